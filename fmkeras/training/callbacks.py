"""Callbacks: TensorBoard scalars with throughput and MFU, and a NaN guard."""

import math
import time

import keras
import numpy as np
import tensorflow as tf


def _scalar(value):
    return float(np.asarray(keras.ops.convert_to_numpy(value)))


class TrainingLogger(keras.callbacks.Callback):
    """Writes TensorBoard scalars every `log_every` steps and after each validation.

    Train (`logs/train`): loss, accuracy, perplexity (`exp(loss)`), learning
    rate, tokens per second and model-FLOPs utilisation. Validation
    (`logs/validation`): loss, accuracy, perplexity. The step axis is the
    optimizer's iteration count, so resumed runs continue the same curves.
    Train loss/accuracy are Keras's running means since the last backup.

    Args:
        log_dir: TensorBoard directory.
        log_every: steps between train scalars.
        tokens_per_step: global batch * sequence length.
        flops_per_step: training FLOPs of one global step.
        peak_flops: FLOP/s the hardware can do (for MFU).
        print_fn: where the console lines go (None: silent).
    """

    def __init__(
        self, log_dir, log_every, tokens_per_step, flops_per_step, peak_flops, print_fn=print
    ):
        super().__init__()
        self.log_dir = str(log_dir)
        self.log_every = log_every
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self.print_fn = print_fn
        self.throughput = []  # tokens/s of each logged interval
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
        tokens_per_second = self.tokens_per_step / seconds
        self.throughput.append(tokens_per_second)
        scalars = {
            "loss": float(logs["loss"]),
            "accuracy": float(logs.get("accuracy", math.nan)),
            "perplexity": math.exp(min(float(logs["loss"]), 50.0)),
            "learning_rate": _scalar(self.model.optimizer.learning_rate),
            "tokens_per_second": tokens_per_second,
            "mfu": self.flops_per_step / seconds / self.peak_flops,
        }
        with self.train_writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        if self.print_fn:
            self.print_fn(
                f"step {step}: loss {scalars['loss']:.4f} accuracy {scalars['accuracy']:.4f} "
                f"lr {scalars['learning_rate']:.2e} {tokens_per_second:,.0f} tokens/s "
                f"MFU {scalars['mfu']:.1%}"
            )

    def on_epoch_end(self, epoch, logs=None):
        if "val_loss" not in (logs or {}):
            return
        self.write_validation(
            self._step(), float(logs["val_loss"]), float(logs.get("val_accuracy", math.nan))
        )

    def write_validation(self, step, loss, accuracy):
        if step == self.last_validation_step:
            return
        self.last_validation_step = step
        with self.valid_writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("accuracy", accuracy)
            tf.summary.scalar("perplexity", math.exp(min(loss, 50.0)))
        if self.print_fn:
            self.print_fn(
                f"step {step}: validation loss {loss:.4f} accuracy {accuracy:.4f} "
                f"perplexity {math.exp(min(loss, 50.0)):.2f}"
            )

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
