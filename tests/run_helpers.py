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


def quick_settings(steps, **settings):
    """Overrides for a tiny run of `steps` steps with one backup and one
    evaluation at the end, without XLA; `settings` use `__` for dots."""
    quick = {
        "model.size": "tiny",
        "train.steps": steps,
        "train.checkpoint_every": steps,
        "train.eval_every": steps,
        "train.jit_compile": "false",
    }
    return quick | {key.replace("__", "."): value for key, value in settings.items()}
