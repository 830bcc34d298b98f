"""Keras's `LayerNormalization` with a faster backward pass while training."""

import keras

from fmkeras import fused


@keras.saving.register_keras_serializable(package="fmkeras")
class LayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization`, same weights, config and outputs;
    inside `fmkeras.fused.fused_elementwise()` (the training driver's `fit`
    and `evaluate`) a last-axis, centered and scaled normalization runs as
    `fmkeras.fused.layer_norm`, whose hand-written gradient replaces the one
    TensorFlow derives from `moments`. Any other setting, and every call
    outside the context (inference, exports), is Keras's own.

    Args:
        **kwargs: `keras.layers.LayerNormalization`'s.

    Example:

    ```python
    layer = fmkeras.layers.LayerNormalization(epsilon=1e-12)
    y = layer(keras.random.normal((2, 8, 16)))
    ```
    """

    def call(self, inputs):
        rank = len(inputs.shape)
        last_axis_only = self.axis in (-1, rank - 1, [-1], [rank - 1])
        plain = self.center and self.scale and not self.rms_scaling
        if fused.enabled() and last_axis_only and plain:
            return fused.layer_norm(inputs, self.gamma, self.beta, self.epsilon)
        return super().call(inputs)
