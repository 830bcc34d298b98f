"""The Task interface: what a task declares so that one driver trains it and
`evaluate`, `predict` and `export` use its finished runs (after Model
Garden's `base_task.Task`, with Keras `fit` as the loop).

A task is a subclass of `Task` registered with
`fmkeras.tasks.registry.register_task`. The driver
(`fmkeras.training.driver.train`) calls, in this order:

    check_config(config)     classmethod: settings the task cannot run
    data_files(config)       classmethod: the files it reads
    validation_metrics(config)  classmethod: the metric names `evaluate` reports
    read_data()              read them (before the model exists)
    build_model()            inside the strategy scope: vocabulary and model
    learning_rate_factors(model)  optional: per-variable multiples of the learning rate
    compile_args(model)      loss and metrics (the driver adds the optimizer)
    backup_hooks(model)      optional: extra files in backups (LoRA adapters)
    logger_settings(model)   throughput units for the logs (tokens or examples)
    train_dataset(step)      the training stream from `step` on
    evaluate(model)          validation: `loss`, `accuracy` and task scalars
    save(model)              model.keras, encoder.keras, task.json, ...
    final_metrics(...)       what metrics.json holds besides the common keys

The three classmethods come from `TaskSpec` (`fmkeras.tasks.spec`); the
commands run them before anything else, without TensorFlow for the built-in
tasks, whose specs live in that module.

A finished run is used through `load(run, info, **options)`, which returns
a `Predictor`.
"""

import shutil
from typing import ClassVar

import numpy as np

from fmkeras.config import ARCHITECTURE_KEYS, SIZES, ModelConfig
from fmkeras.errors import ConfigError
from fmkeras.models import Encoder, encoder_kwargs
from fmkeras.models.starting_point import load_starting_point, starting_vocabulary
from fmkeras.tasks.spec import TaskSpec
from fmkeras.text.wordpiece import WordPieceTokenizer, learn_vocabulary, write_vocabulary
from fmkeras.training.checkpoints import save_model


def log_softmax(logits):
    """Numerically stable log-probabilities over the last axis (numpy)."""
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def check_against_checkpoint(model, encoder, log):
    """The architecture keys a checkpoint `model.init` makes irrelevant: an
    explicit dimension that differs from the checkpoint's is an error, and a
    `model.size` other than the default that the checkpoint does not match is
    ignored with a warning."""
    found = {name: getattr(encoder, name) for name in ARCHITECTURE_KEYS}
    for name, value in found.items():
        wanted = getattr(model, name)
        if wanted is not None and wanted != value:
            raise ConfigError(f"model.{name}={wanted} contradicts model.init={model.init}, whose "
                              f"encoder has {name} {value}; drop model.{name}")  # fmt: skip
    if model.size not in (ModelConfig.size, "custom") and SIZES[model.size] != found:
        shape = ", ".join(f"{name} {value}" for name, value in found.items())
        log(f"warning: model.size={model.size} is ignored: model.init={model.init} brings its "
            f"own encoder ({shape}); model.init=random trains a {model.size} one")  # fmt: skip


class Task(TaskSpec):
    """Base class of every task. Subclasses set `name` and implement the methods
    above; the configuration half (`name`, `data_files`, `check_config`, ...)
    comes from `TaskSpec`, or from a built-in task's spec.

    Attributes set by the driver: `config` (`RunConfig`), `run` (`RunDir`),
    `files` (role -> resolved `Path` of `data_files`), `log` (a print function).
    """

    def __init__(self, config, run, files, log=print):
        self.config = config
        self.run = run
        self.files = files
        self.log = log

    def read_data(self):
        raise NotImplementedError

    def build_model(self):
        raise NotImplementedError

    def compile_args(self, model):
        raise NotImplementedError

    def backup_hooks(self, model):
        """`(write_extra(directory), after_restore(backup))`, either may be None."""
        return None, None

    def logger_settings(self, model):
        """`TrainingLogger` keyword arguments: examples per step by default."""
        return {"examples_per_step": self.config.train.batch_size}

    def train_dataset(self, step):
        raise NotImplementedError

    def evaluate(self, model):
        raise NotImplementedError

    def info(self):
        """task.json: what `load` needs besides the model and vocabularies."""
        return {"task": self.name, "sequence_length": self.config.data.sequence_length}

    def save(self, model):
        """The final model, its encoder if it has one (a starting point for other
        runs) and task.json."""
        save_model(model, self.run.model)
        if getattr(model, "encoder", None) is not None:
            save_model(model.encoder, self.run.encoder)
        self.run.write_info(self.info())

    def final_metrics(self, model, validation):
        """metrics.json entries of this task (the driver adds steps, timings, ...)."""
        return dict(validation)

    def learning_rate_factors(self, model):
        """Per-variable multiples of the scheduled learning rate (variable path ->
        float) for `model`, or None: one rate for all (the default)."""
        return None

    def validation_size(self, available):
        """How many of the `available` validation examples a run validates on:
        all, or the first `train.eval_steps` x `train.batch_size` (logged)."""
        train = self.config.train
        if not train.eval_steps or train.eval_steps * train.batch_size >= available:
            return available
        kept = train.eval_steps * train.batch_size
        self.log(f"validation: the first {kept:,} of {available:,} examples (train.eval_steps="
                 f"{train.eval_steps} x train.batch_size={train.batch_size})")  # fmt: skip
        return kept

    def prepare_vocabulary(self, texts):
        """The run's `vocab.txt` as a tokenizer: kept from an earlier attempt,
        copied from `data.vocab_file`, or learned from `texts`."""
        run, data = self.run, self.config.data
        if not run.vocab.is_file():
            if "vocab" in self.files:
                shutil.copyfile(self.files["vocab"], run.vocab)
            else:
                vocabulary = learn_vocabulary(texts, data.vocab_size, lowercase=data.lowercase,
                                              log=self.log)  # fmt: skip
                write_vocabulary(vocabulary, run.vocab)
        return WordPieceTokenizer(run.vocab, lowercase=data.lowercase)

    def starting_encoder(self, texts):
        """`(encoder, tokenizer, description)` for `model.init` (inside the strategy
        scope): a fresh encoder with a vocabulary from `prepare_vocabulary(texts)`,
        or a checkpoint with its own vocabulary."""
        model = self.config.model
        if model.init == "random":
            tokenizer = self.prepare_vocabulary(texts)
            encoder = Encoder(**encoder_kwargs(model, tokenizer.vocabulary_size), name="encoder")
            return encoder, tokenizer, f"random {model.size} encoder"
        start = self.checkpoint_start()
        return start.encoder, self.checkpoint_tokenizer(), start.description

    def checkpoint_start(self):
        """`model.init`'s `StartingPoint` (inside the strategy scope), its
        sizes checked against the config's architecture keys."""
        model = self.config.model
        start = load_starting_point(model.init, model.dropout)
        check_against_checkpoint(model, start.encoder, self.log)
        return start

    def checkpoint_tokenizer(self):
        """The tokenizer of `model.init`'s vocabulary (read without building its
        model), kept in the run as `vocab.txt`."""
        vocabulary, lowercase = starting_vocabulary(self.config.model.init)
        if not self.run.vocab.is_file():
            write_vocabulary(vocabulary, self.run.vocab)
        return WordPieceTokenizer(vocabulary, lowercase=lowercase)

    @classmethod
    def load(cls, run, info, precision=None, **options):
        """A `Predictor` for the finished run directory `run` (`RunDir`), its
        model in the Keras dtype policy `precision` (default: as saved)."""
        raise NotImplementedError


class Predictor:
    """A finished run, ready for inference.

    `predict(texts)` -> one dict per text; `evaluate(**inputs)` -> metrics of
    a labelled file (its keyword names are `evaluate_inputs`);
    `serving_functions()` -> `signatures.ServingFunctions` for export;
    `export_info()` -> what `assets.extra/fmkeras.json` records;
    `warmup_texts` -> TF Serving warm-up requests; `explainer` -> the
    `Explainer` class of `python -m fmkeras.explain` (None: not
    explainable). `model` is the Keras model (export quantizes it in place).
    """

    warmup_texts: ClassVar[tuple] = ("hello", "A longer request of a few words.")
    explainer: ClassVar[type | None] = None  # an `fmkeras.explain.explainers.Explainer`
    evaluate_inputs: ClassVar[tuple] = ("data",)

    def __init__(self, model, info):
        self.model = model
        self.info = info

    def predict(self, texts):
        raise NotImplementedError

    def evaluate(self, **inputs):
        raise NotImplementedError

    def serving_functions(self):
        raise NotImplementedError

    def export_info(self):
        return dict(self.info)

    def warmup_inputs(self):
        """TF Serving warm-up inputs: `{input name: [strings]}`."""
        return {"texts": list(self.warmup_texts)}
