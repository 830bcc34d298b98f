"""Element-wise chains as small XLA clusters inside graph-mode training steps.

On a CPU with XLA off (what `train.jit_compile: auto` picks there, because
only graph mode reaches oneDNN's AMX / AVX512-BF16 matmul kernels), TensorFlow
runs element-wise work op by op: the exact GELU `0.5 * x * erfc(-x / sqrt 2)`
and its gradient are about ten kernels, each reading and writing the whole
`(batch, seq, intermediate)` tensor, and in bfloat16 each goes through Eigen's
emulated bf16 arithmetic. On the 2-core Sapphire Rapids CPU that made GELU
17 % of a BERT-Small bfloat16 MLM step's op time, more than half as much as
all its matmuls.

Inside `fused_elementwise()`, on TensorFlow:

- `gelu`: forward and backward one XLA cluster each (the backward recomputes
  the Gaussian CDF instead of storing it), in float32, cast back;
- `masked_softmax`: the attention's mask + float32 softmax, and its gradient;
- `dropout`: the mask drawn from a counter-based hash of the layer's seed
  (no stored mask: the backward cluster draws it again), forward and backward
  one cluster each, 3-4x faster than TensorFlow's Philox-based dropout here;
- `sparse_cross_entropy`: a language model's loss over `(tokens, vocabulary)`
  logits and its gradient, without a float32 copy of the logits;
- `adam_moments_and_variable`: AdamW's decay, moments and step per variable;
- `layer_norm`: a hand-written gradient (`tf.custom_gradient`), not XLA.

Everything else in the step, the matmuls included, stays in graph mode.
Outside the context (inference, exports, other backends) each is Keras's own
op, so saved models hold only ordinary ops. The training driver enters the
context around `fit` and `evaluate` (`fmkeras.training.trainer`); a user of
fmkeras's layers, loss and optimizer with their own `fit` can do the same:

```python
with fmkeras.fused.fused_elementwise():
    model.fit(dataset, epochs=1)
```
"""

import contextlib
import functools
import math

import keras

_ENABLED = False
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@contextlib.contextmanager
def fused_elementwise(enabled=True):
    """Layers traced inside use the fused element-wise functions (on TensorFlow)."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled) and keras.backend.backend() == "tensorflow"
    try:
        yield
    finally:
        _ENABLED = previous


def enabled():
    """Whether layers and optimizers traced now use the fused functions."""
    return _ENABLED


def gelu(x):
    """The exact GELU, `x * Phi(x)`."""
    if _ENABLED:
        return _tensorflow_gelu()(x)
    return keras.activations.gelu(x, approximate=False)


@functools.cache
def _tensorflow_gelu():
    import tensorflow as tf

    def normal_cdf(x):
        # XLA's CPU erf is one rational polynomial; its erfc adds an exp and
        # selects: 9.0 against 14.2 ms for this forward + backward on 4,096 x
        # 2,048 bfloat16. Phi(x) for x < -5 (below 3e-7) loses its relative
        # precision this way, not its absolute one, which is all GELU keeps.
        return 0.5 + 0.5 * tf.math.erf(x * _INV_SQRT_2)

    @tf.function(jit_compile=True, autograph=False)
    def forward(x):
        x32 = tf.cast(x, "float32")
        return tf.cast(x32 * normal_cdf(x32), x.dtype)

    @tf.function(jit_compile=True, autograph=False)
    def backward(x, upstream):
        x32 = tf.cast(x, "float32")
        slope = normal_cdf(x32) + x32 * tf.exp(-0.5 * tf.square(x32)) * _INV_SQRT_2PI
        return tf.cast(tf.cast(upstream, "float32") * slope, x.dtype)

    @tf.custom_gradient
    def fused_gelu(x):
        return forward(x), lambda upstream: backward(x, upstream)

    return fused_gelu


def dropout(x, rate, seed_generator):
    """Inverted dropout: each element kept with probability `1 - rate` and
    scaled by `1 / (1 - rate)`, with a fresh seed from `seed_generator` (a
    `keras.random.SeedGenerator`) per call, as `keras.random.dropout`.

    Inside `fused_elementwise()` on TensorFlow the mask is not TensorFlow's
    Philox stream (its CPU kernel made the dropouts 12 % of a BERT-Mini MLM
    step's op time) but a counter-based hash, as JAX's `unsafe_rbg` keys
    trade cryptographic strength for speed in dropout: each element's 32 bits
    are `lowbias32(lowbias32(index ^ key))` (Wellons's integer hash; the key
    hashes the two seed words), compared with `rate * 2**32`. Forward and
    backward are one XLA cluster each and the backward draws the mask again
    from the seed, so no mask is stored: 3-4x faster than TensorFlow's
    dropout, forward and backward, on `(32, 8, 128, 128)` bfloat16 attention
    probabilities. Each seed gives one fixed mask, so runs resume exactly."""
    if _ENABLED:
        return _tensorflow_dropout(float(rate))(x, seed_generator.next())
    return keras.random.dropout(x, rate, seed=seed_generator)


def masked_softmax(logits, mask, dtype):
    """Attention probabilities `softmax(where(mask, logits, -1e9))` over the
    last axis, computed in float32 and cast to `dtype`. `logits`: `(batch,
    heads, target, source)`; `mask`: boolean, broadcastable to it, or None.
    Inside `fused_elementwise()` on TensorFlow the forward pass is one XLA
    cluster and the backward pass another, from the saved probabilities."""
    ops = keras.ops
    if _ENABLED:
        mask = ops.ones((), "bool") if mask is None else mask
        return _tensorflow_masked_softmax(dtype)(logits, mask)
    logits = ops.cast(logits, "float32")
    if mask is not None:
        logits = ops.where(mask, logits, -1e9)
    return ops.cast(ops.softmax(logits, axis=-1), dtype)


def sparse_cross_entropy(labels, logits):
    """`-log softmax(logits)[label]` over the last axis, float32, per row:
    `labels` int `(...)`, `logits` `(..., classes)`. Inside
    `fused_elementwise()` on TensorFlow the forward pass (log-sum-exp and the
    label's logit) is one XLA cluster reading the logits in their own dtype,
    and the backward pass (`softmax - one_hot`, recomputed from the logits and
    the saved log-sum-exp) another, written in the logits' dtype: no float32
    copy of a `(tokens, vocabulary)` tensor in either direction."""
    if _ENABLED:
        return _tensorflow_sparse_cross_entropy()(labels, logits)
    return keras.ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis, `(x - mean) / sqrt(variance + epsilon) *
    gamma + beta`, computed in float32 and cast to `x`'s dtype, with a
    hand-written backward pass (`tf.custom_gradient`): two row reductions and
    a few element-wise kernels instead of the dozen (Tile, SquaredDifference,
    broadcasting gradients) TensorFlow derives from `moments`. Not an XLA
    cluster: XLA's CPU reductions measured slower than TensorFlow's here.
    TensorFlow only (`fmkeras.layers.LayerNormalization` calls it inside
    `fused_elementwise()`)."""
    return _tensorflow_layer_norm(float(epsilon))(x, gamma, beta)


def adam_moments_and_variable(variable, m, v, gradient, alpha, decay, beta_1, beta_2, epsilon,
                              jit_compile=True):  # fmt: skip
    """One AdamW update as new `(m, v, variable)` values: `m` and `v` move
    toward the gradient and its square, and the variable, first decayed by
    `variable * decay` (AdamW's `learning_rate * weight_decay`, or 0), steps by
    `alpha * m / (sqrt(v) + epsilon)` (`alpha`: the bias-corrected learning
    rate): one XLA cluster per variable shape, where Keras's Adam runs about
    ten full-size kernels per variable; `jit_compile=False` runs the same
    arithmetic as plain ops, for shapes that change every step (a lazy
    embedding update's rows). TensorFlow only
    (`fmkeras.training.optimizer.AdamW.update_step` calls it inside
    `fused_elementwise()`)."""
    update = _tensorflow_adam() if jit_compile else _adam_arithmetic
    return update(variable, m, v, gradient, alpha, decay, beta_1, beta_2, epsilon)


def _adam_arithmetic(variable, m, v, gradient, alpha, decay, beta_1, beta_2, epsilon):
    import tensorflow as tf

    gradient = tf.cast(gradient, variable.dtype)
    m = m + (gradient - m) * (1.0 - beta_1)
    v = v + (tf.square(gradient) - v) * (1.0 - beta_2)
    return m, v, variable - variable * decay - m * alpha / (tf.sqrt(v) + epsilon)


@functools.cache
def _tensorflow_adam():
    import tensorflow as tf

    return tf.function(_adam_arithmetic, jit_compile=True, autograph=False)


def _lowbias32(h):
    """Chris Wellons's 32-bit integer hash (`uint32` tensor in, out)."""
    import tensorflow as tf

    def shift_xor(h, bits):
        return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(bits, "uint32")))

    h = shift_xor(h, 16) * tf.constant(0x7FEB352D, "uint32")
    h = shift_xor(h, 15) * tf.constant(0x846CA68B, "uint32")
    return shift_xor(h, 16)


@functools.cache
def _tensorflow_dropout(rate):
    import tensorflow as tf

    threshold = min(round(rate * 2**32), 2**32 - 1)

    @tf.function(jit_compile=True, autograph=False)
    def apply_mask(x, seed):
        seed = tf.cast(seed, "uint32")
        key = _lowbias32(tf.bitwise.bitwise_xor(seed[0], _lowbias32(seed[1])))
        index = tf.bitcast(tf.reshape(tf.range(tf.size(x)), tf.shape(x)), "uint32")
        bits = _lowbias32(_lowbias32(tf.bitwise.bitwise_xor(index, key)))
        keep = bits >= tf.constant(threshold, "uint32")
        return tf.cast(tf.where(keep, tf.cast(x, "float32") / (1.0 - rate), 0.0), x.dtype)

    @tf.custom_gradient
    def fused_dropout(x, seed):
        return apply_mask(x, seed), lambda upstream: (apply_mask(upstream, seed), None)

    return fused_dropout


@functools.cache
def _tensorflow_masked_softmax(dtype):
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False)
    def forward(logits, mask):
        logits = tf.where(mask, tf.cast(logits, "float32"), -1e9)
        return tf.cast(tf.nn.softmax(logits, axis=-1), dtype)

    @tf.function(jit_compile=True, autograph=False)
    def backward(probabilities, upstream, logits_dtype):
        probabilities = tf.cast(probabilities, "float32")
        upstream = tf.cast(upstream, "float32")
        dot = tf.reduce_sum(upstream * probabilities, axis=-1, keepdims=True)
        return tf.cast(probabilities * (upstream - dot), logits_dtype)

    @tf.custom_gradient
    def fused_masked_softmax(logits, mask):
        probabilities = forward(logits, mask)

        def gradient(upstream):
            return backward(probabilities, upstream, logits.dtype), None

        return probabilities, gradient

    return fused_masked_softmax


@functools.cache
def _tensorflow_sparse_cross_entropy():
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False)
    def forward(labels, logits):
        logits = tf.cast(logits, "float32")
        log_sum_exp = tf.reduce_logsumexp(logits, axis=-1)  # (...)
        picked = tf.gather(logits, labels, axis=-1, batch_dims=len(labels.shape))
        return log_sum_exp - picked, log_sum_exp

    @tf.function(jit_compile=True, autograph=False)
    def backward(labels, logits, log_sum_exp, upstream):
        probabilities = tf.exp(tf.cast(logits, "float32") - log_sum_exp[..., None])
        one_hot = tf.one_hot(labels, tf.shape(logits)[-1], dtype="float32")
        return tf.cast((probabilities - one_hot) * upstream[..., None], logits.dtype)

    @tf.custom_gradient
    def fused_sparse_cross_entropy(labels, logits):
        loss, log_sum_exp = forward(labels, logits)

        def gradient(upstream):
            return None, backward(labels, logits, log_sum_exp, tf.cast(upstream, "float32"))

        return loss, gradient

    def sparse_cross_entropy(labels, logits):
        return fused_sparse_cross_entropy(tf.cast(labels, "int32"), logits)

    return sparse_cross_entropy


@functools.cache
def _tensorflow_layer_norm(epsilon):
    import tensorflow as tf

    @tf.custom_gradient
    def fused_layer_norm(x, gamma, beta):
        x32 = tf.cast(x, "float32")
        mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)  # (..., 1)
        inverse_std = tf.math.rsqrt(variance + epsilon)
        normalized = (x32 - mean) * inverse_std  # (..., hidden)

        def gradient(upstream):
            upstream = tf.cast(upstream, "float32")
            scaled = upstream * gamma
            dx = inverse_std * (
                scaled
                - tf.reduce_mean(scaled, axis=-1, keepdims=True)
                - normalized * tf.reduce_mean(scaled * normalized, axis=-1, keepdims=True)
            )
            rows = tf.reshape(upstream, [-1, upstream.shape[-1]])  # (tokens, hidden)
            normalized_rows = tf.reshape(normalized, [-1, upstream.shape[-1]])
            return (
                tf.cast(dx, x.dtype),
                tf.reduce_sum(rows * normalized_rows, axis=0),
                tf.reduce_sum(rows, axis=0),
            )

        return tf.cast(normalized * gamma + beta, x.dtype), gradient

    def layer_norm(x, gamma, beta):
        gamma = tf.cast(tf.convert_to_tensor(gamma), "float32")
        beta = tf.cast(tf.convert_to_tensor(beta), "float32")
        return fused_layer_norm(x, gamma, beta)

    return layer_norm
