"""`train.precision`: which Keras dtype policy a run computes in.

Variables and optimizer state stay float32 under every policy; Keras's
mixed policies compute matmuls and activations in 16 bits, and fmkeras's
layers keep layer-norm statistics and the loss's softmax in float32.
`mixed_float16` gets dynamic loss scaling from `Model.compile`
(`auto_scale_loss`). `in_dtype_policy` rebuilds a finished model in another
policy (exports in `bfloat16`).
"""

from pathlib import Path

import tensorflow as tf

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of a bf16 matrix path
# A CPU's widest matrix path, widest first: what `train.jit_compile: auto` and the
# cached matmul peaks tell CPUs apart by (one model name, e.g. "AMD EPYC", covers
# CPUs with and without AVX-512).
CPU_KINDS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpuinfo_value(field, cpuinfo=Path("/proc/cpuinfo")):
    """The first CPU's `field` in /proc/cpuinfo ("model name", "flags"), or None."""
    try:
        line = next(line for line in cpuinfo.read_text().splitlines()
                    if line.split(":", 1)[0].strip() == field)  # fmt: skip
    except (OSError, StopIteration):
        return None
    return line.split(":", 1)[1].strip()


def cpu_flags():
    """The flags this CPU reports in /proc/cpuinfo (empty where unknown)."""
    return (cpuinfo_value("flags") or "").split()


def cpu_bf16_flags(flags=None):
    """The bf16 matrix-instruction flags among `flags` (default: this CPU's)."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def cpu_kind(flags=None):
    """The widest of `CPU_KINDS` among `flags` (default: this CPU's), or "other"."""
    flags = cpu_flags() if flags is None else flags
    return next((kind for kind in CPU_KINDS if kind in flags), "other")


def resolve_precision(setting, strategy, flags=None):
    """`(policy, reason)` for `train.precision`: `auto` is `mixed_bfloat16` on
    TPUs, on GPUs of compute capability 8.0 or newer and on CPUs with AMX-BF16
    or AVX512-BF16, and `float32` elsewhere (`flags`: the CPU's, for tests)."""
    if setting != "auto":
        return setting, "set by train.precision"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16", "auto: TPUs compute in bfloat16"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capabilities = [tf.config.experimental.get_device_details(gpu)
                        .get("compute_capability", (0, 0)) for gpu in gpus]  # fmt: skip
        if min(capabilities) >= (8, 0):
            return "mixed_bfloat16", f"auto: GPUs of compute capability {min(capabilities)}"
        return "float32", f"auto: GPUs of compute capability {min(capabilities)} lack bfloat16"
    bf16_flags = cpu_bf16_flags(flags)
    if bf16_flags:
        return "mixed_bfloat16", f"auto: the CPU has {', '.join(bf16_flags)}"
    return "float32", "auto: no bfloat16 matrix path on this CPU"


def in_dtype_policy(model, policy):
    """The Keras `model` with every layer computing in `policy` (e.g.
    `bfloat16`: 16-bit weights and compute; fmkeras's layers still take
    softmax and layer-norm statistics in float32): `model` itself where it
    already does, else a copy with its weights."""
    import keras

    policies = set()

    def rewrite(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy":
                policies.add(node["config"]["name"])
                return keras.dtype_policies.serialize(keras.DTypePolicy(policy))
            return {key: rewrite(value) for key, value in node.items()}
        if isinstance(node, list):
            return [rewrite(value) for value in node]
        return node

    config = rewrite(keras.saving.serialize_keras_object(model))
    if policies <= {policy}:
        return model
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy
