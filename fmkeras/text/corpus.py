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
That needs the row counts of the shards read before the step: within the
first pass only those are counted (streaming too), beyond it every shard;
counts are kept in an index file. A run from step 0 starts at once.

Workers (input pipelines) read disjoint shards: pipeline `k` of `n` reads
shards `k, k + n, ...` and makes its slice of every global batch.
"""

import glob
import hashlib
import json
import os
from pathlib import Path

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
        self._known = None  # shard key -> rows, from the index file and counting
        self._count_one = tf.function(self.count_shard,
                                      input_signature=[tf.TensorSpec([], tf.string)])  # fmt: skip

    @property
    def counts(self):
        """Rows per shard (every shard not counted yet is counted, in parallel)."""
        missing = [path for path in self.paths if self.shard_key(path) not in self.known]
        if missing:
            self.log(f"corpus: counting the rows of {len(missing)} shard(s) (once per corpus)")
            shards = tf.data.Dataset.from_tensor_slices(missing)
            counted = shards.map(self.count_shard, num_parallel_calls=os.cpu_count() or 1,
                                 deterministic=True)  # fmt: skip
            for path, rows in zip(missing, counted.as_numpy_iterator(), strict=True):
                self.known[self.shard_key(path)] = int(rows)
            self.save_index()
        return [self.known[self.shard_key(path)] for path in self.paths]

    def rows_in(self, path):
        """Rows of one shard (counted if not known yet)."""
        key = self.shard_key(path)
        if key not in self.known:
            self.known[key] = int(self._count_one(tf.constant(path)))
            self.save_index()
        return self.known[key]

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

    def count_shard(self, path):
        """Rows of the shard at `path` (a string tensor; one traced function
        serves every shard, so memory does not grow with their number)."""
        return self.shard_rows(path).reduce(
            tf.constant(0, tf.int64),
            lambda total, rows: total + tf.cast(tf.shape(rows)[0], tf.int64))  # fmt: skip

    @property
    def known(self):
        """Row counts by shard key, read from the index file when its packing
        settings are these."""
        if self._known is None:
            self._known = {}
            if self.index_path and Path(self.index_path).is_file():
                index = json.loads(Path(self.index_path).read_text())
                if index.get("settings") == self.settings_key():
                    self._known = dict(index["rows"])
        return self._known

    def save_index(self):
        if self.index_path:
            index = {"settings": self.settings_key(), "rows": self.known}
            Path(self.index_path).write_text(json.dumps(index, indent=1))

    def shard_key(self, path):
        """A shard's identity for its row count: path, size and modification time."""
        stat = os.stat(path)
        return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"

    def settings_key(self):
        """What the counts depend on besides the files: vocabulary and packing."""
        vocabulary = hashlib.sha256("\n".join(self.tokenizer.vocabulary).encode()).hexdigest()
        settings = [vocabulary, self.row_length, self.framed, self.max_lines,
                    self.tokenizer.lowercase]  # fmt: skip
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()

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

    def locate(self, mine, seed, position):
        """`(pass, offset, rows)`: where row `position` of the stream over the
        shards `mine` lies, and the rows counted to know it (all of a pass, or
        enough of pass 0). Within the first pass only the shards read before
        the position are counted, so resuming early in a huge corpus is cheap."""
        order = self.shard_order(mine, seed, 0).numpy()
        total = 0
        for rank in order:
            total += self.rows_in(mine[rank])
            if total > position:
                return 0, position, total
        if total == 0:
            return 0, 0, 0
        pass_index, offset = divmod(position, total)
        return pass_index, offset, total

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
            pass_index, offset, rows = self.locate(mine, seed, start_step * local_batch)
            first_window = offset // self.window
            window_start = first_window * self.window
            first_rank, before = 0, 0  # rows of the shards read before `first_rank` this pass
            order = self.shard_order(mine, seed, pass_index).numpy()
            while before + self.rows_in(mine[order[first_rank]]) <= window_start:
                before += self.rows_in(mine[order[first_rank]])
                first_rank += 1
            first_pass = self.pass_rows(mine, seed, pass_index, first_rank,
                                        window_start - before, first_window)  # fmt: skip
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
