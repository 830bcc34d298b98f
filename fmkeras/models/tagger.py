"""Encoder + a per-token classification head (token classification, e.g. NER)."""

import keras

from fmkeras.models.encoder_head import EncoderHead


@keras.saving.register_keras_serializable(package="fmkeras")
class Tagger(EncoderHead):
    """Token classifier: `sequence_output` -> dropout -> dense logits per token.

    Inputs: the encoder's dict. Output: logits `(batch, seq, num_tags)`.

    Args:
        encoder: an `fmkeras.models.Encoder`.
        num_tags: int.
        dropout: float. Dropout before the output layer.

    Example:

    >>> import numpy as np, fmkeras
    >>> encoder = fmkeras.models.Encoder(100, 1, 2, 16, 32, max_sequence_length=8)
    >>> tagger = fmkeras.models.Tagger(encoder, num_tags=5)
    >>> ids = np.array([[2, 4, 9, 3]], "int32")
    >>> logits = tagger({"token_ids": ids, "segment_ids": 0 * ids, "padding_mask": 1 + 0 * ids})
    >>> tuple(logits.shape)
    (1, 4, 5)
    """

    def __init__(self, encoder, num_tags, dropout=0.1, **kwargs):
        super().__init__(encoder, num_tags, dropout, "sequence_output", **kwargs)
        # Token-level loss never reaches the pooler: freeze it (no optimizer state).
        encoder.pooler.trainable = False
        self.num_tags = num_tags

    def get_config(self):
        return {**super().get_config(), "num_tags": self.num_tags}
