"""Import a Hugging Face BERT checkpoint directory into an `Encoder`.

The directory holds `config.json`, `vocab.txt` and `model.safetensors`, as
written by `transformers`' `BertModel.save_pretrained` (tensor names with or
without the `bert.` prefix). No torch or transformers is needed.
"""

import json
from pathlib import Path

import numpy as np

from fmkeras.errors import ConfigError, DataError

HF_FILES = ("config.json", "vocab.txt", "model.safetensors")
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_approximate", "relu": "relu", "silu": "silu"}


def is_hf_bert_dir(path):
    path = Path(path)
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read JSON ({error})") from None


def hf_lowercase(directory):
    """Whether the checkpoint's tokenizer lower-cases (and strips accents)."""
    settings_path = Path(directory) / "tokenizer_config.json"
    settings = _read_json(settings_path) if settings_path.is_file() else {}
    lowercase = settings.get("do_lower_case", True)
    strip_accents = settings.get("strip_accents")
    if strip_accents is not None and strip_accents != lowercase:
        raise ConfigError(
            f"{settings_path}: strip_accents={strip_accents} with do_lower_case={lowercase} "
            "is not supported (fmkeras lower-cases and strips accents together)"
        )
    return lowercase


def hf_encoder_kwargs(directory):
    """`Encoder` arguments from an HF BERT `config.json`; unsupported settings name their key."""
    path = Path(directory) / "config.json"
    config = _read_json(path)
    expected = {"model_type": "bert", "position_embedding_type": "absolute"}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ConfigError(f"{path}: {key}={config[key]!r} is not supported (need {value!r})")
    required = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
    )
    missing = [key for key in required if key not in config]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing}")
    activation = config.get("hidden_act", "gelu")
    if activation not in HF_ACTIVATIONS:
        raise ConfigError(
            f"{path}: hidden_act={activation!r} is not supported; use one of "
            f"{sorted(HF_ACTIVATIONS)}"
        )
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ConfigError(f"{path}: hidden_size is not divisible by num_attention_heads")
    return dict(
        vocabulary_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        hidden_dim=config["hidden_size"],
        intermediate_dim=config["intermediate_size"],
        max_sequence_length=config["max_position_embeddings"],
        num_segments=config.get("type_vocab_size", 2),
        activation=HF_ACTIVATIONS[activation],
        layer_norm_epsilon=config.get("layer_norm_eps", 1e-12),
    )


def read_hf_tensors(directory):
    """`{name: array}` from `model.safetensors`, with any `bert.` prefix removed."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(directory) / "model.safetensors"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path}: not a readable safetensors file ({error})") from None
    return {name.removeprefix("bert."): value for name, value in tensors.items()}


def hf_weight_map(encoder):
    """`[(keras variable, HF tensor name, transform)]` for every encoder weight.

    HF `nn.Linear` stores `(out, in)`; fmkeras projections are einsum kernels
    `(in, heads, head_dim)` / `(heads, head_dim, out)` and Dense `(in, out)`.
    """
    heads, width = encoder.num_heads, encoder.hidden_dim
    head_dim = width // heads

    def linear(shape):
        return lambda w: w.T.reshape(shape)

    def same(w):
        return w

    embedding = encoder.embedding
    mapping = [
        (embedding.token_embedding.embeddings, "embeddings.word_embeddings.weight", same),
        (embedding.position_embedding.embeddings, "embeddings.position_embeddings.weight", same),
        (embedding.segment_embedding.embeddings, "embeddings.token_type_embeddings.weight", same),
        (embedding.layer_norm.gamma, "embeddings.LayerNorm.weight", same),
        (embedding.layer_norm.beta, "embeddings.LayerNorm.bias", same),
    ]
    for i, block in enumerate(encoder.transformer_layers):
        prefix = f"encoder.layer.{i}."
        attention = block.self_attention_layer
        for dense, name in (
            (attention.query_dense, "query"),
            (attention.key_dense, "key"),
            (attention.value_dense, "value"),
        ):
            mapping += [
                (
                    dense.kernel,
                    f"{prefix}attention.self.{name}.weight",
                    linear((width, heads, head_dim)),
                ),
                (dense.bias, f"{prefix}attention.self.{name}.bias", linear((heads, head_dim))),
            ]
        ln_attention, ln_output = block.self_attention_layer_norm, block.feedforward_layer_norm
        intermediate, output = block.feedforward_intermediate_dense, block.feedforward_output_dense
        mapping += [
            (attention.output_dense.kernel, f"{prefix}attention.output.dense.weight",
             linear((heads, head_dim, width))),
            (attention.output_dense.bias, f"{prefix}attention.output.dense.bias", same),
            (ln_attention.gamma, f"{prefix}attention.output.LayerNorm.weight", same),
            (ln_attention.beta, f"{prefix}attention.output.LayerNorm.bias", same),
            (intermediate.kernel, f"{prefix}intermediate.dense.weight", np.transpose),
            (intermediate.bias, f"{prefix}intermediate.dense.bias", same),
            (output.kernel, f"{prefix}output.dense.weight", np.transpose),
            (output.bias, f"{prefix}output.dense.bias", same),
            (ln_output.gamma, f"{prefix}output.LayerNorm.weight", same),
            (ln_output.beta, f"{prefix}output.LayerNorm.bias", same),
        ]  # fmt: skip
    mapping += [
        (encoder.pooler.kernel, "pooler.dense.weight", np.transpose),
        (encoder.pooler.bias, "pooler.dense.bias", same),
    ]
    return mapping


def load_hf_bert(directory, dropout=0.1):
    """Builds an `Encoder` with the checkpoint's architecture and weights.

    Raises `ConfigError`/`DataError` naming the file, key or tensor when the
    directory is incomplete, the config unsupported, or a tensor missing or
    of the wrong shape.
    """
    from fmkeras.models.encoder import Encoder

    directory = Path(directory)
    missing = [name for name in HF_FILES if not (directory / name).is_file()]
    if missing:
        raise DataError(f"{directory} is not a Hugging Face BERT directory: missing {missing}")
    kwargs = hf_encoder_kwargs(directory)
    tensors = read_hf_tensors(directory)
    encoder = Encoder(**kwargs, dropout=dropout, name="encoder")
    mapping = hf_weight_map(encoder)
    absent = [name for _, name, _ in mapping if name not in tensors]
    if absent:
        shown = ", ".join(absent[:5]) + (f" (+{len(absent) - 5} more)" if len(absent) > 5 else "")
        raise DataError(f"{directory / 'model.safetensors'} lacks the tensors {shown}")
    for variable, name, transform in mapping:
        value = tensors[name]
        try:
            value = transform(value)
        except ValueError:
            value = None
        if value is None or tuple(value.shape) != tuple(variable.shape):
            raise DataError(
                f"{directory / 'model.safetensors'}: tensor {name} has shape "
                f"{tuple(tensors[name].shape)}, which does not fit {variable.path} "
                f"{tuple(variable.shape)} of the architecture in config.json"
            )
        variable.assign(value.astype(variable.dtype))
    return encoder


def load_hf_mlm_head(head, directory):
    """Assigns BERT's pretraining head (`cls.predictions.*`: transform dense,
    LayerNorm, output bias; the output kernel is the tied word embedding) to
    a built `MaskedLMHead`. Returns False when the checkpoint has no such head
    (e.g. sentence-embedding models such as all-MiniLM-L6-v2)."""
    tensors = read_hf_tensors(directory)
    mapping = [
        (head.transform_dense.kernel, "cls.predictions.transform.dense.weight", np.transpose),
        (head.transform_dense.bias, "cls.predictions.transform.dense.bias", None),
        (head.layer_norm.gamma, "cls.predictions.transform.LayerNorm.weight", None),
        (head.layer_norm.beta, "cls.predictions.transform.LayerNorm.bias", None),
        (head.output_bias, "cls.predictions.bias", None),
    ]
    if any(name not in tensors for _, name, _ in mapping):
        return False
    for variable, name, transform in mapping:
        value = transform(tensors[name]) if transform else tensors[name]
        if tuple(value.shape) != tuple(variable.shape):
            raise DataError(f"{Path(directory) / 'model.safetensors'}: tensor {name} has shape "
                            f"{tuple(value.shape)}, not {tuple(variable.shape)}")  # fmt: skip
        variable.assign(value.astype(variable.dtype))
    return True
