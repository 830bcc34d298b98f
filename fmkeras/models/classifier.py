"""Encoder + a classification head on the pooled `[CLS]` output."""

import keras

from fmkeras.models.encoder_head import EncoderHead


@keras.saving.register_keras_serializable(package="fmkeras")
class Classifier(EncoderHead):
    """Sequence classifier: `pooled_output` -> dropout -> dense logits.

    Inputs: the encoder's dict. Output: logits `(batch, num_classes)`.

    Args:
        encoder: an `fmkeras.models.Encoder`.
        num_classes: int.
        dropout: float. Dropout before the output layer.

    Example:

    >>> import numpy as np, fmkeras
    >>> encoder = fmkeras.models.Encoder(100, 1, 2, 16, 32, max_sequence_length=8)
    >>> classifier = fmkeras.models.Classifier(encoder, num_classes=3)
    >>> ids = np.array([[2, 4, 9, 3]], "int32")
    >>> logits = classifier({"token_ids": ids, "segment_ids": 0 * ids, "padding_mask": 1 + 0 * ids})
    >>> tuple(logits.shape)
    (1, 3)
    """

    def __init__(self, encoder, num_classes, dropout=0.1, **kwargs):
        super().__init__(encoder, num_classes, dropout, "pooled_output", **kwargs)
        self.num_classes = num_classes

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}
