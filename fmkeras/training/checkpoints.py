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
        final = self.directory / f"step-{step:08d}"
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.directory))
        try:
            self.model.save_weights(temporary / WEIGHTS_FILE)
            if self.write_extra is not None:
                self.write_extra(temporary)
            (temporary / STATE_FILE).write_text(
                json.dumps({"step": step}), encoding="utf-8"
            )
            if final.exists():
                shutil.rmtree(final)
            os.rename(temporary, final)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        for old in sorted(self.directory.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
