"""Language-model data: pack text into fixed-length sequences, then mask them
(masked LM) or shift them (causal LM) in tf.data.

Packing runs once: every line is tokenized in-graph, closed with `[SEP]`,
and the token stream is cut into `[CLS] ... [SEP]` sequences of exactly
`sequence_length` ids (a causal LM takes plain windows of
`sequence_length + 1` ids), so no position is padding. Corpora larger
than memory stream instead (`fmkeras.text.corpus`).

The training stream is indexed by a global example counter: example `i` is
sequence `index_shuffle(i mod N, seed=(seed, i div N))` and the masks of a
batch are drawn with a stateless RNG seeded by the batch's first index. So
every pass over the corpus has a fresh order and fresh masks, a run resumed
at step `s` sees exactly the data it would have seen, and workers can take
disjoint slices of each global batch (`shard_index`, `num_shards`).
"""

import numpy as np
import tensorflow as tf


def pack_sequences(lines, tokenizer, sequence_length, batch_size=4096, framed=True):
    """Tokenizes `lines` and packs them into an int32 array `(N, sequence_length)`:
    `[CLS] ... [SEP]` rows, or (not `framed`, for a causal LM) plain windows of
    the token stream, whose lines each end with `[SEP]`."""
    body = sequence_length - 2 if framed else sequence_length  # room for [CLS] and [SEP]
    pieces = []
    for start in range(0, len(lines), batch_size):
        ids = tokenizer.tokenize(tf.constant(lines[start : start + batch_size]))
        separators = tf.fill([ids.nrows(), 1], tokenizer.sep_id)
        pieces.append(tf.concat([ids, separators], axis=1).flat_values.numpy())
    stream = np.concatenate(pieces)
    count = len(stream) // body
    if count == 0:
        raise ValueError(
            f"the text holds {len(stream)} tokens, fewer than one sequence of {sequence_length}"
        )
    body_ids = stream[: count * body].reshape(count, body)
    if not framed:
        return body_ids.astype(np.int32)
    cls = np.full((count, 1), tokenizer.cls_id, np.int32)
    sep = np.full((count, 1), tokenizer.sep_id, np.int32)
    return np.concatenate([cls, body_ids, sep], axis=1).astype(np.int32)


def mask_tokens(
    token_ids,
    seed,
    max_predictions,
    mask_id,
    vocabulary_size,
    special_ids,
    mask_token_rate=0.8,
    random_token_rate=0.1,
    row_offset=0,
    total_rows=None,
):
    """BERT masking of a batch: `max_predictions` positions per sequence,
    chosen uniformly among non-special tokens; of those 80 % become `[MASK]`,
    10 % a random id and 10 % stay (with the default rates).

    Args:
        token_ids: int32 `(batch, seq)`.
        seed: int `(2,)` stateless seed.
        row_offset, total_rows: `token_ids` are rows `[row_offset, row_offset
            + batch)` of a global batch of `total_rows`; the random draws are
            those of the global batch, so a batch masks the same way however
            many workers share it.

    Returns: `(masked_ids, mask_positions, mask_ids, mask_weights)`; weights
    are 0 where a sequence had fewer candidates than `max_predictions`.
    """
    seeds = tf.random.experimental.stateless_split(seed, 3)
    shape = tf.shape(token_ids)  # the batch may be a validation pass's last, shorter one
    rows = slice(row_offset, row_offset + shape[0])

    def draw(columns, seed, **kwargs):  # this shard's rows of the global batch's draws
        global_shape = [total_rows or shape[0], columns]
        return tf.random.stateless_uniform(global_shape, seed, **kwargs)[rows]

    candidate = tf.reduce_all(token_ids[..., None] != tf.constant(special_ids, tf.int32), axis=-1)
    scores = tf.where(candidate, draw(shape[1], seeds[0]), -1.0)
    _, positions = tf.math.top_k(scores, k=max_predictions)
    positions = tf.sort(positions, axis=-1)  # (batch, predictions)
    weights = tf.cast(tf.gather(candidate, positions, batch_dims=1), tf.float32)
    original = tf.gather(token_ids, positions, batch_dims=1)

    choice = draw(max_predictions, seeds[1])
    random_ids = draw(max_predictions, seeds[2], minval=0, maxval=vocabulary_size, dtype=tf.int32)
    replacement = tf.where(
        choice < mask_token_rate,
        mask_id,
        tf.where(choice < mask_token_rate + random_token_rate, random_ids, original),
    )
    replacement = tf.where(weights > 0, replacement, original)
    row_ids = tf.broadcast_to(tf.range(shape[0])[:, None], tf.shape(positions))
    masked = tf.tensor_scatter_nd_update(
        token_ids, tf.stack([row_ids, positions], axis=-1), replacement
    )
    return masked, positions, original, weights


def next_sentence_pairs(token_ids, table, positions, seed, cls_id, sep_id, row_offset=0,
                        total_rows=None):  # fmt: skip
    """BERT's next-sentence examples from packed `[CLS] body [SEP]` rows.

    Each row is cut at a random point into `[CLS] a [SEP] b [SEP]` (the
    same length): `a` is the row's first pieces and `b`, half of the time,
    the pieces that really follow them (label 1, "is next"); otherwise the
    pieces at the same place in a row a quarter to three quarters of the
    corpus away, so almost always another book (label 0). Draws are those
    of the global batch (as in `mask_tokens`), so resuming and sharding see
    the same examples.

    Args:
        token_ids: int32 `(batch, seq)`, rows of `table` at `positions`.
        table: int32 `(N, seq)`, every packed row.
        positions: int64 `(batch,)`, the rows' indices in `table`.
        seed: int `(2,)` stateless seed.

    Returns: `(token_ids, segment_ids, is_next)`.
    """
    batch, length = tf.shape(token_ids)[0], token_ids.shape[1]  # batch: maybe a last, short one
    table = tf.convert_to_tensor(table, tf.int32)
    total = total_rows or batch
    rows = slice(row_offset, row_offset + batch)
    seeds = tf.random.experimental.stateless_split(seed, 3)
    count = tf.shape(table, out_type=tf.int64)[0]
    is_next = tf.random.stateless_uniform([total], seeds[0])[rows] < 0.5
    # `a` has 1 .. length - 4 pieces, so `b` has at least one.
    split = tf.random.stateless_uniform([total], seeds[1], minval=1, maxval=length - 3,
                                        dtype=tf.int32)[rows]  # fmt: skip
    near = tf.maximum(count // 4, 1)
    far = tf.maximum(count - count // 4, near + 1)
    offset = tf.random.stateless_uniform([total], seeds[2], minval=near, maxval=far,
                                         dtype=tf.int64)[rows]  # fmt: skip
    other = tf.gather(table, (positions + offset) % count)
    source = tf.where(is_next[:, None], token_ids, other)
    previous = tf.concat([source[:, :1], source[:, :-1]], axis=1)  # previous[p] = source[p - 1]
    p, k = tf.range(length)[None, :], split[:, None]  # (1, seq), (batch, 1)
    ids = tf.where(p == 0, cls_id, tf.where(p <= k, token_ids, tf.where(
        p == k + 1, sep_id, tf.where(p < length - 1, previous, sep_id))))  # fmt: skip
    segments = tf.cast(p > k + 1, tf.int32)  # (batch, seq): 0 for [CLS] a [SEP], 1 for b [SEP]
    return ids, segments, tf.cast(is_next, tf.int32)


def mlm_dataset(
    sequences,
    tokenizer,
    batch_size,
    max_predictions,
    seed=0,
    start_step=0,
    shuffle=True,
    repeat=True,
    shard_index=0,
    num_shards=1,
    next_sentence=False,
):
    """A tf.data pipeline of `(inputs, mask_ids, mask_weights)` MLM batches;
    with `next_sentence`, `(inputs, {"mlm": mask_ids, "nsp": is_next},
    {"mlm": mask_weights, "nsp": 1})` on `next_sentence_pairs`.

    Args:
        sequences: int32 `(N, seq)` from `pack_sequences`, or a
            `fmkeras.text.corpus.ShardedCorpus` (streamed; no NSP).
        tokenizer: the `WordPieceTokenizer` that made them (special ids).
        batch_size: global batch size.
        max_predictions: masked positions per sequence.
        seed: int; order and masks are a pure function of it.
        start_step: first global step (resuming skips in O(1)).
        shuffle: reshuffle every pass (False: file order, for validation).
        repeat: endless stream of whole batches; else one pass over every
            sequence, whose last batch holds the rows that remain.
        shard_index, num_shards: this worker's slice of every global batch.
        next_sentence: bool. Next-sentence pairs with segment ids (`mlm_nsp`).
    """
    rows = row_batches(sequences, batch_size, seed, start_step, shuffle, repeat, shard_index,
                       num_shards)  # fmt: skip
    local_batch = batch_size // num_shards
    special_ids = tokenizer.special_ids

    def make_batch(first, position, token_ids):
        segment_ids = tf.zeros_like(token_ids)
        if next_sentence:
            token_ids, segment_ids, is_next = next_sentence_pairs(
                token_ids, sequences, position, tf.stack([tf.cast(seed, tf.int64) + 1, first]),
                tokenizer.cls_id, tokenizer.sep_id, row_offset=shard_index * local_batch,
                total_rows=batch_size,
            )  # fmt: skip
        masked, positions, mask_ids, weights = mask_tokens(
            token_ids,
            tf.stack([tf.cast(seed, tf.int64), first]),
            max_predictions,
            tokenizer.mask_id,
            tokenizer.vocabulary_size,
            special_ids,
            row_offset=shard_index * local_batch,
            total_rows=batch_size,
        )
        inputs = {
            "token_ids": masked,
            "segment_ids": segment_ids,
            "padding_mask": tf.ones_like(masked),
            "mask_positions": positions,
        }
        if next_sentence:
            ones = tf.ones_like(is_next, tf.float32)
            return inputs, {"mlm": mask_ids, "nsp": is_next}, {"mlm": weights, "nsp": ones}
        return inputs, mask_ids, weights

    return finish(rows.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE))


def causal_lm_dataset(sequences, batch_size, seed=0, start_step=0, shuffle=True, repeat=True,
                      shard_index=0, num_shards=1):  # fmt: skip
    """`({"token_ids", "padding_mask"}, next_ids)` batches for a causal LM:
    rows of `sequence_length + 1` ids (`pack_sequences(..., framed=False)` or
    a `ShardedCorpus`) split into inputs (all but the last id) and labels
    (all but the first). Other arguments as in `mlm_dataset`."""
    rows = row_batches(sequences, batch_size, seed, start_step, shuffle, repeat, shard_index,
                       num_shards)  # fmt: skip

    def shift(first, position, token_ids):
        inputs = token_ids[:, :-1]  # (batch, seq)
        return {"token_ids": inputs, "padding_mask": tf.ones_like(inputs)}, token_ids[:, 1:]

    return finish(rows.map(shift, num_parallel_calls=tf.data.AUTOTUNE))


def finish(dataset):
    """Prefetching, and the sharding policy of every language-model stream:
    under multi-worker training every worker builds each global batch and keeps
    its own slice (DATA; OFF would hand both workers the same slices,
    tests/test_distribute.py)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def row_batches(sequences, batch_size, seed=0, start_step=0, shuffle=True, repeat=True,
                shard_index=0, num_shards=1):  # fmt: skip
    """`(first, positions, token_ids)` for every global step from `start_step`:
    the global index of the batch's first example, and this shard's rows
    `(batch_size / num_shards, seq)` with their indices in `sequences` (-1
    when streamed). In memory, example `i` is row `index_shuffle(i mod N,
    seed=(seed, i div N))` (module docstring); a `ShardedCorpus` streams its
    own order. Without `repeat`, one pass over the N rows: the last batch
    holds the N mod `batch_size` that remain (weighted by its rows in Keras's
    mean loss, as every task's validation is). Arguments as in `mlm_dataset`."""
    if batch_size % num_shards:
        raise ValueError(f"batch_size={batch_size} does not split into {num_shards} shards")
    local_batch = batch_size // num_shards
    if not isinstance(sequences, np.ndarray):  # a ShardedCorpus
        return sequences.batches(batch_size, seed, start_step, shard_index, num_shards)
    count = len(sequences)
    if count < batch_size and repeat:
        raise ValueError(f"only {count} sequences, fewer than one batch of {batch_size}")
    table = tf.constant(sequences, tf.int32)

    def rows(step):
        first = step * batch_size  # global index of the batch's first example
        indices = first + shard_index * local_batch + tf.range(local_batch, dtype=tf.int64)
        if not repeat:  # one pass: the last batch stops at the last row
            indices = indices[: tf.maximum(count - indices[0], 0)]
        passes, position = indices // count, indices % count
        if shuffle:
            seeds = tf.stack(  # (local_batch, 3): one permutation per pass over the corpus
                [tf.fill(tf.shape(passes), tf.cast(seed, tf.int64)), passes, tf.zeros_like(passes)],
                axis=-1,
            )
            # The raw op: the Python wrapper mis-pads batched seeds (TF 2.20).
            position = tf.raw_ops.RandomIndexShuffle(
                index=position, seed=seeds, max_index=tf.constant(count - 1, tf.int64)
            )
        return first, position, tf.gather(table, position)  # (local_batch, seq)

    if repeat:
        steps = tf.data.Dataset.counter(start_step)
    else:
        steps = tf.data.Dataset.range(start_step, -(-count // batch_size))  # ceil
    return steps.map(rows, num_parallel_calls=tf.data.AUTOTUNE)
