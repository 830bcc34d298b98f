"""One check for every layer: config, `.keras` round trip, symbolic and eager
calls, an XLA train step, the fused element-wise path the training driver
uses, and mixed precision (after keras-hub's run_layer_test)."""

import json

import keras
import numpy as np
import tensorflow as tf

import fmkeras
from fmkeras.fused import fused_elementwise


def _symbolic_inputs(inputs):
    return {
        name: keras.Input(shape=value.shape[1:], dtype=str(value.dtype), name=name)
        for name, value in inputs.items()
    }


def _functional(layer, inputs, call_kwargs):
    symbolic = _symbolic_inputs(inputs)
    return keras.Model(symbolic, layer(**symbolic, **call_kwargs))


def _outputs_and_gradients(model, inputs):
    """A graph-mode forward and backward pass: outputs and every weight's gradient."""

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            output = tf.cast(model(inputs), "float32")
            probe = tf.sin(tf.reshape(tf.range(tf.size(output), dtype="float32"), tf.shape(output)))
            loss = tf.reduce_sum(output * probe)
        return output, tape.gradient(loss, model.trainable_weights)

    output, gradients = step()
    return [output.numpy()] + [None if g is None else tf.convert_to_tensor(g).numpy()
                               for g in gradients]  # fmt: skip


def run_layer_checks(
    layer_cls, init_kwargs, inputs, expected_output_shape, tmp_path, call_kwargs=None, seed=0
):
    """Asserts the layer contract.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments.
        inputs: dict of call argument name -> numpy array (batch first).
        expected_output_shape: shape of the (single) output.
        tmp_path: a directory for the `.keras` file.
        call_kwargs: extra non-tensor call arguments.
    """
    call_kwargs = call_kwargs or {}
    keras.utils.set_random_seed(seed)

    # Every constructor argument is stored under its own name and in the config.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    for name in init_kwargs:
        assert hasattr(layer, name), f"{layer_cls.__name__} does not store {name!r}"
        assert name in config, f"{layer_cls.__name__}.get_config() lacks {name!r}"
    json.dumps(config)  # serializable
    revived = layer_cls.from_config(config)
    assert revived.get_config() == config
    assert keras.layers.deserialize(keras.layers.serialize(layer)).get_config() == config

    # Eager call.
    output = layer(**inputs, **call_kwargs)
    assert tuple(output.shape) == tuple(expected_output_shape)
    assert keras.backend.standardize_dtype(output.dtype) == layer.compute_dtype

    # Symbolic call and `.keras` round trip with identical outputs.
    model = _functional(layer_cls(**init_kwargs), inputs, call_kwargs)
    assert tuple(model.output.shape[1:]) == tuple(expected_output_shape[1:])
    expected = model.predict(inputs, verbose=0)
    path = tmp_path / f"{layer_cls.__name__}.keras"
    model.save(path)
    reloaded = fmkeras.load_model(path)
    np.testing.assert_allclose(reloaded.predict(inputs, verbose=0), expected, atol=1e-6)

    # Inside fused_elementwise() (the training driver's fit and evaluate) outputs
    # and gradients are Keras's own.
    stock = _outputs_and_gradients(model, inputs)
    with fused_elementwise():
        fused = _outputs_and_gradients(model, inputs)
    for expected_value, fused_value in zip(stock, fused, strict=True):
        if expected_value is None:
            assert fused_value is None
        else:
            np.testing.assert_allclose(fused_value, expected_value, rtol=1e-4, atol=1e-5)

    # One XLA-compiled training step changes the weights.
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=True)
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.fit(inputs, np.ones_like(expected), batch_size=len(expected), epochs=1, verbose=0)
    changed = [
        not np.allclose(a, w.numpy()) for a, w in zip(before, model.trainable_weights, strict=True)
    ]
    assert any(changed), "an XLA train step left every weight unchanged"

    # Mixed precision: float32 variables, low-precision compute and outputs.
    for policy, compute in (("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")):
        mixed = layer_cls(**init_kwargs, dtype=policy)
        output = mixed(**inputs, **call_kwargs)
        assert keras.backend.standardize_dtype(output.dtype) == compute, policy
        for variable in mixed.weights:
            assert variable.dtype == "float32", (
                f"{variable.path} is {variable.dtype} under {policy}"
            )
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(output).astype("float32")))
