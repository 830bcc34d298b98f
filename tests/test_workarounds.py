"""The Keras multi-worker workarounds: still needed where they patch, and
two local workers train in lockstep with them."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import keras.src.backend.tensorflow.trainer as trainer

from fmkeras.launch import free_ports

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras, tensorflow as tf
    if sys.argv[1] == "patched":
        from fmkeras.config import DistributeConfig
        from fmkeras.distribute import create_strategy
        strategy = create_strategy(DistributeConfig(strategy="multi_worker"))
    else:  # stock Keras
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        layers = [keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)]
        model = keras.Sequential(layers)
        model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    history = model.fit(data.with_options(options), epochs=3, steps_per_epoch=4, verbose=0)
    print(json.dumps(history.history["loss"]))
""")


def test_patched_keras_internals_still_exist():
    # If Keras renames these, the workaround silently stops applying: fail instead.
    assert (
        "iterator" in inspect.signature(trainer.TensorFlowTrainer._maybe_symbolic_build).parameters
    )
    assert list(inspect.signature(trainer.reduce_per_replica).parameters) == [
        "values", "strategy", "reduction"
    ]  # fmt: skip
    assert callable(trainer._collective_all_reduce_multi_worker)


def run_two_workers(mode):
    """`[(returncode, stdout, stderr)]` of two local workers running WORKER."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster,
               "task": {"type": "worker", "index": index}})}  # fmt: skip
        workers.append(subprocess.Popen([sys.executable, "-c", WORKER, mode], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=240)
        finally:
            if worker.poll() is None:
                worker.kill()  # SIGTERM is swallowed by TF in multi-worker mode
                out, err = worker.communicate()
        results.append((worker.returncode, out, err))
    return results


def test_two_local_workers_fit_in_lockstep():
    results = run_two_workers("patched")
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    losses = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert losses[0][-1] < losses[0][0]


def test_stock_keras_still_needs_the_workaround():
    # When this fails, Keras fixed keras#20585: drop fmkeras/workarounds.py.
    results = run_two_workers("stock")
    assert any(code != 0 for code, _, _ in results)
    assert any("PerReplica" in err for _, _, err in results)
