"""Transformer encoder block: self-attention + feed-forward."""

import keras

from fmkeras.layers.transformer_block import TransformerBlock
from fmkeras.layers.utils import built_layer_norm, merge_masks


@keras.saving.register_keras_serializable(package="fmkeras")
class TransformerEncoderBlock(TransformerBlock):
    """One Transformer encoder layer (BERT's post-LN or GPT-2's pre-LN).

    Post-LN (`normalize_first=False`, BERT): `x = LN(x + Attn(x))`,
    `x = LN(x + FFN(x))`. Pre-LN (`normalize_first=True`):
    `x = x + Attn(LN(x))`, `x = x + FFN(LN(x))`. Sublayer names follow
    `keras_hub.layers.TransformerEncoder`, whose outputs this layer matches
    for the same weights.

    Args:
        num_heads: int. Attention heads; `hidden_dim` must divide by it
            unless `key_dim` is given.
        intermediate_dim: int. Width of the feed-forward layer.
        key_dim: int. Size of each head (default `hidden_dim // num_heads`).
        dropout: float. Dropout after attention and after the feed-forward.
        attention_dropout: float. Dropout on attention probabilities.
            Defaults to `dropout`.
        activation: str. Feed-forward activation: `"gelu"`,
            `"gelu_approximate"`, `"relu"` or `"silu"`.
        normalize_first: bool. Pre-LN instead of post-LN.
        layer_norm_epsilon: float. LayerNorm epsilon.
        use_bias: bool. Biases in the attention and feed-forward projections.
        kernel_initializer: initializer for the dense kernels.
        bias_initializer: initializer for the dense biases.

    Example:

    >>> import numpy as np, fmkeras
    >>> block = fmkeras.layers.TransformerEncoderBlock(num_heads=2, intermediate_dim=32)
    >>> x = np.random.rand(3, 5, 16).astype("float32")
    >>> tuple(block(x, padding_mask=np.ones((3, 5), "int32")).shape)
    (3, 5, 16)
    """

    def __init__(self, num_heads, intermediate_dim, **kwargs):
        super().__init__(num_heads, intermediate_dim, **kwargs)
        self.supports_masking = True

    def build(self, inputs_shape):
        self._check_hidden_dim(inputs_shape[-1])
        self.self_attention_layer = self._attention("self_attention_layer", inputs_shape[-1])
        self.self_attention_layer.build(inputs_shape)
        self.self_attention_layer_norm = built_layer_norm(
            self, "self_attention_layer_norm", inputs_shape
        )
        self.self_attention_dropout = self._dropout("self_attention_dropout")
        self._build_feedforward(inputs_shape)
        self.feedforward_dropout = self._dropout("feedforward_dropout")
        self.built = True

    def call(
        self,
        inputs,
        padding_mask=None,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
    ):
        """Args:
        inputs: `(batch, seq, hidden)`.
        padding_mask: `(batch, seq)`, nonzero/True for real tokens.
        attention_mask: boolean `(batch, seq, seq)`.
        training: bool.
        return_attention_scores: bool. Also return the attention
            probabilities `(batch, heads, seq, seq)`.
        """
        mask = merge_masks(padding_mask, attention_mask)  # (batch, 1|seq, seq)
        x = self._sublayer_input(inputs, self.self_attention_layer_norm)
        attended = self.self_attention_layer(
            x, x, attention_mask=mask, training=training,
            return_attention_scores=return_attention_scores,
        )  # fmt: skip
        if return_attention_scores:
            attended, scores = attended  # scores: (batch, heads, seq, seq)
        x = self._add_residual(
            attended, inputs, self.self_attention_layer_norm, self.self_attention_dropout, training
        )
        x = self._residual(
            x, self.feedforward_layer_norm, self._feedforward, self.feedforward_dropout, training
        )  # (batch, seq, hidden)
        return (x, scores) if return_attention_scores else x

    def attention_values(self, inputs):
        """The value vectors `(batch, seq, heads, value_dim)` this block's
        self-attention reads for `inputs` (MiniLM's value-relation transfer).
        It projects them again beside `call`: one extra value matmul per paired
        block, which keeps the attention's return values unchanged."""
        x = self._sublayer_input(inputs, self.self_attention_layer_norm)
        return self.self_attention_layer.value_dense(x)

    def compute_output_shape(self, inputs_shape):
        return inputs_shape
