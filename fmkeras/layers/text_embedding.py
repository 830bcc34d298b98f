"""Token + position (+ segment) embeddings, BERT style."""

import keras
from keras import ops

from fmkeras.layers.dropout import Dropout
from fmkeras.layers.layer_normalization import LayerNormalization
from fmkeras.layers.utils import clone_initializer


@keras.saving.register_keras_serializable(package="fmkeras")
class TextEmbedding(keras.layers.Layer):
    """Sum of token, learned position and segment embeddings, then LayerNorm
    and dropout (BERT's embedding block).

    `token_embedding` is exposed so an output head can tie its weights to it.
    `start_index` offsets the positions, for incremental decoding.

    Args:
        vocabulary_size: int. Number of token ids.
        hidden_dim: int. Embedding width.
        max_sequence_length: int. Number of learned positions.
        num_segments: int. Number of segment ids; 0 for no segment embedding.
        dropout: float. Dropout after the LayerNorm.
        layer_norm_epsilon: float.
        embeddings_initializer: initializer for all three tables.

    Example:

    >>> import numpy as np, fmkeras
    >>> embedding = fmkeras.layers.TextEmbedding(100, 16, max_sequence_length=8)
    >>> tuple(embedding(np.array([[5, 6, 7]])).shape)
    (1, 3, 16)
    """

    def __init__(
        self,
        vocabulary_size,
        hidden_dim,
        max_sequence_length,
        num_segments=2,
        dropout=0.0,
        layer_norm_epsilon=1e-12,
        embeddings_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.max_sequence_length = max_sequence_length
        self.num_segments = num_segments
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer or keras.initializers.TruncatedNormal(stddev=0.02)
        )

    def build(self, token_ids_shape, segment_ids_shape=None):
        def table(rows, name):
            layer = keras.layers.Embedding(
                rows,
                self.hidden_dim,
                embeddings_initializer=clone_initializer(self.embeddings_initializer),
                dtype=self.dtype_policy,
                name=name,
            )
            layer.build(token_ids_shape)
            return layer

        self.token_embedding = table(self.vocabulary_size, "token_embedding")
        self.position_embedding = table(self.max_sequence_length, "position_embedding")
        if self.num_segments:
            self.segment_embedding = table(self.num_segments, "segment_embedding")
        self.layer_norm = LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="embeddings_layer_norm"
        )
        self.layer_norm.build((*token_ids_shape, self.hidden_dim))
        self.dropout_layer = Dropout(
            self.dropout, dtype=self.dtype_policy, name="embeddings_dropout"
        )
        self.built = True

    def call(self, token_ids, segment_ids=None, start_index=0, training=None):
        """Args:
        token_ids: int `(batch, seq)`.
        segment_ids: int `(batch, seq)`; zeros when omitted.
        start_index: int, position of the first token.
        training: bool.
        """
        token_vectors = self.token_embedding(token_ids)  # (batch, seq, hidden)
        return self.embed_vectors(token_vectors, segment_ids, start_index, training)

    def embed_vectors(self, token_vectors, segment_ids=None, start_index=0, training=None):
        """The embedding of token vectors instead of ids: adds positions and
        segments to `token_vectors` `(batch, seq, hidden)`, then LayerNorm and
        dropout. `call` is `embed_vectors(token_embedding(token_ids), ...)`;
        explanations integrate gradients over `token_vectors`."""
        positions = ops.arange(ops.shape(token_vectors)[1]) + start_index
        x = token_vectors + ops.expand_dims(self.position_embedding(positions), 0)
        if self.num_segments:
            if segment_ids is None:
                segment_ids = ops.zeros(ops.shape(token_vectors)[:2], "int32")
            x = x + self.segment_embedding(segment_ids)
        return self.dropout_layer(self.layer_norm(x), training=training)

    def compute_output_shape(self, token_ids_shape, segment_ids_shape=None):
        return (*token_ids_shape, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "hidden_dim": self.hidden_dim,
                "max_sequence_length": self.max_sequence_length,
                "num_segments": self.num_segments,
                "dropout": self.dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            }
        )
        return config
