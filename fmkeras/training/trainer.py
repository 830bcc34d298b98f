"""The `fit` loop every task shares: backups every `train.checkpoint_every`
steps and at the end, resume from the newest sound backup, a NaN guard, and
a backup then a clean exit on SIGTERM."""

import math
import signal
import warnings

import keras
import tensorflow as tf

from fmkeras import distribute
from fmkeras.errors import ConfigError, Stopped, TrainingError
from fmkeras.fused import fused_elementwise
from fmkeras.training.callbacks import Backup, StopOnNaN, StopOnSignal
from fmkeras.training.checkpoints import (
    backup_problem,
    backups,
    latest_backup,
    restore_backup,
    set_aside,
)
from fmkeras.training.precision import cpu_kind
from fmkeras.workarounds import compile_replica_steps_with_xla


def fit_phases(start, steps, every):
    """`[(first_step, steps_per_epoch, epochs)]`: the Keras `fit` calls that take
    a run from step `start` to `steps` with a Keras epoch ending every `every`
    steps (where backups and validation can happen) and at `steps`. A run whose
    length is not a multiple of `every` ends with a shorter epoch; a run resumed
    between multiples first catches up to the next one."""
    phases, step = [], start
    if step % every and step < steps:
        catch_up = min(steps, (step // every + 1) * every)
        phases.append((step, catch_up - step, 1))
        step = catch_up
    whole = steps // every * every
    if step < whole:
        phases.append((step, every, (whole - step) // every))
        step = whole
    if step < steps:
        phases.append((step, steps - step, 1))
    return phases


# What `train.jit_compile: auto` picks on one device, by device (a CPU by its widest
# matrix path, `precision.cpu_kind`) and compute dtype, from each implementation's best
# rounds in `tools/bench_train.py` (README, "Training throughput against keras-hub and
# Model Garden"). XLA's CPU backend does not reach the AMX kernels that oneDNN uses in
# graph mode; without AMX, XLA's fusions win the bfloat16 step back. Unmeasured: off.
XLA_BY_DEVICE = {
    ("CPU amx_bf16", "float32"): False,  # equal: mini 790 on / 791 ms off, small 1,884 / 1,885
    ("CPU amx_bf16", "bfloat16"): False,  # mini 558 / 551 ms, small 999 / 985
    ("CPU avx512_bf16", "float32"): False,  # off best at mini and small
    ("CPU avx512_bf16", "bfloat16"): True,  # mini 580 / 653 ms, small 1,609 / 1,762
    ("CPU avx2", "float32"): False,  # mini 1,917 / 1,753 ms, small 5,460 / 5,530
    ("CPU avx2", "bfloat16"): False,  # mini 2,012 / 1,924 ms, small 5,798 / 5,538 (emulated bf16)
    ("GPU", "float32"): True,
    ("GPU", "bfloat16"): True,
    ("GPU", "float16"): True,
}


def resolve_jit_compile(setting, strategy, compute_dtype="float32", flags=None):
    """`(xla, reason)` for `train.jit_compile`: `auto` looks `XLA_BY_DEVICE` up
    on one device and is off under multi-device strategies (XLA per replica is
    opt-in there with `true`). `flags`: the CPU's, for tests."""
    if setting != "auto":
        return setting == "true", "set by train.jit_compile"
    if not distribute.is_single_device(strategy):
        return False, "auto: off under multi-device strategies (true: XLA per replica)"
    device = "GPU" if tf.config.list_logical_devices("GPU") else f"CPU {cpu_kind(flags)}"
    if (device, compute_dtype) not in XLA_BY_DEVICE:
        return False, (f"auto: off for {compute_dtype} on a {device} (not measured there; "
                       "train.jit_compile=true tries it)")  # fmt: skip
    xla = XLA_BY_DEVICE[device, compute_dtype]
    return xla, f"auto: {'on' if xla else 'off'} for {compute_dtype} on a {device}, as measured"


def compile_model(model, strategy, train, log, **compile_args):
    """`model.compile(**compile_args)` with XLA and `steps_per_execution` from
    `train` (call it inside `strategy.scope()`), and the optimizer built; returns
    whether XLA is on. Under
    Mirrored and MultiWorkerMirrored strategies XLA compiles each replica's
    step (`workarounds.compile_replica_steps_with_xla`) and steps run one per
    execution: Keras's multi-step loop fails there with "You must feed a value
    for placeholder tensor" (keras#19246)."""
    compute_dtype = keras.mixed_precision.global_policy().compute_dtype
    xla, reason = resolve_jit_compile(train.jit_compile, strategy, compute_dtype)
    log(f"XLA {'on' if xla else 'off'}: {reason}; GELU, attention softmax, dropout, LM loss "
        "and AdamW fused into small XLA functions in fit/evaluate (fmkeras.fused)")
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
    # Outside a strategy scope Keras skips its symbolic build (`_maybe_symbolic_build`)
    # and creates the optimizer's moments inside the first traced step, and a
    # tf.function that creates variables is traced twice: built here, the step is
    # traced once (a tiny 20-step MLM run: 12.8 -> 7.8 s).
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    return xla


def resume(model, run, train, log, after_restore=None):
    """Restores the newest sound backup of `run` into the compiled `model`;
    returns its step (0 without one). A damaged backup (failed checksums, or
    weights that do not load) is set aside and the previous one is used."""
    multi_worker = distribute.is_multi_worker(model.distribute_strategy)
    candidates = []
    for path, step in backups(run.backups):
        problem = backup_problem(path)
        if problem is None:
            candidates.append((path, step))
        elif not multi_worker:  # workers must agree on a step: no silent fallback there
            set_aside(path, problem, log)
    # Multi-worker: every worker has its own backups, and one may have been killed
    # before writing the newest; all resume from the newest step they all have.
    newest = candidates[0][1] if candidates else 0
    agreed = distribute.smallest_across_workers(model.distribute_strategy, newest)
    candidates = [(path, step) for path, step in candidates if step <= agreed]
    if agreed and (not candidates or candidates[0][1] != agreed):
        raise ConfigError(
            f"the workers' newest common backup is step {agreed}, but {run.backups} "
            "no longer has a sound copy of it; delete the run directories of all workers "
            "to start over"
        )
    for path, step in candidates:
        if step > train.steps:
            raise ConfigError(f"{path} is at step {step}, past train.steps={train.steps}; "
                              "resume with the original train.steps")  # fmt: skip
        try:
            restore_backup(model, path)
        except Exception as error:  # noqa: BLE001 - e.g. h5py on a truncated file
            if multi_worker:
                raise ConfigError(f"{path} cannot be restored: {error}") from None
            set_aside(path, f"{type(error).__name__}: {error}", log)
            continue
        if after_restore is not None:
            after_restore(path)
        log(f"resuming from {path} (step {step} of {train.steps})")
        return step
    return 0


def fit(model, train_data, train, run, start_step, callbacks=(), **backup):
    """Runs `model.fit` from `start_step` to `train.steps` with backups.

    `train_data(step)` returns the training dataset from `step` on (each
    `fit_phases` phase starts its own). `backup` keyword arguments go to
    `Backup` (e.g. `write_extra`). A cadence that does not divide
    `train.steps` is logged by the caller (`describe_cadence`).

    SIGTERM stops a single-process run at the next step with a backup and
    raises `Stopped` (exit 0). Multi-worker runs keep TensorFlow's own
    handling: all workers would have to agree on the step to stop at, so a
    terminated cluster resumes from its newest common backup instead.
    """
    stop_on_nan = StopOnNaN()
    saver = Backup(run.backups, train.checkpoint_every, train.steps, keep=train.keep_backups,
                   **backup)  # fmt: skip
    # Epochs end at every backup and every validation (`Evaluator`).
    epoch_every = math.gcd(train.checkpoint_every, train.eval_every)
    compiled_steps = model.steps_per_execution
    multi_worker = distribute.is_multi_worker(model.distribute_strategy)
    stop_on_signal = StopOnSignal(signals=() if multi_worker else (signal.SIGTERM,))
    with stop_on_signal:
        for first_step, steps_per_epoch, epochs in fit_phases(start_step, train.steps,
                                                              epoch_every):  # fmt: skip
            # Keras runs whole executions: an epoch that is not a multiple of
            # steps_per_execution would overrun it, so such a phase runs fewer per call.
            set_steps_per_execution(model, math.gcd(steps_per_epoch, compiled_steps))
            with fused_elementwise():
                model.fit(
                    train_data(first_step),
                    epochs=epochs,
                    steps_per_epoch=steps_per_epoch,
                    callbacks=[stop_on_nan, stop_on_signal, *callbacks, saver],
                    shuffle=False,  # datasets order themselves
                    verbose=0,
                )
            if stop_on_nan.bad_step is not None:
                last, _ = latest_backup(run.backups)
                raise TrainingError(
                    f"the loss became NaN or infinite at step {stop_on_nan.bad_step}; training "
                    f"stopped. Last good backup: {last or 'none'}. Lower train.learning_rate "
                    "or raise train.warmup_steps, then run the same command again to resume "
                    "from that backup."
                )
            if stop_on_signal.step is not None:
                path = saver.save()
                raise Stopped(
                    f"stopped by {stop_on_signal.received} at step {stop_on_signal.step} of "
                    f"{train.steps}: backup {path} written. Run the same command again to "
                    "resume from it."
                )


def evaluate(model, dataset, return_dict=False):
    """`model.evaluate` over a finite dataset -> `(loss, accuracy)` (or, with
    `return_dict`, every metric by name). Keras warns that the input "ran out
    of data" when the batches do not fill the last multi-step execution
    (`steps_per_execution` > 1); here that is expected, and every batch is
    still counted."""
    with warnings.catch_warnings(), fused_elementwise():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        return model.evaluate(dataset, verbose=0, return_dict=return_dict)


def set_steps_per_execution(model, steps):
    """Retraces `model`'s train function for `steps` steps per call, if that changes it."""
    if model.steps_per_execution != steps:
        model.steps_per_execution = steps
        model.make_train_function(force=True)


def describe_cadence(train):
    """A log line for backups that cannot all fall on `checkpoint_every` multiples, or None."""
    if train.steps % train.checkpoint_every == 0:
        return None
    return (f"backups every {train.checkpoint_every} steps and at the final step "
            f"{train.steps}")  # fmt: skip
