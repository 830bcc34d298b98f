"""Helpers for end-to-end tests of `python -m fmkeras.train`."""

import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(log_dir, tag):
    """`[(step, value)]` of one TensorBoard scalar."""
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


def train_args(task, recipe, settings, out):
    """`fmkeras.train.main` arguments: a task, a recipe, `--set` overrides, `--out`."""
    args = [task, "--recipe", str(recipe), "--out", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args
