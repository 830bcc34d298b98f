"""Base of the fine-tuning models: an encoder output -> dropout -> dense logits."""

import keras


class EncoderHead(keras.Model):
    """`encoder(inputs)[output_key]` -> dropout -> `Dense(units)`, as a functional model.

    Subclasses name the encoder output they read and their size argument.

    Args:
        encoder: an `fmkeras.models.Encoder`.
        units: int. Output logits.
        dropout: float. Dropout before the output layer.
        output_key: `"pooled_output"` or `"sequence_output"`.
    """

    def __init__(self, encoder, units, dropout, output_key, **kwargs):
        # === Layers ===
        self.encoder = encoder
        self.output_dropout = keras.layers.Dropout(
            dropout, dtype=encoder.dtype_policy, name="output_dropout"
        )
        self.output_dense = keras.layers.Dense(
            units,
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            dtype=encoder.dtype_policy,
            name="logits",
        )

        # === Functional Model ===
        inputs = dict(encoder.input)
        features = encoder(inputs)[output_key]  # (batch, hidden) or (batch, seq, hidden)
        logits = self.output_dense(self.output_dropout(features))
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.dropout = dropout

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.layers.serialize(self.encoder),
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.layers.deserialize(config["encoder"])
        return cls(**config)
