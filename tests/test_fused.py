"""`fmkeras.fused`: inside `fused_elementwise()` GELU, attention softmax, layer
norm and AdamW compute what Keras computes (float32 to rounding, bfloat16
within its precision), dropout draws an equivalent mask, all through XLA
clusters that exports never contain."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fmkeras import fused
from fmkeras.layers import Dropout, LayerNormalization
from fmkeras.training.losses import SparseCategoricalCrossentropy
from fmkeras.training.optimizer import AdamW

RNG = np.random.default_rng(0)


def value_and_gradient(function, x, dtype):
    """`function(x)` and the gradient of a fixed projection of it, traced as a graph."""
    x = tf.constant(x, dtype)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = function(x)
            probe = tf.sin(tf.reshape(tf.range(tf.size(y), dtype="float32"), tf.shape(y)))
            loss = tf.reduce_sum(tf.cast(y, "float32") * probe)
        return y, tape.gradient(loss, x)

    return [np.asarray(tf.cast(t, "float32")) for t in step()]


MASK = RNG.random((2, 1, 1, 7)) > 0.3  # (batch, 1, 1, source): padding


def masked_softmax(x):
    return fused.masked_softmax(x, tf.constant(MASK), x.dtype)


LABELS = RNG.integers(0, 50, (4, 6))


def sparse_cross_entropy(x):
    return fused.sparse_cross_entropy(tf.constant(LABELS), x)


FUNCTIONS = {
    "gelu": (fused.gelu, (4, 8, 32)),
    "masked_softmax": (masked_softmax, (2, 3, 5, 7)),
    "sparse_cross_entropy": (sparse_cross_entropy, (4, 6, 50)),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_fused_functions_match_keras_in_float32_and_bfloat16(name):
    function, shape = FUNCTIONS[name]
    x = 3 * RNG.normal(size=shape).astype("float32")
    stock = value_and_gradient(function, x, "float32")
    with fused.fused_elementwise():
        fused32 = value_and_gradient(function, x, "float32")
        fused16 = value_and_gradient(function, x, "bfloat16")
    for expected, got32, got16 in zip(stock, fused32, fused16, strict=True):
        np.testing.assert_allclose(got32, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got16, expected, rtol=0.03, atol=0.03)


def xla_functions(function, *args):
    """Names of the XLA-compiled functions in the graph of `function(*args)`."""
    graph = tf.function(function).get_concrete_function(*args).graph.as_graph_def()
    return [f.signature.name for f in graph.library.function
            if "_XlaMustCompile" in f.attr and f.attr["_XlaMustCompile"].b]  # fmt: skip


def test_the_fused_path_is_xla_inside_the_context_only_and_nests_in_xla():
    x = tf.TensorSpec((2, 4, 8), "bfloat16")
    assert xla_functions(fused.gelu, x) == []  # exports and inference: ordinary ops
    with fused.fused_elementwise():
        assert xla_functions(fused.gelu, x)
        inside_xla = tf.function(fused.gelu, jit_compile=True)  # train.jit_compile: true
        value = inside_xla(tf.ones((2, 4, 8), "bfloat16"))
    assert not fused.enabled()
    np.testing.assert_allclose(np.asarray(tf.cast(value, "float32")), 0.8413, atol=1e-2)
    with fused.fused_elementwise(enabled=False):
        assert not fused.enabled()


def test_layer_normalization_keeps_keras_for_other_axes_and_no_offset():
    x = RNG.normal(size=(2, 3, 4)).astype("float32")
    for kwargs in (dict(axis=1), dict(center=False)):
        layer = LayerNormalization(**kwargs)
        expected = keras.layers.LayerNormalization(**kwargs)
        layer.build(x.shape)
        expected.build(x.shape)
        with fused.fused_elementwise():
            np.testing.assert_allclose(layer(x), expected(x), atol=1e-6)


def adamw_weights_after_fit(fused_updates, amsgrad=False, optimizer_class=AdamW):
    """Weights after 4 steps of an AdamW (decay with exclusions, clipping) on a
    model with a sparse (embedding) and dense gradients, or with AMSGrad."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5,), dtype="int32"), keras.layers.Embedding(50, 8),
        keras.layers.Dense(8, activation="gelu"), LayerNormalization(), keras.layers.Dense(3),
    ])  # fmt: skip
    optimizer = optimizer_class(learning_rate=0.05, weight_decay=0.1, global_clipnorm=1.0,
                                amsgrad=amsgrad)  # fmt: skip
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(optimizer=optimizer, loss="mse")
    # No id twice in a batch: Keras's clipping squares a repeated row's values
    # one by one, fmkeras's the row's summed gradient (the gradient's true norm).
    rng = np.random.default_rng(1)
    x = np.stack([rng.permutation(50)[:20] for _ in range(4)]).reshape(16, 5).astype("int32")
    y = np.ones((16, 5, 3), "float32")
    with fused.fused_elementwise(enabled=fused_updates):
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    return [(v.name, v.numpy()) for v in model.weights]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_adamw_updates_like_keras(amsgrad):
    """fmkeras's AdamW (sparse clipping, decay per variable) inside and
    outside the fused context follows Keras's own AdamW."""
    stock = adamw_weights_after_fit(False, amsgrad, keras.optimizers.AdamW)
    for fused_updates in (False, True):
        weights = adamw_weights_after_fit(fused_updates, amsgrad)
        for (name, expected), (_, got) in zip(stock, weights, strict=True):
            # atol: the norm sums in another order, and Adam's step divides by
            # sqrt(v) of near-zero gradients (each step moves weights by ~0.05)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=5e-5, err_msg=name)


@pytest.mark.parametrize("label_shape", [(4, 6), (4, 6, 1)])
def test_the_loss_equals_keras_with_sample_weights(label_shape, monkeypatch):
    logits = tf.constant(RNG.normal(size=(4, 6, 50)), "bfloat16")
    labels = tf.constant(LABELS.reshape(label_shape))
    weights = tf.constant(RNG.random((4, 6)) > 0.3, "float32")
    kwargs = dict(from_logits=True, reduction="mean_with_sample_weight")
    expected = keras.losses.SparseCategoricalCrossentropy(**kwargs)(labels, logits, weights)
    loss = SparseCategoricalCrossentropy(**kwargs)
    read = []  # the dtype the fused loss reads: the logits', not Keras's float32 copy
    fused_loss = fused.sparse_cross_entropy
    monkeypatch.setattr(fused, "sparse_cross_entropy",
                        lambda y, x: read.append(x.dtype) or fused_loss(y, x))  # fmt: skip
    with fused.fused_elementwise():
        got = tf.function(loss)(labels, logits, weights)
    assert read == [tf.bfloat16]
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    assert loss.fusable and not SparseCategoricalCrossentropy(ignore_class=0).fusable
    revived = SparseCategoricalCrossentropy.from_config(loss.get_config())
    assert revived.get_config() == loss.get_config()


def dropout_value_and_gradient(seed_generator, x, rate=0.25):
    return value_and_gradient(lambda t: fused.dropout(t, rate, seed_generator), x, "float32")


def test_fused_dropout_keeps_one_mask_per_seed_forward_and_backward():
    """Inside the context: a Bernoulli(1 - rate) mask, scaled by 1/(1 - rate),
    the same in the gradient as in the output, fresh for every call, and the
    same again from the same seed state (what exact resume needs)."""
    rate, x = 0.25, 1 + RNG.random((64, 4, 32, 32)).astype("float32")  # no zeros
    with fused.fused_elementwise():
        first = dropout_value_and_gradient(keras.random.SeedGenerator(7), x, rate)
        generator = keras.random.SeedGenerator(7)
        again = dropout_value_and_gradient(generator, x, rate)
        second = dropout_value_and_gradient(generator, x, rate)
    output, gradient = first
    kept = output != 0
    n = kept.size
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(output[kept], x[kept] / (1 - rate), rtol=1e-6)
    probe = np.sin(np.arange(n, dtype="float32")).reshape(x.shape)  # value_and_gradient's
    np.testing.assert_allclose(gradient, probe * kept / (1 - rate), atol=1e-6)  # same mask
    np.testing.assert_array_equal(again[0], output)
    other = second[0] != 0
    assert (other != kept).any()
    assert abs(np.corrcoef(kept.ravel(), other.ravel())[0, 1]) < 5 / np.sqrt(n)
    assert abs(np.corrcoef(kept.ravel()[:-1], kept.ravel()[1:])[0, 1]) < 5 / np.sqrt(n)


def test_dropout_layer_is_keras_outside_the_context_and_xla_inside():
    x = tf.constant(RNG.normal(size=(4, 8, 16)), "float32")
    layer, stock = Dropout(0.3, seed=3), keras.layers.Dropout(0.3, seed=3)
    np.testing.assert_array_equal(layer(x, training=True), stock(x, training=True))
    np.testing.assert_array_equal(layer(x, training=False), x)
    spec = tf.TensorSpec((None, 8, 16), "bfloat16")
    assert xla_functions(lambda t: layer(t, training=True), spec) == []
    with fused.fused_elementwise():
        assert xla_functions(lambda t: layer(t, training=True), spec)
        assert xla_functions(lambda t: layer(t, training=False), spec) == []
        np.testing.assert_array_equal(layer(x, training=False), x)
        inside_xla = tf.function(lambda t: layer(t, training=True), jit_compile=True)
        dropped = np.asarray(inside_xla(tf.ones((4, 8, 16))))  # train.jit_compile: true
    assert set(np.unique(dropped)) == {0.0, np.float32(1 / 0.7)}
