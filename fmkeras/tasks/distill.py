"""Knowledge distillation (`task: distill`): a student classifier learns from
a finished classify run, the teacher (Hinton et al. 2015).

The student is any `classify` starting point (a fresh tiny or mini encoder
with its own vocabulary, a pretraining run, a checkpoint); the teacher keeps
its own vocabulary and sequence length. The teacher's logits for every
training example are computed once, before training (one forward pass over
the training set, logged with its time), and travel with the examples, so a
step costs the student alone. The loss is `alpha * T^2 * KL(softmax(t / T)
|| softmax(s / T)) + (1 - alpha) * CE(label, s)` with teacher logits `t`,
student logits `s` and temperature `T` (`distill.temperature`,
`distill.alpha`). The finished run is a classify run in every other respect:
evaluate, predict, explain and export treat it as one.
"""

import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from fmkeras.errors import ConfigError
from fmkeras.tasks import load_run
from fmkeras.tasks.classify import ClassifyTask
from fmkeras.tasks.finetune import collect
from fmkeras.tasks.registry import register_task
from fmkeras.text.labelled import encode_inputs


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
        temperature = self.temperature
        teacher = ops.log_softmax(ops.cast(y_true[:, 1:], "float32") / temperature, axis=-1)
        student = ops.log_softmax(y_pred / temperature, axis=-1)
        soft = ops.sum(ops.exp(teacher) * (teacher - student), axis=-1) * temperature**2
        hard = keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
        return self.alpha * soft + (1.0 - self.alpha) * hard

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="fmkeras")
def label_accuracy(y_true, y_pred):
    """Accuracy against the label column of distillation targets."""
    return keras.metrics.sparse_categorical_accuracy(ops.cast(y_true[:, 0], "int32"), y_pred)


@register_task
class DistillTask(ClassifyTask):
    name = "distill"

    @classmethod
    def check_config(cls, config):
        teacher = config.distill.teacher
        if not teacher:
            raise ConfigError("task=distill needs distill.teacher=RUN_DIR, a finished classify run")
        if not (Path(teacher) / "task.json").is_file():
            raise ConfigError(f"distill.teacher={teacher} is not a finished run (no task.json)")
        super().check_config(config)

    def read_data(self):
        super().read_data()
        teacher = self.config.distill.teacher
        self.teacher = load_run(teacher, tasks=("classify", "distill"))
        if list(self.teacher.labels) != list(self.names):
            raise ConfigError(f"distill.teacher={teacher} has the labels {self.teacher.labels}, "
                              f"but {self.config.data.train_file} has {self.names}")  # fmt: skip

    def build_model(self):
        model = super().build_model()
        self.teacher_logits = self.teacher_outputs()
        return model

    def teacher_outputs(self):
        """The teacher's logits `(examples, classes)` for the training rows."""
        started = time.time()
        teacher = self.teacher
        ids = encode_inputs(teacher.tokenizer, self.train_rows.inputs,
                            teacher.info["sequence_length"])  # fmt: skip
        order = np.arange(len(self.train_rows), dtype=np.int32)  # batches reorder by length
        logits = np.zeros((len(order), len(self.names)), np.float32)
        for output, index in collect(teacher.model, teacher.batches(ids, order, 64)):
            logits[int(index)] = output
        agree = float((logits.argmax(-1) == self.train_labels).mean())
        self.log(f"teacher {self.config.distill.teacher}: logits of {len(order):,} training "
                 f"examples in {time.time() - started:.0f} s (agrees with {agree:.1%} of the "
                 f"labels)")  # fmt: skip
        return logits

    def compile_args(self, model):
        distill = self.config.distill
        accuracy = keras.metrics.MeanMetricWrapper(label_accuracy, name="accuracy")
        return {"loss": DistillationLoss(distill.temperature, distill.alpha),
                "weighted_metrics": [accuracy]}  # fmt: skip

    def train_dataset(self, step):
        """Batches whose targets are `[label, teacher logits...]` (the example
        index travels through the shuffled, bucketed batches as the label)."""
        indices = np.arange(len(self.train_labels), dtype=np.int32)
        batches = self.batches(self.train_ids, indices, shuffle=True,
                               seed=self.config.train.seed + step, repeat=True)  # fmt: skip
        labels = tf.constant(self.train_labels, tf.float32)
        teacher = tf.constant(self.teacher_logits)

        def targets(features, index, weight):
            label = tf.gather(labels, index)[:, None]  # (batch, 1)
            return features, tf.concat([label, tf.gather(teacher, index)], axis=1), weight

        return batches.map(targets)

    def info(self):
        distill = self.config.distill
        return {**super().info(), "distill": {"teacher": distill.teacher,
                                              "temperature": distill.temperature,
                                              "alpha": distill.alpha}}  # fmt: skip
