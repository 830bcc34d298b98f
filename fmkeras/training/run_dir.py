"""The run directory: everything one training run writes, and the one place
that knows its layout.

config.yaml            resolved configuration
vocab.txt              vocabulary (translate: the source side)
target_vocab.txt       translate: the target vocabulary
task.json              what inference needs: the task, labels, casing, lengths
logs/                  TensorBoard (train/, validation/)
backup/step-*/         resumable backups (model + optimizer state, LoRA adapters)
best/                  train.keep_best: a backup of the best validation so far
model.keras            final task model (LoRA runs: adapters merged)
encoder.keras          final encoder alone (a starting point for fine-tuning)
adapters.safetensors   LoRA runs: adapters + head, keyed by variable path
metrics.json           final metrics
workers/worker-N/      multi-worker: a non-chief worker's own backups while it runs
"""

import dataclasses
import json
from pathlib import Path

import yaml

from fmkeras.config import RunConfig, flat_config, flatten, to_dict
from fmkeras.errors import ConfigError
from fmkeras.training.checkpoints import atomic_path, latest_backup, write_json

# Keys that may change between attempts of one run without changing what it computes.
RESUMABLE_CHANGES = (
    "data.dir",
    "train.log_every",
    "train.eval_every",
    "train.eval_steps",
    "train.peak_gflops",
    "train.steps_per_execution",
    "train.jit_compile",
    "train.profile_steps",
    "train.keep_best",
    "train.keep_backups",
    "distribute.",
)
# What a run made before a key existed computed: the key's value then, where it is
# not the key's default today.
VALUES_BEFORE_THE_KEY = {"train.precision": "float32"}


def read_scalars(log_dir, tag):
    """`[(step, value)]` of one scalar that `TrainingLogger` wrote into `log_dir`;
    raises ConfigError if there is none (an empty list would let a caller's
    check pass vacuously)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()["tensors"]
    if tag not in tags:
        raise ConfigError(f"{log_dir} holds no TensorBoard scalar {tag!r} "
                          f"(it has {', '.join(sorted(tags)) or 'none'})")  # fmt: skip
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


@dataclasses.dataclass
class RunDir:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    config = property(lambda self: self.root / "config.yaml")
    vocab = property(lambda self: self.root / "vocab.txt")
    target_vocab = property(lambda self: self.root / "target_vocab.txt")
    task_info = property(lambda self: self.root / "task.json")
    logs = property(lambda self: self.root / "logs")
    backups = property(lambda self: self.root / "backup")
    best = property(lambda self: self.root / "best")
    model = property(lambda self: self.root / "model.keras")
    encoder = property(lambda self: self.root / "encoder.keras")
    adapters = property(lambda self: self.root / "adapters.safetensors")
    metrics = property(lambda self: self.root / "metrics.json")

    def load_model(self, precision=None):
        """The final task model; `precision` (a Keras dtype policy such as
        `bfloat16`) rebuilds it to compute in that policy."""
        import keras

        model = keras.saving.load_model(self.model)
        if precision is None:
            return model
        from fmkeras.training.precision import in_dtype_policy

        return in_dtype_policy(model, precision)

    def worker(self, index):
        """The directory a non-chief worker keeps its own backups in."""
        return RunDir(self.root / "workers" / f"worker-{index}")

    def prepare(self, config, resumable=(), resuming=None):
        """Creates the directory and records `config`; refuses to resume a
        backup made with a configuration that computes something else.

        `resuming` says whether the directory holds progress to resume (default:
        a backup exists; a federated server passes its round checkpoint);
        `resumable` adds key prefixes that may change on resumption."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create the run directory {self.root}: "
                              f"{error.strerror}") from None  # fmt: skip
        if resuming is None:
            resuming = latest_backup(self.backups)[0] is not None
        if resuming:
            self.check_same_run(config, resumable)
        with atomic_path(self.config) as temporary:
            temporary.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")

    def check_same_run(self, config, resumable=()):
        """Raises ConfigError, listing the keys, if config.yaml records a run whose
        configuration differs from `config` in a key that changes what it computes
        (`RESUMABLE_CHANGES` and the prefixes `resumable` do not)."""
        if not self.config.is_file():
            return
        old = dict(flatten(self.read_config()))
        if "task" in old:
            from fmkeras.tasks.registry import ALIASES

            old["task"] = ALIASES.get(old["task"], old["task"])
        new = flat_config(config)
        # A key the run's fmkeras version did not have yet counts as what it computed then.
        defaults = {**flat_config(RunConfig()), **VALUES_BEFORE_THE_KEY}
        changed = [
            f"{key}: {old.get(key, defaults.get(key))!r} -> {new.get(key)!r}"
            for key in sorted(new)
            if old.get(key, defaults.get(key)) != new.get(key)
            and not key.startswith(RESUMABLE_CHANGES + tuple(resumable))
        ]
        if changed:
            raise ConfigError(
                f"{self.root} holds a run with a different configuration "
                f"({'; '.join(changed)}); use another --out, or delete {self.root} "
                "to start over"
            )

    def validation_curve(self, metric):
        """`[(step, value)]` of one validation metric, from TensorBoard's logs."""
        return read_scalars(self.logs / "validation", metric)

    def read_config(self):
        """config.yaml as nested dicts."""
        return yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}

    def write_info(self, info):
        """task.json: what inference needs besides the model and vocabularies."""
        write_json(self.task_info, info)

    def read_info(self):
        """task.json of a finished run (runs of any task, including pretraining
        runs made before they wrote one); a one-line error says what is wrong
        and what to do otherwise."""
        from fmkeras.tasks.registry import ALIASES

        if not self.root.is_dir():
            raise ConfigError(f"run directory {self.root} does not exist")
        if self.task_info.is_file() and self.model.is_file():
            info = json.loads(self.task_info.read_text(encoding="utf-8"))
        elif self.config.is_file() and self.model.is_file():  # pretraining before task.json
            config = self.read_config()
            data = config.get("data", {})
            length = data.get("sequence_length", 128)
            predictions = data.get("max_predictions") or round(data.get("mask_rate", 0.15) * length)
            info = {"task": config.get("task"), "lowercase": data.get("lowercase", True),
                    "sequence_length": length, "predictions": max(1, predictions)}  # fmt: skip
        elif self.config.is_file():
            backup, state = latest_backup(self.backups)
            progress = f"its newest backup is step {state['step']}" if backup else "no backup yet"
            raise ConfigError(
                f"{self.root} is not finished ({progress}); run the same train command "
                "again to finish it"
            )
        else:
            raise ConfigError(f"{self.root} is not an fmkeras run directory "
                              f"(no {self.config.name})")  # fmt: skip
        info["task"] = ALIASES.get(info["task"], info["task"])
        return info
