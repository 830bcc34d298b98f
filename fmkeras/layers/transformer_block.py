"""What Transformer encoder and decoder blocks share: arguments, sublayers, residuals."""

import keras

from fmkeras.layers.dropout import Dropout
from fmkeras.layers.multi_head_attention import MultiHeadAttention
from fmkeras.layers.utils import built_dense, built_layer_norm, clone_initializer, get_activation


class TransformerBlock(keras.layers.Layer):
    """Base of `TransformerEncoderBlock` and `TransformerDecoderBlock`.

    Args:
        num_heads: int. Attention heads; the hidden size must divide by it
            unless `key_dim` is given.
        intermediate_dim: int. Width of the feed-forward layer.
        key_dim: int. Size of each head. Defaults to `hidden_dim // num_heads`;
            a pruned block (fewer heads of the original size) sets it.
        dropout: float. Dropout after each sublayer.
        attention_dropout: float. Dropout on attention probabilities.
            Defaults to `dropout`.
        activation: str. Feed-forward activation: `"gelu"`,
            `"gelu_approximate"`, `"relu"` or `"silu"`.
        normalize_first: bool. Pre-LN (`x + f(LN(x))`) instead of post-LN
            (`LN(x + f(x))`, BERT).
        layer_norm_epsilon: float.
        use_bias: bool. Biases in the attention and feed-forward projections
            (False: none, as in Cramming, Geiping & Goldstein 2022).
        kernel_initializer: initializer for the dense kernels.
        bias_initializer: initializer for the dense biases.
    """

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        key_dim=None,
        dropout=0.0,
        attention_dropout=None,
        activation="gelu",
        normalize_first=False,
        layer_norm_epsilon=1e-5,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        get_activation(activation)  # fail at construction, not at the first call
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.key_dim = key_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation = activation
        self.normalize_first = normalize_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def _check_hidden_dim(self, hidden_dim):
        if self.key_dim is None and hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim={hidden_dim} must be divisible by num_heads={self.num_heads}."
            )

    def _attention(self, name, hidden_dim):
        dropout = self.dropout if self.attention_dropout is None else self.attention_dropout
        return MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=self.key_dim or hidden_dim // self.num_heads,
            dropout=dropout,
            use_bias=self.use_bias,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name=name,
        )

    def _build_feedforward(self, shape):
        """The feed-forward sublayers, named as in keras-hub."""
        self.feedforward_intermediate_dense = built_dense(
            self, self.intermediate_dim, "feedforward_intermediate_dense", shape, self.use_bias
        )
        self.feedforward_output_dense = built_dense(
            self, shape[-1], "feedforward_output_dense", (*shape[:-1], self.intermediate_dim),
            self.use_bias,
        )
        self.feedforward_layer_norm = built_layer_norm(self, "feedforward_layer_norm", shape)

    def _dropout(self, name):
        return Dropout(self.dropout, dtype=self.dtype_policy, name=name)

    def _feedforward(self, x):
        x = get_activation(self.activation)(self.feedforward_intermediate_dense(x))
        return self.feedforward_output_dense(x)

    def _residual(self, x, layer_norm, function, dropout, training):
        """`LN(x + drop(f(x)))`, or `x + drop(f(LN(x)))` when normalizing first."""
        output = function(self._sublayer_input(x, layer_norm))
        return self._add_residual(output, x, layer_norm, dropout, training)

    def _sublayer_input(self, x, layer_norm):
        """What a sublayer reads: `LN(x)` when normalizing first, else `x`."""
        return layer_norm(x) if self.normalize_first else x

    def _add_residual(self, output, residual, layer_norm, dropout, training):
        """`residual + drop(output)`, then LayerNorm unless normalizing first."""
        x = dropout(output, training=training) + residual
        return x if self.normalize_first else layer_norm(x)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "key_dim": self.key_dim,
                "dropout": self.dropout,
                "attention_dropout": self.attention_dropout,
                "activation": self.activation,
                "normalize_first": self.normalize_first,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
