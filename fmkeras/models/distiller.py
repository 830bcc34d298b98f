"""A student classifier that learns from a frozen teacher's logits and
intermediate layers (TinyBERT's hidden-state transfer, Jiao et al. 2020;
MiniLM's attention transfer, Wang et al. 2020)."""

import keras
from keras import ops

EPSILON = 1e-9  # keeps log() finite where an attention probability is 0 (padding)


def soft_target_loss(teacher_logits, student_logits, temperature):
    """`T^2 * KL(softmax(t / T) || softmax(s / T))` per example, `(batch,)`
    (Hinton et al. 2015; the T^2 keeps gradient sizes as T changes)."""
    teacher = ops.log_softmax(ops.cast(teacher_logits, "float32") / temperature, axis=-1)
    student = ops.log_softmax(ops.cast(student_logits, "float32") / temperature, axis=-1)
    return ops.sum(ops.exp(teacher) * (teacher - student), axis=-1) * temperature**2


def masked_mean(values, mask):
    """The mean of `values` over the positions where `mask` (1 or 0,
    broadcastable to `values`) is 1."""
    mask = ops.broadcast_to(mask, ops.shape(values))
    return ops.sum(values * mask) / ops.maximum(ops.sum(mask), 1.0)


def hidden_state_loss(teacher_states, student_states, mask):
    """Mean squared error `(batch, seq, hidden)` over real tokens (TinyBERT)."""
    error = ops.square(ops.cast(student_states, "float32") - ops.cast(teacher_states, "float32"))
    return masked_mean(ops.mean(error, axis=-1), mask)


def attention_loss(teacher_scores, student_scores, mask):
    """KL(teacher || student) of attention probabilities `(batch, heads, seq,
    seq)` per query over real tokens, head by head (MiniLM); with different
    head counts, of the head-averaged maps."""
    teacher = ops.cast(teacher_scores, "float32")
    student = ops.cast(student_scores, "float32")
    if teacher.shape[1] != student.shape[1]:
        teacher = ops.mean(teacher, axis=1, keepdims=True)  # (batch, 1, seq, seq)
        student = ops.mean(student, axis=1, keepdims=True)
    divergence = ops.sum(
        teacher * (ops.log(teacher + EPSILON) - ops.log(student + EPSILON)), axis=-1
    )  # (batch, heads, seq)
    return masked_mean(divergence, mask[:, None, :])


def uniform_layer_pairs(student_layers, teacher_layers):
    """`[(student layer, teacher layer)]`: student block i learns from teacher
    block `(i + 1) * teacher_layers / student_layers - 1` (TinyBERT's uniform
    mapping; the last blocks pair up)."""
    return [(i, (i + 1) * teacher_layers // student_layers - 1) for i in range(student_layers)]


@keras.saving.register_keras_serializable(package="fmkeras")
class Distiller(keras.Model):
    """A `Classifier` student trained against a frozen teacher `Classifier`
    that reads the same token ids (same vocabulary).

    Called with `training=True`, it runs both models and adds, with
    `add_loss`, `alpha * soft_target_loss`, `hidden_weight *` the mean
    `hidden_state_loss` and `attention_weight *` the mean `attention_loss`
    over `layer_pairs`; the hard-label loss is the compiled one (weighted
    `1 - alpha`). Otherwise it is the student alone: its logits.

    Args:
        student: an `fmkeras.models.Classifier`.
        teacher: an `fmkeras.models.Classifier` (made non-trainable).
        layer_pairs: list of `(student block, teacher block)` indices.
            Hidden-state transfer needs equal hidden sizes.
        temperature: float. Softens both distributions of the soft targets.
        alpha: float. Weight of the soft-target loss.
        hidden_weight: float. Weight of the hidden-state loss (0: off).
        attention_weight: float. Weight of the attention loss (0: off).

    Example:

    >>> import numpy as np, fmkeras
    >>> def classifier(layers):
    ...     encoder = fmkeras.models.Encoder(100, layers, 2, 16, 32, max_sequence_length=8)
    ...     return fmkeras.models.Classifier(encoder, num_classes=2)
    >>> distiller = fmkeras.models.Distiller(classifier(1), classifier(2), [(0, 1)],
    ...                                      hidden_weight=1.0, attention_weight=1.0)
    >>> ids = np.array([[2, 4, 9, 3]], "int32")
    >>> inputs = {"token_ids": ids, "segment_ids": 0 * ids, "padding_mask": 1 + 0 * ids}
    >>> distiller(inputs, training=True).shape, len(distiller.losses)
    ((1, 2), 3)
    """

    def __init__(self, student, teacher, layer_pairs, temperature=2.0, alpha=0.5,
                 hidden_weight=0.0, attention_weight=0.0, **kwargs):  # fmt: skip
        super().__init__(dtype=student.dtype_policy, **kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.layer_pairs = [tuple(pair) for pair in layer_pairs]
        self.temperature = temperature
        self.alpha = alpha
        self.hidden_weight = hidden_weight
        self.attention_weight = attention_weight
        if hidden_weight and student.encoder.hidden_dim != teacher.encoder.hidden_dim:
            raise ValueError(f"hidden-state transfer needs equal hidden sizes; the student has "
                             f"{student.encoder.hidden_dim}, the teacher "
                             f"{teacher.encoder.hidden_dim}")  # fmt: skip
        for model, index, role in [(student, 0, "student"), (teacher, 1, "teacher")]:
            layers = model.encoder.num_layers
            if any(not 0 <= pair[index] < layers for pair in self.layer_pairs):
                raise ValueError(f"layer pairs {self.layer_pairs}: the {role} has {layers} blocks")
        self.built = student.built and teacher.built  # functional models, built at construction

    def call(self, inputs, training=False):
        if not training:
            return self.student(inputs, training=False)
        attending = bool(self.attention_weight)
        student = self.student.encoder.call_with_layer_outputs(
            inputs, training=True,
            attention_layers={s for s, _ in self.layer_pairs} if attending else ())  # fmt: skip
        dropped = self.student.output_dropout(student["pooled_output"], training=True)
        logits = self.student.output_dense(dropped)  # (batch, classes)
        teacher = self.teacher.encoder.call_with_layer_outputs(
            inputs, training=False,
            attention_layers={t for _, t in self.layer_pairs} if attending else ())  # fmt: skip
        teacher_logits = ops.stop_gradient(self.teacher.output_dense(teacher["pooled_output"]))
        mask = ops.cast(inputs["padding_mask"], "float32")  # (batch, seq)
        self.add_loss(self.alpha * ops.mean(soft_target_loss(teacher_logits, logits,
                                                             self.temperature)))  # fmt: skip
        pairs = len(self.layer_pairs)
        if self.hidden_weight:
            hidden = [hidden_state_loss(ops.stop_gradient(teacher["hidden_states"][t]),
                                        student["hidden_states"][s], mask)
                      for s, t in self.layer_pairs]  # fmt: skip
            self.add_loss(self.hidden_weight * ops.sum(ops.stack(hidden)) / pairs)
        if attending:
            attention = [attention_loss(ops.stop_gradient(teacher["attention_scores"][t]),
                                        student["attention_scores"][s], mask)
                         for s, t in self.layer_pairs]  # fmt: skip
            self.add_loss(self.attention_weight * ops.sum(ops.stack(attention)) / pairs)
        return logits

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "student": keras.layers.serialize(self.student),
            "teacher": keras.layers.serialize(self.teacher),
            "layer_pairs": [list(pair) for pair in self.layer_pairs],
            "temperature": self.temperature,
            "alpha": self.alpha,
            "hidden_weight": self.hidden_weight,
            "attention_weight": self.attention_weight,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for role in ("student", "teacher"):
            config[role] = keras.layers.deserialize(config[role])
        return cls(**config)

