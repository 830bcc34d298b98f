"""BERT-style encoder backbone (same input/output contract as keras-hub's BertBackbone)."""

import keras

from fmkeras.layers.text_embedding import TextEmbedding
from fmkeras.layers.transformer_encoder_block import TransformerEncoderBlock
from fmkeras.layers.utils import with_dtype_policy


def per_layer(value, num_layers, name):
    """`value` (an int, or a list of one int per layer) as a list of `num_layers` ints."""
    if isinstance(value, int):
        return [value] * num_layers
    if len(value) != num_layers:
        raise ValueError(f"{name} has {len(value)} entries for {num_layers} layers")
    return [int(v) for v in value]


@keras.saving.register_keras_serializable(package="fmkeras")
class Encoder(keras.Model):
    """A Transformer encoder as a functional model.

    Inputs: a dict of int32 `(batch, seq)` tensors `token_ids`, `segment_ids`
    and `padding_mask` (1 for real tokens). Outputs: a dict with
    `sequence_output` `(batch, seq, hidden)` and `pooled_output`
    `(batch, hidden)` (tanh dense on the first token), like
    `keras_hub.models.BertBackbone`. Intermediate outputs are reachable by
    layer name, e.g. `keras.Model(encoder.input,
    encoder.get_layer("transformer_layer_0").output)`.

    Args:
        vocabulary_size: int.
        num_layers: int. Number of `TransformerEncoderBlock`s.
        num_heads: int, or a list of one int per layer (a structurally
            pruned encoder, `fmkeras.compress`).
        hidden_dim: int.
        intermediate_dim: int, or a list of one int per layer. Feed-forward
            width.
        dropout: float.
        max_sequence_length: int. Learned positions.
        num_segments: int. Segment ids (BERT uses 2).
        activation: str. Feed-forward activation.
        normalize_first: bool. Pre-LN blocks (adds a final LayerNorm).
        layer_norm_epsilon: float.
        use_bias: bool. Biases in the blocks' attention and feed-forward
            projections (False: none, as Cramming trains).
        key_dim: int. Size of each attention head; defaults to
            `hidden_dim // num_heads` (a pruned encoder keeps its original
            head size with fewer heads).

    Example:

    >>> import numpy as np, fmkeras
    >>> encoder = fmkeras.models.Encoder(
    ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=8)
    >>> ids = np.array([[2, 7, 9, 3]], "int32")
    >>> out = encoder({"token_ids": ids, "segment_ids": 0 * ids,
    ...                "padding_mask": np.ones_like(ids)})
    >>> tuple(out["sequence_output"].shape), tuple(out["pooled_output"].shape)
    ((1, 4, 16), (1, 16))
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_heads,
        hidden_dim,
        intermediate_dim,
        dropout=0.1,
        max_sequence_length=512,
        num_segments=2,
        activation="gelu",
        normalize_first=False,
        layer_norm_epsilon=1e-12,
        use_bias=True,
        key_dim=None,
        dtype=None,
        **kwargs,
    ):
        heads_per_layer = per_layer(num_heads, num_layers, "num_heads")
        widths_per_layer = per_layer(intermediate_dim, num_layers, "intermediate_dim")
        if key_dim is None and not isinstance(num_heads, int):
            raise ValueError("an Encoder with per-layer num_heads needs key_dim (the head size)")

        # === Layers ===
        self.embedding = TextEmbedding(
            vocabulary_size,
            hidden_dim,
            max_sequence_length,
            num_segments=num_segments,
            dropout=dropout,
            layer_norm_epsilon=layer_norm_epsilon,
            dtype=dtype,
            name="embedding",
        )
        initializer = keras.initializers.TruncatedNormal(stddev=0.02)
        self.transformer_layers = [
            TransformerEncoderBlock(
                num_heads=heads_per_layer[i],
                intermediate_dim=widths_per_layer[i],
                key_dim=key_dim,
                dropout=dropout,
                activation=activation,
                normalize_first=normalize_first,
                layer_norm_epsilon=layer_norm_epsilon,
                use_bias=use_bias,
                kernel_initializer=initializer,
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
        self.pooler = keras.layers.Dense(
            hidden_dim,
            activation="tanh",
            kernel_initializer=initializer,
            dtype=dtype,
            name="pooled_dense",
        )

        # === Functional Model ===
        inputs = {
            name: keras.Input(shape=(None,), dtype="int32", name=name)
            for name in ("token_ids", "segment_ids", "padding_mask")
        }
        x = self.embedding(inputs["token_ids"], inputs["segment_ids"])
        for block in self.transformer_layers:
            x = block(x, padding_mask=inputs["padding_mask"])  # (batch, seq, hidden)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        pooled = self.pooler(x[:, 0, :])  # (batch, hidden)
        super().__init__(
            inputs=inputs,
            outputs={"sequence_output": x, "pooled_output": pooled},
            dtype=dtype,
            **kwargs,
        )
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
        self.num_segments = num_segments
        self.activation = activation
        self.normalize_first = normalize_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_bias = use_bias
        self.key_dim = key_dim

    @property
    def token_embedding(self):
        """The `keras.layers.Embedding` holding the token table (for tied heads)."""
        return self.embedding.token_embedding

    def call_with_token_vectors(
        self, token_vectors, segment_ids, padding_mask, return_attention_scores=False
    ):
        """The encoder's outputs from token embeddings instead of token ids
        (inference: no dropout), for gradients with respect to the input
        embeddings (`fmkeras.explain`).

        Args:
            token_vectors: float `(batch, seq, hidden)`, e.g.
                `encoder.token_embedding(token_ids)`.
            segment_ids: int `(batch, seq)`.
            padding_mask: int `(batch, seq)`.
            return_attention_scores: bool. Add `attention_scores`: a list of
                `(batch, heads, seq, seq)` probabilities, one per layer.

        Returns the dict of `call`, which the same ids give.
        """
        x = self.embedding.embed_vectors(token_vectors, segment_ids)
        attention_layers = range(self.num_layers) if return_attention_scores else ()
        outputs = self._run_blocks(x, padding_mask, False, attention_layers)
        del outputs["hidden_states"], outputs["attention_values"]
        if not return_attention_scores:
            del outputs["attention_scores"]
        return outputs

    def call_with_layer_outputs(self, inputs, training=False, attention_layers=(),
                                value_layers=()):  # fmt: skip
        """The outputs of `call` plus each block's, for intermediate-layer
        distillation (`fmkeras.tasks.distill`).

        Args:
            inputs: the dict of `call`.
            training: bool. Whether dropout is active.
            attention_layers: indices of the blocks whose attention
                probabilities to return.
            value_layers: indices of the blocks whose attention values to return.

        Returns the dict of `call` plus `hidden_states`, one `(batch, seq,
        hidden)` output per block, `attention_scores`, one entry per block:
        `(batch, heads, seq, seq)` probabilities for `attention_layers`, None
        for the others, and `attention_values` likewise: `(batch, seq, heads,
        value_dim)` for `value_layers`.
        """
        x = self.embedding(inputs["token_ids"], inputs["segment_ids"], training=training)
        return self._run_blocks(x, inputs["padding_mask"], training, attention_layers,
                                value_layers)  # fmt: skip

    def _run_blocks(self, x, padding_mask, training, attention_layers, value_layers=()):
        hidden_states, scores, values = [], [], []
        for index, block in enumerate(self.transformer_layers):
            values.append(block.attention_values(x) if index in value_layers else None)
            if index in attention_layers:
                x, layer_scores = block(x, padding_mask=padding_mask, training=training,
                                        return_attention_scores=True)  # fmt: skip
            else:
                x, layer_scores = block(x, padding_mask=padding_mask, training=training), None
            hidden_states.append(x)  # (batch, seq, hidden)
            scores.append(layer_scores)  # (batch, heads, seq, seq) or None
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return {"sequence_output": x, "pooled_output": self.pooler(x[:, 0, :]),
                "hidden_states": hidden_states, "attention_scores": scores,
                "attention_values": values}  # fmt: skip

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
            "num_segments": self.num_segments,
            "activation": self.activation,
            "normalize_first": self.normalize_first,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "use_bias": self.use_bias,
            "key_dim": self.key_dim,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**with_dtype_policy(config))
