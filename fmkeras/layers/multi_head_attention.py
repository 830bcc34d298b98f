"""Multi-head attention with padding/causal masks and a key/value cache."""

import keras
from keras import ops

from fmkeras import fused
from fmkeras.layers.dropout import Dropout
from fmkeras.layers.utils import causal_mask, clone_initializer
from fmkeras.workarounds import TrailingEinsumDense


@keras.saving.register_keras_serializable(package="fmkeras")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention.

    Projections have the same shapes as `keras.layers.MultiHeadAttention`
    (`query`/`key`/`value` kernels `(hidden, heads, key_dim)`, output kernel
    `(heads, value_dim, output_dim)`), so weights copy across one to one and
    the sublayer names (`query`, `key`, `value`, `attention_output`) are the
    ones BERT checkpoints and LoRA target lists use.

    Attention runs through two einsums, which Keras's TensorFlow backend
    turns into batched matmuls (`keras.ops.dot_product_attention` is
    `tf.einsum` there, measured 7 % slower per layer in forward + backward),
    with the probabilities dropped out in training. Softmax is computed in
    float32 under mixed precision. The projections are
    `fmkeras.workarounds.TrailingEinsumDense` (an `EinsumDense` whose
    gradient is one 2-D matmul on TensorFlow).

    Key/value cache (for autoregressive decoding): pass `cache` of shape
    `(batch, 2, max_length, num_heads, key_dim)`. With `cache_update_index`,
    the keys/values of the current `value` tokens are written into the cache
    at that index and the query attends to the whole cache (the caller's
    `attention_mask` hides future slots). Without `cache_update_index` the
    cache is used as is (e.g. precomputed cross-attention keys/values).
    With a cache the layer returns `(output, cache)`.

    Args:
        num_heads: int. Number of attention heads.
        key_dim: int. Size of each query/key head.
        value_dim: int. Size of each value head. Defaults to `key_dim`.
        dropout: float. Dropout rate on the attention probabilities.
        use_bias: bool. Whether the projections have biases.
        output_dim: int. Size of the output. Defaults to the query's last dim.
        kernel_initializer: initializer for the projection kernels.
        bias_initializer: initializer for the projection biases.

    Example:

    >>> import numpy as np, fmkeras
    >>> attention = fmkeras.layers.MultiHeadAttention(num_heads=2, key_dim=8)
    >>> x = np.random.rand(3, 5, 16).astype("float32")
    >>> tuple(attention(x, x, use_causal_mask=True).shape)
    (3, 5, 16)
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_dim=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.dropout = dropout
        self.use_bias = use_bias
        self.output_dim = output_dim
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def _projection(self, equation, output_shape, bias_axes, name):
        return TrailingEinsumDense(  # an EinsumDense with an efficient gradient on TensorFlow
            equation,
            output_shape=output_shape,
            bias_axes=bias_axes if self.use_bias else None,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, query_shape, value_shape=None, key_shape=None):
        value_shape = query_shape if value_shape is None else value_shape
        key_shape = value_shape if key_shape is None else key_shape
        value_dim = self.value_dim or self.key_dim
        output_dim = self.output_dim or query_shape[-1]
        heads = self.num_heads
        # (batch, seq, hidden) -> (batch, seq, heads, head_dim)
        self.query_dense = self._projection(
            "btd,dnh->btnh", (None, heads, self.key_dim), "nh", "query"
        )
        self.query_dense.build(query_shape)
        self.key_dense = self._projection("btd,dnh->btnh", (None, heads, self.key_dim), "nh", "key")
        self.key_dense.build(key_shape)
        self.value_dense = self._projection(
            "btd,dnh->btnh", (None, heads, value_dim), "nh", "value"
        )
        self.value_dense.build(value_shape)
        # (batch, seq, heads, head_dim) -> (batch, seq, output_dim)
        self.output_dense = self._projection(
            "btnh,nhd->btd", (None, output_dim), "d", "attention_output"
        )
        self.output_dense.build((*query_shape[:-1], heads, value_dim))
        self.dropout_layer = Dropout(
            self.dropout, dtype=self.dtype_policy, name="attention_dropout"
        )
        self.built = True

    def call(
        self,
        query,
        value=None,
        key=None,
        attention_mask=None,
        use_causal_mask=False,
        cache=None,
        cache_update_index=None,
        return_attention_scores=False,
        training=None,
    ):
        """Attends from `query` to `value` (and `key`, default `value`).

        Args:
            query: `(batch, target_length, dim)`.
            value: `(batch, source_length, dim)`; defaults to `query`.
            key: like `value`; defaults to `value`.
            attention_mask: boolean `(batch, target_length, source_length)`,
                True where attention is allowed.
            use_causal_mask: bool. Also mask future positions.
            cache: optional `(batch, 2, max_length, heads, key_dim)` cache.
            cache_update_index: int or scalar tensor, where to write the new
                keys/values into `cache`.
            return_attention_scores: bool. Also return the probabilities
                `(batch, heads, target_length, source_length)`.
            training: bool. Whether dropout is active.
        """
        value = query if value is None else value
        key = value if key is None else key
        query_heads = self.query_dense(query)  # (batch, target, heads, key_dim)

        if cache is not None and cache_update_index is None:
            key_heads, value_heads = cache[:, 0, ...], cache[:, 1, ...]
        else:
            key_heads = self.key_dense(key)  # (batch, source, heads, key_dim)
            value_heads = self.value_dense(value)  # (batch, source, heads, value_dim)
            if cache is not None:
                start = [0, cache_update_index, 0, 0]
                key_heads = ops.slice_update(cache[:, 0, ...], start, key_heads)
                value_heads = ops.slice_update(cache[:, 1, ...], start, value_heads)
                cache = ops.stack([key_heads, value_heads], axis=1)

        mask = attention_mask
        if use_causal_mask:
            causal = causal_mask(ops.shape(query_heads)[1], ops.shape(key_heads)[1])
            mask = causal if mask is None else ops.logical_and(ops.cast(mask, "bool"), causal)

        output, scores = self._attend(query_heads, key_heads, value_heads, mask, training)
        output = self.output_dense(output)  # (batch, target, output_dim)
        results = [output]
        if return_attention_scores:
            results.append(scores)
        if cache is not None:
            results.append(cache)
        return results[0] if len(results) == 1 else tuple(results)

    def _attend(self, query_heads, key_heads, value_heads, mask, training):
        scale = 1.0 / float(self.key_dim) ** 0.5
        query_heads = ops.multiply(query_heads, ops.cast(scale, query_heads.dtype))
        # (batch, heads, target, source)
        logits = ops.einsum("btnh,bsnh->bnts", query_heads, key_heads)
        if mask is not None:
            mask = ops.expand_dims(ops.cast(mask, "bool"), axis=-3)
        # float32 softmax, cast to the compute dtype
        probabilities = fused.masked_softmax(logits, mask, self.compute_dtype)
        dropped = self.dropout_layer(probabilities, training=training)
        output = ops.einsum("bnts,bsnh->btnh", dropped, value_heads)
        return output, probabilities

    def compute_output_shape(self, query_shape, value_shape=None, key_shape=None):
        return (*query_shape[:-1], self.output_dim or query_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "value_dim": self.value_dim,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "output_dim": self.output_dim,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
