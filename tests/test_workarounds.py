"""The Keras + tf.distribute workarounds: the multi-worker ones are still
needed where they patch and two local workers train in lockstep with them;
the per-replica XLA step trains exactly like Keras's own; the attention
projections' gradient is one 2-D matmul and equals stock EinsumDense's, and
they quantize like it; a SavedModel's signatures are traced once; a final
model is saved without its optimizer."""

import inspect
import json
import subprocess
import sys
import textwrap
import warnings

import keras
import keras.src.backend.tensorflow.trainer as trainer
import numpy as np
import pytest
import tensorflow as tf
from run_helpers import run_workers

from fmkeras.export import quantize_model
from fmkeras.workarounds import (
    TrailingEinsumDense,
    compile_replica_steps_with_xla,
    save_signatures,
    save_without_training_state,
)

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


PROJECTIONS = [  # (equation, output_shape, bias_axes, input shape): fmkeras's attention projections
    ("btd,dnh->btnh", (None, 2, 3), "nh", (4, 5, 6)),
    ("btnh,nhd->btd", (None, 6), "d", (4, 5, 2, 3)),
]


def kernel_gradient_ops(layer, inputs):
    """Output, gradients (input, kernel, bias) and the op types of the traced gradient."""

    @tf.function
    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.cos(y))
        return y, tape.gradient(loss, [x, *layer.trainable_variables])

    graph = forward_backward.get_concrete_function(tf.TensorSpec(inputs.shape)).graph
    output, gradients = forward_backward(inputs)
    return output, gradients, {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("equation,output_shape,bias_axes,shape", PROJECTIONS)
def test_stock_einsum_dense_still_needs_the_workaround(equation, output_shape, bias_axes, shape):
    # When this fails, Keras's TensorFlow einsum no longer broadcasts the kernel
    # in a BatchMatMulV2 (keras#22823's problem): drop TrailingEinsumDense.
    layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    *_, op_types = kernel_gradient_ops(layer, tf.ones(shape))
    assert "BatchMatMulV2" in op_types


@pytest.mark.parametrize("equation,output_shape,bias_axes,shape", PROJECTIONS)
def test_trailing_einsum_dense_matches_einsum_dense_with_2d_matmuls(
    equation, output_shape, bias_axes, shape
):
    inputs = tf.random.stateless_normal(shape, seed=(1, 2))
    stock = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    fixed = TrailingEinsumDense(equation, output_shape, bias_axes=bias_axes)
    stock.build(shape)
    fixed.build(shape)
    kernel = np.random.default_rng(0).normal(size=stock.kernel.shape).astype("float32")
    bias = np.linspace(-1, 1, int(np.prod(stock.bias.shape)), dtype="float32")
    for layer in (stock, fixed):
        layer.set_weights([kernel, bias.reshape(stock.bias.shape)])
    expected, expected_gradients, _ = kernel_gradient_ops(stock, inputs)
    output, gradients, op_types = kernel_gradient_ops(fixed, inputs)
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)
    for gradient, reference in zip(gradients, expected_gradients, strict=True):
        np.testing.assert_allclose(gradient, reference, rtol=1e-4, atol=1e-4)
    assert "BatchMatMulV2" not in op_types and "MatMul" in op_types
    assert fixed.tensordot_axes == {"btd,dnh->btnh": 1, "btnh,nhd->btd": 2}[equation]


def stock_and_trailing_projections(shape):
    """A built `EinsumDense` query projection and a `TrailingEinsumDense` one."""
    layers = [cls("btd,dnh->btnh", (None, 2, 3), bias_axes="nh")
              for cls in (keras.layers.EinsumDense, TrailingEinsumDense)]  # fmt: skip
    for layer in layers:
        layer.build(shape)
    return layers


def test_trailing_einsum_dense_keeps_lora_and_other_equations():
    x = tf.random.stateless_normal((3, 4, 6), seed=(3, 4))
    layers = stock_and_trailing_projections(x.shape)
    for layer in layers:
        layer.enable_lora(2, b_initializer="ones")  # adapters that change the output
    layers[1].set_weights(layers[0].get_weights())
    stock, fixed = (layer(x) for layer in layers)
    np.testing.assert_allclose(fixed, stock, rtol=1e-5, atol=1e-5)  # the adapters count
    layers[1].lora_kernel_b.assign(tf.zeros_like(layers[1].lora_kernel_b))
    assert not np.allclose(layers[1](x), stock, atol=1e-3)
    transposed = TrailingEinsumDense("abc,dc->abd", (None, 5))  # not a trailing contraction
    assert transposed.tensordot_axes is None and transposed(x).shape == (3, 4, 5)


def test_trailing_einsum_dense_quantizes_like_einsum_dense():
    # EinsumDense.quantize skips subclasses with only a warning (its type check):
    # int8 exports kept the attention projections in float32.
    x = tf.random.stateless_normal((3, 4, 6), seed=(5, 6))
    layers = stock_and_trailing_projections(x.shape)
    layers[1].set_weights(layers[0].get_weights())
    float_output = layers[1](x)
    model = keras.Sequential([keras.Input((4, 6)), layers[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Model.quantize warns on a skipped layer
        quantize_model(model, "int8")  # what `fmkeras export --quantize int8` runs
    layers[0].quantize("int8")
    assert layers[1].quantization_mode == "int8" and layers[1]._kernel.dtype == "int8"
    np.testing.assert_allclose(layers[1](x), layers[0](x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layers[1](x), float_output, atol=0.05)


def traced_model_function():
    """A Keras model's call with a lookup table, and the list its traces append to."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(["a", "b"]), tf.constant([1.0, 2.0])),
        default_value=0.0,
    )
    traces = []

    def serve(keys):
        traces.append(1)
        values = tf.repeat(table.lookup(keys)[:, None], 3, axis=1)  # (batch, 3)
        return {"outputs": model(values)}

    return model, table, serve, traces


def test_stock_export_archive_still_traces_endpoints_twice(tmp_path):
    # When this fails, tf.saved_model.save reuses the trace (tensorflow#56370):
    # fmkeras.workarounds.save_signatures can give way to keras.export.ExportArchive.
    model, table, serve, traces = traced_model_function()
    archive = keras.export.ExportArchive()
    archive.track(table)
    archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec([None], tf.string)])
    archive.write_out(str(tmp_path / "stock"), verbose=False)
    assert len(traces) == 2


def test_saved_signatures_are_traced_once_and_answer_like_the_model(tmp_path):
    model, table, serve, traces = traced_model_function()
    function = tf.function(serve, input_signature=[tf.TensorSpec([None], tf.string, name="keys")])
    concrete = function.get_concrete_function()
    save_signatures(tmp_path / "saved", {"serving_default": concrete, "other": concrete},
                    resources=[table])  # fmt: skip
    assert len(traces) == 1
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    keys = tf.constant(["b", "a", "z"])
    answers = loaded.signatures["other"](keys=keys)["outputs"].numpy()
    expected = model(np.repeat([[2.0], [1.0], [0.0]], 3, axis=1))  # the table's values
    np.testing.assert_allclose(answers, expected, atol=1e-6)
    stored = tf.train.load_checkpoint(str(tmp_path / "saved" / "variables" / "variables"))
    values = stored.get_variable_to_shape_map()
    assert sum(np.prod(values[key]) for key in values if key.endswith("VARIABLE_VALUE")) == 8


def compiled_and_trained_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    return model


def saved_groups(path):
    """The top-level groups of a `.keras` file's weights and its compile config."""
    import zipfile

    import h5py

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        with archive.open("model.weights.h5") as weights, h5py.File(weights) as store:
            return set(store), config.get("compile_config")


def test_stock_keras_still_saves_the_optimizer_it_is_told_to_leave_out(tmp_path):
    # When this fails, Keras honours include_optimizer=False in .keras files
    # (tensorflow#84268): drop save_without_training_state.
    compiled_and_trained_model().save(tmp_path / "m.keras", include_optimizer=False)
    assert "optimizer" in saved_groups(tmp_path / "m.keras")[0]


def test_saved_without_training_state_loads_quietly_and_keeps_training(tmp_path):
    model = compiled_and_trained_model()
    save_without_training_state(model, tmp_path / "m.keras")
    groups, compile_config = saved_groups(tmp_path / "m.keras")
    assert "optimizer" not in groups and not compile_config
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "Skipping variable loading"
        loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(np.ones((2, 3)), verbose=0),
                               model.predict(np.ones((2, 3)), verbose=0))  # fmt: skip
    assert model.compiled and int(model.optimizer.iterations) == 1
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)  # the optimizer trains on
    assert int(model.optimizer.iterations) == 2
