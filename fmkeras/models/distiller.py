"""A student classifier that learns from a frozen teacher's logits and
intermediate layers (TinyBERT's hidden-state transfer, Jiao et al. 2020;
MiniLM's attention and value-relation transfer, Wang et al. 2020)."""

import math

import keras
from keras import ops

EPSILON = 1e-9  # keeps log() finite where an attention probability is 0 (padding)


def soft_target_loss(teacher_logits, student_logits, temperature):
    """`T^2 * KL(softmax(t / T) || softmax(s / T))` per example, `(batch,)`
    (Hinton et al. 2015; the T^2 keeps gradient sizes as T changes)."""
    teacher = ops.log_softmax(ops.cast(teacher_logits, "float32") / temperature, axis=-1)
    student = ops.log_softmax(ops.cast(student_logits, "float32") / temperature, axis=-1)
    return ops.sum(ops.exp(teacher) * (teacher - student), axis=-1) * temperature**2


@keras.saving.register_keras_serializable(package="fmkeras")
class DistillationLoss(keras.losses.Loss):
    """Soft-target KL at a temperature plus hard-label cross-entropy.

    `y_true` is `(batch, 1 + classes)`: the label, then the teacher's logits.

    Args:
        temperature: float. Softens teacher and student distributions.
        alpha: float. Weight of the soft-target term (scaled by T^2, so its
            gradients keep their size as T changes).
    """

    def __init__(self, temperature=2.0, alpha=0.5, name="distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = temperature
        self.alpha = alpha

    def call(self, y_true, y_pred):
        labels = ops.cast(y_true[:, 0], "int32")  # (batch,)
        y_pred = ops.cast(y_pred, "float32")  # (batch, classes)
        soft = soft_target_loss(y_true[:, 1:], y_pred, self.temperature)
        hard = keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
        return self.alpha * soft + (1.0 - self.alpha) * hard

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="fmkeras")
def label_accuracy(y_true, y_pred):
    """Accuracy against the label column of distillation targets."""
    return keras.metrics.sparse_categorical_accuracy(ops.cast(y_true[:, 0], "int32"), y_pred)


def masked_mean(values, mask):
    """The mean of `values` over the positions where `mask` (1 or 0,
    broadcastable to `values`) is 1."""
    mask = ops.broadcast_to(mask, ops.shape(values))
    return ops.sum(values * mask) / ops.maximum(ops.sum(mask), 1.0)


def hidden_state_loss(teacher_states, student_states, mask):
    """Mean squared error `(batch, seq, hidden)` over real tokens (TinyBERT)."""
    error = ops.square(ops.cast(student_states, "float32") - ops.cast(teacher_states, "float32"))
    return masked_mean(ops.mean(error, axis=-1), mask)


def relation_divergence(teacher, student, mask):
    """KL(teacher || student) of float32 row distributions `(batch, heads,
    seq, seq)`, averaged over heads and the real (query) tokens of `mask`."""
    divergence = ops.sum(
        teacher * (ops.log(teacher + EPSILON) - ops.log(student + EPSILON)), axis=-1
    )  # (batch, heads, seq)
    return masked_mean(divergence, mask[:, None, :])


def attention_loss(teacher_scores, student_scores, mask):
    """KL(teacher || student) of attention probabilities `(batch, heads, seq,
    seq)` per query over real tokens, head by head (MiniLM); with different
    head counts, of the head-averaged maps."""
    teacher = ops.cast(teacher_scores, "float32")
    student = ops.cast(student_scores, "float32")
    if teacher.shape[1] != student.shape[1]:
        teacher = ops.mean(teacher, axis=1, keepdims=True)  # (batch, 1, seq, seq)
        student = ops.mean(student, axis=1, keepdims=True)
    return relation_divergence(teacher, student, mask)


def value_relations(values, heads, mask):
    """`softmax(V_r V_r^T / sqrt(d_r))` of each relation head r: the value
    vectors `(batch, seq, attention heads, dim)` concatenated and split into
    `heads` groups of `d_r` (MiniLM-v2's relation heads), padded keys left out;
    `(batch, heads, seq, seq)` float32."""
    values = ops.cast(values, "float32")
    batch, length = ops.shape(values)[0], ops.shape(values)[1]
    width = values.shape[2] * values.shape[3] // heads
    split = ops.transpose(ops.reshape(values, (batch, length, heads, width)), (0, 2, 1, 3))
    logits = ops.einsum("bnsd,bntd->bnst", split, split) / math.sqrt(width)
    keys = ops.cast(mask[:, None, None, :], "bool")  # (batch, 1, 1, seq)
    return ops.softmax(ops.where(keys, logits, -1e9), axis=-1)


def value_relation_loss(teacher_values, student_values, mask):
    """KL(teacher || student) of the value relations (MiniLM) over real tokens,
    with as many relation heads as the two models' attention-head counts share
    (their greatest common divisor: MiniLM's per-head relations when equal)."""
    heads = math.gcd(teacher_values.shape[2], student_values.shape[2])
    return relation_divergence(value_relations(teacher_values, heads, mask),
                               value_relations(student_values, heads, mask), mask)  # fmt: skip


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
    `hidden_state_loss`, `attention_weight *` the mean `attention_loss` and
    `value_weight *` the mean `value_relation_loss` over `layer_pairs`; the
    hard-label loss is the compiled one (weighted `1 - alpha`). Otherwise it
    is the student alone: its logits.

    Args:
        student: an `fmkeras.models.Classifier`.
        teacher: an `fmkeras.models.Classifier` (made non-trainable).
        layer_pairs: list of `(student block, teacher block)` indices.
            Hidden-state transfer needs equal hidden sizes.
        temperature: float. Softens both distributions of the soft targets.
        alpha: float. Weight of the soft-target loss.
        hidden_weight: float. Weight of the hidden-state loss (0: off).
        attention_weight: float. Weight of the attention loss (0: off).
        value_weight: float. Weight of the value-relation loss (0: off).

    Example:

    >>> import numpy as np, fmkeras
    >>> def classifier(layers):
    ...     encoder = fmkeras.models.Encoder(100, layers, 2, 16, 32, max_sequence_length=8)
    ...     return fmkeras.models.Classifier(encoder, num_classes=2)
    >>> distiller = fmkeras.models.Distiller(classifier(1), classifier(2), [(0, 1)],
    ...     hidden_weight=1.0, attention_weight=1.0, value_weight=1.0)
    >>> ids = np.array([[2, 4, 9, 3]], "int32")
    >>> inputs = {"token_ids": ids, "segment_ids": 0 * ids, "padding_mask": 1 + 0 * ids}
    >>> tuple(distiller(inputs, training=True).shape), len(distiller.losses)
    ((1, 2), 4)
    """

    def __init__(self, student, teacher, layer_pairs, temperature=2.0, alpha=0.5,
                 hidden_weight=0.0, attention_weight=0.0, value_weight=0.0,
                 **kwargs):  # fmt: skip
        super().__init__(dtype=student.dtype_policy, **kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.layer_pairs = [tuple(pair) for pair in layer_pairs]
        self.temperature = temperature
        self.alpha = alpha
        self.hidden_weight = hidden_weight
        self.attention_weight = attention_weight
        self.value_weight = value_weight
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
        attending, valuing = bool(self.attention_weight), bool(self.value_weight)
        student_blocks = {s for s, _ in self.layer_pairs}
        teacher_blocks = {t for _, t in self.layer_pairs}
        student = self.student.encoder.call_with_layer_outputs(
            inputs, training=True, attention_layers=student_blocks if attending else (),
            value_layers=student_blocks if valuing else ())  # fmt: skip
        dropped = self.student.output_dropout(student["pooled_output"], training=True)
        logits = self.student.output_dense(dropped)  # (batch, classes)
        teacher = self.teacher.encoder.call_with_layer_outputs(
            inputs, training=False, attention_layers=teacher_blocks if attending else (),
            value_layers=teacher_blocks if valuing else ())  # fmt: skip
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
        if valuing:
            relations = [value_relation_loss(ops.stop_gradient(teacher["attention_values"][t]),
                                             student["attention_values"][s], mask)
                         for s, t in self.layer_pairs]  # fmt: skip
            self.add_loss(self.value_weight * ops.sum(ops.stack(relations)) / pairs)
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
            "value_weight": self.value_weight,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for role in ("student", "teacher"):
            config[role] = keras.layers.deserialize(config[role])
        return cls(**config)

