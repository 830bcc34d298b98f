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
- Hidden channels (width pruning, Minitron: Muralidharan et al. 2024):
  each channel of the residual stream is scored by its mean absolute
  activation over real tokens, summed over the blocks' outputs (post-LN
  blocks: LayerNorm outputs, as in the paper); the least important are
  removed from every weight that reads or writes the stream, the
  embedding tables included. LayerNorm then normalises over the kept
  channels, so outputs change and a recovery (distillation) is expected.
  The pooler keeps as many units, its most important by magnitude
  (`|W_pool[:, j]| * |W_logits[j, :]|`).
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

# Weight path ending -> ((axis, what indexes it), ...): how each weight shrinks. "heads" and
# "units" index a block's own heads and feed-forward units; "channels" the hidden (residual
# stream) channels every layer shares; "pooled" the pooler's units.
SLICES = {
    "embeddings": ((1, "channels"),),  # token, position and segment tables (rows, hidden)
    "layer_norm/gamma": ((0, "channels"),),  # every LayerNorm: embeddings, blocks, final
    "layer_norm/beta": ((0, "channels"),),
    "self_attention_layer/query/kernel": ((0, "channels"), (1, "heads")),  # (hidden, heads, key)
    "self_attention_layer/query/bias": ((0, "heads"),),  # (heads, key_dim)
    "self_attention_layer/key/kernel": ((0, "channels"), (1, "heads")),
    "self_attention_layer/key/bias": ((0, "heads"),),
    "self_attention_layer/value/kernel": ((0, "channels"), (1, "heads")),
    "self_attention_layer/value/bias": ((0, "heads"),),
    "self_attention_layer/attention_output/kernel": ((0, "heads"), (2, "channels")),
    "self_attention_layer/attention_output/bias": ((0, "channels"),),
    "feedforward_intermediate_dense/kernel": ((0, "channels"), (1, "units")),  # (hidden, units)
    "feedforward_intermediate_dense/bias": ((0, "units"),),  # (intermediate,)
    "feedforward_output_dense/kernel": ((0, "units"), (1, "channels")),  # (units, hidden)
    "feedforward_output_dense/bias": ((0, "channels"),),
    "pooled_dense/kernel": ((0, "channels"), (1, "pooled")),  # (hidden, hidden)
    "pooled_dense/bias": ((0, "pooled"),),
    "logits/kernel": ((0, "pooled"),),  # (hidden, classes)
}
PER_LAYER = ("heads", "units")
LAYER = re.compile(r"transformer_layer_(\d+)/")


@dataclasses.dataclass
class PruningPlan:
    """What each layer keeps: sorted head and feed-forward unit indices, and
    the hidden channels and pooler units the whole encoder keeps."""

    layers: list  # indices of the kept layers
    heads: list  # per kept layer: indices of the kept heads
    units: list  # per kept layer: indices of the kept feed-forward units
    channels: list | None = None  # indices of the kept hidden channels (None: all)
    pooled: list | None = None  # indices of the kept pooler units, as many (None: all)

    def hidden_dim(self, encoder):
        """The pruned width of `encoder`'s hidden channels."""
        return encoder.hidden_dim if self.channels is None else len(self.channels)

    def summary(self, encoder):
        blocks = encoder.transformer_layers
        total_heads = sum(block.num_heads for block in blocks)
        total_units = sum(block.intermediate_dim for block in blocks)
        dropped = [block for index, block in enumerate(blocks) if index not in self.layers]
        return {
            "layers_kept": list(self.layers),
            "heads_per_layer": [len(kept) for kept in self.heads],
            "intermediate_dim_per_layer": [len(kept) for kept in self.units],
            "heads_removed": total_heads - sum(map(len, self.heads)),
            "heads_total": total_heads,
            "heads_in_dropped_layers": sum(block.num_heads for block in dropped),
            "units_removed": total_units - sum(map(len, self.units)),
            "units_total": total_units,
            "hidden_dim": self.hidden_dim(encoder),
            "hidden_dim_before": encoder.hidden_dim,
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


def channel_importance(encoder, batches):
    """`(hidden,)` array: Minitron's activation importance of each hidden
    channel, the mean `|x_c|` over the real tokens of `batches` (of
    `(features, labels, weights)`), summed over the blocks' outputs."""
    score = np.zeros(encoder.hidden_dim)
    for features, _, _ in batches:
        outputs = encoder.call_with_layer_outputs(features)
        real = np.asarray(features["padding_mask"], "float32")[..., None]  # (batch, seq, 1)
        for states in outputs["hidden_states"]:  # (batch, seq, hidden) per block
            magnitude = np.abs(np.asarray(states, "float32")) * real
            score += magnitude.sum(axis=(0, 1)) / real.sum()
    return score


def pooler_importance(model):
    """`(hidden,)` array: `|W_pool[:, j]| * |W_logits[j, :]|` of each pooler unit."""
    pooler = np.asarray(model.encoder.pooler.kernel)  # (hidden, hidden)
    head = np.asarray(model.output_dense.kernel)  # (hidden, classes)
    return np.linalg.norm(pooler, axis=0) * np.linalg.norm(head, axis=1)


def most_important(scores, share):
    """Sorted indices of the `scores` that removing the share `share` of the
    least important keeps (at least one)."""
    keep = max(1, len(scores) - int(round(share * len(scores))))
    return sorted(np.argsort(-np.asarray(scores), kind="stable")[:keep].tolist())


def plan_pruning(head_scores, unit_scores, heads=0.0, ffn=0.0, layers=None,
                 channel_scores=None, pooler_scores=None, hidden=0.0):  # fmt: skip
    """A `PruningPlan` keeping `layers` evenly spaced layers (default all),
    then removing the share `heads` of their heads (least important after
    per-layer L2 normalisation, at least one kept per layer), the share
    `ffn` of each kept layer's feed-forward units and the share `hidden` of
    the hidden channels and as many pooler units (by `channel_scores` and
    `pooler_scores`, needed when `hidden` > 0)."""
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
    units = [most_important(scores, ffn) for scores in unit_scores]
    channels = pooled = None  # all of them
    if hidden:
        if channel_scores is None or pooler_scores is None:
            raise ValueError("pruning hidden channels needs channel_scores and pooler_scores")
        channels = most_important(channel_scores, hidden)
        pooled = most_important(pooler_scores, hidden)  # as many: the pooler is hidden wide
    return PruningPlan(kept_layers, [sorted(layer) for layer in kept], units, channels, pooled)


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
        "hidden_dim": plan.hidden_dim(encoder),
    })  # fmt: skip
    copy = type(model)(**{**model.get_config(), "encoder": smaller})
    sources = {weight.path: weight for weight in model.weights}
    for target in copy.weights:
        layer = LAYER.search(target.path)  # new index -> the kept layer's weights
        path = target.path if layer is None else LAYER.sub(
            f"transformer_layer_{plan.layers[int(layer.group(1))]}/", target.path, count=1)
        value = np.asarray(sources[path])
        rules = next((rules for end, rules in SLICES.items() if target.path.endswith(end)), ())
        for axis, what in rules:
            kept = getattr(plan, what)
            kept = kept[int(layer.group(1))] if what in PER_LAYER else kept
            if kept is not None:
                value = np.take(value, kept, axis=axis)
        target.assign(value)
    return copy
