"""Atomic files and resumable backups of a training run.

A backup is a directory `backup/step-NNNNNNNN/` holding the model and
optimizer state (`state.weights.h5`, keyed by layer path) and `state.json`.
It is written under a temporary name and renamed into place, so a run
killed at any moment leaves either the previous backup or the new one,
never a torn one.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import keras

from fmkeras.errors import ConfigError

STATE_FILE = "state.json"
WEIGHTS_FILE = "state.weights.h5"


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent
    )
    os.close(handle)
    os.unlink(temporary)  # writers such as h5py/zip want to create the file themselves
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.exists(temporary):
            os.unlink(temporary)


def write_json(path, data):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model(model, path):
    """`model.save` to `path` (`.keras`), atomically."""
    with atomic_path(path) as temporary:
        model.save(temporary)


def latest_backup(directory, at_most=None):
    """`(path, state)` of the newest complete backup in `directory` (not after
    step `at_most`, if given), or `(None, None)`."""
    directory = Path(directory)
    if not directory.is_dir():
        return None, None
    for candidate in sorted(directory.glob("step-*"), reverse=True):
        state_path = candidate / STATE_FILE
        if state_path.is_file() and (candidate / WEIGHTS_FILE).is_file():
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if at_most is None or state["step"] <= at_most:
                return candidate, state
    return None, None


def restore_backup(model, backup_path):
    """Loads weights and optimizer state (iterations, moments) into `model`."""
    with model.distribute_strategy.scope():  # optimizer slots are mirrored variables too
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(Path(backup_path) / WEIGHTS_FILE)


def write_backup(model, final, state, write_extra=None):
    """Writes `model`'s weights and optimizer state, `state` (state.json) and
    `write_extra(directory)`'s files into the directory `final`, through a
    temporary directory renamed into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".partial-", dir=final.parent))
    try:
        model.save_weights(temporary / WEIGHTS_FILE)
        if write_extra is not None:
            write_extra(temporary)
        (temporary / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def read_state(directory):
    """state.json of a backup directory, or None."""
    path = Path(directory) / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class BestKeeper:
    """`train.keep_best`: keeps a backup of the best validation so far in
    `directory` (lower is better for `loss` and `perplexity`, higher for the
    rest); it survives resumption.

    Args:
        metric: a validation metric name (`accuracy`, `f1`, `bleu`, `loss`, ...).
        directory: where the best backup lives.
        write_extra: as for `Backup` (e.g. LoRA adapters).
    """

    LOWER_IS_BETTER = ("loss", "perplexity")

    def __init__(self, metric, directory, write_extra=None):
        self.metric = metric
        self.directory = Path(directory)
        self.write_extra = write_extra
        state = read_state(self.directory)
        if state and state.get("metric") != metric:  # kept for another metric: start over
            state = None
        self.step = state["step"] if state else None
        self.value = state["value"] if state else None

    def improves(self, value):
        if self.value is None:
            return True
        return value < self.value if self.metric in self.LOWER_IS_BETTER else value > self.value

    def update(self, model, step, metrics):
        """Backs up `model` if `metrics[metric]` at `step` beats the best so far."""
        value = metrics.get(self.metric)
        if not isinstance(value, float):
            known = ", ".join(k for k, v in metrics.items() if isinstance(v, float))
            raise ConfigError(f"train.keep_best={self.metric!r}: validation reports {known}")
        if self.improves(value):
            write_backup(model, self.directory, {"step": step, "metric": self.metric,
                                                 "value": value}, self.write_extra)  # fmt: skip
            self.step, self.value = step, value


class Backup(keras.callbacks.Callback):
    """Saves a backup at the end of every Keras epoch (`trainer.fit_phases` makes
    an epoch end every `train.checkpoint_every` steps and at the last step),
    named by the optimizer step; keeps the newest `keep`.

    Args:
        directory: where `step-*` backups go.
        keep: how many backups to keep.
        write_extra: optional `fn(directory)` that adds files to each backup
            (e.g. LoRA adapters) before it is renamed into place.
    """

    def __init__(self, directory, keep=2, write_extra=None):
        super().__init__()
        self.directory = Path(directory)
        self.keep = keep
        self.write_extra = write_extra

    def on_train_begin(self, logs=None):
        for partial in self.directory.glob(".partial-*"):  # left by a killed run
            shutil.rmtree(partial, ignore_errors=True)

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:  # e.g. NaN loss: keep the last good backup
            return
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        write_backup(self.model, self.directory / f"step-{step:08d}", {"step": step},
                     self.write_extra)  # fmt: skip
        for old in sorted(self.directory.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
