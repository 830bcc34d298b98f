"""Encoder + tied masked-LM head, trained with `fit`."""

import keras

from fmkeras.layers.masked_lm_head import MaskedLMHead


@keras.saving.register_keras_serializable(package="fmkeras")
class MaskedLM(keras.Model):
    """Masked language model over an `Encoder`.

    Inputs: the encoder's dict plus `mask_positions` int32
    `(batch, predictions)`. Output: logits
    `(batch, predictions, vocabulary_size)`. The head's output projection is
    the encoder's token embedding (tied). With `next_sentence`, BERT's
    next-sentence head (a dense layer on the pooled output) is added and the
    output is `{"mlm": logits, "nsp": (batch, 2) logits}` (class 1: "is next").

    Args:
        encoder: an `fmkeras.models.Encoder`.
        next_sentence: bool. Add the next-sentence prediction head.

    Example:

    >>> import numpy as np, fmkeras
    >>> encoder = fmkeras.models.Encoder(100, 1, 2, 16, 32, max_sequence_length=8)
    >>> mlm = fmkeras.models.MaskedLM(encoder)
    >>> ids = np.array([[2, 4, 9, 3]], "int32")
    >>> logits = mlm({"token_ids": ids, "segment_ids": 0 * ids, "padding_mask": 1 + 0 * ids,
    ...               "mask_positions": np.array([[1, 2]], "int32")})
    >>> tuple(logits.shape)
    (1, 2, 100)
    """

    def __init__(self, encoder, next_sentence=False, **kwargs):
        # === Layers ===
        self.encoder = encoder
        self.head = MaskedLMHead(
            vocabulary_size=encoder.vocabulary_size,
            token_embedding=encoder.token_embedding,
            intermediate_activation=encoder.activation,
            layer_norm_epsilon=encoder.layer_norm_epsilon,
            dtype=encoder.dtype_policy,
            name="mlm_head",
        )

        # === Functional Model ===
        inputs = dict(encoder.input)
        inputs["mask_positions"] = keras.Input(shape=(None,), dtype="int32", name="mask_positions")
        outputs = encoder({k: v for k, v in inputs.items() if k != "mask_positions"})
        logits = self.head(outputs["sequence_output"], mask_positions=inputs["mask_positions"])
        if next_sentence:
            self.next_sentence_head = keras.layers.Dense(
                2,
                kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
                dtype=encoder.dtype_policy,
                name="next_sentence_head",
            )
            logits = {"mlm": logits, "nsp": self.next_sentence_head(outputs["pooled_output"])}
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        # The MLM loss alone does not reach the pooler: freeze it so the optimizer keeps
        # no state for it (after super().__init__, which resets `trainable` on sublayers).
        encoder.pooler.trainable = next_sentence
        self.next_sentence = next_sentence

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.layers.serialize(self.encoder),
            "next_sentence": self.next_sentence,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.layers.deserialize(config["encoder"])
        return cls(**config)


def masked_lm_logits(outputs):
    """The masked-LM logits of a `MaskedLM`'s outputs (with or without NSP)."""
    return outputs["mlm"] if isinstance(outputs, dict) else outputs

