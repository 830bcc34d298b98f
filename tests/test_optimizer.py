import keras
import numpy as np
import pytest
import tensorflow as tf

from fmkeras import fused
from fmkeras.config import TrainConfig
from fmkeras.training.optimizer import AdamW, WarmupDecay, create_optimizer
from fmkeras.training.trainer import compile_model, fit_phases


def rate(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_warmup_then_linear_or_cosine_decay():
    linear = WarmupDecay(1e-3, warmup_steps=10, total_steps=110, decay="linear")
    assert rate(linear, 0) == pytest.approx(1e-4)
    assert rate(linear, 9) == pytest.approx(1e-3)
    assert rate(linear, 60) == pytest.approx(5e-4)
    assert rate(linear, 110) == pytest.approx(0.0, abs=1e-12)
    cosine = WarmupDecay(1e-3, 10, 110, decay="cosine")
    assert rate(cosine, 60) == pytest.approx(5e-4)
    assert rate(cosine, 35) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi / 4)))
    assert rate(WarmupDecay(1e-3, 10, 110, decay="constant"), 100) == pytest.approx(1e-3)
    assert WarmupDecay.from_config(linear.get_config()).get_config() == linear.get_config()


def test_weight_decay_skips_layer_norm_and_biases():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4), keras.layers.LayerNormalization()]
    )
    model.layers[1].gamma.assign(2.0 * np.ones(4))
    optimizer = create_optimizer(
        TrainConfig(steps=10, learning_rate=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    )
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    # Zero gradients: Adam's step is 0, so only decoupled weight decay moves weights.
    zeros = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    optimizer.apply_gradients(zip(zeros, model.trainable_variables, strict=True))
    for variable in model.trainable_variables:
        moved = not np.allclose(variable.numpy(), before[variable.path])
        assert moved == variable.path.endswith("kernel"), variable.path


def test_fit_phases_back_up_every_interval_and_at_the_end():
    assert fit_phases(0, 1600, 200) == [(0, 200, 8)]
    # 2003 steps with backups every 500: four epochs of 500, then one of 3 (never every step).
    assert fit_phases(0, 2003, 500) == [(0, 500, 4), (2000, 3, 1)]
    assert fit_phases(0, 30, 200) == [(0, 30, 1)]
    assert fit_phases(1000, 2003, 500) == [(1000, 500, 2), (2000, 3, 1)]
    # A backup between multiples (the final one of a shorter run, or an older cadence)
    # first catches up to the next multiple.
    assert fit_phases(7, 30, 5) == [(7, 3, 1), (10, 5, 4)]
    assert fit_phases(2003, 2003, 500) == []


def test_the_gradient_norm_is_measured_before_clipping_and_not_saved(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    optimizer = create_optimizer(TrainConfig(steps=10, clip_norm=1.0))
    norm = keras.metrics.Mean(name="gradient_norm")
    optimizer.measure_gradient_norm(norm)
    for gradient in ([[3.0], [4.0]], [[6.0], [8.0]]):  # global norms 5 and 10
        optimizer.apply_gradients([(np.array(gradient, "float32"), model.weights[0])])
    assert float(norm.result()) == pytest.approx(7.5)  # unclipped, averaged
    # The saved state is AdamW's: a backup of it loads into a stock Keras AdamW.
    stock = keras.optimizers.AdamW.from_config(optimizer.get_config())
    stock.build(model.trainable_variables)
    names = [[v.path.split("/", 1)[1] for v in o.variables] for o in (optimizer, stock)]
    assert names[0] == names[1] and len(names[0]) == 3  # iteration, momentum, velocity
    model.compile(optimizer=optimizer, loss="mse")
    model.save(tmp_path / "m.keras")
    assert isinstance(keras.saving.load_model(tmp_path / "m.keras").optimizer, AdamW)


@pytest.mark.parametrize("build_first", [True, False])
def test_compile_model_builds_the_optimizer_so_the_step_is_traced_once(build_first):
    # Keras alone (build_first=False) creates the optimizer's moments inside the
    # first traced step, which tf.function then traces a second time; when that
    # case traces once, Keras builds the optimizer itself: drop the build.
    train = TrainConfig(steps=4, jit_compile="false")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        if build_first:
            compile_model(model, strategy, train, lambda _: None, optimizer=create_optimizer(train),
                          loss="mse")  # fmt: skip
            assert model.optimizer.built
        else:
            model.compile(optimizer=create_optimizer(train), loss="mse")
    traces = []  # Python runs the step once per trace
    keras_step = model.train_step
    model.train_step = lambda data: traces.append(1) or keras_step(data)
    x = np.ones((8, 3), "float32")
    model.fit(x, x[:, :2], batch_size=4, epochs=2, verbose=0)
    assert len(traces) == (1 if build_first else 2)


def sparse_gradient():
    """Rows 1 and 3 of a (6, 2) embedding, row 3 twice (as two lookups give it)."""
    values = tf.constant([[0.3, -0.4], [1.0, 2.0], [-2.0, 2.0]])
    return tf.IndexedSlices(values, tf.constant([3, 1, 3]), tf.constant([6, 2]))


@pytest.mark.parametrize("fused_updates", [False, True])
def test_lazy_embeddings_update_only_the_rows_a_batch_used(fused_updates):
    """`train.lazy_embeddings`: Adam and weight decay move the looked-up rows
    exactly as a dense step would (repeated rows summed); the other rows and
    their moments stay as they were. Without it every row decays."""
    start = np.arange(12, dtype="float32").reshape(6, 2) / 10
    steps = {}
    for lazy in (False, True):
        variable = keras.Variable(start, name="embeddings")
        train = TrainConfig(steps=10, learning_rate=0.1, warmup_steps=0, weight_decay=0.5,
                            clip_norm=0.0, lazy_embeddings=lazy)  # fmt: skip
        optimizer = create_optimizer(train)
        with fused.fused_elementwise(enabled=fused_updates):
            optimizer.apply_gradients([(sparse_gradient(), variable)])
        steps[lazy] = variable.numpy(), optimizer.variables[1].numpy()  # weights, momentum
    (dense, dense_m), (lazy, lazy_m) = steps[False], steps[True]
    used = [1, 3]
    np.testing.assert_allclose(lazy[used], dense[used], rtol=1e-6)
    np.testing.assert_allclose(lazy_m[used], dense_m[used], rtol=1e-6)
    np.testing.assert_allclose(lazy_m[used], 0.1 * np.array([[1.0, 2.0], [-1.7, 1.6]]), rtol=1e-6)
    unused = [0, 2, 4, 5]
    np.testing.assert_array_equal(lazy[unused], start[unused])
    assert np.all(np.abs(dense[unused]) < np.abs(start[unused]) + 1e-9)  # decayed
    assert not np.allclose(dense[unused][1:], start[unused][1:])


def test_sparse_gradients_are_measured_and_clipped_without_densifying():
    """The logged norm and global-norm clipping of an embedding's gradient
    equal the dense gradient's (repeated rows summed first)."""
    dense_gradient = tf.convert_to_tensor(sparse_gradient()).numpy()
    extra = np.array([[3.0]], "float32")
    norm = np.sqrt(np.sum(np.square(dense_gradient)) + 9.0)
    for gradient in (sparse_gradient(), dense_gradient):
        optimizer = create_optimizer(TrainConfig(steps=10, clip_norm=1.0))
        metric = keras.metrics.Mean()
        optimizer.measure_gradient_norm(metric)
        variables = [keras.Variable(np.zeros(shape, "float32")) for shape in ((6, 2), (1, 1))]
        clipped, _ = optimizer._clip_gradients([gradient, extra])
        sparse = isinstance(gradient, tf.IndexedSlices)
        assert isinstance(clipped, tf.IndexedSlices) == sparse  # a sparse gradient stays sparse
        optimizer.apply([gradient, extra], variables)
        assert float(metric.result()) == pytest.approx(norm, rel=1e-6)
        momentum = optimizer.variables[1].numpy()  # 0.1 * the clipped gradient
        np.testing.assert_allclose(momentum, 0.1 * dense_gradient / norm, rtol=1e-5)


@pytest.mark.parametrize("fused_updates, lazy", [(False, False), (True, False), (True, True)])
def test_a_learning_rate_factor_is_the_step_of_a_scaled_learning_rate(fused_updates, lazy):
    """`create_optimizer(train, {path: f})` (`finetune.layer_decay`): that
    variable moves as with `f` x the learning rate, weight decay included;
    the others as without factors. Dense, fused and lazy (sparse) steps."""

    def step(learning_rate, factors):
        scaled = keras.Variable(np.arange(12, dtype="float32").reshape(6, 2) / 10, name="a")
        other = keras.Variable(np.ones((6, 2), "float32"), name="b")
        train = TrainConfig(steps=10, learning_rate=learning_rate, warmup_steps=0,
                            weight_decay=0.5, clip_norm=0.0, lazy_embeddings=lazy)  # fmt: skip
        optimizer = create_optimizer(train, factors and {scaled.path: factors})
        gradient = sparse_gradient() if lazy else tf.convert_to_tensor(sparse_gradient())
        with fused.fused_elementwise(enabled=fused_updates):
            optimizer.apply_gradients([(gradient, scaled), (gradient, other)])
        return scaled.numpy(), other.numpy()

    with_factor, other = step(0.1, 0.25)
    assert not np.allclose(with_factor, step(0.1, None)[0])
    np.testing.assert_allclose(with_factor, step(0.025, None)[0], rtol=1e-6)
    np.testing.assert_allclose(other, step(0.1, None)[1], rtol=1e-6)


def test_ema_averages_the_weights_and_fit_leaves_them_to_the_driver():
    """`train.ema`: the first step's weights, then `d * average + (1 - d) *
    weight` with Model Garden's dynamic decay `d = min(ema, (1 + t) / (10 + t))`,
    kept out of the model when `fit` ends (the driver fits once per phase);
    `averaged_weights` swaps it in and back."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    train = TrainConfig(steps=30, learning_rate=0.1, warmup_steps=0, decay="constant", ema=0.5)
    model.compile(optimizer=create_optimizer(train), loss="mse")
    x, y = np.array([[1.0, 2.0]], "float32"), np.array([[1.0]], "float32")
    average = None
    for step in range(12):  # the decay is dynamic for t < 8, then 0.5
        model.fit(x, y, verbose=0)  # one step per fit, as between backups
        weight = model.weights[0].numpy()
        decay = min(0.5, (1 + step) / (10 + step))
        average = weight if average is None else decay * average + (1 - decay) * weight
    assert not np.allclose(weight, average)  # fit did not copy the average in
    with model.optimizer.averaged_weights():
        np.testing.assert_allclose(model.weights[0].numpy(), average, rtol=1e-6)
    np.testing.assert_array_equal(model.weights[0].numpy(), weight)
    model.optimizer.use_averaged_weights()
    np.testing.assert_allclose(model.weights[0].numpy(), average, rtol=1e-6)


def test_masked_weights_stay_zero_in_their_average():
    variable = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    mask = keras.Variable(np.array([[1.0, 0.0], [0.0, 1.0]], "float32"), trainable=False)
    optimizer = create_optimizer(TrainConfig(steps=10, ema=0.9))
    optimizer.mask_weights({variable.path: mask})
    for _ in range(2):
        optimizer.apply_gradients([(np.ones((2, 2), "float32"), variable)])
    with optimizer.averaged_weights():
        np.testing.assert_array_equal(variable.numpy() == 0, mask.numpy() == 0)
