"""Attributions over input embeddings: integrated gradients (Sundararajan et
al., 2017) with a choice of integration rule, gradient × input, and attention
rollout (Abnar & Zuidema, 2020).

The model side is a `score(vectors, batch)` function: token embeddings
`(rows, seq, hidden)` plus a dict of per-row inputs (segment ids, padding,
which output to explain) -> one float per row. Rows are independent, so one
gradient of the summed scores gives every row's gradient, and the
interpolation steps of many examples share one batch.
"""

import numpy as np
import tensorflow as tf

from fmkeras.errors import ConfigError
from fmkeras.explain.choices import RULES


def integration_points(steps, rule="gausslegendre"):
    """`(alphas, weights)` with `∫₀¹ g(α) dα ≈ Σ weights · g(alphas)`.

    Rules as in Captum: Gauss-Legendre (exact for polynomials of degree
    `2·steps − 1`, the default) or a Riemann sum (left, right, middle,
    trapezoid).
    """
    if steps < 1 or (rule == "riemann_trapezoid" and steps < 2):
        raise ConfigError(f"--steps {steps} is too few for the {rule} rule")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2  # from [-1, 1] to [0, 1]
    if rule == "riemann_trapezoid":
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, steps), weights
    offsets = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}
    if rule not in offsets:
        raise ConfigError(f"--rule {rule!r} is not one of {', '.join(RULES)}")
    return (np.arange(steps) + offsets[rule]) / steps, np.full(steps, 1.0 / steps)


def completeness_error(attributions, score, baseline_score):
    """|Σ attributions − (F(x) − F(baseline))| ÷ |F(x) − F(baseline)|."""
    change = score - baseline_score
    return abs(float(np.sum(attributions)) - change) / max(abs(change), 1e-12)


def stack_items(items, pad_values):
    """Per-example dicts -> one dict of arrays: 1-D or 2-D arrays padded along
    their first axis to the longest (with `pad_values[key]`, else 0), scalars
    stacked."""
    batch = {}
    for key in items[0]:
        values = [np.asarray(item[key]) for item in items]
        if values[0].ndim == 0:
            batch[key] = np.stack(values)
            continue
        length = max(len(value) for value in values)
        padded = np.full(
            (len(values), length, *values[0].shape[1:]), pad_values.get(key, 0), values[0].dtype
        )
        for row, value in enumerate(values):
            padded[row, : len(value)] = value
        batch[key] = padded
    return batch


def repeat_rows(batch, times):
    """Each row of every array `times` times in a row (one per interpolation step)."""
    return {key: tf.constant(np.repeat(value, times, axis=0)) for key, value in batch.items()}


def attention_rollout(attention):
    """Attention rollout: `attention` is a list of per-layer probabilities
    `(heads, seq, seq)`; each layer is averaged over heads, mixed half and
    half with the identity (the residual) and renormalized, and the layers
    are multiplied in order. Returns `(seq, seq)`: row i says how much each
    input token flows into position i at the top."""
    rollout = None
    for layer in attention:
        mixed = 0.5 * np.asarray(layer, np.float64).mean(0) + 0.5 * np.eye(layer.shape[-1])
        mixed /= mixed.sum(-1, keepdims=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


class Attributor:
    """Integrated gradients and gradient × input for a `score` function.

    Items are dicts of one example's arrays: `vectors` and `baseline` (its
    token embeddings and the baseline's, `(seq, hidden)`) and whatever
    `score` reads from the batch (`segment_ids`, `padding_mask`, `target`,
    ...). Examples are padded per call with `pad_values`.

    Args:
        score: `score(vectors, batch) -> (rows,)`, traceable by `tf.function`.
        pad_values: dict. Padding value per batch key (default 0).
        rows_per_call: int. Rows (examples × steps) per gradient call.
    """

    def __init__(self, score, pad_values=None, rows_per_call=256):
        self.score = score
        self.pad_values = pad_values or {}
        self.rows_per_call = rows_per_call
        self._scores = tf.function(score, reduce_retracing=True)
        self._gradients = tf.function(self._scores_and_gradients, reduce_retracing=True)

    def _scores_and_gradients(self, vectors, batch):
        with tf.GradientTape() as tape:
            tape.watch(vectors)
            scores = self.score(vectors, batch)  # (rows,)
        return scores, tape.gradient(scores, vectors)  # rows are independent

    def _inputs(self, items):
        batch = stack_items(
            [{k: v for k, v in item.items() if k != "baseline"} for item in items], self.pad_values
        )
        baseline = stack_items([{"vectors": item["baseline"]} for item in items], {})["vectors"]
        return batch.pop("vectors"), baseline, batch

    def scores(self, items):
        """F(x) per item (a `baseline` is not needed); order kept, rows batched."""
        scores = []
        for start in range(0, len(items), self.rows_per_call):
            chunk = items[start : start + self.rows_per_call]
            batch = stack_items([{k: v for k, v in item.items() if k != "baseline"}
                                 for item in chunk], self.pad_values)  # fmt: skip
            vectors = tf.constant(batch.pop("vectors"), tf.float32)
            scores.append(self._scores(vectors, repeat_rows(batch, 1)).numpy())
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)

    def integrated_gradients(self, items, steps=50, rule="gausslegendre", tolerance=0.0,
                             max_steps=800):  # fmt: skip
        """Per item: `(attributions (seq,), F(x), F(baseline), steps)`; the
        attributions are summed over the hidden axis and, up to the
        integration error, add up to `F(x) − F(baseline)`. Items whose
        `completeness_error` exceeds `tolerance` (0: never) are integrated
        again with 4× the steps, up to `max_steps`."""
        results = [(*result, steps) for result in self._integrate(items, steps, rule)]
        while tolerance > 0 and steps * 4 <= max_steps:
            redo = [i for i, result in enumerate(results)
                    if completeness_error(*result[:3]) > tolerance]  # fmt: skip
            if not redo:
                break
            steps *= 4
            for i, result in zip(redo, self._integrate([items[i] for i in redo], steps, rule),
                                 strict=True):  # fmt: skip
                results[i] = (*result, steps)
        return results

    def _integrate(self, items, steps, rule):
        alphas, weights = integration_points(steps, rule)
        per_call = max(1, self.rows_per_call // steps)
        results = []
        for start in range(0, len(items), per_call):
            chunk = items[start : start + per_call]
            vectors, baseline, batch = self._inputs(chunk)
            difference = vectors - baseline  # (examples, seq, hidden)
            scaled = alphas.astype(np.float32)[None, :, None, None] * difference[:, None]
            path = baseline[:, None] + scaled  # (examples, steps, seq, hidden)
            path = path.reshape(-1, *vectors.shape[1:])  # (examples * steps, seq, hidden)
            _, gradients = self._gradients(tf.constant(path, tf.float32), repeat_rows(batch, steps))
            gradients = gradients.numpy().reshape(len(chunk), steps, *vectors.shape[1:])
            averaged = np.einsum("s,esth->eth", weights, gradients)
            attributions = (averaged * difference).sum(-1)  # (examples, seq)
            ends = tf.constant(np.concatenate([vectors, baseline]), tf.float32)
            doubled = {key: tf.constant(np.concatenate([v, v])) for key, v in batch.items()}
            end_scores = self._scores(ends, doubled).numpy()  # F(x) rows, then F(baseline) rows
            for row, item in enumerate(chunk):
                length = len(item["vectors"])
                scores = float(end_scores[row]), float(end_scores[len(chunk) + row])
                results.append((attributions[row, :length], *scores))
        return results

    def gradient_times_input(self, items):
        """Per item: `∂F/∂x · (x − baseline)` summed over the hidden axis, `(seq,)`."""
        products = []
        for start in range(0, len(items), self.rows_per_call):
            chunk = items[start : start + self.rows_per_call]
            vectors, baseline, batch = self._inputs(chunk)
            _, gradients = self._gradients(tf.constant(vectors, tf.float32), repeat_rows(batch, 1))
            product = (gradients.numpy() * (vectors - baseline)).sum(-1)  # (examples, seq)
            products += [product[row, : len(item["vectors"])] for row, item in enumerate(chunk)]
        return products
