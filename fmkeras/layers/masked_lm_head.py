"""Masked-language-model head, tied to the token embedding."""

import keras
from keras import ops

from fmkeras.layers.layer_normalization import LayerNormalization
from fmkeras.layers.utils import clone_initializer, get_activation


@keras.saving.register_keras_serializable(package="fmkeras")
class MaskedLMHead(keras.layers.Layer):
    """Predicts the original tokens at `mask_positions` (BERT's MLM head).

    Gathers the hidden states at the masked positions first, so the
    vocabulary projection costs `batch * predictions`, not
    `batch * sequence`, rows. Then dense + activation + LayerNorm, and logits
    through the transposed `token_embedding` matrix plus a bias (weight
    tying). Without `token_embedding` the head owns its output kernel.
    Without `mask_positions` it predicts every position (a decoder's
    language-model head); without `transform`, the logits come straight
    from the tied projection of the inputs (GPT-2's head).

    Args:
        vocabulary_size: int. Number of output classes.
        token_embedding: optional `keras.layers.Embedding` to tie to.
        intermediate_activation: str. Activation of the transform.
        layer_norm_epsilon: float.
        kernel_initializer: initializer for the dense kernels.
        bias_initializer: initializer for the biases.
        transform: bool. Dense + activation + LayerNorm before the
            projection (BERT); False projects the inputs directly.

    Example:

    >>> import numpy as np, fmkeras
    >>> head = fmkeras.layers.MaskedLMHead(vocabulary_size=50)
    >>> hidden = np.random.rand(2, 7, 16).astype("float32")
    >>> tuple(head(hidden, mask_positions=np.array([[1, 3], [0, 6]])).shape)
    (2, 2, 50)
    """

    def __init__(
        self,
        vocabulary_size,
        token_embedding=None,
        intermediate_activation="gelu",
        layer_norm_epsilon=1e-12,
        kernel_initializer=None,
        bias_initializer="zeros",
        transform=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        get_activation(intermediate_activation)
        self.vocabulary_size = vocabulary_size
        self.token_embedding = token_embedding
        self.intermediate_activation = intermediate_activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or keras.initializers.TruncatedNormal(stddev=0.02)
        )
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.transform = transform

    def build(self, inputs_shape, mask_positions_shape=None):
        hidden_dim = inputs_shape[-1]
        if self.token_embedding is not None:
            if not self.token_embedding.built:  # e.g. deserialized on its own
                self.token_embedding.build((None, None))
            if self.token_embedding.input_dim != self.vocabulary_size:
                raise ValueError(
                    f"token_embedding has {self.token_embedding.input_dim} rows but "
                    f"vocabulary_size={self.vocabulary_size}."
                )
            if self.token_embedding.output_dim != hidden_dim:
                raise ValueError(
                    f"token_embedding width {self.token_embedding.output_dim} != hidden "
                    f"size {hidden_dim}."
                )
        if self.transform:
            self.transform_dense = keras.layers.Dense(
                hidden_dim,
                kernel_initializer=clone_initializer(self.kernel_initializer),
                bias_initializer=clone_initializer(self.bias_initializer),
                dtype=self.dtype_policy,
                name="transform_dense",
            )
            self.transform_dense.build((None, None, hidden_dim))
            self.layer_norm = LayerNormalization(
                epsilon=self.layer_norm_epsilon,
                dtype=self.dtype_policy,
                name="transform_layer_norm",
            )
            self.layer_norm.build((None, None, hidden_dim))
        if self.token_embedding is None:
            self.output_kernel = self.add_weight(
                shape=(hidden_dim, self.vocabulary_size),
                initializer=clone_initializer(self.kernel_initializer),
                name="output_kernel",
            )
        self.output_bias = self.add_weight(
            shape=(self.vocabulary_size,),
            initializer=clone_initializer(self.bias_initializer),
            name="output_bias",
        )
        self.built = True

    def call(self, inputs, mask_positions=None):
        """Args:
        inputs: `(batch, seq, hidden)` encoder output.
        mask_positions: int `(batch, predictions)`, or None for every position.

        Returns: logits `(batch, predictions, vocabulary_size)`.
        """
        x = inputs
        if mask_positions is not None:
            x = ops.take_along_axis(inputs, ops.expand_dims(mask_positions, -1), axis=1)
        if self.transform:
            x = get_activation(self.intermediate_activation)(self.transform_dense(x))
            x = self.layer_norm(x)  # (batch, predictions, hidden)
        if self.token_embedding is not None:
            kernel = ops.transpose(ops.cast(self.token_embedding.embeddings, self.compute_dtype))
        else:
            kernel = ops.cast(self.output_kernel, self.compute_dtype)
        logits = ops.matmul(x, kernel)
        return logits + ops.cast(self.output_bias, self.compute_dtype)

    def compute_output_shape(self, inputs_shape, mask_positions_shape=None):
        rows = inputs_shape[:-1] if mask_positions_shape is None else mask_positions_shape
        return (*rows, self.vocabulary_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "token_embedding": keras.layers.serialize(self.token_embedding)
                if self.token_embedding is not None
                else None,
                "intermediate_activation": self.intermediate_activation,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "transform": self.transform,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("token_embedding") is not None:
            config["token_embedding"] = keras.layers.deserialize(config["token_embedding"])
        return cls(**config)
