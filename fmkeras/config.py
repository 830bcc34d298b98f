"""Typed run configuration: YAML recipes + `--set key=value` overrides.

A recipe is a YAML mapping with the sections below; every key it may hold
is a field of these dataclasses, and anything else is rejected before a run
starts, with the valid keys named. Keys stay stable across releases: users'
recipes and scripts depend on them.
"""

import dataclasses
import difflib
import typing
from pathlib import Path

import yaml

from fmkeras.errors import ConfigError

TASKS = ("pretrain", "classify", "tag", "translate")


@dataclasses.dataclass
class ModelConfig:
    size: str = "mini"  # tiny | mini | small | medium | base | custom
    # random | a directory (fmkeras run or converted checkpoint: encoder.keras + vocab.txt;
    # or Hugging Face BERT: config.json + model.safetensors + vocab.txt) |
    # python:PACKAGE/SUBDIR (a directory inside an installed package). A loaded
    # checkpoint fixes the architecture; size and the four keys below are then unused.
    init: str = "random"
    num_layers: int | None = None  # any of these four overrides the size
    hidden_dim: int | None = None
    num_heads: int | None = None
    intermediate_dim: int | None = None
    dropout: float = 0.1
    max_sequence_length: int = 512
    activation: str = "gelu"
    normalize_first: bool = False


@dataclasses.dataclass
class DataConfig:
    dir: str | None = None  # data directory; else --data-dir, else $FMKERAS_DATA_DIR
    train_file: str = "gutenberg_en/train.txt"
    valid_file: str = "gutenberg_en/valid.txt"
    max_lines: int | None = None  # read only the first N lines of each file (quick runs)
    vocab_file: str | None = None  # existing vocab.txt; learned from train_file when unset
    vocab_size: int = 16000
    lowercase: bool = True
    sequence_length: int = 128
    mask_rate: float = 0.15
    max_predictions: int | None = None  # per sequence; default round(mask_rate * sequence_length)
    text_column: str = "sentence"  # classify: TSV column names (header line required)
    label_column: str = "label"
    bad_rows: str = "fail"  # classify/tag: fail | skip (skipped rows are counted and reported)
    source_language: str = "en"  # translate: files are <train_file>.<language>
    target_language: str = "zh"
    target_vocab_file: str | None = None  # translate: learned from the target side when unset
    shared_vocabulary: bool = False  # translate: one vocabulary for both sides (the source's)


@dataclasses.dataclass
class DecodeConfig:
    beam_width: int = 4  # 1 = greedy
    length_penalty: float = 0.6  # GNMT: score / ((5 + length) / 6) ** length_penalty
    max_length: int | None = None  # target tokens; default data.sequence_length
    batch_size: int = 64


@dataclasses.dataclass
class FinetuneConfig:
    method: str = "full"  # full | lora
    lora_rank: int = 8
    lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
    lora_targets: str = "query,value"  # comma-separated subset of query,key,value,output


@dataclasses.dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32  # global batch, split across replicas
    learning_rate: float = 5e-4
    warmup_steps: int | None = None  # default 10 % of steps
    decay: str = "linear"  # linear | cosine | constant
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    jit_compile: str = "auto"  # auto | true | false
    steps_per_execution: int = 1
    checkpoint_every: int = 200  # steps between backups (one Keras "epoch")
    eval_every: int = 1000  # steps between validations
    eval_steps: int | None = None  # validation batches; default the whole valid file
    log_every: int = 50  # steps between TensorBoard scalars
    label_smoothing: float = 0.0  # translate
    peak_gflops: float | None = None  # per-replica peak for MFU; default measured matmul ceiling
    seed: int = 42


@dataclasses.dataclass
class DistributeConfig:
    strategy: str = "auto"  # auto | one_device | mirrored | multi_worker | tpu
    cpu_devices: int = 1  # split the CPU into N logical devices (tests mirrored without GPUs)
    tpu: str | None = None  # TPU name or address for strategy=tpu


@dataclasses.dataclass
class RunConfig:
    task: str = "pretrain"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distribute: DistributeConfig = dataclasses.field(default_factory=DistributeConfig)


CHOICES = {
    "task": TASKS,
    "data.bad_rows": ("fail", "skip"),
    "finetune.method": ("full", "lora"),
    "train.decay": ("linear", "cosine", "constant"),
    "train.jit_compile": ("auto", "true", "false"),
    "distribute.strategy": ("auto", "one_device", "mirrored", "multi_worker", "tpu"),
}


def _check_type(key, value, annotation):
    """Returns `value` converted to `annotation`, or raises ConfigError."""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} may not be null")
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            try:  # PyYAML reads 3e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if kind is str and isinstance(value, str | bool | int | float):
            # YAML reads `true`/`1e-3` as non-strings; keep what the user typed.
            return str(value).lower() if isinstance(value, bool) else str(value)
    names = " or ".join(k.__name__ for k in allowed if k is not type(None))
    raise ConfigError(f"{key} expects {names}, got {value!r} ({type(value).__name__})")


def _unknown_key(key, valid):
    hint = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"unknown key {key!r}.{hint} Valid keys: {', '.join(sorted(valid))}")


def set_value(config, key, value):
    """Sets dotted `key` (e.g. `train.steps`) on `config`, type-checked."""
    parts = key.split(".")
    target = config
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part not in fields:
            prefix = ".".join(parts[:depth])
            valid = [f"{prefix}.{n}" if prefix else n for n in fields]
            raise _unknown_key(key, valid)
        field = fields[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(field.type):
                raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.<name>")
            value = _check_type(key, value, field.type)
            choices = CHOICES.get(key)
            if choices and value not in choices:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
            setattr(target, part, value)
        elif not dataclasses.is_dataclass(field.type):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])} is not a section")
        else:
            target = getattr(target, part)


def _flatten(mapping, prefix=""):
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def load_recipe(path):
    """Reads a YAML recipe into a flat `{dotted_key: value}` dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return dict(_flatten(data))


def parse_override(text):
    """`"train.steps=100"` -> `("train.steps", 100)` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(recipe=None, overrides=(), base=None):
    """A validated `RunConfig` from defaults, a recipe file, `base` and overrides.

    `base` is a flat dict applied before the recipe (the quickstart's
    defaults); `overrides` are `key=value` strings applied last.
    """
    config = RunConfig()
    for key, value in (base or {}).items():
        set_value(config, key, value)
    if recipe is not None:
        for key, value in load_recipe(recipe).items():
            try:
                set_value(config, key, value)
            except ConfigError as error:
                raise ConfigError(f"{recipe}: {error}") from None
    for text in overrides:
        key, value = parse_override(text)
        set_value(config, key, value)
    validate(config)
    return config


def validate(config):
    """Cross-field checks that a single key's type cannot express."""
    train, data = config.train, config.data
    for key in ("steps", "batch_size", "checkpoint_every", "eval_every", "log_every"):
        if getattr(train, key) <= 0:
            raise ConfigError(f"train.{key} must be positive, got {getattr(train, key)}")
    if train.steps_per_execution <= 0:
        raise ConfigError("train.steps_per_execution must be positive")
    if not 0.0 < data.mask_rate < 1.0:
        raise ConfigError(f"data.mask_rate must be in (0, 1), got {data.mask_rate}")
    if data.sequence_length < 8:
        raise ConfigError(f"data.sequence_length must be at least 8, got {data.sequence_length}")
    if data.sequence_length > config.model.max_sequence_length:
        raise ConfigError(
            f"data.sequence_length={data.sequence_length} exceeds "
            f"model.max_sequence_length={config.model.max_sequence_length}"
        )
    finetune = config.finetune
    if finetune.lora_rank < 1 or finetune.lora_alpha <= 0:
        raise ConfigError("finetune.lora_rank must be >= 1 and finetune.lora_alpha positive")
    unknown = set(lora_targets(finetune)) - set(LORA_TARGETS)
    if unknown or not lora_targets(finetune):
        raise ConfigError(
            f"finetune.lora_targets={finetune.lora_targets!r}: use a comma-separated subset of "
            f"{', '.join(LORA_TARGETS)}"
        )
    if config.decode.beam_width < 1 or config.decode.batch_size < 1:
        raise ConfigError("decode.beam_width and decode.batch_size must be at least 1")
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {train.label_smoothing}")
    if config.distribute.cpu_devices < 1:
        raise ConfigError("distribute.cpu_devices must be at least 1")


LORA_TARGETS = ("query", "key", "value", "output")


def lora_targets(finetune):
    return [name.strip() for name in finetune.lora_targets.split(",") if name.strip()]


def to_dict(config):
    return dataclasses.asdict(config)
