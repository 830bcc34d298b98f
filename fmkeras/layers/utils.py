"""Small helpers shared by the layers: masks, activations, initializers."""

import keras
import numpy as np
from keras import ops

from fmkeras import fused
from fmkeras.layers.layer_normalization import LayerNormalization

ACTIVATIONS = {
    "gelu": fused.gelu,  # exact; one XLA cluster per pass inside fused.fused_elementwise()
    "gelu_approximate": lambda x: keras.activations.gelu(x, approximate=True),
    "relu": keras.activations.relu,
    "silu": keras.activations.silu,
}


def get_activation(name):
    """Returns the activation function for one of `ACTIVATIONS`' names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def clone_initializer(initializer):
    """A fresh initializer with the same config, so sublayers don't share seeds."""
    initializer = keras.initializers.get(initializer)
    return initializer.__class__.from_config(initializer.get_config())


def causal_mask(target_length, source_length, offset=0):
    """Boolean `(1, target, source)` mask; query `i` sees keys `<= i + offset`."""
    rows = ops.expand_dims(ops.arange(target_length) + offset, axis=1)
    cols = ops.expand_dims(ops.arange(source_length), axis=0)
    return ops.expand_dims(ops.greater_equal(rows, cols), axis=0)


def merge_masks(padding_mask=None, attention_mask=None):
    """Combines a `(batch, source)` padding mask and a `(batch, target, source)`
    attention mask into one boolean mask broadcastable to the latter."""
    mask = None
    if padding_mask is not None:
        mask = ops.expand_dims(ops.cast(padding_mask, "bool"), axis=1)  # (batch, 1, source)
    if attention_mask is not None:
        attention_mask = ops.cast(attention_mask, "bool")
        mask = attention_mask if mask is None else ops.logical_and(mask, attention_mask)
    return mask


def built_dense(parent, units, name, input_shape, use_bias=True):
    """A built `Dense` sublayer using `parent`'s initializers and dtype policy."""
    layer = keras.layers.Dense(
        units,
        use_bias=use_bias,
        kernel_initializer=clone_initializer(parent.kernel_initializer),
        bias_initializer=clone_initializer(parent.bias_initializer),
        dtype=parent.dtype_policy,
        name=name,
    )
    layer.build(input_shape)
    return layer


def built_layer_norm(parent, name, input_shape):
    """A built `LayerNormalization` sublayer using `parent`'s epsilon and dtype policy."""
    layer = LayerNormalization(
        epsilon=parent.layer_norm_epsilon, dtype=parent.dtype_policy, name=name
    )
    layer.build(input_shape)
    return layer


def with_dtype_policy(config):
    """A model config with its serialized `dtype` policy revived (for `from_config`)."""
    config = dict(config)
    if isinstance(config.get("dtype"), dict):
        config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
    return config


def count_weights(weights):
    """The number of scalars in `weights` (e.g. `model.trainable_weights`)."""
    return sum(int(np.prod(weight.shape)) for weight in weights)
