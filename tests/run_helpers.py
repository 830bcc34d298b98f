"""Helpers for end-to-end tests of `python -m fmkeras.train` and of local workers."""

import contextlib
import io
import json
import os
import runpy
import select
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request

import numpy as np
from conftest import REPO

from fmkeras.launch import free_ports
from fmkeras.training.run_dir import read_scalars

PRETRAIN_RECIPE = REPO / "trainers" / "pretrain_gutenberg.yaml"


scalars = read_scalars  # `[(step, value)]` of one TensorBoard scalar


LANGUAGE_MODEL_TASKS = {"mlm", "pretrain", "causal_lm"}  # the tasks that report MFU


def train_args(task, recipe, settings, out):
    """`fmkeras.train.main` arguments: a task, a recipe, `--set` overrides, `--out`
    (float32 unless `settings` say otherwise: recipes default to `auto`, and a
    test's numbers should not depend on whether the CPU has bfloat16; language
    models get a fixed MFU peak: on a machine without a cached one, each run
    would otherwise spend seconds probing it, uncached under the tests' load)."""
    args = [task, "--recipe", str(recipe), "--out", str(out)]
    fixed = {"train.precision": "float32"}
    if task in LANGUAGE_MODEL_TASKS:
        fixed["train.peak_gflops"] = 100
    for key, value in {**fixed, **settings}.items():
        args += ["--set", f"{key}={value}"]
    return args


# A tiny classify-style run from a fresh encoder: a few seconds of training.
TINY_CLASSIFIER = {"model.size": "tiny", "model.init": "random", "data.max_lines": 800,
                   "data.vocab_size": 800, "train.batch_size": 16, "train.steps": 6,
                   "train.checkpoint_every": 6, "train.eval_every": 6,
                   "train.jit_compile": "false"}  # fmt: skip


def train_tiny_classifier(task, recipe, out, **extra):
    """Trains a tiny classify-style run from a fresh encoder (`extra`: more
    `--set` keys) in-process and returns its directory."""
    from fmkeras.train import main

    settings = {**TINY_CLASSIFIER, **extra}
    assert main(train_args(task, REPO / "trainers" / recipe, settings, out)) == 0
    return out


def built_task(recipe, settings, out):
    """The task of `recipe` with `--set` `settings` (a dict) in run directory
    `out`, in-process and untrained: `(task, model)` after `read_data` and
    `build_model`, for tests of what a task builds (its log goes to stdout)."""
    from fmkeras.config import build_config
    from fmkeras.tasks.registry import get_task
    from fmkeras.tasks.spec import resolve_files
    from fmkeras.training.run_dir import RunDir

    config = build_config(recipe, [f"{key}={value}" for key, value in settings.items()])
    task_class = get_task(config.task)
    run = RunDir(out)
    run.prepare(config)
    task = task_class(config, run, resolve_files(task_class, config, None, print), print)
    task.read_data()
    return task, task.build_model()


def tiny_args(vocab, steps=40, recipe=PRETRAIN_RECIPE, **extra):
    """`python -m fmkeras.train` arguments of a tiny pretraining run (keys with dots)
    of `recipe` (a masked-LM one)."""
    settings = {
        "model.size": "tiny",
        "data.max_lines": 1500,
        "data.vocab_file": vocab,
        "data.sequence_length": 32,  # the recipe's 128 makes a 40-step run ~30 % longer
        "train.batch_size": 16,
        "train.learning_rate": 1e-3,
        "train.steps": steps,
        "train.checkpoint_every": 20,
        "train.eval_every": 20,
        "train.eval_steps": 4,
        "train.log_every": 10,
        "train.steps_per_execution": 1,
        "train.peak_gflops": 100,
        "train.precision": "float32",  # as in `train_args`
        **extra,
    }
    args = ["pretrain", "--recipe", str(recipe)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def assert_model_holds_backup(model_path, backup):
    """The `.keras` model at `model_path` holds the weights of the backup
    directory `backup`: restoring the backup over them changes nothing."""
    import fmkeras
    from fmkeras.training.checkpoints import restore_backup

    model = fmkeras.load_model(model_path)
    saved = [weight.numpy() for weight in model.weights]
    restore_backup(model, backup)
    for weight, value in zip(model.weights, saved, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value, err_msg=weight.path)


def wait_for(path, process, seconds=300):
    """Waits until `path` exists while `process` runs."""
    deadline = time.time() + seconds
    while not path.exists():
        if process.poll() is not None:
            said = process.stderr.read()[-2000:] if process.stderr else ""
            raise AssertionError(f"the process ended before {path} appeared: {said}")
        assert time.time() < deadline, f"no {path} within {seconds} s"
        time.sleep(0.02)


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


def run_tool(name, *args):
    """`python tools/NAME.py ARGS` run in this process as `__main__` (a fresh
    process would spend seconds importing TensorFlow), as a
    `subprocess.CompletedProcess` with the exit code and captured output."""
    argv, out, err, code = sys.argv, io.StringIO(), io.StringIO(), 0
    command = [str(REPO / "tools" / f"{name}.py"), *map(str, args)]
    sys.argv = command
    sys.path.insert(0, str(REPO / "tools"))  # as `python tools/NAME.py` puts it first
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(command[0], run_name="__main__")
    except SystemExit as exit_:  # argparse errors, sys.exit(message): as Python reports them
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        if isinstance(exit_.code, str):
            err.write(exit_.code + "\n")
    finally:
        sys.argv = argv
        sys.path.remove(str(REPO / "tools"))
    return subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())


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


SERVE_CHECK = textwrap.dedent("""
    import json, sys, traceback
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    def plain(outputs):
        return {k: tf.convert_to_tensor(v).numpy().tolist() for k, v in outputs.items()}

    def check(path, inputs):
        inputs = {"texts": inputs} if isinstance(inputs, list) else inputs  # name -> strings
        warmup_file = f"{path}/assets.extra/tf_serving_warmup_requests"
        records = [record.numpy() for record in tf.data.TFRecordDataset(warmup_file)]
        loaded = tf.saved_model.load(path)
        tensors = {name: tf.constant(strings) for name, strings in inputs.items()}
        eager = loaded.signatures["serving_default"](**tensors)
        # TF Serving's C++ path, without Grappler's graph rewrites: they keep the outputs
        # and cost ~8 s per load here (the restore runs them over every function).
        config = tf.compat.v1.ConfigProto()
        config.graph_options.rewrite_options.disable_meta_optimizer = True
        with tf.compat.v1.Session(graph=tf.Graph(), config=config) as session:
            meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
            signature = meta.signature_def["serving_default"]
            fetches = {k: v.name for k, v in signature.outputs.items()}
            graph = session.run(fetches, {signature.inputs[k].name: v for k, v in inputs.items()})
            # TF Serving replays assets.extra/tf_serving_warmup_requests at load time.
            for record in records:
                log = prediction_log_pb2.PredictionLog.FromString(record)
                request = log.predict_log.request
                name = request.model_spec.signature_name
                feeds = {meta.signature_def[name].inputs[key].name: tf.make_ndarray(proto)
                         for key, proto in request.inputs.items()}
                session.run(fetches, feeds)
        assert "tensorflow_text" not in sys.modules and "fmkeras" not in sys.modules
        return {"eager": plain(eager), "session": plain(graph), "warmup": len(records)}

    for line in sys.stdin:  # one JSON request per line, one JSON answer per line
        try:
            answer = check(**json.loads(line))
        except Exception:
            answer = {"error": traceback.format_exc()}
        print(json.dumps(answer, default=bytes.decode), flush=True)
""")
_serve_checker = []  # this test worker's TF-only process, started on first use


def serve_in_fresh_process(version, texts):
    """Outputs of `serving_default` in a TF-only process (it never imports
    fmkeras or tensorflow-text), loaded as `tf.saved_model.load` (eager) and as
    TF Serving does (session), after replaying the warm-up requests; the two
    must agree. `texts` is a list (the `texts` input) or `{input name:
    [strings]}`. The process is started once per test worker and kept: each
    start costs seconds of importing TensorFlow."""
    if not _serve_checker or _serve_checker[0].poll() is not None:
        log = tempfile.TemporaryFile("w+")  # the checker's stderr, shown if it dies
        _serve_checker[:] = [subprocess.Popen([sys.executable, "-c", SERVE_CHECK],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=log, text=True), log]  # fmt: skip
    checker, log = _serve_checker
    checker.stdin.write(json.dumps({"path": str(version), "inputs": texts}) + "\n")
    checker.stdin.flush()
    if not select.select([checker.stdout], [], [], 300)[0]:
        checker.kill()
        raise AssertionError(f"no answer within 300 s for {version}")
    answer = checker.stdout.readline()
    if not answer:
        log.seek(0)
        raise AssertionError(f"the checker process died loading {version}: {log.read()[-3000:]}")
    served = json.loads(answer)
    assert "error" not in served, served["error"][-3000:]
    assert served["warmup"] == 2
    for key, value in served["eager"].items():
        if isinstance(np.asarray(value).flat[0], float):
            np.testing.assert_allclose(served["session"][key], value, atol=1e-5)
        else:
            assert served["session"][key] == value, key
    return served["eager"]


def request_json(url, body=None):
    """`(status, JSON answer)` of a GET (no body) or POST (a JSON-able body, or
    raw bytes) to a REST server; error statuses are returned, not raised."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
