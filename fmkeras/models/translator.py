"""Encoder-decoder Transformer for translation, with cached incremental decoding."""

import keras
from keras import ops

from fmkeras.layers.masked_lm_head import MaskedLMHead
from fmkeras.layers.text_embedding import TextEmbedding
from fmkeras.layers.transformer_decoder_block import TransformerDecoderBlock


@keras.saving.register_keras_serializable(package="fmkeras")
class Translator(keras.Model):
    """Source `Encoder` + Transformer decoder with a tied output head.

    Inputs: a dict of int32 `source_ids` `(batch, source)` and `target_ids`
    `(batch, target)` (teacher forcing: the target shifted right, starting
    with the start token); `padding_id` marks padding in both. Output:
    logits `(batch, target, target_vocabulary_size)`. The decoder's input
    embedding and its output projection share one matrix.

    For decoding, `initial_state` + `decode_step` run the decoder one token at
    a time over per-layer key/value caches (see `fmkeras.decoding`).

    Args:
        encoder: an `fmkeras.models.Encoder` for the source side (possibly
            pretrained; its vocabulary is the source vocabulary).
        target_vocabulary_size: int.
        num_layers: int. Decoder blocks.
        num_heads: int.
        intermediate_dim: int.
        dropout: float.
        max_sequence_length: int. Longest target.
        padding_id: int. Padding token id (source and target).

    The decoder follows the encoder's activation, LayerNorm placement and
    epsilon, and whether its projections have biases.

    Example:

    >>> import numpy as np, fmkeras
    >>> encoder = fmkeras.models.Encoder(50, 1, 2, 16, 32, max_sequence_length=8)
    >>> model = fmkeras.models.Translator(encoder, 40, 1, 2, 32, max_sequence_length=8)
    >>> pair = {"source_ids": np.array([[2, 7, 3, 0]]), "target_ids": np.array([[2, 5, 6]])}
    >>> logits = model(pair)
    >>> tuple(logits.shape)
    (1, 3, 40)
    """

    def __init__(
        self,
        encoder,
        target_vocabulary_size,
        num_layers,
        num_heads,
        intermediate_dim,
        dropout=0.1,
        max_sequence_length=128,
        padding_id=0,
        **kwargs,
    ):
        # === Layers ===
        self.encoder = encoder
        hidden_dim = encoder.hidden_dim
        dtype = encoder.dtype_policy
        self.target_embedding = TextEmbedding(
            target_vocabulary_size,
            hidden_dim,
            max_sequence_length,
            num_segments=0,
            dropout=dropout,
            layer_norm_epsilon=encoder.layer_norm_epsilon,
            dtype=dtype,
            name="target_embedding",
        )
        self.decoder_layers = [
            TransformerDecoderBlock(
                num_heads=num_heads,
                intermediate_dim=intermediate_dim,
                dropout=dropout,
                activation=encoder.activation,
                normalize_first=encoder.normalize_first,
                layer_norm_epsilon=encoder.layer_norm_epsilon,
                use_bias=encoder.use_bias,
                kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
                dtype=dtype,
                name=f"decoder_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.decoder_final_layer_norm = (
            keras.layers.LayerNormalization(
                epsilon=encoder.layer_norm_epsilon, dtype=dtype, name="decoder_final_layer_norm"
            )
            if encoder.normalize_first
            else None
        )
        self.target_embedding.build((None, None))
        self.lm_head = MaskedLMHead(
            target_vocabulary_size,
            token_embedding=self.target_embedding.token_embedding,
            intermediate_activation=encoder.activation,
            layer_norm_epsilon=encoder.layer_norm_epsilon,
            dtype=dtype,
            name="lm_head",
        )

        # === Functional Model ===
        inputs = {
            name: keras.Input(shape=(None,), dtype="int32", name=name)
            for name in ("source_ids", "target_ids")
        }
        source_mask = ops.not_equal(inputs["source_ids"], padding_id)
        target_mask = ops.not_equal(inputs["target_ids"], padding_id)
        encoded = encoder(
            {
                "token_ids": inputs["source_ids"],
                "segment_ids": ops.zeros_like(inputs["source_ids"]),
                "padding_mask": ops.cast(source_mask, "int32"),
            }
        )["sequence_output"]  # (batch, source, hidden)
        x = self.target_embedding(inputs["target_ids"])  # (batch, target, hidden)
        for block in self.decoder_layers:
            x = block(
                x, encoded, decoder_padding_mask=target_mask, encoder_padding_mask=source_mask
            )
        if self.decoder_final_layer_norm is not None:
            x = self.decoder_final_layer_norm(x)
        logits = self.lm_head(x)  # (batch, target, vocabulary)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.dtype_policy = dtype  # the decoding caches follow the layers (see Encoder)
        # Translation loss does not reach the pooler: freeze it.
        encoder.pooler.trainable = False

        # === Config ===
        self.target_vocabulary_size = target_vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.max_sequence_length = max_sequence_length
        self.padding_id = padding_id

    def initial_state(self, source_ids, max_length):
        """Decoding state for `source_ids` `(batch, source)`: the source mask,
        per-layer cross-attention keys/values (computed once) and empty
        self-attention caches for `max_length` target tokens."""
        source_ids = ops.convert_to_tensor(source_ids, "int32")
        source_mask = ops.not_equal(source_ids, self.padding_id)
        encoded = self.encoder(
            {
                "token_ids": source_ids,
                "segment_ids": ops.zeros_like(source_ids),
                "padding_mask": ops.cast(source_mask, "int32"),
            }
        )["sequence_output"]
        batch = ops.shape(source_ids)[0]
        head_dim = self.encoder.hidden_dim // self.num_heads
        empty = ops.zeros(
            (batch, 2, max_length, self.num_heads, head_dim), dtype=self.compute_dtype
        )  # (batch, key/value, length, heads, head_dim)
        return {
            "source_mask": source_mask,
            "cross": [
                block.compute_cross_attention_cache(encoded) for block in self.decoder_layers
            ],
            "self": [empty for _ in self.decoder_layers],
        }

    def decode_step(self, token_ids, index, state):
        """Logits `(batch, vocabulary)` for the token after `token_ids` `(batch, 1)`
        at position `index`, and the state with the caches updated."""
        x = self.target_embedding(token_ids, start_index=index)
        caches = []
        for block, cache, cross in zip(
            self.decoder_layers, state["self"], state["cross"], strict=True
        ):
            x, cache, _ = block(
                x,
                encoder_padding_mask=state["source_mask"],
                self_attention_cache=cache,
                self_attention_cache_update_index=index,
                cross_attention_cache=cross,
            )
            caches.append(cache)
        if self.decoder_final_layer_norm is not None:
            x = self.decoder_final_layer_norm(x)
        logits = self.lm_head(x)[:, 0, :]
        return logits, {**state, "self": caches}

    def call_with_source_vectors(
        self, source_vectors, source_ids, target_ids, return_attention_scores=False
    ):
        """Logits `(batch, target, vocabulary)` from source token embeddings
        instead of source ids (inference), for gradients with respect to the
        source embeddings (`fmkeras.explain`).

        Args:
            source_vectors: float `(batch, source, hidden)`, e.g.
                `encoder.token_embedding(source_ids)`.
            source_ids: int `(batch, source)`: only their padding is read.
            target_ids: int `(batch, target)`, as for `call`.
            return_attention_scores: bool. Also return a dict of per-layer
                probabilities: `encoder` `(batch, heads, source, source)` and
                `cross` `(batch, heads, target, source)`.
        """
        source_mask = ops.not_equal(source_ids, self.padding_id)
        encoded = self.encoder.call_with_token_vectors(
            source_vectors,
            ops.zeros_like(source_ids),
            ops.cast(source_mask, "int32"),
            return_attention_scores=return_attention_scores,
        )
        target_mask = ops.not_equal(target_ids, self.padding_id)
        x = self.target_embedding(target_ids)  # (batch, target, hidden)
        cross = []
        for block in self.decoder_layers:
            x = block(
                x,
                encoded["sequence_output"],
                decoder_padding_mask=target_mask,
                encoder_padding_mask=source_mask,
                return_attention_scores=return_attention_scores,
            )
            if return_attention_scores:
                x, scores = x
                cross.append(scores)
        if self.decoder_final_layer_norm is not None:
            x = self.decoder_final_layer_norm(x)
        logits = self.lm_head(x)  # (batch, target, vocabulary)
        if return_attention_scores:
            return logits, {"encoder": encoded["attention_scores"], "cross": cross}
        return logits

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.layers.serialize(self.encoder),
            "target_vocabulary_size": self.target_vocabulary_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "dropout": self.dropout,
            "max_sequence_length": self.max_sequence_length,
            "padding_id": self.padding_id,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.layers.deserialize(config["encoder"])
        return cls(**config)
