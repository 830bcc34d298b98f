"""Fine-tuning end to end (classify, tag, LoRA) and LoRA adapters in detail."""

import json

import keras
import numpy as np
import pytest
from conftest import REPO
from run_helpers import built_task, scalars, serve_in_fresh_process, train_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fmkeras
from fmkeras.config import applies_to
from fmkeras.errors import DataError
from fmkeras.evaluate import main as evaluate_main
from fmkeras.export import main as export_main
from fmkeras.models import Classifier, Encoder
from fmkeras.models.starting_point import load_starting_point
from fmkeras.predict import main as predict_main
from fmkeras.tasks import load_run
from fmkeras.tasks.classify import ClassifyTask, classification_metrics
from fmkeras.text.wordpiece import write_vocabulary
from fmkeras.train import main
from fmkeras.training import lora
from fmkeras.training.checkpoints import save_model

TINY = dict(num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=64)
QUICK = {
    "model.size": "tiny",
    "model.init": "random",
    "data.max_lines": 1500,
    "data.vocab_size": 1000,
    "train.batch_size": 16,
    "train.learning_rate": 1e-3,
    "train.steps": 40,
    "train.warmup_steps": 4,
    "train.checkpoint_every": 20,
    "train.eval_every": 20,
    "train.log_every": 10,
    "train.jit_compile": "false",  # a few steps: compiling each bucket shape costs more
}


def test_classify_end_to_end_with_evaluate_and_predict(tmp_path, capsys, data_dir, monkeypatch):
    run = tmp_path / "sst2"
    assert main(train_args("classify", REPO / "trainers" / "sst2.yaml", QUICK, run)) == 0
    for name in ("model.keras", "encoder.keras", "vocab.txt", "task.json", "metrics.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["confusion_matrix"] and np.sum(metrics["confusion_matrix"]) == 872
    assert metrics["labels"] == ["0", "1"] and 0 <= metrics["macro_f1"] <= 1
    losses = [value for _, value in scalars(run / "logs" / "train", "loss")]
    assert losses[-1] < losses[0]
    assert [step for step, _ in scalars(run / "logs" / "validation", "macro_f1")] == [20, 40]
    images = EventAccumulator(str(run / "logs" / "validation")).Reload().Tags()["tensors"]
    assert {"confusion_matrix", "confusion_matrix_table"} <= set(images)  # image and table

    capsys.readouterr()
    assert evaluate_main([str(run)]) == 0  # the run's validation file, sst2/dev.tsv
    output = capsys.readouterr()
    assert f"validation data: {data_dir / 'sst2' / 'dev.tsv'}" in output.err
    scored = json.loads(output.out)  # the keys of metrics.json, 4 decimals
    assert scored["accuracy"] == round(metrics["accuracy"], 4)
    assert {"loss", "accuracy", "macro_f1", "skipped_rows"} <= set(scored) & set(metrics)
    assert evaluate_main([str(run), "--data", str(data_dir / "sst2" / "dev.tsv"), "--out",
                          str(tmp_path / "scored.json")]) == 0  # fmt: skip
    written = json.loads((tmp_path / "scored.json").read_text())
    assert written["accuracy"] == pytest.approx(metrics["accuracy"], rel=1e-9)  # full precision
    capsys.readouterr()
    assert predict_main([str(run), "a gorgeous , witty film", "dull"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["a gorgeous , witty film", "dull"]
    assert all(sum(line["probabilities"].values()) == pytest.approx(1, abs=2e-4) for line in lines)
    assert all(len(repr(p)) <= 6 for line in lines for p in line["probabilities"].values())
    # Empty texts get no made-up label, and --file output stays aligned with its lines.
    texts = tmp_path / "texts.txt"
    texts.write_text("dull\n\n   \na gorgeous , witty film\n", encoding="utf-8")
    assert predict_main([str(run), "", "--file", str(texts)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("empty", False) for line in lines] == [True, False, True, True, False]
    labelled = [line["text"] for line in lines if "label" in line]
    assert labelled == ["dull", "a gorgeous , witty film"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input files were checked")

    monkeypatch.setattr("fmkeras.tasks.load_run", no_model)
    assert evaluate_main([str(run), "--data", str(tmp_path / "missing.tsv")]) == 2
    assert "missing.tsv does not exist" in capsys.readouterr().err
    assert evaluate_main([str(run), "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert f"sst2/dev.tsv in data directory {tmp_path / 'nowhere'}" in capsys.readouterr().err


@pytest.mark.long_running
def test_tag_end_to_end_scores_entities_and_exports(tmp_path, data_dir, capsys):
    run = tmp_path / "ner"
    settings = {**QUICK, "data.max_lines": 400, "train.learning_rate": 3e-3,
                "model.max_sequence_length": 16,
                "data.sequence_length": 16}  # long sentences get cut: their last words are O
    assert main(train_args("tag", REPO / "trainers" / "conll2003.yaml", settings, run)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"precision", "recall", "f1", "per_type"} <= set(metrics)
    assert metrics["sentences"] > 100 and metrics["truncated_words"] > 0
    losses = [value for _, value in scalars(run / "logs" / "train", "loss")]
    assert losses[-1] < losses[0]
    tagged = load_run(run).tag([["EU", "rejects", "German", "call"], ["Peter"]])
    assert [word for word, _ in tagged[0]] == ["EU", "rejects", "German", "call"]
    assert all(tag in metrics_labels(run) for sentence in tagged for _, tag in sentence)

    # The export tags raw text in the serving graph exactly as the run does.
    assert export_main([str(run), "--name", "ner", "--out", str(tmp_path / "sm")]) == 0
    texts = [
        "EU rejects German call to boycott British lamb .",
        "Peter Blackburn of London said the U.S. team played well in the final game on Sunday",
        "Rome",
    ]
    served = serve_in_fresh_process(tmp_path / "sm" / "ner" / "1", texts)
    expected = load_run(run).tag([text.split() for text in texts])
    assert [[t for t in row if t] for row in served["tags"]] == [
        [tag for _, tag in sentence] for sentence in expected
    ]


def metrics_labels(run):
    return json.loads((run / "task.json").read_text())["labels"]


def test_bad_rows_stop_or_are_skipped(tmp_path, data_dir, capsys):
    train = tmp_path / "train.tsv"
    train.write_bytes(b"sentence\tlabel\n" + b"fine film\t1\nawful\t0\n" * 40 + b"bad \xff\t1\n")
    settings = {**QUICK, "data.train_file": str(train), "train.steps": 2}
    recipe = REPO / "trainers" / "sst2.yaml"
    assert main(train_args("classify", recipe, settings, tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert f"error: {train}:82: not valid UTF-8" in err and "set data.bad_rows=skip" in err
    settings["data.bad_rows"] = "skip"
    assert main(train_args("classify", recipe, settings, tmp_path / "b")) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().out
    # The evaluate command's hint names its own flag.
    assert evaluate_main([str(tmp_path / "b"), "--data", str(train)]) == 2
    assert "(pass --bad-rows skip to skip such rows)" in capsys.readouterr().err
    assert evaluate_main([str(tmp_path / "b"), "--data", str(train), "--bad-rows", "skip"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_rows"] == {"data": 1}
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["skipped_rows"] == {"train": 1, "valid": 0}


def tiny_starting_point(directory):
    """A saved tiny encoder + vocabulary usable as `model.init`."""
    encoder = Encoder(vocabulary_size=40, **TINY, name="encoder")
    directory.mkdir()
    encoder.save(directory / "encoder.keras")
    write_vocabulary(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)],
                     directory / "vocab.txt")  # fmt: skip
    return directory


IDS = np.array([[2, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0]], "int32")
INPUTS = {"token_ids": IDS, "segment_ids": 0 * IDS, "padding_mask": (IDS > 0).astype("int32")}


def lora_classifier(start_dir, targets=("query", "value")):
    start = load_starting_point(str(start_dir), dropout=0.0)
    model = Classifier(start.encoder, 3, dropout=0.0, name="classifier")
    lora.enable_lora(model, start.encoder, 2, 4.0, list(targets))
    return model, start.encoder


def test_lora_trains_only_adapters_and_head_and_reloads_by_path(tmp_path):
    start_dir = tiny_starting_point(tmp_path / "start")
    model, encoder = lora_classifier(start_dir)
    names = sorted(v.path for v in model.trainable_weights)
    assert names == sorted(
        [f"transformer_layer_{i}/self_attention_layer/{p}/lora_kernel_{ab}"
         for i in range(2) for p in ("query", "value") for ab in "ab"]
        + ["logits/kernel", "logits/bias"]
    )  # fmt: skip
    frozen = {v.path: np.array(v) for v in model.weights if not v.trainable}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(INPUTS, np.array([0, 2]), epochs=3, verbose=0)
    for variable in model.weights:
        if not variable.trainable:
            np.testing.assert_array_equal(np.array(variable), frozen[variable.path])
    expected = model.predict(INPUTS, verbose=0)
    lora.save_adapters(model, tmp_path / "adapters.safetensors", {"rank": 2})

    # A fresh model whose adapters are created in the other order loads the same values:
    # adapters are matched by variable path, not by position (keras-hub#2701).
    fresh, _ = lora_classifier(start_dir, targets=("value", "query"))
    lora.load_adapters(fresh, tmp_path / "adapters.safetensors")
    np.testing.assert_allclose(fresh.predict(INPUTS, verbose=0), expected, atol=1e-6)

    # Saving merges the adapters into the kernels: the .keras model needs no LoRA.
    save_model(model, tmp_path / "merged.keras")  # as a run saves model.keras
    merged = fmkeras.load_model(tmp_path / "merged.keras")
    assert not any("lora" in v.path for v in merged.weights)
    np.testing.assert_allclose(merged.predict(INPUTS, verbose=0), expected, atol=1e-5)

    wrong, _ = lora_classifier(start_dir, targets=("query",))
    with pytest.raises(DataError, match="the model has no variables"):
        lora.load_adapters(wrong, tmp_path / "adapters.safetensors")


def test_lora_backup_restores_base_kernels_and_adapters(tmp_path):
    start_dir = tiny_starting_point(tmp_path / "start")
    model, encoder = lora_classifier(start_dir)
    base = np.array(encoder.transformer_layers[0].self_attention_layer.query_dense._kernel)
    for variable in model.trainable_weights:  # stand-in for training: non-zero adapters
        variable.assign(np.random.default_rng(0).normal(0, 0.1, variable.shape))
    expected = model.predict(INPUTS, verbose=0)
    model.save_weights(tmp_path / "state.weights.h5")  # what a backup holds: merged kernels
    lora.save_adapters(model, tmp_path / "adapters.safetensors", {"rank": 2})

    restored, restored_encoder = lora_classifier(start_dir)
    restored.load_weights(tmp_path / "state.weights.h5")
    lora.restore_adapters(
        restored, restored_encoder, ["query", "value"], tmp_path / "adapters.safetensors"
    )
    query = restored_encoder.transformer_layers[0].self_attention_layer.query_dense
    np.testing.assert_allclose(np.array(query._kernel), base, atol=1e-6)
    np.testing.assert_allclose(restored.predict(INPUTS, verbose=0), expected, atol=1e-5)


def test_lora_run_saves_adapters_that_reproduce_the_merged_model(tmp_path, data_dir, capsys):
    start_dir = tiny_starting_point(tmp_path / "start")
    run = tmp_path / "lora"
    settings = {**QUICK, "model.init": str(start_dir), "model.dropout": 0.0, "train.steps": 20}
    recipe = REPO / "trainers" / "sst2_lora.yaml"
    # Keys the checkpoint makes irrelevant: a contradicting width fails, a size warns.
    wide = {**settings, "model.hidden_dim": 32}
    assert main(train_args("classify", recipe, wide, tmp_path / "wide")) == 2
    assert "model.hidden_dim=32 contradicts model.init=" in capsys.readouterr().err
    assert main(train_args("classify", recipe, settings, run)) == 0
    assert "warning: model.size=tiny is ignored: model.init=" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["lora"]["trainable_share"] < 0.2
    merged = fmkeras.load_model(run / "model.keras")
    start = load_starting_point(str(start_dir), dropout=0.0)
    fresh = Classifier(start.encoder, 2, dropout=0.0, name="classifier")
    lora.enable_lora(fresh, start.encoder, 8, 16.0, ["query", "value"])
    lora.load_adapters(fresh, run / "adapters.safetensors")
    np.testing.assert_allclose(
        fresh.predict(INPUTS, verbose=0), merged.predict(INPUTS, verbose=0), atol=1e-5
    )


def test_classify_declares_exactly_the_metrics_its_validation_reports():
    """`validation_metrics` is what `train.keep_best` and `sweep --metric` are
    checked against before training; it must not drift from `evaluate`."""
    examples = [(np.array([0.2, 0.8]), 1), (np.array([0.7, 0.3]), 1), (np.array([0.9, 0.1]), 0)]
    reported = {name for name, value in classification_metrics(examples, ["0", "1"]).items()
                if isinstance(value, float)}  # fmt: skip
    assert reported == set(ClassifyTask.validation_metrics(None))


def test_layer_decay_slows_each_layer_below_the_head(tmp_path, data_dir, capsys):
    """`finetune.layer_decay=0.01` on a 2-block encoder: the embeddings learn at
    1e-6 x the rate, block 0 at 1e-4, block 1 at 1e-2 and the head at 1."""
    start_dir = tiny_starting_point(tmp_path / "start")
    settings = {**QUICK, "model.init": str(start_dir), "model.dropout": 0.0, "train.steps": 4,
                "train.warmup_steps": 0, "finetune.layer_decay": 0.01}  # fmt: skip
    run = tmp_path / "decayed"
    assert main(train_args("classify", REPO / "trainers" / "sst2.yaml", settings, run)) == 0
    assert ("finetune.layer_decay=0.01: learning rate x1e-06 for the embeddings, x0.0001 "
            "(block 0) to x0.01 (block 1), x1 for the head") in capsys.readouterr().out  # fmt: skip
    encoder = keras.saving.load_model(start_dir / "encoder.keras")
    before = {v.path: v.numpy() for v in encoder.weights}
    moved = {}
    for variable in fmkeras.load_model(run / "model.keras").weights:
        if variable.path in before:  # the encoder's (the head started at random)
            group = variable.path.split("/")[0]
            change = float(np.abs(variable.numpy() - before[variable.path]).max())
            moved[group] = max(moved.get(group, 0.0), change)
    # Adam moves a weight by at most ~3.2 x its rate per step (bias-corrected moments).
    for group, factor in (("embedding", 1e-6), ("transformer_layer_0", 1e-4),
                          ("transformer_layer_1", 1e-2)):  # fmt: skip
        assert 0 < moved[group] <= 4 * 3.2 * 1e-3 * factor, (group, moved[group])
    assert moved["pooled_dense"] > 10 * moved["transformer_layer_1"]  # the pooler: full rate


def test_label_smoothing_smooths_the_classifiers_cross_entropy(tmp_path, data_dir):
    """`train.label_smoothing` (as HF's `label_smoothing_factor`): (1 - s) x the
    true class's negative log-likelihood + s x the mean over classes, over
    weighted positions; 0 is Keras's cross-entropy."""
    settings = {"model.size": "tiny", "model.init": "random", "data.max_lines": 50,
                "data.vocab_size": 300, "data.sequence_length": 16}  # fmt: skip
    logits = np.array([[2.0, -1.0], [0.3, 0.5], [1.0, 1.0], [-2.0, 0.5]], "float32")
    labels, weights = np.array([0, 0, 1, 1]), np.array([1.0, 1.0, 0.0, 1.0], "float32")
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll, uniform = -log_p[np.arange(4), labels], -log_p.mean(-1)
    for smoothing in (0.2, 0.0):
        task, model = built_task(REPO / "trainers" / "sst2.yaml",
                                 {**settings, "train.label_smoothing": smoothing},
                                 tmp_path / f"run-{smoothing}")  # fmt: skip
        loss = task.compile_args(model)["loss"]
        expected = (weights * ((1 - smoothing) * nll + smoothing * uniform)).sum() / weights.sum()
        assert float(loss(labels, logits, sample_weight=weights)) == pytest.approx(expected, 1e-5)
    assert applies_to("train.label_smoothing", "tag")
    assert not applies_to("train.label_smoothing", "distill")  # its soft targets smooth already

