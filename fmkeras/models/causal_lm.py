"""Decoder-only Transformer language model (GPT-style), with a key/value cache."""

import keras
from keras import ops

from fmkeras.layers.masked_lm_head import MaskedLMHead
from fmkeras.layers.text_embedding import TextEmbedding
from fmkeras.layers.transformer_decoder_block import TransformerDecoderBlock
from fmkeras.layers.utils import with_dtype_policy


@keras.saving.register_keras_serializable(package="fmkeras")
class CausalLM(keras.Model):
    """A GPT-style causal language model from fmkeras's own blocks.

    Token + position embeddings, `num_layers` `TransformerDecoderBlock`s
    without cross-attention (causal self-attention + feed-forward), a final
    LayerNorm when normalizing first (GPT-2's pre-LN, the default), and
    logits through the transposed token embedding (tied, as in GPT-2).

    Inputs: a dict of int32 `token_ids` and `padding_mask` `(batch, seq)`.
    Output: next-token logits `(batch, seq, vocabulary_size)`: position `i`
    predicts token `i + 1`.

    For generation, `initial_cache` + `call_with_cache` run the model over
    per-layer key/value caches, a prompt at once or one token at a time
    (see `fmkeras.decoding.sample_search`).

    Args:
        vocabulary_size: int.
        num_layers: int.
        num_heads: int.
        hidden_dim: int.
        intermediate_dim: int. Feed-forward width.
        dropout: float.
        max_sequence_length: int. Learned positions (prompt + generated).
        activation: str. Feed-forward activation.
        normalize_first: bool. Pre-LN blocks and a final LayerNorm.
        layer_norm_epsilon: float.
        use_bias: bool. Biases in the blocks' attention and feed-forward projections.

    Example:

    >>> import numpy as np, fmkeras
    >>> lm = fmkeras.models.CausalLM(100, num_layers=1, num_heads=2, hidden_dim=16,
    ...                              intermediate_dim=32, max_sequence_length=8)
    >>> ids = np.array([[2, 7, 9, 3]], "int32")
    >>> tuple(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}).shape)
    (1, 4, 100)
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_heads,
        hidden_dim,
        intermediate_dim,
        dropout=0.0,
        max_sequence_length=512,
        activation="gelu",
        normalize_first=True,
        layer_norm_epsilon=1e-5,
        use_bias=True,
        dtype=None,
        **kwargs,
    ):
        # === Layers ===
        self.embedding = TextEmbedding(
            vocabulary_size,
            hidden_dim,
            max_sequence_length,
            num_segments=0,
            dropout=dropout,
            layer_norm_epsilon=layer_norm_epsilon,
            dtype=dtype,
            name="embedding",
        )
        self.transformer_layers = [
            TransformerDecoderBlock(
                num_heads=num_heads,
                intermediate_dim=intermediate_dim,
                dropout=dropout,
                activation=activation,
                normalize_first=normalize_first,
                layer_norm_epsilon=layer_norm_epsilon,
                use_bias=use_bias,
                kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
                dtype=dtype,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_layer_norm = (
            keras.layers.LayerNormalization(
                epsilon=layer_norm_epsilon, dtype=dtype, name="final_layer_norm"
            )
            if normalize_first
            else None
        )
        self.embedding.build((None, None))
        self.lm_head = MaskedLMHead(
            vocabulary_size,
            token_embedding=self.embedding.token_embedding,
            transform=False,
            dtype=dtype,
            name="lm_head",
        )

        # === Functional Model ===
        inputs = {
            name: keras.Input(shape=(None,), dtype="int32", name=name)
            for name in ("token_ids", "padding_mask")
        }
        x = self.embedding(inputs["token_ids"])  # (batch, seq, hidden)
        for block in self.transformer_layers:
            x = block(x, decoder_padding_mask=inputs["padding_mask"])
        logits = self.lm_head(self._normalized(x))  # (batch, seq, vocabulary)
        super().__init__(inputs=inputs, outputs=logits, dtype=dtype, **kwargs)
        if dtype is not None:  # a functional model ignores `dtype` (keras-hub's Backbone does this)
            self.dtype_policy = keras.dtype_policies.get(dtype)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.max_sequence_length = max_sequence_length
        self.activation = activation
        self.normalize_first = normalize_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_bias = use_bias

    def _normalized(self, x):
        return x if self.final_layer_norm is None else self.final_layer_norm(x)

    def initial_cache(self, batch_size, max_length):
        """Empty key/value caches for `max_length` positions: one
        `(batch, 2, max_length, heads, head_dim)` tensor per layer."""
        head_dim = self.hidden_dim // self.num_heads
        empty = ops.zeros((batch_size, 2, max_length, self.num_heads, head_dim),
                          dtype=self.compute_dtype)  # fmt: skip
        return [empty for _ in self.transformer_layers]

    def call_with_cache(self, token_ids, index, cache):
        """Logits `(batch, n, vocabulary)` for `token_ids` `(batch, n)` at
        positions `[index, index + n)`, attending to the cached positions
        before them; returns `(logits, cache)` with their keys/values written."""
        x = self.embedding(token_ids, start_index=index)  # (batch, n, hidden)
        updated = []
        for block, layer_cache in zip(self.transformer_layers, cache, strict=True):
            x, layer_cache, _ = block(
                x, self_attention_cache=layer_cache, self_attention_cache_update_index=index
            )
            updated.append(layer_cache)
        return self.lm_head(self._normalized(x)), updated

    def decode_step(self, token_ids, index, cache):
        """`fmkeras.decoding`'s step: logits `(batch, vocabulary)` after the
        token `token_ids` `(batch, 1)` at position `index`."""
        logits, cache = self.call_with_cache(token_ids, index, cache)
        return logits[:, 0, :], cache

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "dropout": self.dropout,
            "max_sequence_length": self.max_sequence_length,
            "activation": self.activation,
            "normalize_first": self.normalize_first,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "use_bias": self.use_bias,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**with_dtype_policy(config))
