"""AdamW with warmup + decay, no weight decay on LayerNorm and bias, the
gradient norm measured for the logs, embedding gradients kept sparse
(optionally updated lazily, row by row), and an optional moving average of
the weights."""

import contextlib
import math

import keras
import tensorflow as tf
from keras import ops

from fmkeras import fused

NO_DECAY_NAMES = ["bias", "gamma", "beta"]  # LayerNorm scale/offset and all biases


@keras.saving.register_keras_serializable(package="fmkeras")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then linear, cosine or no decay to 0 at `total_steps`."""

    def __init__(self, peak, warmup_steps, total_steps, decay="linear"):
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay = decay

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = ops.cast(max(self.warmup_steps, 1), "float32")
        decay_steps = ops.cast(max(self.total_steps - self.warmup_steps, 1), "float32")
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.decay == "linear":
            after = 1.0 - progress
        elif self.decay == "cosine":
            after = 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            after = ops.ones_like(progress)
        scale = ops.where(step < self.warmup_steps, (step + 1.0) / warmup, after)
        return self.peak * scale

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "decay": self.decay,
        }


@keras.saving.register_keras_serializable(package="fmkeras")
class AdamW(keras.optimizers.AdamW):
    """Keras's AdamW that can also measure the global norm of each step's
    gradients (before clipping) into a `keras.metrics.Mean` given to
    `measure_gradient_norm` (the training logger reads and resets it). Its
    saved state is AdamW's: the metric is kept out of the optimizer's tracked
    variables, so backups of runs made before stay loadable. Under
    multi-device strategies the norm is each replica's, averaged.

    An embedding's gradient (`tf.IndexedSlices`: the rows a batch looked up)
    stays sparse through the norm and global-norm clipping, which Keras would
    make a dense `(vocabulary, dim)` tensor each; its repeated rows are summed
    first, so the norm is the gradient's (Keras and `tf.linalg.global_norm`
    square a repeated row's pieces one by one, which misstates it). With `lazy_embeddings=True`
    AdamW then updates only those rows, their moments and their weight decay
    (TF Addons' `LazyAdam`); the other rows wait unchanged until a batch uses
    them. Otherwise the gradient is made dense for the update, as in Keras.

    With `use_ema` it keeps a moving average of the weights (Keras's, with
    Model Garden's dynamic decay) that it leaves to the caller to use:
    `averaged_weights()` for a while, `use_averaged_weights()` for good.
    """

    def __init__(self, *args, lazy_embeddings=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_embeddings = lazy_embeddings

    def get_config(self):
        config = super().get_config()
        if self.lazy_embeddings:  # else a stock AdamW config, loadable without fmkeras
            config["lazy_embeddings"] = True
        return config

    def measure_gradient_norm(self, metric):
        # object.__setattr__: Keras's attribute tracking would add the metric's
        # variables to the optimizer's (and so to every backup).
        object.__setattr__(self, "_gradient_norm", metric)

    def pull_towards(self, variables, mu):
        """FedProx's proximal term: every later step adds `mu * (w - w_anchor)`
        (the gradient of `mu/2 * |w - w_anchor|^2`) to the gradient of each of
        `variables`, anchored at their values now; `mu=0` turns it off. Call
        it once before the first step (the train function is traced with the
        term in it), then at will."""
        proximal = self.__dict__.get("_proximal")
        if proximal is None:  # kept out of the tracked (saved) variables, as the metric is
            proximal = ({v.path: keras.Variable(v, trainable=False, name="anchor")
                         for v in variables}, keras.Variable(0.0, trainable=False, name="mu"))
            object.__setattr__(self, "_proximal", proximal)
        anchors, weight = proximal
        for variable in variables:
            anchors[variable.path].assign(variable)
        weight.assign(mu)

    def scale_learning_rates(self, factors):
        """Per-variable learning rates: each variable whose path is in `factors`
        (path -> float) takes that multiple of the schedule's learning rate, for
        its Adam step and its weight decay (which AdamW scales by the rate).
        Call it before the first step (the train function is traced with the
        factors in it)."""
        object.__setattr__(self, "_rate_factors", dict(factors))  # kept out of the saved state

    def _variable_rate(self, variable, learning_rate):
        """The schedule's `learning_rate` for `variable`: cast, and scaled by its factor."""
        learning_rate = ops.cast(learning_rate, variable.dtype)
        factors = self.__dict__.get("_rate_factors")
        if not factors:
            return learning_rate
        # `variable` may be the backend's variable here: its Keras variable has the path.
        path = self._trainable_variables[self._get_variable_index(variable)].path
        return learning_rate * factors.get(path, 1.0)

    def mask_weights(self, masks):
        """Gradual magnitude pruning (`fmkeras.compress.sparsity`): after every
        update, each variable whose path is in `masks` (path -> 0/1
        `keras.Variable` of its shape) is multiplied by its mask, so pruned
        weights stay zero. Call it before the first step (the train function
        is traced with the masks in it); assign the masks at will."""
        object.__setattr__(self, "_masks", masks)  # kept out of the saved state

    def update_step(self, gradient, variable, learning_rate):
        """Keras's AdamW step, with each variable's weight decay done here
        rather than in Keras's separate pass over all variables (the same
        arithmetic: Adam's step does not read the variable). Inside
        `fused.fused_elementwise()` (the training driver's `fit`) decay,
        moments and variable are one fused function. A sparse gradient is
        made dense first, as Keras's Adam does (`gradient - m`), so every
        row's moments decay, unless `lazy_embeddings` is set. AMSGrad keeps
        Keras's update."""
        if isinstance(gradient, tf.IndexedSlices):
            if self.lazy_embeddings and not self.amsgrad:
                return self._lazy_update_step(gradient, variable, learning_rate)
            gradient = tf.convert_to_tensor(gradient)
        learning_rate = self._variable_rate(variable, learning_rate)
        decay = self._decay_rate(variable, learning_rate)
        if self.amsgrad or not fused.enabled():
            self.assign_sub(variable, variable * decay)
            return super().update_step(gradient, variable, learning_rate)
        m, v, alpha = self._moments_and_step_size(variable, learning_rate)
        values = [tf.convert_to_tensor(x) for x in (variable, m.value, v.value, gradient)]
        new_m, new_v, new_variable = fused.adam_moments_and_variable(
            *values, alpha, decay, self.beta_1, self.beta_2, self.epsilon
        )
        self.assign(m, new_m)
        self.assign(v, new_v)
        self.assign(variable, new_variable)

    def _decay_rate(self, variable, learning_rate):
        """AdamW's `learning_rate * weight_decay`, 0 for excluded variables."""
        if self.weight_decay is None or not self._use_weight_decay(variable):
            return ops.zeros((), variable.dtype)
        return learning_rate * ops.cast(self.weight_decay, variable.dtype)

    def _moments_and_step_size(self, variable, learning_rate):
        """The variable's `(m, v)` slots and Adam's bias-corrected step size."""
        index = self._get_variable_index(variable)
        step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, variable.dtype), step)
        beta_2_power = ops.power(ops.cast(self.beta_2, variable.dtype), step)
        alpha = learning_rate * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        return self._momentums[index], self._velocities[index], alpha

    def _lazy_update_step(self, gradient, variable, learning_rate):
        """AdamW on the rows of a sparse gradient only: the dense step's
        arithmetic on `(rows, dim)` slices gathered from the variable and its
        moments and scattered back (not XLA: the row count changes every step,
        which would recompile each time)."""
        gradient = deduplicated(gradient)  # replicas' slices arrive concatenated
        rows = gradient.indices
        learning_rate = self._variable_rate(variable, learning_rate)
        m, v, alpha = self._moments_and_step_size(variable, learning_rate)
        decay = self._decay_rate(variable, learning_rate)
        old = [tf.gather(x, rows) for x in (variable, m.value, v.value)]  # (rows, dim) each
        betas_and_epsilon = (self.beta_1, self.beta_2, self.epsilon)
        new_m, new_v, new_variable = fused.adam_moments_and_variable(
            *old, gradient.values, alpha, decay, *betas_and_epsilon, jit_compile=False
        )
        self.assign(m, tf.IndexedSlices(new_m, rows))
        self.assign(v, tf.IndexedSlices(new_v, rows))
        self.assign(variable, tf.IndexedSlices(new_variable, rows))

    def _apply_weight_decay(self, variables):
        """Nothing: `update_step` decays each variable (a lazy one row by row)."""

    def _clip_gradients(self, grads):
        """Keras's clipping, but global-norm clipping scales a sparse
        gradient's values instead of making it dense."""
        if self.clipnorm or not self.global_clipnorm:
            return super()._clip_gradients(grads)
        norm = global_norm(grads)
        scale = self.global_clipnorm * ops.minimum(1.0 / norm, 1.0 / self.global_clipnorm)
        scale += norm - norm  # NaN when the norm is not finite, as in Keras
        return [scaled(g, scale) for g in grads]

    def apply(self, grads, trainable_variables=None):
        grads = [deduplicated(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        metric = self.__dict__.get("_gradient_norm")
        if metric is not None:
            metric.update_state(global_norm(grads))
        proximal = self.__dict__.get("_proximal")
        if proximal is not None:
            anchors, mu = proximal
            variables = trainable_variables or self._trainable_variables
            grads = [g if g is None or v.path not in anchors
                     else g + ops.cast(mu * (v - anchors[v.path]), g.dtype)
                     for g, v in zip(grads, variables, strict=True)]  # fmt: skip
        result = super().apply(grads, trainable_variables)
        masks = self.__dict__.get("_masks")
        if masks:
            for index, variable in enumerate(self._trainable_variables):
                if variable.path in masks:
                    mask = masks[variable.path]
                    variable.assign(variable * ops.cast(mask, variable.dtype))
                    if self.use_ema:  # the average keeps the pruned zeros too
                        average = self._model_variables_moving_average[index]
                        average.assign(average * ops.cast(mask, average.dtype))
        return result

    def _update_model_variables_moving_average(self, trainable_variables):
        """Keras's moving average (`use_ema`) with Model Garden's dynamic decay
        (`tf.train.ExponentialMovingAverage` with `num_updates`): at step t
        the decay is `min(ema_momentum, (1 + t) / (10 + t))`, so early averages
        are not held back by the initial weights; the first step's weights
        start it."""
        step = ops.cast(self.iterations, "float32")
        decay = ops.where(step > 0, ops.minimum(self.ema_momentum, (1.0 + step) / (10.0 + step)),
                          0.0)  # fmt: skip
        for variable, average in zip(trainable_variables, self._model_variables_moving_average,
                                     strict=True):  # fmt: skip
            rate = ops.cast(decay, average.dtype)
            average.assign(rate * average + (1.0 - rate) * ops.cast(variable, average.dtype))

    def finalize_variable_values(self, var_list):
        """Nothing: Keras would copy the moving averages (`use_ema`) into the
        model at the end of every `fit`, and the driver fits once per phase
        between backups. `averaged_weights` and `use_averaged_weights` are
        where the averages enter the model."""

    @contextlib.contextmanager
    def averaged_weights(self):
        """With `use_ema`: the trained variables hold their moving averages
        while the block runs (validation, `train.keep_best`), and their own
        values again after it; the averages are untouched. A model saved in
        the block (keep_best's) holds the averages as its weights and as its
        optimizer's averages, as after `use_averaged_weights`."""
        values = [ops.convert_to_numpy(variable) for variable in self._trainable_variables]
        self.use_averaged_weights()
        try:
            yield
        finally:
            for variable, value in zip(self._trainable_variables, values, strict=True):
                variable.assign(value)

    def use_averaged_weights(self):
        """With `use_ema`: the trained variables take their moving averages for good."""
        self._overwrite_model_variables_with_average_value(self._trainable_variables)


def deduplicated(gradient):
    """A sparse gradient with each row once (repeated rows' values summed)."""
    rows, position = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(rows)[0])
    return tf.IndexedSlices(values, rows, gradient.dense_shape)


def global_norm(grads):
    """The float32 norm of all gradients together; sparse ones (deduplicated)
    through their values, without a dense copy."""
    values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]
    squares = [ops.sum(ops.square(ops.cast(x, "float32"))) for x in values]
    return ops.sqrt(ops.sum(ops.stack(squares)))


def scaled(gradient, scale):
    """`gradient * scale`; a sparse gradient through its values (stays sparse)."""
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values * ops.cast(scale, gradient.values.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient * ops.cast(scale, gradient.dtype)


def create_optimizer(train_config, rate_factors=None):
    """AdamW from a `TrainConfig`: schedule, weight-decay exclusions, clipping,
    the weights' moving average (`train.ema`, Keras's `use_ema`);
    `rate_factors` (variable path -> multiple of the scheduled learning rate,
    e.g. `Task.learning_rate_factors`) for per-variable rates."""
    warmup = train_config.warmup_steps
    if warmup is None:
        warmup = train_config.steps // 10
    optimizer = AdamW(
        learning_rate=WarmupDecay(
            train_config.learning_rate, warmup, train_config.steps, train_config.decay
        ),
        weight_decay=train_config.weight_decay,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-6,
        global_clipnorm=train_config.clip_norm or None,
        lazy_embeddings=train_config.lazy_embeddings,
        use_ema=train_config.ema > 0,
        ema_momentum=train_config.ema or 0.99,
    )
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY_NAMES)
    if rate_factors:
        optimizer.scale_learning_rates(rate_factors)
    return optimizer
