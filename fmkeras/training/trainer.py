"""The `fit` loop every task shares: backups every `train.checkpoint_every`
steps, resume from the newest backup, a NaN guard, optional Keras validation."""

import tensorflow as tf

from fmkeras import distribute
from fmkeras.errors import ConfigError, TrainingError
from fmkeras.training.callbacks import StopOnNaN
from fmkeras.training.checkpoints import Backup, latest_backup, restore_backup
from fmkeras.workarounds import compile_replica_steps_with_xla


def epoch_length(steps, checkpoint_every):
    """Steps per Keras epoch: the largest divisor of `steps` not above `checkpoint_every`."""
    for length in range(min(checkpoint_every, steps), 0, -1):
        if steps % length == 0:
            return length


def resolve_jit_compile(setting, strategy):
    """`train.jit_compile` -> bool; `auto` is XLA on one device only (XLA per
    replica under Mirrored strategies is opt-in with `true`)."""
    if setting == "auto":
        return distribute.is_single_device(strategy)
    return setting == "true"


def compile_model(model, strategy, train, log, **compile_args):
    """`model.compile(**compile_args)` with XLA and `steps_per_execution` from
    `train` (call it inside `strategy.scope()`); returns whether XLA is on. Under
    Mirrored and MultiWorkerMirrored strategies XLA compiles each replica's
    step (`workarounds.compile_replica_steps_with_xla`) and steps run one per
    execution: Keras's multi-step loop fails there with "You must feed a value
    for placeholder tensor" (keras#19246)."""
    xla = resolve_jit_compile(train.jit_compile, strategy)
    mirrored = isinstance(
        strategy, tf.distribute.MirroredStrategy | tf.distribute.MultiWorkerMirroredStrategy
    )
    steps_per_execution = train.steps_per_execution
    if mirrored and steps_per_execution > 1:
        log(f"train.steps_per_execution={steps_per_execution} -> 1 under {type(strategy).__name__} "
            "(keras#19246)")  # fmt: skip
        steps_per_execution = 1
    model.compile(
        jit_compile=xla and not mirrored, steps_per_execution=steps_per_execution, **compile_args
    )
    if xla and mirrored:
        compile_replica_steps_with_xla(model)
    return xla


def resume(model, run, train, log, after_restore=None):
    """Restores the newest backup of `run` into the compiled `model`; returns its step."""
    steps_per_epoch = epoch_length(train.steps, train.checkpoint_every)
    backup_path, state = latest_backup(run.backups)
    # Multi-worker: every worker has its own backups, and one may have been killed
    # before writing the newest; all resume from the newest step they all have.
    newest = state["step"] if state else 0
    agreed = distribute.smallest_across_workers(model.distribute_strategy, newest)
    if agreed != newest:
        backup_path, state = latest_backup(run.backups, at_most=agreed)
        if agreed and (state is None or state["step"] != agreed):
            raise ConfigError(
                f"the workers' newest common backup is step {agreed}, but {run.backups} "
                "no longer has it; delete the run directories of all workers to start over"
            )
    if backup_path is None:
        return 0
    if state["step"] % steps_per_epoch:
        raise ConfigError(
            f"{backup_path} is at step {state['step']}, which this run's checkpoint interval "
            f"({steps_per_epoch} steps) cannot continue from; resume with the original "
            "train.steps and train.checkpoint_every"
        )
    restore_backup(model, backup_path)
    if after_restore is not None:
        after_restore(backup_path)
    log(f"resuming from {backup_path} (step {state['step']} of {train.steps})")
    return state["step"]


def fit(model, train_data, train, run, start_step, callbacks=(), validation_data=None, **backup):
    """Runs `model.fit` from `start_step` to `train.steps` with backups.

    `validation_data` (optional) is evaluated every `train.eval_every` steps.
    `backup` keyword arguments go to `Backup` (e.g. `extra_files`).
    """
    steps_per_epoch = epoch_length(train.steps, train.checkpoint_every)
    stop_on_nan = StopOnNaN()
    if start_step < train.steps:
        model.fit(
            train_data,
            epochs=train.steps // steps_per_epoch,
            initial_epoch=start_step // steps_per_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_data=validation_data,
            validation_freq=max(1, round(train.eval_every / steps_per_epoch)),
            callbacks=[stop_on_nan, *callbacks, Backup(run.backups, steps_per_epoch, **backup)],
            shuffle=False,  # datasets order themselves
            verbose=0,
        )
    if stop_on_nan.bad_step is not None:
        last, _ = latest_backup(run.backups)
        raise TrainingError(
            f"the loss became NaN or infinite at step {stop_on_nan.bad_step}; training stopped. "
            f"Last good backup: {last or 'none'}. Lower train.learning_rate or raise "
            "train.warmup_steps, then run the same command again to resume from that backup."
        )
