"""Keras's `Dropout` with a faster mask while training."""

import keras

from fmkeras import fused


@keras.saving.register_keras_serializable(package="fmkeras")
class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout`, same config, seed generator and expected
    output; inside `fmkeras.fused.fused_elementwise()` (the training driver's
    `fit` and `evaluate`) an element-wise dropout (no `noise_shape`) runs as
    `fmkeras.fused.dropout`: one XLA cluster each way, its mask drawn from a
    counter-based hash of the seed instead of TensorFlow's Philox stream.
    Every other call (outside the context, `noise_shape` set) is Keras's own.

    Args:
        **kwargs: `keras.layers.Dropout`'s.

    Example:

    ```python
    layer = fmkeras.layers.Dropout(0.1, seed=7)
    y = layer(keras.random.normal((2, 8, 16)), training=True)
    ```
    """

    def call(self, inputs, training=False):
        if training and 0 < self.rate < 1 and self.noise_shape is None:
            return fused.dropout(inputs, self.rate, self.seed_generator)  # Keras's outside
        return super().call(inputs, training=training)
