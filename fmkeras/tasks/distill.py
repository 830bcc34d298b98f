"""Knowledge distillation (`task: distill`): a student classifier learns from
a finished classify run, the teacher (Hinton et al. 2015).

The student is any `classify` starting point (a fresh tiny or mini encoder
with its own vocabulary, a pretraining run, a checkpoint); the teacher keeps
its own vocabulary and sequence length. The teacher's logits for every
training example are computed once, before training (one forward pass over
the training set, logged with its time; kept in the run directory, so a
resumed run reads them), and travel with the examples, so a step costs the
student alone. The loss is `alpha * T^2 * KL(softmax(t / T)
|| softmax(s / T)) + (1 - alpha) * CE(label, s)` with teacher logits `t`,
student logits `s` and temperature `T` (`distill.temperature`,
`distill.alpha`).

`distill.teacher` may name several runs ("RUN1,RUN2,..."): an ensemble. Their
logits are averaged, so at every temperature the soft targets are the
normalised geometric mean of the teachers' softened distributions. Each
teacher runs once, one at a time, over the training rows.

With `distill.hidden_weight`, `attention_weight` or `value_weight` above 0
the student also learns the teacher's intermediate layers (`models.Distiller`:
hidden states as TinyBERT, attention probabilities and value relations as
MiniLM, between the blocks `distill.layers` pairs). The student must then
read the teacher's vocabulary (e.g. a student made by `fmkeras.compress prune
--layers`), and the teacher runs beside it on every batch instead of cached
logits.

The finished run is a classify run in every other respect: evaluate,
predict, explain and export treat it as one.
"""

import hashlib
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from fmkeras.config import distill_teacher_blocks
from fmkeras.errors import ConfigError
from fmkeras.models.distiller import (
    DistillationLoss,
    Distiller,
    label_accuracy,
    uniform_layer_pairs,
)
from fmkeras.tasks import load_run
from fmkeras.tasks.classify import ClassifyTask
from fmkeras.tasks.finetune import EncoderTask, collect
from fmkeras.tasks.registry import register_task
from fmkeras.tasks.spec import (
    LAYER_WEIGHTS,
    TEACHER_TASKS,
    DistillSpec,
    intermediate,
    teacher_runs,
)
from fmkeras.text.augment import augment_texts
from fmkeras.text.labelled import encode_inputs
from fmkeras.training.checkpoints import atomic_path
from fmkeras.training.losses import label_loss
from fmkeras.training.run_dir import RunDir

TEACHER_LOGITS = "teacher_logits.npz"  # in the student's run directory


@register_task
class DistillTask(DistillSpec, ClassifyTask):
    def read_data(self):
        super().read_data()
        self.teachers = teacher_runs(self.config.distill)
        for teacher in self.teachers:  # the spec checked that each is a classify run
            info = RunDir(teacher).read_info()
            if list(info["labels"]) != list(self.names):
                raise ConfigError(f"distill.teacher: {teacher} has the labels "
                                  f"{info['labels']}, but {self.config.data.train_file} has "
                                  f"{self.names}")  # fmt: skip
        self.augmented = self.augment_rows()

    def build_model(self):
        """The student (a classifier); with intermediate transfer, the student
        and the teacher in a `Distiller` (inside the strategy scope, in the run's
        precision)."""
        student = super().build_model()
        distill = self.config.distill
        if not intermediate(distill):
            self.teacher_logits = self.teacher_outputs()
            # A copy's hard label is the teacher's answer: a perturbation may change the label.
            copies = slice(len(self.train_labels) - self.augmented, None)
            self.train_labels[copies] = self.teacher_logits[copies].argmax(-1)
            return student
        self.teacher = load_teacher(self.teachers[0])  # check_config: one teacher here
        self.check_shared_vocabulary()
        teacher = self.teacher.model
        student_blocks, teacher_blocks = student.encoder.num_layers, teacher.encoder.num_layers
        if distill.layers is None:
            pairs = uniform_layer_pairs(student_blocks, teacher_blocks)
        else:
            blocks = distill_teacher_blocks(distill.layers)
            if len(blocks) != student_blocks:
                raise ConfigError(f"distill.layers={distill.layers} has {len(blocks)} entries; "
                                  f"the student has {student_blocks} blocks")  # fmt: skip
            pairs = [(s, t) for s, t in enumerate(blocks) if t is not None]
        try:
            model = Distiller(student, teacher, pairs, distill.temperature, distill.alpha,
                              distill.hidden_weight, distill.attention_weight,
                              distill.value_weight, name="distiller")  # fmt: skip
        except ValueError as error:
            raise ConfigError(f"distill: {error}") from None
        described = ", ".join(f"{s}<-{t}" for s, t in pairs)
        self.log(f"teacher {distill.teacher} runs beside the student ({teacher_blocks} -> "
                 f"{student_blocks} blocks, student<-teacher {described}; hidden_weight "
                 f"{distill.hidden_weight:g}, attention_weight {distill.attention_weight:g}, "
                 f"value_weight {distill.value_weight:g})")  # fmt: skip
        return model

    def augment_rows(self):
        """Appends `distill.augment` perturbed copies of each training text to
        the training rows (`fmkeras.text.augment`), each with its source's label
        until the teacher relabels it; returns how many were appended."""
        copies = self.config.distill.augment
        if not copies:
            return 0
        rows = self.train_rows
        texts, sources = augment_texts(rows.inputs, copies, self.config.train.seed)
        rows.inputs = rows.inputs + texts
        rows.labels = rows.labels + [rows.labels[i] for i in sources]
        self.log(f"distill.augment={copies}: {len(texts):,} perturbed copies of "
                 f"{len(set(sources)):,} training texts (distinct from their texts "
                 f"and each other), labelled by the teacher")  # fmt: skip
        return len(texts)

    def check_shared_vocabulary(self):
        """Intermediate transfer pairs token positions: one vocabulary."""
        teacher = self.teacher.tokenizer
        if teacher.vocabulary != self.tokenizer.vocabulary or \
                teacher.lowercase != self.tokenizer.lowercase:
            raise ConfigError(f"{LAYER_WEIGHTS} need a student with the "
                              f"teacher's vocabulary, but {self.run.vocab} differs from "
                              f"{Path(self.config.distill.teacher) / 'vocab.txt'} (start the "
                              f"student from the teacher, e.g. python -m fmkeras.compress prune "
                              f"TEACHER --layers 3)")  # fmt: skip
        positions = self.teacher.model.encoder.max_sequence_length
        if self.config.data.sequence_length > positions:
            raise ConfigError(f"data.sequence_length={self.config.data.sequence_length} exceeds "
                              f"the teacher's {positions} positions")  # fmt: skip

    def teacher_outputs(self):
        """The teacher's logits `(examples, classes)` for the training rows
        (augmented copies included), computed once per run: they stay in the
        run directory (`teacher_logits.npz`, with a fingerprint of the teacher,
        its precision and the rows), so a resumed run reads them instead of
        running the teacher again."""
        started = time.time()
        cache = self.run.root / TEACHER_LOGITS
        fingerprint = self.teacher_fingerprint()
        logits = cached_logits(cache, fingerprint)
        if logits is None:
            logits = self.run_teacher()
            with atomic_path(cache) as temporary:
                np.savez(temporary, logits=logits, fingerprint=fingerprint)
            source = f"in {time.time() - started:.0f} s"
        else:
            source = f"from {cache} (computed when the run started)"
        originals = len(logits) - self.augmented
        agree = float((logits[:originals].argmax(-1) == self.train_labels[:originals]).mean())
        copies = f" and {self.augmented:,} copies" if self.augmented else ""
        teachers = self.teachers
        named = teachers[0] if len(teachers) == 1 else \
            f"ensemble of {len(teachers)} ({', '.join(teachers)}; mean logits)"  # fmt: skip
        self.log(f"teacher {named}: logits of {originals:,} training examples{copies} {source} "
                 f"(agrees with {agree:.1%} of the labels)")  # fmt: skip
        return logits

    def run_teacher(self):
        """The mean of the teachers' logits; one teacher in memory at a time."""
        teachers = self.teachers
        logits = np.zeros((len(self.train_rows), len(self.names)), np.float32)
        order = np.arange(len(self.train_rows), dtype=np.int32)  # batches reorder by length
        for run in teachers:
            teacher = load_teacher(run)
            ids = encode_inputs(teacher.tokenizer, self.train_rows.inputs,
                                teacher.info["sequence_length"])  # fmt: skip
            # Batches of 256: 1.3x the examples/s of 64 (MiniLM, bfloat16, AMX host).
            for output, index in collect(teacher.model, teacher.batches(ids, order, 256)):
                logits[int(index)] += output / len(teachers)
        return logits

    def teacher_fingerprint(self):
        """Changes with the teachers' saved models, the compute precision and
        the training rows (texts and order)."""
        policy = keras.mixed_precision.global_policy().name
        digest = hashlib.sha256(policy.encode())
        for run in self.teachers:
            model = RunDir(run).model.resolve()
            stat = model.stat()
            digest.update(f"{model} {stat.st_size} {stat.st_mtime_ns}".encode())
        for text in self.train_rows.inputs:
            digest.update(repr(text).encode())
        return digest.hexdigest()

    def compile_args(self, model):
        distill = self.config.distill
        if isinstance(model, Distiller):  # the soft and intermediate terms are the model's
            return {**EncoderTask.compile_args(self, model), "loss": label_loss(),
                    "loss_weights": 1.0 - distill.alpha}  # fmt: skip
        accuracy = keras.metrics.MeanMetricWrapper(label_accuracy, name="accuracy")
        return {"loss": DistillationLoss(distill.temperature, distill.alpha),
                "weighted_metrics": [accuracy]}  # fmt: skip

    def train_dataset(self, step):
        """Batches whose targets are `[label, teacher logits...]` (the example
        index travels through the shuffled, bucketed batches as the label);
        labels alone when the teacher runs beside the student."""
        if intermediate(self.config.distill):
            return super().train_dataset(step)
        indices = np.arange(len(self.train_labels), dtype=np.int32)
        batches = self.batches(self.train_ids, indices, shuffle=True,
                               seed=self.config.train.seed + step, repeat=True)  # fmt: skip
        labels = tf.constant(self.train_labels, tf.float32)
        teacher = tf.constant(self.teacher_logits)

        def targets(features, index, weight):
            label = tf.gather(labels, index)[:, None]  # (batch, 1)
            return features, tf.concat([label, tf.gather(teacher, index)], axis=1), weight

        return batches.map(targets)

    def backup_hooks(self, model):
        return super().backup_hooks(student_of(model))

    def save(self, model):
        super().save(student_of(model))

    def info(self):
        distill = self.config.distill
        keys = ("teacher", "temperature", "alpha", "hidden_weight", "attention_weight",
                "value_weight", "layers")  # fmt: skip
        return {**super().info(), "distill": {key: getattr(distill, key) for key in keys}}


def load_teacher(run):
    """A teacher `Predictor` in the run's compute precision."""
    policy = keras.mixed_precision.global_policy().name
    return load_run(run, tasks=TEACHER_TASKS, precision=policy)


def cached_logits(path, fingerprint):
    """The logits saved at `path` if their fingerprint is `fingerprint`, else None."""
    try:
        with np.load(path) as saved:
            if str(saved["fingerprint"]) == fingerprint:
                return saved["logits"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none, or unreadable
        pass
    return None


def student_of(model):
    """The classifier a run saves: the student of a `Distiller`."""
    return model.student if isinstance(model, Distiller) else model
