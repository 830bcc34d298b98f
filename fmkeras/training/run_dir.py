"""The run directory: everything one training run writes.

config.yaml    resolved configuration
vocab.txt      vocabulary
logs/          TensorBoard (train/, validation/)
backup/        resumable backups (step-*/)
model.keras    final task model
encoder.keras  final encoder alone (a starting point for fine-tuning)
metrics.json   final metrics
"""

import dataclasses
from pathlib import Path

import yaml

from fmkeras.config import RunConfig, to_dict
from fmkeras.errors import ConfigError
from fmkeras.training.checkpoints import atomic_path, latest_backup

# Keys that may change between attempts of one run without changing what it computes.
RESUMABLE_CHANGES = (
    "data.dir",
    "train.log_every",
    "train.eval_every",
    "train.eval_steps",
    "train.peak_gflops",
    "train.steps_per_execution",
    "train.jit_compile",
    "distribute.",
)


def _flat(mapping, prefix=""):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@dataclasses.dataclass
class RunDir:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    config = property(lambda self: self.root / "config.yaml")
    vocab = property(lambda self: self.root / "vocab.txt")
    logs = property(lambda self: self.root / "logs")
    backups = property(lambda self: self.root / "backup")
    model = property(lambda self: self.root / "model.keras")
    encoder = property(lambda self: self.root / "encoder.keras")
    metrics = property(lambda self: self.root / "metrics.json")

    def prepare(self, config):
        """Creates the directory and records `config`; refuses to resume a
        backup made with a configuration that computes something else."""
        self.root.mkdir(parents=True, exist_ok=True)
        new = dict(_flat(to_dict(config)))
        if self.config.is_file() and latest_backup(self.backups)[0] is not None:
            old = dict(_flat(yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}))
            # A key the run's fmkeras version did not have yet counts as its default value.
            defaults = dict(_flat(to_dict(RunConfig())))
            changed = [
                f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                for key in sorted(new)
                if old.get(key, defaults.get(key)) != new.get(key)
                and not key.startswith(RESUMABLE_CHANGES)
            ]
            if changed:
                raise ConfigError(
                    f"{self.root} holds a run with a different configuration "
                    f"({'; '.join(changed)}); use another --out, or delete {self.root} "
                    "to start over"
                )
        with atomic_path(self.config) as temporary:
            temporary.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
