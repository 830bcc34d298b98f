"""Transformer decoder block: causal self-attention + cross-attention + feed-forward."""

import keras
from keras import ops

from fmkeras.layers.transformer_block import TransformerBlock
from fmkeras.layers.utils import built_layer_norm, causal_mask, merge_masks


@keras.saving.register_keras_serializable(package="fmkeras")
class TransformerDecoderBlock(TransformerBlock):
    """One Transformer decoder layer with an optional key/value cache.

    Causal self-attention, then cross-attention to `encoder_sequence` (only
    when the block is built with one), then a feed-forward network; post-LN
    or pre-LN as in `TransformerEncoderBlock`.

    For incremental decoding pass `self_attention_cache`
    `(batch, 2, max_length, heads, head_dim)` and
    `self_attention_cache_update_index`; the block then processes only the
    new tokens, and returns `(outputs, self_attention_cache,
    cross_attention_cache)`. `cross_attention_cache`, when given, holds the
    encoder keys/values computed once (see `compute_cross_attention_cache`).

    Args:
        num_heads: int. Attention heads.
        intermediate_dim: int. Feed-forward width.
        dropout: float. Dropout after each sublayer.
        attention_dropout: float. Dropout on attention probabilities.
            Defaults to `dropout`.
        activation: str. `"gelu"`, `"gelu_approximate"`, `"relu"` or `"silu"`.
        normalize_first: bool. Pre-LN instead of post-LN.
        layer_norm_epsilon: float.
        use_bias: bool. Biases in the attention and feed-forward projections.
        kernel_initializer: initializer for the dense kernels.
        bias_initializer: initializer for the dense biases.

    Example:

    >>> import numpy as np, fmkeras
    >>> block = fmkeras.layers.TransformerDecoderBlock(num_heads=2, intermediate_dim=32)
    >>> target = np.random.rand(2, 4, 16).astype("float32")
    >>> source = np.random.rand(2, 6, 16).astype("float32")
    >>> tuple(block(target, source).shape)
    (2, 4, 16)
    """

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        hidden_dim = decoder_sequence_shape[-1]
        self._check_hidden_dim(hidden_dim)
        shape = decoder_sequence_shape
        self.self_attention_layer = self._attention("self_attention_layer", hidden_dim)
        self.self_attention_layer.build(shape)
        self.self_attention_layer_norm = built_layer_norm(self, "self_attention_layer_norm", shape)
        self.has_cross_attention = encoder_sequence_shape is not None
        if self.has_cross_attention:
            self.cross_attention_layer = self._attention("cross_attention_layer", hidden_dim)
            self.cross_attention_layer.build(shape, encoder_sequence_shape)
            self.cross_attention_layer_norm = built_layer_norm(
                self, "cross_attention_layer_norm", shape
            )
        self._build_feedforward(shape)
        self.dropout_layer = self._dropout("dropout")
        self.built = True

    def call(
        self,
        decoder_sequence,
        encoder_sequence=None,
        decoder_padding_mask=None,
        encoder_padding_mask=None,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        cross_attention_cache=None,
        training=None,
        return_attention_scores=False,
    ):
        """Args:
        decoder_sequence: `(batch, target, hidden)`; with a cache, only the
            new tokens.
        encoder_sequence: `(batch, source, hidden)`.
        decoder_padding_mask: `(batch, target)` (full length with a cache).
        encoder_padding_mask: `(batch, source)`.
        self_attention_cache: `(batch, 2, max_length, heads, head_dim)`.
        self_attention_cache_update_index: write position in the cache.
        cross_attention_cache: precomputed encoder keys/values.
        training: bool.
        return_attention_scores: bool (without caches). Also return the
            cross-attention probabilities `(batch, heads, target, source)`.

        Returns the output `(batch, target, hidden)`; with a cache, also the
        updated self- and cross-attention caches; with
        `return_attention_scores`, also the cross-attention probabilities.
        """
        use_cache = self_attention_cache is not None
        target_length = ops.shape(decoder_sequence)[1]
        if use_cache:
            # New tokens at positions [index, index + target) see the cache up to themselves.
            source_length = ops.shape(self_attention_cache)[2]
            offset = self_attention_cache_update_index
        else:
            source_length, offset = target_length, 0
        self_mask = causal_mask(target_length, source_length, offset)  # (1, target, source)
        self_mask = merge_masks(decoder_padding_mask, self_mask)

        x = self._sublayer_input(decoder_sequence, self.self_attention_layer_norm)
        if use_cache:
            attended, self_attention_cache = self.self_attention_layer(
                x,
                x,
                attention_mask=self_mask,
                cache=self_attention_cache,
                cache_update_index=self_attention_cache_update_index,
                training=training,
            )
        else:
            attended = self.self_attention_layer(x, x, attention_mask=self_mask, training=training)
        x = self._add_residual(
            attended, decoder_sequence, self.self_attention_layer_norm, self.dropout_layer, training
        )

        scores = None
        if self.has_cross_attention:
            cross_mask = merge_masks(encoder_padding_mask)
            query = self._sublayer_input(x, self.cross_attention_layer_norm)
            if cross_attention_cache is None:
                attended = self.cross_attention_layer(
                    query, encoder_sequence, attention_mask=cross_mask, training=training,
                    return_attention_scores=return_attention_scores,
                )  # fmt: skip
                if return_attention_scores:
                    attended, scores = attended  # (batch, heads, target, source)
            else:
                attended, _ = self.cross_attention_layer(
                    query, attention_mask=cross_mask, cache=cross_attention_cache, training=training
                )
            x = self._add_residual(
                attended, x, self.cross_attention_layer_norm, self.dropout_layer, training
            )

        x = self._residual(
            x, self.feedforward_layer_norm, self._feedforward, self.dropout_layer, training
        )
        if use_cache:
            return x, self_attention_cache, cross_attention_cache
        return (x, scores) if return_attention_scores else x

    def compute_cross_attention_cache(self, encoder_sequence):
        """Encoder keys/values `(batch, 2, source, heads, head_dim)` for decoding."""
        attention = self.cross_attention_layer
        return ops.stack(
            [attention.key_dense(encoder_sequence), attention.value_dense(encoder_sequence)],
            axis=1,
        )

    def compute_output_shape(self, decoder_sequence_shape, encoder_sequence_shape=None):
        return decoder_sequence_shape
