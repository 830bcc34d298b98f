"""Losses that Keras does not ship in the form fmkeras needs."""

import keras
from keras import ops

from fmkeras import fused


@keras.saving.register_keras_serializable(package="fmkeras")
class SparseCategoricalCrossentropy(keras.losses.SparseCategoricalCrossentropy):
    """Keras's sparse categorical cross-entropy (same arguments, config and
    values); from logits, without `ignore_class`, inside
    `fmkeras.fused.fused_elementwise()` (the training driver's `fit` and
    `evaluate`) it is `fmkeras.fused.sparse_cross_entropy`: for a language
    model's `(tokens, vocabulary)` logits, no float32 copy of them in either
    pass.

    Args:
        **kwargs: `keras.losses.SparseCategoricalCrossentropy`'s.
    """

    def __init__(self, from_logits=False, ignore_class=None, **kwargs):
        super().__init__(from_logits=from_logits, ignore_class=ignore_class, **kwargs)
        self.fusable = from_logits and ignore_class is None
        self._logits = None

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras's `Loss.__call__` casts `y_pred` to the loss dtype (float32)
        # before `call`: a float32 copy of bfloat16 `(tokens, vocabulary)`
        # logits forward and its cast back in the gradient (12 ms of a
        # BERT-Mini MLM step). The fused loss reads the logits as they come;
        # Keras's masking and reduction stay, and the unused cast is pruned.
        if self.fusable and fused.enabled():
            self._logits = ops.convert_to_tensor(y_pred)
        try:
            return super().__call__(y_true, y_pred, sample_weight)
        finally:
            self._logits = None

    def call(self, y_true, y_pred):
        if not (self.fusable and fused.enabled()):
            return super().call(y_true, y_pred)
        if self._logits is not None:
            y_pred = self._logits
        if len(y_true.shape) == len(y_pred.shape):  # (..., 1) labels
            y_true = ops.squeeze(y_true, axis=-1)
        return fused.sparse_cross_entropy(y_true, y_pred)


@keras.saving.register_keras_serializable(package="fmkeras")
class SmoothedSparseCrossEntropy(keras.losses.Loss):
    """Sparse categorical cross-entropy from logits with label smoothing.

    `(1 - label_smoothing) * NLL(true class) + label_smoothing * mean over
    classes of -log p`, without materialising one-hot targets (the
    vocabulary may be large). Averaged over positions with non-zero sample
    weight (padding carries weight 0).

    Args:
        label_smoothing: float in [0, 1).
    """

    def __init__(self, label_smoothing=0.1, name="smoothed_cross_entropy", **kwargs):
        kwargs.setdefault("reduction", "mean_with_sample_weight")
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        log_probs = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)
        y_true = ops.cast(y_true, "int32")
        nll = -ops.squeeze(ops.take_along_axis(log_probs, y_true[..., None], axis=-1), -1)
        uniform = -ops.mean(log_probs, axis=-1)
        return (1.0 - self.label_smoothing) * nll + self.label_smoothing * uniform

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def label_loss(label_smoothing=0.0):
    """The cross-entropy of integer labels from logits, averaged over positions
    with non-zero sample weight: Keras's, or label-smoothed (`train.label_smoothing`)."""
    if label_smoothing:
        return SmoothedSparseCrossEntropy(label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
