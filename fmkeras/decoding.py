"""Greedy and beam search over a cached one-token-at-a-time step function.

Both are written with `keras.ops` loops, so they trace into one graph (wrap
them in `tf.function(jit_compile=True)` to compile with XLA, or export them).

The step contract: `step(token_ids, index, state) -> (logits, state)` where
`token_ids` is `(n, 1)` (the token at position `index`), `logits` is
`(n, vocabulary)` for position `index + 1`, and `state` is a nested
structure of tensors whose leading dimension is `n` (for example
`Translator.decode_step` with the state of `Translator.initial_state`).
"""

import keras
from keras import ops

NEG_INF = -1e9


def _write_column(tokens, index, column):
    """`tokens[:, index] = column` for `(n, length)` tokens."""
    return ops.slice_update(tokens, [0, index], ops.expand_dims(column, 1))


def greedy_search(step, state, batch_size, max_length, start_id, end_id, padding_id=0):
    """Most likely next token at every step; `(batch, max_length)` ids after the
    start token (padding after the end token)."""
    tokens = ops.full((batch_size, max_length + 1), padding_id, dtype="int32")
    tokens = _write_column(tokens, 0, ops.full((batch_size,), start_id, dtype="int32"))
    finished = ops.zeros((batch_size,), dtype="bool")

    def body(index, tokens, finished, state):
        current = ops.slice(tokens, [0, index], [batch_size, 1])
        logits, state = step(current, index, state)
        chosen = ops.cast(ops.argmax(logits, axis=-1), "int32")
        chosen = ops.where(finished, padding_id, chosen)
        tokens = _write_column(tokens, index + 1, chosen)
        return index + 1, tokens, ops.logical_or(finished, chosen == end_id), state

    def cond(index, tokens, finished, state):
        return ops.logical_and(index < max_length, ops.logical_not(ops.all(finished)))

    _, tokens, _, _ = ops.while_loop(cond, body, (0, tokens, finished, state))
    return tokens[:, 1:]


def _reorder(state, rows):
    """Gathers rows `(n,)` of every tensor in `state`."""
    return keras.tree.map_structure(lambda t: ops.take(t, rows, axis=0), state)


def beam_search(
    step,
    state,
    batch_size,
    max_length,
    start_id,
    end_id,
    beam_width=4,
    length_penalty=0.6,
    padding_id=0,
):
    """Beam search; returns `(ids (batch, max_length), scores (batch,))` of the
    best hypothesis per example.

    Beams are ranked by summed log-probability while searching; finished
    beams only extend with padding at no cost. The final choice divides each
    beam's log-probability by GNMT's length penalty `((5 + length) / 6) **
    length_penalty` (0 disables it).
    """
    width, rows = beam_width, batch_size * beam_width
    state = keras.tree.map_structure(lambda t: ops.repeat(t, width, axis=0), state)
    tokens = ops.full((rows, max_length + 1), padding_id, dtype="int32")
    tokens = _write_column(tokens, 0, ops.full((rows,), start_id, dtype="int32"))
    # Only the first beam of each example is live at the start (the others are copies).
    first = ops.cast(ops.arange(width) == 0, "float32")
    scores = ops.tile(ops.where(first > 0, 0.0, NEG_INF)[None, :], (batch_size, 1))
    finished = ops.zeros((rows,), dtype="bool")
    offsets = ops.repeat(ops.arange(batch_size, dtype="int32") * width, width)  # (rows,)

    def body(index, tokens, scores, finished, state):
        current = ops.slice(tokens, [0, index], [rows, 1])
        logits, state = step(current, index, state)
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)  # (rows, vocabulary)
        vocabulary = ops.shape(log_probs)[-1]
        only_padding = ops.where(ops.arange(vocabulary) == padding_id, 0.0, NEG_INF)
        log_probs = ops.where(finished[:, None], only_padding[None, :], log_probs)
        candidates = ops.reshape(scores, (rows, 1)) + log_probs
        candidates = ops.reshape(candidates, (batch_size, width * vocabulary))
        scores, flat = ops.top_k(candidates, k=width)  # (batch, width)
        beam = ops.cast(flat // vocabulary, "int32")
        chosen = ops.reshape(ops.cast(flat % vocabulary, "int32"), (rows,))
        parents = offsets + ops.reshape(beam, (rows,))
        tokens = _write_column(ops.take(tokens, parents, axis=0), index + 1, chosen)
        finished = ops.logical_or(ops.take(finished, parents, axis=0), chosen == end_id)
        return index + 1, tokens, scores, finished, _reorder(state, parents)

    def cond(index, tokens, scores, finished, state):
        return ops.logical_and(index < max_length, ops.logical_not(ops.all(finished)))

    _, tokens, scores, _, _ = ops.while_loop(cond, body, (0, tokens, scores, finished, state))
    tokens = tokens[:, 1:]
    lengths = ops.sum(ops.cast(tokens != padding_id, "float32"), axis=-1)
    penalty = ops.power((5.0 + lengths) / 6.0, length_penalty)
    normalized = ops.reshape(ops.reshape(scores, (rows,)) / penalty, (batch_size, width))
    best = ops.cast(ops.argmax(normalized, axis=-1), "int32")
    rows_chosen = ops.arange(batch_size, dtype="int32") * width + best
    best_scores = ops.take_along_axis(normalized, best[:, None], axis=1)[:, 0]
    return ops.take(tokens, rows_chosen, axis=0), best_scores
