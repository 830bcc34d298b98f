"""Corpora larger than memory: text shards streamed as packed rows.

A corpus is a list of UTF-8 text files (a glob such as
`books/*.txt`). Nothing is held in memory but a window of rows: each
shard is read line by line (`tf.data.TextLineDataset`), tokenized in the
input pipeline, closed with `[SEP]` per line and packed into rows as
`pack_sequences` packs a file (a shard's last partial row is dropped).

Order, a pure function of the seed: pass `p` over the corpus reads the
shards in the order `index_shuffle(seed=(seed, p))`, and shuffles the row
stream in windows of `window` rows, each with its own stateless seed. A run
resumed at step `s` therefore starts reading at the shard that holds its
window, skips to the row, and sees exactly the batches it would have seen.
That needs each shard's row count, which the first resume counts (streaming
too) and keeps in an index file; a run from step 0 starts at once.

Workers (input pipelines) read disjoint shards: pipeline `k` of `n` reads
shards `k, k + n, ...` and makes its slice of every global batch.
"""

import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from fmkeras.errors import DataError

WINDOW_ROWS = 4096  # rows shuffled together (about 2 MB of ids at 128 tokens)
LINES_PER_CHUNK = 256  # lines tokenized together


def expand_shards(pattern):
    """The sorted files an absolute glob names; `DataError` when none."""
    paths = sorted(Path(path) for path in glob.glob(str(pattern)) if Path(path).is_file())
    if not paths:
        raise DataError(f"no file matches {pattern}")
    return paths


class ShardedCorpus:
    """Text shards streamed as packed rows of token ids (module docstring).

    Args:
        paths: the shard files.
        tokenizer: a `WordPieceTokenizer`.
        row_length: ids per row.
        framed: `[CLS] ... [SEP]` rows (masked LM) or plain windows of the
            token stream (causal LM, rows of `sequence_length + 1`).
        max_lines: read only the first lines of each shard.
        window: rows shuffled together.
        index_path: where the row counts are kept between runs.
        log: a print function.
    """

    def __init__(self, paths, tokenizer, row_length, framed=True, max_lines=None,
                 window=WINDOW_ROWS, index_path=None, log=print):  # fmt: skip
        self.paths = [str(path) for path in paths]
        self.tokenizer = tokenizer
        self.row_length = row_length
        self.framed = framed
        self.max_lines = max_lines
        self.window = window
        self.index_path = index_path
        self.log = log
        self._counts = None

    @property
    def counts(self):
        """Rows per shard (counted on first use)."""
        if self._counts is None:
            self._counts = self.count_rows()
        return self._counts

    def __len__(self):
        return int(sum(self.counts))

    # === Reading one shard ===

    def shard_rows(self, path):
        """A dataset of row batches `(k, row_length)` of one shard, in file order."""
        lines = tf.data.TextLineDataset(path)
        if self.max_lines is not None:
            lines = lines.take(self.max_lines)
        # Bad UTF-8 bytes become U+FFFD, which the tokenizer's clean-up removes.
        lines = lines.map(lambda line: tf.strings.strip(tf.strings.unicode_transcode(
            line, "UTF-8", "UTF-8", errors="replace")))  # fmt: skip
        lines = lines.filter(lambda line: tf.strings.length(line) > 0)
        body = self.row_length - 2 if self.framed else self.row_length
        tokenizer = self.tokenizer

        def line_ids(chunk):  # (lines,) -> the chunk's ids, each line closed with [SEP]
            ids = tokenizer.tokenize(chunk)
            separators = tf.fill([ids.nrows(), 1], tf.constant(tokenizer.sep_id, ids.dtype))
            return tf.cast(tf.concat([ids, separators], axis=1).flat_values, tf.int32)

        def pack(leftover, ids):  # carry the ids that do not fill a row to the next chunk
            stream = tf.concat([leftover, ids], axis=0)
            count = tf.size(stream) // body
            rows = tf.reshape(stream[: count * body], [count, body])
            return stream[count * body :], rows

        rows = lines.batch(LINES_PER_CHUNK).map(line_ids)
        rows = rows.scan(tf.zeros([0], tf.int32), pack)
        if self.framed:
            cls, sep = tokenizer.cls_id, tokenizer.sep_id
            rows = rows.map(lambda body_ids: tf.pad(
                tf.pad(body_ids, [[0, 0], [1, 0]], constant_values=cls),
                [[0, 0], [0, 1]], constant_values=sep))  # fmt: skip
        return rows

    def count_rows(self):
        """Rows per shard: from the index file when it describes these shards
        and settings, else counted (in parallel) and written there."""
        key = self.signature()
        if self.index_path and Path(self.index_path).is_file():
            index = json.loads(Path(self.index_path).read_text())
            if index.get("signature") == key:
                return index["rows"]
        self.log(f"corpus: counting the rows of {len(self.paths)} shard(s) (once per corpus)")

        def count(path):  # one traced function for every shard: memory does not grow with them
            return self.shard_rows(path).reduce(
                tf.constant(0, tf.int64),
                lambda total, rows: total + tf.cast(tf.shape(rows)[0], tf.int64))  # fmt: skip

        shards = tf.data.Dataset.from_tensor_slices(self.paths)
        counted = shards.map(count, num_parallel_calls=os.cpu_count() or 1, deterministic=True)
        counts = [int(rows) for rows in counted.as_numpy_iterator()]
        if self.index_path:
            Path(self.index_path).write_text(json.dumps({"signature": key, "rows": counts}))
        return counts

    def signature(self):
        """What the row counts depend on: the files (path, size, modification
        time), the vocabulary and the packing settings."""
        files = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in self.paths]
        vocabulary = hashlib.sha256("\n".join(self.tokenizer.vocabulary).encode()).hexdigest()
        settings = [self.row_length, self.framed, self.max_lines, self.tokenizer.lowercase]
        return hashlib.sha256(json.dumps([files, vocabulary, settings]).encode()).hexdigest()

    # === The training stream ===

    def shard_order(self, mine, seed, pass_index):
        """Ranks of the pipeline's shards `mine` read in pass `pass_index` (a tensor)."""
        count = len(mine)
        seeds = tf.stack([tf.cast(seed, tf.int64), tf.cast(pass_index, tf.int64),
                          tf.constant(1, tf.int64)])  # fmt: skip
        return tf.raw_ops.RandomIndexShuffle(index=tf.range(count, dtype=tf.int64), seed=seeds,
                                             max_index=tf.constant(count - 1, tf.int64))

    def pass_rows(self, mine, seed, pass_index, first_rank=0, skip_rows=0, first_window=0):
        """Rows `(row_length,)` of one pass over the shards `mine`, shuffled in
        windows; from the shard ranked `first_rank`, after `skip_rows` of its
        rows, with windows numbered from `first_window`."""
        order = self.shard_order(mine, seed, pass_index)[first_rank:]
        paths = tf.gather(tf.constant(mine), order)
        rows = tf.data.Dataset.from_tensor_slices(paths).flat_map(self.shard_rows).unbatch()
        windows = rows.skip(skip_rows).batch(self.window).enumerate(first_window)

        def shuffle(window_index, window):
            seeds = tf.random.experimental.stateless_fold_in(
                tf.stack([tf.cast(seed, tf.int64), tf.cast(pass_index, tf.int64)]), window_index
            )
            return tf.random.experimental.stateless_shuffle(window, seeds)

        return windows.map(shuffle).unbatch()

    def batches(self, batch_size, seed=0, start_step=0, shard_index=0, num_shards=1):
        """`(first, positions, token_ids)` per global step from `start_step`, as
        `fmkeras.text.mlm.row_batches` gives them (positions are -1): this
        pipeline's rows `(batch_size / num_shards, row_length)`, read from its
        own shards."""
        local_batch = batch_size // num_shards
        mine = self.paths[shard_index::num_shards]
        if not mine:
            raise ValueError(f"{len(self.paths)} shard(s) cannot feed {num_shards} pipelines")
        if start_step == 0:  # no row counts needed
            pass_index = offset = window_start = 0
            first_pass = self.pass_rows(mine, seed, 0)
            rows = int(first_pass.take(local_batch).reduce(0, lambda count, _: count + 1))
        else:  # where step `start_step` starts: pass, window, shard and row within it
            counts = self.counts[shard_index::num_shards]
            rows = int(sum(counts))
            pass_index, offset = divmod(start_step * local_batch, max(rows, 1))
            first_window = offset // self.window
            window_start = first_window * self.window
            order = self.shard_order(mine, seed, pass_index).numpy()
            before = np.cumsum([0] + [counts[rank] for rank in order])  # rows before each rank
            first_rank = int(np.searchsorted(before, window_start, side="right") - 1)
            skip = window_start - int(before[first_rank])  # rows of that shard before the window
            first_pass = self.pass_rows(mine, seed, pass_index, first_rank, skip, first_window)
        if rows < local_batch:
            raise ValueError(f"only {rows} sequences, fewer than one batch of {local_batch}")
        later = tf.data.Dataset.counter(pass_index + 1).flat_map(
            lambda index: self.pass_rows(mine, seed, index))  # fmt: skip
        stream = first_pass.skip(offset - window_start).concatenate(later)
        stream = stream.batch(local_batch, drop_remainder=True).enumerate(start_step)

        def label(step, token_ids):
            first = step * batch_size
            return first, tf.fill([local_batch], tf.constant(-1, tf.int64)), token_ids

        return stream.map(label)
