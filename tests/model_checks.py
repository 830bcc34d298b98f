"""One check for every model: config round trip, `.keras` save/load with
identical outputs, weight counts, a bfloat16 copy (as `export --precision
bfloat16` makes it), and a training step (the model-level twin of
`layer_checks.run_layer_checks`)."""

import json

import keras
import numpy as np

import fmkeras
from fmkeras.training.precision import in_dtype_policy


def _outputs(model, inputs):
    return keras.tree.map_structure(np.asarray, model.predict(inputs, verbose=0))


def run_model_checks(model, inputs, tmp_path, expected_parameters=None):
    """Asserts the model contract.

    Args:
        model: a built fmkeras model.
        inputs: dict of input name -> numpy array (batch first).
        tmp_path: a directory for the `.keras` file.
        expected_parameters: the model's parameter count, if known.
    """
    config = model.get_config()
    json.dumps(keras.saving.serialize_keras_object(model))  # serializable
    revived = type(model).from_config(config)
    assert revived.get_config() == config
    assert revived.count_params() == model.count_params()

    paths = [variable.path for variable in model.weights]
    assert len(paths) == len(set(paths)), "two weights share a path"
    if expected_parameters is not None:
        assert model.count_params() == expected_parameters

    expected = _outputs(model, inputs)
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    reloaded = fmkeras.load_model(path)
    assert type(reloaded) is type(model) and reloaded.get_config() == config
    assert sorted(v.path for v in reloaded.weights) == sorted(paths)
    assert reloaded.count_params() == model.count_params()
    keras.tree.map_structure(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), _outputs(reloaded, inputs),
        expected,
    )

    # A bfloat16 copy: 16-bit weights (but output layers built in float32), the
    # same answers within bfloat16's precision.
    half = in_dtype_policy(reloaded, "bfloat16")
    assert half.count_params() == model.count_params()
    sixteen_bit = sum(int(np.prod(w.shape)) for w in half.weights if w.dtype == "bfloat16")
    assert sixteen_bit >= 0.9 * model.count_params()
    keras.tree.map_structure(
        lambda a, b: np.testing.assert_allclose(np.asarray(a, "float32"), b, rtol=0.05,
                                                atol=0.05 * max(1.0, np.abs(b).max())),
        keras.tree.map_structure(np.asarray, half(inputs, training=False)), expected,
    )  # fmt: skip

    # One training step moves every trainable weight that the outputs depend on.
    targets = keras.tree.map_structure(np.zeros_like, expected)
    reloaded.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [np.array(w) for w in reloaded.trainable_weights]
    reloaded.fit(inputs, targets, epochs=1, verbose=0)
    changed = sum(not np.allclose(a, w) for a, w in zip(before, reloaded.trainable_weights,
                                                        strict=True))  # fmt: skip
    assert changed > 0, "a training step left every weight unchanged"
