"""Atomic files and resumable backups of a training run.

A backup is a directory `backup/step-NNNNNNNN/` holding the model and
optimizer state (`state.weights.h5`, keyed by layer path) and `state.json`
(the step, and the SHA-256 of every other file). It is written under a
temporary name and renamed into place, so a run killed at any moment leaves
either the previous backup or the new one, never a torn one; a backup
damaged afterwards (a bad disk, a copy cut short) fails its checksums, and
resuming falls back to the previous one.

This module imports no Keras (the `Backup` callback lives in
`fmkeras.training.callbacks`), so run directories can be read and checked
before TensorFlow is imported.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from fmkeras.errors import ConfigError, TrainingError

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
    """`model.save` to `path` (`.keras`), atomically, without the optimizer
    state and compile configuration (backups hold what resuming needs)."""
    from fmkeras.workarounds import save_without_training_state  # Keras: not at import

    with atomic_path(path) as temporary:
        save_without_training_state(model, temporary)


def checksums(directory):
    """`{relative path: sha256}` of the files under `directory` but state.json."""
    directory, sums = Path(directory), {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != STATE_FILE:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            sums[path.relative_to(directory).as_posix()] = digest.hexdigest()
    return sums


def backup_problem(directory):
    """Why the backup `directory` cannot be used (missing files, unreadable
    state.json, a checksum mismatch), or None if it is sound. Backups written
    before checksums were recorded are checked for their files only."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        return f"no {WEIGHTS_FILE}"
    state = read_state(directory)
    if state is None:
        return f"{STATE_FILE} is missing or unreadable"
    expected = state.get("sha256")
    if expected is not None:
        found = checksums(directory)
        damaged = sorted(name for name in expected.keys() | found.keys()
                         if expected.get(name) != found.get(name))  # fmt: skip
        if damaged:
            return f"checksum mismatch in {', '.join(damaged)}"
    return None


def backups(directory, at_most=None):
    """`[(path, step)]` of the `step-N` directories in `directory`, newest first
    (not after step `at_most`, if given)."""
    directory = Path(directory)
    found = [(path, int(path.name.removeprefix("step-")))
             for path in (directory.glob("step-*") if directory.is_dir() else ())
             if path.name.removeprefix("step-").isdigit()]  # fmt: skip
    return sorted(((path, step) for path, step in found if at_most is None or step <= at_most),
                  key=lambda item: item[1], reverse=True)  # fmt: skip


def latest_backup(directory, at_most=None):
    """`(path, state)` of the newest backup in `directory` with both its files
    (not after step `at_most`, if given), or `(None, None)`."""
    for path, _ in backups(directory, at_most):
        state = read_state(path)
        if state is not None and (path / WEIGHTS_FILE).is_file():
            return path, state
    return None, None


def set_aside(backup, reason, log):
    """Renames an unusable backup to `corrupt-step-N` (kept for inspection, never
    resumed from) and says so."""
    target = backup.with_name(f"corrupt-{backup.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(backup, target)
    log(f"backup {backup} is unusable ({reason}); moved to {target.name}, falling back to "
        "the previous backup")  # fmt: skip


def restore_backup(model, backup_path):
    """Loads weights and optimizer state (iterations, moments) into `model`;
    the weights alone into a model without an optimizer (one loaded from a
    run's model.keras)."""
    with model.distribute_strategy.scope():  # optimizer slots are mirrored variables too
        optimizer = getattr(model, "optimizer", None)  # uncompiled models have no attribute
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)
        model.load_weights(Path(backup_path) / WEIGHTS_FILE)


def write_backup(model, final, state, write_extra=None):
    """Writes `model`'s weights and optimizer state, `write_extra(directory)`'s
    files and `state` with their checksums (state.json) into the directory
    `final`, through a temporary directory renamed into place. A failed write
    (a full disk, say) raises `TrainingError` and leaves earlier backups as
    they were."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".partial-", dir=final.parent))
    try:
        model.save_weights(temporary / WEIGHTS_FILE)
        if write_extra is not None:
            write_extra(temporary)
        state = {**state, "sha256": checksums(temporary)}
        (temporary / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
    except OSError as error:
        others = sorted(p.name for p in final.parent.glob("step-*") if p != final)
        kept = f"the previous backups ({', '.join(others)}) are intact" if others else \
            "there is no earlier backup"  # fmt: skip
        raise TrainingError(
            f"could not write the backup {final}: {error.strerror or error}; {kept}. Free "
            "space (or fix the directory), then run the same command again to resume"
        ) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def read_state(directory):
    """state.json of a backup directory, or None (missing or unreadable)."""
    try:
        state = json.loads((Path(directory) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


class BestKeeper:
    """`train.keep_best`: keeps a backup of the best validation so far in
    `directory` (lower is better for `loss` and `perplexity`, higher for the
    rest); it survives resumption.

    Args:
        metric: a validation metric name (`accuracy`, `f1`, `bleu`, `loss`, ...).
        directory: where the best backup lives.
        write_extra: as for `Backup` (e.g. LoRA adapters).
        from_step: validations before this step are not candidates (e.g. before
            gradual pruning reaches its target sparsity).
    """

    LOWER_IS_BETTER = ("loss", "perplexity")

    def __init__(self, metric, directory, write_extra=None, from_step=0):
        self.metric = metric
        self.directory = Path(directory)
        self.write_extra = write_extra
        self.from_step = from_step
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
        if step >= self.from_step and self.improves(value):
            write_backup(model, self.directory, {"step": step, "metric": self.metric,
                                                 "value": value}, self.write_extra)  # fmt: skip
            self.step, self.value = step, value
