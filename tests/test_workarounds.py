"""The Keras + tf.distribute workarounds: the multi-worker ones are still
needed where they patch and two local workers train in lockstep with them;
the per-replica XLA step trains exactly like Keras's own."""

import inspect
import json
import subprocess
import sys
import textwrap

import keras
import keras.src.backend.tensorflow.trainer as trainer
import numpy as np
import tensorflow as tf
from run_helpers import run_workers

from fmkeras.workarounds import compile_replica_steps_with_xla

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


def test_two_local_workers_fit_in_lockstep():
    results = run_workers(WORKER, "patched")
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    losses = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert losses[0][-1] < losses[0][0]


def test_stock_keras_still_needs_the_workaround():
    # When this fails, Keras fixed keras#20585: drop fmkeras/workarounds.py.
    results = run_workers(WORKER, "stock")
    assert any(code != 0 for code, _, _ in results)
    assert any("PerReplica" in err for _, _, err in results)


def test_replica_xla_step_trains_like_keras():
    """The per-replica XLA train step gives Keras's own step's losses and weights,
    an embedding (sparse gradient, lazily updated Adam rows) included."""
    x = np.random.default_rng(0).integers(0, 50, (64, 6)).astype("int32")
    y = (x.sum(axis=1) % 2).astype("int32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    results, calls = [], []
    for replica_xla in (False, True):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((6,), dtype="int32"),
                keras.layers.Embedding(50, 8),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(2),
            ])  # fmt: skip
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            model.compile(optimizer="adam", loss=loss, jit_compile=False)
            if replica_xla:
                compile_replica_steps_with_xla(model)
                step = model.train_step
                model.train_step = lambda data, step=step: calls.append(1) or step(data)
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append((history.history["loss"], model.get_weights()))
    assert calls  # Keras called the replacement step
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for replaced, stock in zip(results[1][1], results[0][1], strict=True):
        np.testing.assert_allclose(replaced, stock, atol=1e-5)


MIRRORED_PREDICT = textwrap.dedent("""
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from fmkeras.workarounds import predict_on_batch
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(loss="mse")
    rows = np.arange(9, dtype="float32").reshape(3, 3)
    expected = np.asarray(model(rows))
    print(json.dumps({"stock": len(model.predict_on_batch(rows)),
                      "fixed": bool(np.allclose(predict_on_batch(model, rows), expected))}))
""")


def test_predict_on_batch_gives_one_row_per_input_under_mirrored():
    # When "stock" becomes 3, Keras fixed predict_on_batch under MirroredStrategy:
    # drop fmkeras.workarounds.predict_on_batch.
    done = subprocess.run([sys.executable, "-c", MIRRORED_PREDICT], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"stock": 6, "fixed": True}
