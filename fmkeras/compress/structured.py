"""Structured pruning: remove whole attention heads and feed-forward units,
giving a physically smaller dense encoder (fewer heads, narrower
feed-forward layers) that loads, trains, evaluates and exports like any.

- Head importance (Michel et al. 2019, "Are Sixteen Heads Really Better
  than One?"): `I_h = sum over batches |dL/d xi_h|`, the loss's sensitivity
  to a gate `xi_h` on head `h`'s context vectors. The gate scales head `h`'s
  slice of the output projection `W_o[h]`, so `dL/d xi_h = <dL/dW_o[h],
  W_o[h]>` at `xi = 1`: one gradient of the output kernels per batch, no
  gates in the model. Scores are normalised per layer (L2), as in the
  paper, and the least important heads are removed across all layers,
  keeping at least one per layer.
- Feed-forward unit importance: magnitude, `|W_in[:, j]| * |W_out[j, :]|`
  (the L2 norms of the unit's input column and output row); each layer
  keeps the same share of its units.
- Whole layers: keeping `layers` of them, evenly spaced from the first to
  the last (as DistilBERT initialises its student from every other layer
  of its teacher).
"""

import dataclasses
import re

import keras
import numpy as np
import tensorflow as tf

from fmkeras.models import Encoder

# Weight path ending -> (axis, what indexes it): how each encoder-block weight shrinks.
SLICES = {
    "self_attention_layer/query/kernel": (1, "heads"),  # (hidden, heads, key_dim)
    "self_attention_layer/query/bias": (0, "heads"),  # (heads, key_dim)
    "self_attention_layer/key/kernel": (1, "heads"),
    "self_attention_layer/key/bias": (0, "heads"),
    "self_attention_layer/value/kernel": (1, "heads"),
    "self_attention_layer/value/bias": (0, "heads"),
    "self_attention_layer/attention_output/kernel": (0, "heads"),  # (heads, key_dim, hidden)
    "feedforward_intermediate_dense/kernel": (1, "units"),  # (hidden, intermediate)
    "feedforward_intermediate_dense/bias": (0, "units"),  # (intermediate,)
    "feedforward_output_dense/kernel": (0, "units"),  # (intermediate, hidden)
}
LAYER = re.compile(r"transformer_layer_(\d+)/")


@dataclasses.dataclass
class PruningPlan:
    """What each layer keeps: sorted head and feed-forward unit indices."""

    layers: list  # indices of the kept layers
    heads: list  # per kept layer: indices of the kept heads
    units: list  # per kept layer: indices of the kept feed-forward units

    def summary(self, encoder):
        total_heads = sum(block.num_heads for block in encoder.transformer_layers)
        total_units = sum(block.intermediate_dim for block in encoder.transformer_layers)
        return {
            "layers_kept": list(self.layers),
            "heads_per_layer": [len(kept) for kept in self.heads],
            "intermediate_dim_per_layer": [len(kept) for kept in self.units],
            "heads_removed": total_heads - sum(map(len, self.heads)),
            "heads_total": total_heads,
            "units_removed": total_units - sum(map(len, self.units)),
            "units_total": total_units,
        }


def head_importance(model, batches):
    """`[(heads,) array per layer]`: Michel et al.'s `sum |dL/d xi_h|` over
    `batches` of `(features, labels, weights)` (cross-entropy of the logits)."""
    blocks = model.encoder.transformer_layers
    kernels = [block.self_attention_layer.output_dense.kernel for block in blocks]
    scores = [np.zeros(block.num_heads) for block in blocks]
    loss_function = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for features, labels, weights in batches:
        with tf.GradientTape() as tape:
            logits = model(features, training=False)
            loss = loss_function(labels, logits, sample_weight=weights)
        gradients = tape.gradient(loss, kernels)
        for score, gradient, kernel in zip(scores, gradients, kernels, strict=True):
            # (heads, key_dim, hidden) -> (heads,): <dL/dW_o[h], W_o[h]>
            score += np.abs(np.sum(np.asarray(gradient) * np.asarray(kernel), axis=(1, 2)))
    return scores


def unit_importance(encoder):
    """`[(intermediate,) array per layer]`: `|W_in[:, j]| * |W_out[j, :]|`."""
    scores = []
    for block in encoder.transformer_layers:
        incoming = np.asarray(block.feedforward_intermediate_dense.kernel)  # (hidden, units)
        outgoing = np.asarray(block.feedforward_output_dense.kernel)  # (units, hidden)
        scores.append(np.linalg.norm(incoming, axis=0) * np.linalg.norm(outgoing, axis=1))
    return scores


def plan_pruning(head_scores, unit_scores, heads=0.0, ffn=0.0, layers=None):
    """A `PruningPlan` keeping `layers` evenly spaced layers (default all),
    then removing the share `heads` of their heads (least important after
    per-layer L2 normalisation, at least one kept per layer) and the share
    `ffn` of each kept layer's feed-forward units."""
    count = len(head_scores)
    kept_layers = sorted({int(i) for i in np.linspace(0, count - 1, layers or count).round()})
    head_scores = [head_scores[i] for i in kept_layers]
    unit_scores = [unit_scores[i] for i in kept_layers]
    normalised = [score / (np.linalg.norm(score) or 1.0) for score in head_scores]
    ranked = sorted((score, layer, head) for layer, scores in enumerate(normalised)
                    for head, score in enumerate(scores))  # fmt: skip
    kept = [set(range(len(scores))) for scores in head_scores]
    to_remove = int(round(heads * len(ranked)))
    for _, layer, head in ranked:
        if to_remove == 0:
            break
        if len(kept[layer]) > 1:
            kept[layer].discard(head)
            to_remove -= 1
    units = []
    for scores in unit_scores:
        keep = max(1, len(scores) - int(round(ffn * len(scores))))
        units.append(sorted(np.argsort(-scores, kind="stable")[:keep].tolist()))
    return PruningPlan(kept_layers, [sorted(layer) for layer in kept], units)


def pruned_model(model, plan):
    """A copy of the encoder-head `model` (e.g. a `Classifier`) whose encoder
    keeps only `plan`'s heads and units, with the matching weights."""
    encoder = model.encoder
    blocks = encoder.transformer_layers
    key_dim = blocks[0].self_attention_layer.key_dim
    smaller = Encoder.from_config({
        **encoder.get_config(),
        "num_layers": len(plan.layers),
        "num_heads": [len(kept) for kept in plan.heads],
        "intermediate_dim": [len(kept) for kept in plan.units],
        "key_dim": key_dim,
    })  # fmt: skip
    copy = type(model)(**{**model.get_config(), "encoder": smaller})
    sources = {weight.path: weight for weight in model.weights}
    kept = {"heads": plan.heads, "units": plan.units}
    for target in copy.weights:
        layer = LAYER.search(target.path)  # new index -> the kept layer's weights
        path = target.path if layer is None else LAYER.sub(
            f"transformer_layer_{plan.layers[int(layer.group(1))]}/", target.path, count=1)
        value = np.asarray(sources[path])
        rule = next((rule for end, rule in SLICES.items() if target.path.endswith(end)), None)
        if rule is not None:
            axis, what = rule
            value = np.take(value, kept[what][int(layer.group(1))], axis=axis)
        target.assign(value)
    return copy
