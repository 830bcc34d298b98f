"""Greedy, beam and sampling search over a cached one-token-at-a-time step
function.

They are written with `keras.ops` loops, so they trace into one graph (wrap
them in `tf.function(jit_compile=True)` to compile with XLA, or export them).
Sampling draws with TensorFlow's stateless RNG, seeded by `(seed, position)`
(`keras.random` takes no tensor seeds), so a seed reproduces a generation
in eager, graph, XLA and exported runs alike.

The step contract: `step(token_ids, index, state) -> (logits, state)` where
`token_ids` is `(n, 1)` (the token at position `index`), `logits` is
`(n, vocabulary)` for position `index + 1`, and `state` is a nested
structure of tensors whose leading dimension is `n` (for example
`Translator.decode_step` with the state of `Translator.initial_state`).
"""

import keras
import tensorflow as tf
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


def _candidates(logits, top_k, top_p):
    """`(values, indices)` `(n, k)` of the tokens that may be drawn: the `top_k`
    likeliest (every token when `top_k` is 0), then, within their renormalized
    distribution, the nucleus of mass `top_p` (as Hugging Face's top-k then
    top-p warpers); the rest get `NEG_INF`. The likeliest token always stays."""
    vocabulary = logits.shape[-1]
    if isinstance(top_k, int):  # a constant k, as XLA needs
        k = min(top_k, vocabulary) if top_k > 0 else vocabulary
    else:
        k = ops.where(top_k > 0, ops.minimum(top_k, vocabulary), vocabulary)
    values, indices = tf.math.top_k(logits, k)  # descending
    probabilities = tf.nn.softmax(values, axis=-1)  # (keras warns about k = 1, a valid choice)
    before = ops.cumsum(probabilities, axis=-1) - probabilities  # mass of the better tokens
    return ops.where(before < top_p, values, NEG_INF), indices


def _is_filtered(top_k, top_p):
    return ops.logical_or(ops.convert_to_tensor(top_k) > 0, ops.convert_to_tensor(top_p) < 1.0)


def filter_logits(logits, top_k=0, top_p=1.0):
    """`logits` `(n, vocabulary)` with every token that `sample` cannot draw
    set to `NEG_INF`: outside the `top_k` most likely, or outside the nucleus
    of mass `top_p` of their renormalized distribution. `top_k` 0 and
    `top_p` 1 disable them."""
    logits = ops.cast(logits, "float32")

    def filtered():
        values, _ = _candidates(logits, top_k, top_p)
        floor = ops.min(ops.where(values > NEG_INF, values, -NEG_INF), axis=-1)  # (n,)
        return ops.where(logits >= floor[:, None], logits, NEG_INF)

    return ops.cond(_is_filtered(top_k, top_p), filtered, lambda: logits)


def sample(logits, index, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    """Next tokens `(n,)` int32 from `logits` `(n, vocabulary)`: the most
    likely at temperature 0, else drawn from `softmax(logits / temperature)`
    restricted as `filter_logits` says, with Gumbel noise seeded by `(seed,
    index)`. With top-k, only the `k` candidates are sorted and get noise."""
    logits = ops.cast(logits, "float32")
    temperature = ops.convert_to_tensor(temperature, "float32")
    seeds = ops.stack([ops.cast(seed, "int64"), ops.cast(index, "int64")])

    def gumbel_argmax(values):  # (n,) the index drawn from softmax(values)
        uniform = tf.random.stateless_uniform(ops.shape(values), seeds, minval=1e-20, maxval=1.0)
        return ops.cast(ops.argmax(values - ops.log(-ops.log(uniform)), axis=-1), "int32")

    def among_candidates():
        values, indices = _candidates(logits / temperature, top_k, top_p)
        chosen = gumbel_argmax(values)
        return ops.take_along_axis(indices, chosen[:, None], axis=1)[:, 0]

    def drawn():
        return ops.cond(_is_filtered(top_k, top_p), among_candidates,
                        lambda: gumbel_argmax(logits / temperature))  # fmt: skip

    greedy = lambda: ops.cast(ops.argmax(logits, axis=-1), "int32")  # noqa: E731
    return ops.cond(temperature > 0, drawn, greedy)


def sample_search(step, state, logits, tokens, prompt_lengths, start, max_new_tokens, end_id,
                  choose, padding_id=0):  # fmt: skip
    """Continues right-padded prompts one token at a time.

    Args:
        step: the step function (module docstring).
        state: its state with the prompts' positions before `start` cached.
        logits: `(batch, vocabulary)` logits for position `start`.
        tokens: int32 `(batch, total)`: each prompt, then padding.
        prompt_lengths: int32 `(batch,)`, each at least `start`.
        start: the shortest prompt's length.
        max_new_tokens: tokens to add after each prompt (fewer when a row
            emits `end_id` or reaches `total`).
        end_id: int. Ends a row (it is kept; padding follows).
        choose: `(logits, index) -> (batch,)` ids, e.g. `sample` with settings.

    Returns `(tokens, lengths)`: every row's prompt and continuation, padded
    with `padding_id`, and the length of each.
    """
    total = ops.shape(tokens)[1]
    limits = ops.minimum(prompt_lengths + max_new_tokens, total)  # (batch,)
    finished = limits <= start
    lengths = ops.minimum(prompt_lengths, limits)

    def body(index, tokens, lengths, logits, finished, state):
        current = ops.take(tokens, index, axis=1)  # (batch,) prompt token or padding
        in_prompt = index < prompt_lengths
        chosen = ops.where(in_prompt, current, choose(logits, index))
        chosen = ops.where(finished, padding_id, chosen)
        tokens = _write_column(tokens, index, chosen)
        lengths = ops.where(finished, lengths, index + 1)
        ended = ops.logical_and(ops.logical_not(in_prompt), chosen == end_id)
        finished = ops.logical_or(finished, ops.logical_or(ended, index + 1 >= limits))
        logits, state = step(ops.expand_dims(chosen, 1), index, state)
        return index + 1, tokens, lengths, logits, finished, state

    def cond(index, tokens, lengths, logits, finished, state):
        return ops.logical_and(index < total, ops.logical_not(ops.all(finished)))

    loop = (start, tokens, lengths, logits, finished, state)
    _, tokens, lengths, _, _, _ = ops.while_loop(cond, body, loop)
    return tokens, lengths
