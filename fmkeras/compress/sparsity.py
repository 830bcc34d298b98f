"""Gradual magnitude pruning during training (Zhu & Gupta 2017, "To prune,
or not to prune"), the `sparsity.*` keys.

Every Dense/EinsumDense kernel inside a Transformer block (attention
projections, feed-forward layers) gets a 0/1 mask. From
`sparsity.start_step` to `sparsity.end_step`, every `sparsity.every` steps,
each kernel's mask is recomputed to zero its smallest-magnitude share
`s_t = s_f * (1 - (1 - (t - t_0) / (t_end - t_0))^3)` (the cubic schedule:
fast at first, gently at the end), reaching `sparsity.target` `s_f`; the
steps after `end_step` train the masked model. The optimizer multiplies
every masked kernel by its mask after each update (in the compiled step,
`AdamW.mask_weights`), so pruned weights stay exactly zero through
training, the saved model and its exports. A resumed run recomputes the
masks from the weights: the pruned ones are zero, the smallest there are.

The dense model keeps its shapes: zeros shrink the compressed size (gzip of
the weights), not dense latency (`tools/compare_exports.py` measures both).
TensorFlow Model Optimization's `prune_low_magnitude` does this for
tf.keras 2 models only; fmkeras models are Keras 3.
"""

import keras
import numpy as np

from fmkeras.layers.transformer_block import TransformerBlock
from fmkeras.training.callbacks import optimizer_step


def prunable_kernels(model):
    """The Dense and EinsumDense kernels inside `model`'s Transformer blocks."""
    kernels = []
    for block in model._flatten_layers(include_self=False):
        if not isinstance(block, TransformerBlock):
            continue
        for layer in block._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.Dense | keras.layers.EinsumDense):
                kernels.append(layer.kernel)
    return kernels


def scheduled_sparsity(step, target, start_step, end_step, every):
    """Zhu & Gupta's sparsity after `step` steps, updated every `every` steps."""
    if step < start_step:
        return 0.0
    if step >= end_step:
        return target
    last_update = start_step + (step - start_step) // every * every
    progress = (last_update - start_step) / (end_step - start_step)
    return target * (1.0 - (1.0 - progress) ** 3)


def magnitude_mask(values, sparsity):
    """0/1 float32 mask zeroing the `sparsity` share of `values` with the smallest |value|."""
    flat = np.abs(values).ravel()
    mask = np.ones(flat.size, np.float32)
    mask[np.argsort(flat, kind="stable")[: int(round(sparsity * flat.size))]] = 0.0
    return mask.reshape(values.shape)


def zero_share(kernels):
    """The share of exact zeros over `kernels`."""
    zeros = sum(int(np.sum(np.asarray(kernel) == 0)) for kernel in kernels)
    return zeros / max(sum(int(np.prod(kernel.shape)) for kernel in kernels), 1)


class GradualPruning(keras.callbacks.Callback):
    """Updates the masks on the schedule (see the module docstring).

    Build it before the first training step: it registers the masks with
    the optimizer, whose compiled step applies them.

    Args:
        model: the model being trained.
        optimizer: an `fmkeras.training.optimizer.AdamW`.
        settings: a `SparsityConfig`.
        total_steps: `train.steps` (the default `end_step` is two thirds of it).
        log: a print function.
    """

    def __init__(self, model, optimizer, settings, total_steps, log=print):
        super().__init__()
        self.kernels = prunable_kernels(model)
        self.target = settings.target
        self.start_step = settings.start_step
        self.end_step = settings.end_step or max(self.start_step + 1, 2 * total_steps // 3)
        self.every = settings.every
        self.log = log
        self.masks = {
            kernel.path: keras.Variable(np.ones(kernel.shape, np.float32), trainable=False,
                                        name="mask")  # fmt: skip
            for kernel in self.kernels
        }
        optimizer.mask_weights(self.masks)
        self.sparsity = 0.0

    def describe(self):
        parameters = sum(int(np.prod(kernel.shape)) for kernel in self.kernels)
        return (f"sparsity: {len(self.kernels)} kernels ({parameters:,} weights) pruned by "
                f"magnitude to {self.target:.0%} from step {self.start_step} to "
                f"{self.end_step}, every {self.every} steps")  # fmt: skip

    def update(self, step):
        sparsity = scheduled_sparsity(step, self.target, self.start_step, self.end_step,
                                      self.every)  # fmt: skip
        if sparsity == self.sparsity:
            return
        for kernel in self.kernels:
            values = np.asarray(kernel)
            mask = magnitude_mask(values, sparsity)
            self.masks[kernel.path].assign(mask)
            kernel.assign(values * mask.astype(values.dtype))
        self.sparsity = sparsity

    def on_train_begin(self, logs=None):
        self.update(optimizer_step(self.model))

    def on_train_batch_end(self, batch, logs=None):
        self.update(optimizer_step(self.model))

    def measured(self):
        """The share of zeros in the pruned kernels now."""
        return zero_share(self.kernels)
