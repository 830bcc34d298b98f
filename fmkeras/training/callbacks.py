"""Callbacks: TensorBoard scalars with throughput and MFU, periodic
validation, a NaN guard, a SIGTERM stop, and the periodic backups."""

import contextlib
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from fmkeras.training.checkpoints import write_backup


def _scalar(value):
    return float(np.asarray(keras.ops.convert_to_numpy(value)))


def optimizer_step(model):
    """The optimizer's iteration count: the step axis of every log and backup."""
    return int(_scalar(model.optimizer.iterations))


def confusion_image(matrix, cell=24):
    """A `(1, H, W, 3)` uint8 heatmap of a confusion matrix (rows: true labels,
    columns: predictions), each row normalized; white is 0, dark blue is 1."""
    counts = np.asarray(matrix, np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    pixels = white + shares[..., None] * (blue - white)  # (true, predicted, rgb)
    pixels = np.repeat(np.repeat(pixels, cell, axis=0), cell, axis=1)
    return pixels[None].round().astype(np.uint8)


def confusion_table(matrix, labels=None):
    """A confusion matrix as a Markdown table (TensorBoard's Text tab)."""
    labels = labels or [str(i) for i in range(len(matrix))]
    rows = [f"| **{label}** | " + " | ".join(str(n) for n in row) + " |"
            for label, row in zip(labels, matrix, strict=True)]  # fmt: skip
    header = "| true \\ predicted | " + " | ".join(labels) + " |"
    return "\n".join([header, "|" + " --- |" * (len(labels) + 1), *rows])


def clock(seconds):
    """`H:MM:SS`."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def perplexity(loss):
    """A language model's perplexity from its mean cross-entropy `loss` (nats),
    capped at e^50 so that a diverged run still logs a number."""
    return math.exp(min(loss, 50.0))


class TrainingLogger(keras.callbacks.Callback):
    """Progress lines, a live bar and TensorBoard scalars.

    Train scalars (`logs/train`) are written on the step grid validation
    uses: every multiple of `log_every`, the first step of an attempt and
    the final step. Loss and metrics are means over the steps since the
    previous point (recovered from Keras's running means, which restart at
    every backup), not running means. Throughput (tokens or examples per
    second, MFU) counts only the time spent in training steps, and the
    first step of an attempt (tracing, compilation) is left out. Each line
    shows `step N/total (P %)`, the elapsed time of this attempt and an ETA
    from the wall time per step since the first step. When stdout is a
    terminal, a Keras `Progbar` shows every step in between.

    Validation (`logs/validation`): whatever `write_validation` is given.
    The step axis is the optimizer's iteration count, so resumed runs
    continue the same curves.

    Args:
        log_dir: TensorBoard directory.
        log_every: steps between train points.
        final_step: the run's last step (`train.steps`).
        tokens_per_step: global batch * sequence length (language models).
        flops_per_step: training FLOPs of one global step (with tokens_per_step).
        peak_flops: FLOP/s the hardware can do (for MFU).
        examples_per_step: global batch, when tokens_per_step is None.
        print_fn: where the console lines go (None: silent).
        progress_bar: show a live bar (default: when stdout is a terminal).
        gradient_norm: optional `keras.metrics.Mean` the optimizer feeds with each
            step's global gradient norm (`optimizer.AdamW.measure_gradient_norm`);
            logged as the mean over each window, then reset.
    """

    def __init__(
        self,
        log_dir,
        log_every,
        final_step,
        tokens_per_step=None,
        flops_per_step=None,
        peak_flops=None,
        examples_per_step=None,
        print_fn=print,
        progress_bar=None,
        gradient_norm=None,
    ):
        super().__init__()
        self.gradient_norm = gradient_norm
        self.log_dir = str(log_dir)
        self.log_every = log_every
        self.final_step = final_step
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self.examples_per_step = examples_per_step
        self.print_fn = print_fn
        self.progress_bar = sys.stdout.isatty() if progress_bar is None else progress_bar
        self.throughput = []  # tokens/s (or examples/s) of each timed window
        self.last_validation_step = None
        self._attempt = None  # (first step, wall time) of this attempt
        self._bar = None
        # Made here, not in on_train_begin: a finished run that is started again skips
        # `fit` but still writes its final validation.
        self.train_writer = tf.summary.create_file_writer(f"{self.log_dir}/train")
        self.valid_writer = tf.summary.create_file_writer(f"{self.log_dir}/validation")

    def _say(self, message):
        if self.print_fn:
            if self._bar is not None:  # clear the bar's line; it redraws on the next step
                sys.stdout.write("\r\033[K")
            self.print_fn(message)

    def on_train_begin(self, logs=None):
        if self._attempt is None:  # fit_phases calls `fit` several times per attempt
            step = optimizer_step(self.model)
            self._attempt = (step, time.perf_counter())
            self._first_done = None  # (step, time) when the attempt's first step finished
            self._last_point = None  # step of the last train point
            self._busy, self._busy_steps = 0.0, 0
            if self.progress_bar and self.print_fn and step < self.final_step:
                self._bar = keras.utils.Progbar(self.final_step - step, unit_name="step")

    def on_epoch_begin(self, epoch, logs=None):
        # Keras's running means restart with every epoch (every backup).
        self._epoch_start = optimizer_step(self.model)
        self._window = (0, {})  # (steps, {name: sum}) this epoch up to the last point

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_began = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now, step = time.perf_counter(), optimizer_step(self.model)
        if self._first_done is None:
            self._first_done = (step, now)
        else:  # the first step (tracing, compilation) is not timed
            self._busy += now - self._batch_began
            self._busy_steps += step - self._last_busy_step
        self._last_busy_step = step
        if self._bar is not None:
            self._bar.update(step - self._attempt[0], finalize=step >= self.final_step)
        first = self._last_point is None
        on_grid = first or step >= self.final_step or \
            step // self.log_every > self._last_point // self.log_every  # fmt: skip
        if not on_grid:
            return
        done = step - self._epoch_start
        sums = {k: float(v) * done for k, v in (logs or {}).items()
                if np.ndim(v) == 0 and math.isfinite(float(v))}  # fmt: skip
        window_steps = done - self._window[0]
        means = {name: (sums[name] - self._window[1].get(name, 0.0)) / max(window_steps, 1)
                 for name in sorted(sums, key=lambda name: name != "loss")}  # loss first
        self._window = (done, sums)
        self._last_point = step
        self._write_point(step, now, means)

    def _write_point(self, step, now, means):
        scalars = {**means, "learning_rate": _scalar(self.model.optimizer.learning_rate)}
        norm = ""
        if self.gradient_norm is not None:
            scalars["gradient_norm"] = float(self.gradient_norm.result())
            self.gradient_norm.reset_state()
            norm = f" grad_norm {scalars['gradient_norm']:.3g}"
        speed = ""
        if self._busy_steps:
            seconds = self._busy / self._busy_steps
            self._busy, self._busy_steps = 0.0, 0
            if self.tokens_per_step:
                scalars["tokens_per_second"] = self.tokens_per_step / seconds
                scalars["mfu"] = self.flops_per_step / seconds / self.peak_flops
                speed = f" | {scalars['tokens_per_second']:,.0f} tokens/s MFU {scalars['mfu']:.1%}"
            else:
                scalars["examples_per_second"] = self.examples_per_step / seconds
                speed = f" | {scalars['examples_per_second']:,.0f} examples/s"
            self.throughput.append(scalars.get("tokens_per_second",
                                               scalars.get("examples_per_second")))  # fmt: skip
        if self.tokens_per_step and "loss" in means:  # of the masked LM (mlm_loss with NSP)
            scalars["perplexity"] = perplexity(means.get("mlm_loss", means["loss"]))
        with self.train_writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        first_step, first_time = self._first_done
        timing = f" | {clock(now - self._attempt[1])} elapsed"
        if step > first_step and step < self.final_step:
            eta = (now - first_time) / (step - first_step) * (self.final_step - step)
            timing += f", ETA {clock(eta)}"
        shown = " ".join(f"{name} {value:.4f}" for name, value in means.items())
        self._say(f"step {step}/{self.final_step} ({step / self.final_step:.0%}): {shown} "
                  f"lr {scalars['learning_rate']:.2e}{norm}{speed}{timing}")  # fmt: skip

    def median_throughput(self):
        ordered = sorted(self.throughput)
        return ordered[len(ordered) // 2] if ordered else None

    def summary(self):
        """metrics.json's throughput entries: the median over the timed windows."""
        median = self.median_throughput()
        if not self.tokens_per_step:
            return {"examples_per_second": median}
        mfu = median * self.flops_per_step / self.tokens_per_step / self.peak_flops if median \
            else None  # fmt: skip
        return {"tokens_per_second": median, "mfu": mfu}

    def write_run_info(self, config):
        """The run's configuration (a flat `{key: value}`) as TensorBoard text and
        as an HParams session in `log_dir`, so runs compare by their settings."""
        from tensorboard.plugins.hparams import api as hparams

        values = {key: value if isinstance(value, bool | int | float | str) else str(value)
                  for key, value in config.items()}  # fmt: skip
        table = "\n".join(f"| `{key}` | `{value}` |" for key, value in values.items())
        with tf.summary.create_file_writer(self.log_dir).as_default(step=0):
            hparams.hparams(values)
            tf.summary.text("config", f"| key | value |\n| --- | --- |\n{table}")

    def write_validation(self, step, metrics):
        """Validation summaries at `step` (once per step): the float entries of
        `metrics` as scalars, strings as text."""
        if step == self.last_validation_step:
            return
        self.last_validation_step = step
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        with self.valid_writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
            for name, value in metrics.items():
                if isinstance(value, str):  # e.g. translation samples
                    tf.summary.text(name, value)
            if metrics.get("confusion_matrix") is not None:  # classification
                matrix, labels = metrics["confusion_matrix"], metrics.get("labels")
                tf.summary.image("confusion_matrix", confusion_image(matrix))
                tf.summary.text("confusion_matrix_table", confusion_table(matrix, labels))
        self.valid_writer.flush()
        shown = " ".join(f"{name} {value:.4f}" for name, value in scalars.items())
        self._say(f"step {step}/{self.final_step}: validation {shown}")

    def on_train_end(self, logs=None):
        self.train_writer.flush()
        self.valid_writer.flush()


class StopOnNaN(keras.callbacks.Callback):
    """Stops training when the loss stops being finite; `bad_step` tells where."""

    def __init__(self):
        super().__init__()
        self.bad_step = None

    def on_train_batch_end(self, batch, logs=None):
        if logs and not math.isfinite(float(logs.get("loss", 0.0))):
            self.bad_step = optimizer_step(self.model)
            self.model.stop_training = True


class StopOnSignal(keras.callbacks.Callback):
    """A context manager and callback: while active, SIGTERM (the notice cloud
    preemption and job schedulers send first) stops training at the next step
    boundary instead of killing the process; `step` tells where. Outside the
    main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, signals=(signal.SIGTERM,)):
        super().__init__()
        self.signals = signals
        self.received = None
        self.step = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._receive)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _receive(self, number, frame):
        self.received = signal.Signals(number).name

    def on_train_batch_end(self, batch, logs=None):
        if self.received and self.step is None:
            self.step = optimizer_step(self.model)
            self.model.stop_training = True


class Evaluator(keras.callbacks.Callback):
    """Validates at the first epoch end on or after every `eval_every` steps
    (the final step is left to the driver): `evaluate(model)` -> dict of
    metrics, written through `logger.write_validation` and handed to
    `on_validation(model, step, metrics)` if given (e.g. `BestKeeper.update`).
    Both run inside `weights()` if given, a context manager that puts the
    weights to validate in the model (e.g. `AdamW.averaged_weights`)."""

    def __init__(self, evaluate, logger, eval_every, final_step, on_validation=None,
                 weights=None):  # fmt: skip
        super().__init__()
        self.evaluate = evaluate
        self.logger = logger
        self.eval_every = eval_every
        self.final_step = final_step
        self.on_validation = on_validation
        self.weights = weights or contextlib.nullcontext
        self.last_step = None

    def on_epoch_end(self, epoch, logs=None):
        step = optimizer_step(self.model)
        last = self.last_step if self.last_step is not None else step - 1
        self.last_step = step
        if self.model.stop_training:  # NaN or SIGTERM: stop without validating
            return
        if step // self.eval_every > last // self.eval_every and step < self.final_step:
            with self.weights():
                metrics = self.evaluate(self.model)
                self.logger.write_validation(step, metrics)
                if self.on_validation is not None:
                    self.on_validation(self.model, step, metrics)


class Profiler(keras.callbacks.Callback):
    """Records a TensorFlow profile of optimizer steps `[start, end)` into
    `log_dir`, for TensorBoard's Profile tab (`pip install tensorboard-plugin-profile`)."""

    def __init__(self, log_dir, start, end):
        super().__init__()
        self.log_dir = str(log_dir)
        self.start = start
        self.end = end
        self.active = False

    def on_train_batch_begin(self, batch, logs=None):
        if not self.active and self.start <= optimizer_step(self.model) < self.end:
            tf.profiler.experimental.start(self.log_dir)
            self.active = True

    def on_train_batch_end(self, batch, logs=None):
        if self.active and optimizer_step(self.model) >= self.end:
            self.on_train_end()

    def on_train_end(self, logs=None):
        if self.active:
            tf.profiler.experimental.stop()
            self.active = False


class Backup(keras.callbacks.Callback):
    """Saves a backup at the end of each Keras epoch that ends on a multiple of
    `every` or at `final_step` (`trainer.fit_phases` makes epochs end there),
    named by the optimizer step, unless training was stopped (a NaN loss);
    keeps the newest `keep` (`train.keep_backups`).

    Args:
        directory: where `step-*` backups go.
        every: steps between backups (`train.checkpoint_every`).
        final_step: the run's last step, always backed up.
        keep: how many backups to keep.
        write_extra: optional `fn(directory)` that adds files to each backup
            (e.g. LoRA adapters) before it is renamed into place.
    """

    def __init__(self, directory, every, final_step, keep=2, write_extra=None):
        super().__init__()
        self.directory = Path(directory)
        self.every = every
        self.final_step = final_step
        self.keep = keep
        self.write_extra = write_extra

    def on_train_begin(self, logs=None):
        for partial in self.directory.glob(".partial-*"):  # left by a killed run
            shutil.rmtree(partial, ignore_errors=True)

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:  # e.g. NaN loss: keep the last good backup
            return
        step = optimizer_step(self.model)
        if step % self.every == 0 or step >= self.final_step:
            self.save()

    def save(self):
        """Backs up the model at its current step; returns the backup's path."""
        step = optimizer_step(self.model)
        final = self.directory / f"step-{step:08d}"
        write_backup(self.model, final, {"step": step}, self.write_extra)
        for old in sorted(self.directory.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final
