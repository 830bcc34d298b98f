"""LoRA fine-tuning: low-rank adapters on the encoder's attention projections.

Uses Keras's `EinsumDense.enable_lora`; everything else in the encoder is
frozen, including the adapted layers' biases (which `enable_lora` leaves
trainable). Adapters are saved by *variable path* together with the task
head (every trainable variable), so they reload into any freshly built model
with the same layer names, whatever order the layers were created in (the
failure mode of keras-hub#2701, which matches by position).

Saving a model with adapters (`model.save`, `save_weights`) writes the
merged kernels: `model.keras` of a LoRA run is the merged model. Backups
therefore also store the adapters, and `restore_adapters` un-merges.

Keras factorises an attention projection's `(hidden, heads, head_dim)`
kernel per head: A is `(hidden, heads, rank)` and B `(rank, head_dim)`, so
the update has rank `rank` within each head (as in keras-hub).
"""

import json

import numpy as np
from keras import ops

from fmkeras.errors import DataError
from fmkeras.layers.utils import count_weights
from fmkeras.training.checkpoints import atomic_path
from fmkeras.training.run_dir import RunDir

PROJECTIONS = {"query": "query_dense", "key": "key_dense", "value": "value_dense",
               "output": "output_dense"}  # fmt: skip


def adapted_layers(encoder, targets):
    """The `EinsumDense` projections named by `targets` in every block."""
    return [
        getattr(block.self_attention_layer, PROJECTIONS[target])
        for block in encoder.transformer_layers
        for target in targets
    ]


def enable_lora(model, encoder, rank, alpha, targets):
    """Freezes `encoder` and adds rank-`rank` adapters to `targets`. Call before `compile`.

    Returns `(trainable_parameters, total_parameters)`.
    """
    if getattr(model, "optimizer", None) is not None and model.optimizer.built:
        raise ValueError("enable LoRA before compile(): the optimizer is already built")
    for variable in encoder.weights:
        variable.trainable = False
    for layer in adapted_layers(encoder, targets):
        layer.enable_lora(rank, lora_alpha=alpha)
    return count_weights(model.trainable_weights), count_weights(model.weights)


def save_adapters(model, path, settings):
    """Writes every trainable variable of `model`, keyed by its path, plus
    `settings`, atomically (a temporary file renamed into place)."""
    from safetensors.numpy import save_file

    tensors = {v.path: np.asarray(ops.convert_to_numpy(v)) for v in model.trainable_weights}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"fmkeras_lora": json.dumps(settings)})


def read_adapters(path):
    """`(tensors, settings)` of an adapter file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            settings = json.loads((handle.metadata() or {}).get("fmkeras_lora", "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path}: not a readable adapter file ({error})") from None
    if settings is None:
        raise DataError(f"{path} has no fmkeras LoRA settings; it was not written by fmkeras")
    return tensors, settings


def load_adapters(model, path):
    """Assigns an adapter file's tensors to `model`'s variables of the same paths.

    Every tensor must find its variable with the same shape; the error names
    the paths that do not.
    """
    tensors, _ = read_adapters(path)
    variables = {v.path: v for v in model.weights}
    missing = sorted(set(tensors) - set(variables))
    if missing:
        raise DataError(f"{path}: the model has no variables {missing[:5]} (of {len(missing)})")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(variables[key].shape):
            raise DataError(
                f"{path}: {key} has shape {value.shape}, the model's {tuple(variables[key].shape)}"
            )
        variables[key].assign(value)


def restore_adapters(model, encoder, targets, path):
    """After `load_weights` of a backup (merged kernels, zeroed adapters):
    subtracts the adapters from the kernels again and loads them."""
    tensors, _ = read_adapters(path)
    for layer in adapted_layers(encoder, targets):
        a = tensors[layer.lora_kernel_a.path]
        b = tensors[layer.lora_kernel_b.path]
        delta = (layer.lora_alpha / layer.lora_rank) * np.matmul(a, b)
        layer._kernel.assign(ops.convert_to_numpy(layer._kernel) - delta)  # frozen base kernel
    load_adapters(model, path)


def adapter_settings(finetune, targets):
    return {"rank": finetune.lora_rank, "alpha": finetune.lora_alpha, "targets": targets}


def adapter_file(directory):
    """Where a run directory, or one of its backups, keeps the adapters."""
    return RunDir(directory).adapters
