"""Callbacks: TensorBoard scalars with throughput and MFU, periodic
validation, a NaN guard and a SIGTERM stop."""

import math
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf


def _scalar(value):
    return float(np.asarray(keras.ops.convert_to_numpy(value)))


class TrainingLogger(keras.callbacks.Callback):
    """Writes TensorBoard scalars every `log_every` steps and after each validation.

    Train (`logs/train`): loss, accuracy, learning rate, and either tokens
    per second, model-FLOPs utilisation and perplexity (`exp(loss)`, language
    models) or examples per second (tasks with variable-length batches).
    Validation (`logs/validation`): whatever `write_validation` is given. The
    step axis is the optimizer's iteration count, so resumed runs continue
    the same curves. Train loss/accuracy are Keras's running means since the
    last backup.

    Args:
        log_dir: TensorBoard directory.
        log_every: steps between train scalars.
        tokens_per_step: global batch * sequence length (language models).
        flops_per_step: training FLOPs of one global step (with tokens_per_step).
        peak_flops: FLOP/s the hardware can do (for MFU).
        examples_per_step: global batch, when tokens_per_step is None.
        print_fn: where the console lines go (None: silent).
    """

    def __init__(
        self,
        log_dir,
        log_every,
        tokens_per_step=None,
        flops_per_step=None,
        peak_flops=None,
        examples_per_step=None,
        print_fn=print,
    ):
        super().__init__()
        self.log_dir = str(log_dir)
        self.log_every = log_every
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self.examples_per_step = examples_per_step
        self.print_fn = print_fn
        self.throughput = []  # tokens/s (or examples/s) of each logged interval
        self.last_validation_step = None
        # Made here, not in on_train_begin: a finished run that is started again skips
        # `fit` but still writes its final validation.
        self.train_writer = tf.summary.create_file_writer(f"{self.log_dir}/train")
        self.valid_writer = tf.summary.create_file_writer(f"{self.log_dir}/validation")

    def on_train_begin(self, logs=None):
        self._mark = None

    def _step(self):
        return int(_scalar(self.model.optimizer.iterations))

    def on_train_batch_end(self, batch, logs=None):
        step, now = self._step(), time.perf_counter()
        if self._mark is None:  # the first call includes tracing/compilation: start timing here
            self._mark = (step, now)
            return
        if step - self._mark[0] < self.log_every:
            return
        seconds = (now - self._mark[1]) / (step - self._mark[0])
        self._mark = (step, now)
        loss = float(logs["loss"])
        scalars = {
            "loss": loss,
            "accuracy": float(logs.get("accuracy", math.nan)),
            "learning_rate": _scalar(self.model.optimizer.learning_rate),
        }
        if self.tokens_per_step:
            scalars["perplexity"] = math.exp(min(loss, 50.0))
            scalars["tokens_per_second"] = self.tokens_per_step / seconds
            scalars["mfu"] = self.flops_per_step / seconds / self.peak_flops
            speed = f"{scalars['tokens_per_second']:,.0f} tokens/s MFU {scalars['mfu']:.1%}"
        else:
            scalars["examples_per_second"] = self.examples_per_step / seconds
            speed = f"{scalars['examples_per_second']:,.0f} examples/s"
        self.throughput.append(scalars.get("tokens_per_second", scalars.get("examples_per_second")))
        with self.train_writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        if self.print_fn:
            self.print_fn(
                f"step {step}: loss {loss:.4f} accuracy {scalars['accuracy']:.4f} "
                f"lr {scalars['learning_rate']:.2e} {speed}"
            )

    def median_throughput(self):
        ordered = sorted(self.throughput)
        return ordered[len(ordered) // 2] if ordered else None

    def summary(self):
        """metrics.json's throughput entries: the median over the logged intervals."""
        median = self.median_throughput()
        if not self.tokens_per_step:
            return {"examples_per_second": median}
        mfu = median * self.flops_per_step / self.tokens_per_step / self.peak_flops if median \
            else None  # fmt: skip
        return {"tokens_per_second": median, "mfu": mfu}

    def write_validation(self, step, metrics):
        """Validation summaries at `step` (once per step): the float entries of
        `metrics` as scalars (language models add perplexity), strings as text."""
        if step == self.last_validation_step:
            return
        self.last_validation_step = step
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        if self.tokens_per_step and "loss" in scalars:
            scalars["perplexity"] = math.exp(min(scalars["loss"], 50.0))
        with self.valid_writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
            for name, value in metrics.items():
                if isinstance(value, str):  # e.g. translation samples
                    tf.summary.text(name, value)
        self.valid_writer.flush()
        if self.print_fn:
            shown = " ".join(f"{name} {value:.4f}" for name, value in scalars.items())
            self.print_fn(f"step {step}: validation {shown}")

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
            self.bad_step = int(_scalar(self.model.optimizer.iterations))
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
            self.step = int(_scalar(self.model.optimizer.iterations))
            self.model.stop_training = True


class Evaluator(keras.callbacks.Callback):
    """Validates at the first epoch end on or after every `eval_every` steps
    (the final step is left to the driver): `evaluate(model)` -> dict of
    metrics, written through `logger.write_validation` and handed to
    `on_validation(model, step, metrics)` if given (e.g. `BestKeeper.update`)."""

    def __init__(self, evaluate, logger, eval_every, final_step, on_validation=None):
        super().__init__()
        self.evaluate = evaluate
        self.logger = logger
        self.eval_every = eval_every
        self.final_step = final_step
        self.on_validation = on_validation
        self.last_step = None

    def on_epoch_end(self, epoch, logs=None):
        step = int(_scalar(self.model.optimizer.iterations))
        last = self.last_step if self.last_step is not None else step - 1
        self.last_step = step
        if self.model.stop_training:  # NaN or SIGTERM: stop without validating
            return
        if step // self.eval_every > last // self.eval_every and step < self.final_step:
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

    def _step(self):
        return int(_scalar(self.model.optimizer.iterations))

    def on_train_batch_begin(self, batch, logs=None):
        if not self.active and self.start <= self._step() < self.end:
            tf.profiler.experimental.start(self.log_dir)
            self.active = True

    def on_train_batch_end(self, batch, logs=None):
        if self.active and self._step() >= self.end:
            self.on_train_end()

    def on_train_end(self, logs=None):
        if self.active:
            tf.profiler.experimental.stop()
            self.active = False
