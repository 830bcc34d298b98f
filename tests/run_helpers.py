"""Helpers for end-to-end tests of `python -m fmkeras.train` and of local workers."""

import json
import os
import subprocess
import sys

import tensorflow as tf
from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmkeras.launch import free_ports

PRETRAIN_RECIPE = REPO / "trainers" / "pretrain_gutenberg.yaml"


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


def tiny_args(vocab, steps=40, **extra):
    """`python -m fmkeras.train` arguments of a tiny pretraining run (keys with dots)."""
    settings = {
        "model.size": "tiny",
        "data.max_lines": 1500,
        "data.vocab_file": vocab,
        "train.batch_size": 16,
        "train.learning_rate": 1e-3,
        "train.steps": steps,
        "train.checkpoint_every": 20,
        "train.eval_every": 20,
        "train.eval_steps": 4,
        "train.log_every": 10,
        "train.steps_per_execution": 1,
        "train.peak_gflops": 100,
        **extra,
    }
    args = ["pretrain", "--recipe", str(PRETRAIN_RECIPE)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def run_cli(args, **kwargs):
    """`python -m fmkeras.train ARGS` in a fresh process (captured, text)."""
    return subprocess.run(
        [sys.executable, "-m", "fmkeras.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def run_workers(script, *args, count=2, timeout=240, cwd=None):
    """`[(returncode, stdout, stderr)]` of `count` local workers, each running
    `python -c script *args` with its own TF_CONFIG on loopback ports."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(count)]}
    workers = []
    for index in range(count):
        task = {"type": "worker", "index": index}
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}
        command = [sys.executable, "-c", script, *map(str, args)]
        workers.append(subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=timeout)
        finally:
            if worker.poll() is None:
                worker.kill()  # SIGTERM is swallowed by TF in multi-worker mode
                out, err = worker.communicate()
        results.append((worker.returncode, out, err))
    return results
