"""Compression: structured pruning (gradient head importance, smaller dense
models that equal the original with those heads and units zeroed) and
gradual magnitude pruning (masks that stay zero through training, resume
and export)."""

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from model_checks import run_model_checks
from run_helpers import run_tool, train_tiny_classifier

from fmkeras.compress.command import main as compress_main
from fmkeras.compress.sparsity import magnitude_mask, prunable_kernels, scheduled_sparsity
from fmkeras.compress.structured import (
    channel_importance,
    head_importance,
    plan_pruning,
    pooler_importance,
    pruned_model,
    unit_importance,
)
from fmkeras.config import build_config
from fmkeras.errors import ConfigError
from fmkeras.evaluate import main as evaluate_main
from fmkeras.export import main as export_main
from fmkeras.models import Classifier, Encoder
from fmkeras.tasks import load_run
from fmkeras.tasks.translation import build_translator
from fmkeras.training.checkpoints import restore_backup

IDS = np.array([[2, 7, 9, 3, 5, 6], [4, 5, 6, 3, 0, 0]], "int32")
FEATURES = {"token_ids": IDS, "segment_ids": 0 * IDS, "padding_mask": (IDS > 0).astype("int32")}
LABELS = np.array([0, 2])


def tiny_classifier(use_bias=True):
    keras.utils.set_random_seed(1)
    encoder = Encoder(50, 2, 4, 16, 32, dropout=0.0, max_sequence_length=8, use_bias=use_bias,
                      name="encoder")  # fmt: skip
    return Classifier(encoder, 3, dropout=0.0, name="classifier")


@pytest.fixture(scope="module", params=[True, False], ids=["biases", "no-biases"])
def classifier(request):
    return tiny_classifier(use_bias=request.param)


def logits(model):
    return np.asarray(model.predict_on_batch(FEATURES))


def scores(model):
    return head_importance(model, [(FEATURES, LABELS, np.ones(2, "float32"))])


def channel_scores(model, features=FEATURES):
    return channel_importance(model.encoder, [(features, LABELS, np.ones(2, "float32"))])


def width_plan(model, hidden, **shares):
    return plan_pruning(scores(model), unit_importance(model.encoder), **shares,
                        channel_scores=channel_scores(model),
                        pooler_scores=pooler_importance(model), hidden=hidden)  # fmt: skip


def test_pruning_nothing_leaves_outputs_identical(classifier):
    plan = width_plan(classifier, hidden=0.0, heads=0.0, ffn=0.0)
    assert plan.heads == [[0, 1, 2, 3]] * 2 and plan.units == [list(range(32))] * 2
    assert plan.channels is None and plan.pooled is None  # every channel
    np.testing.assert_array_equal(logits(pruned_model(classifier, plan)), logits(classifier))


def test_width_pruning_slices_every_weight_of_the_residual_stream(classifier, tmp_path):
    """Minitron's width pruning: the kept hidden channels are the most active
    ones, and every weight that reads or writes the stream keeps exactly
    those rows or columns (heads and units pruned at the same time)."""
    importance = channel_scores(classifier)
    plan = width_plan(classifier, hidden=0.25, heads=0.5, ffn=0.25)
    assert plan.channels == sorted(np.argsort(-importance, kind="stable")[:12].tolist())
    assert len(plan.pooled) == 12
    smaller = pruned_model(classifier, plan)
    assert smaller.encoder.hidden_dim == 12
    before = {weight.path: np.asarray(weight) for weight in classifier.weights}
    after = {weight.path: np.asarray(weight) for weight in smaller.weights}
    channels, pooled = plan.channels, plan.pooled
    heads, units = plan.heads[1], plan.units[1]
    block = "transformer_layer_1/"
    expected = {
        "embedding/token_embedding/embeddings": lambda w: w[:, channels],
        "embedding/embeddings_layer_norm/gamma": lambda w: w[channels],
        block + "self_attention_layer/query/kernel": lambda w: w[channels][:, heads],
        block + "self_attention_layer/attention_output/kernel": lambda w: w[heads][..., channels],
        block + "feedforward_intermediate_dense/kernel": lambda w: w[channels][:, units],
        block + "feedforward_output_dense/kernel": lambda w: w[units][:, channels],
        block + "feedforward_layer_norm/gamma": lambda w: w[channels],
        "pooled_dense/kernel": lambda w: w[channels][:, pooled],
        "logits/kernel": lambda w: w[pooled],
    }
    for path, select in expected.items():
        np.testing.assert_array_equal(after[path], select(before[path]), err_msg=path)
    assert {path for path in after if after[path].shape != before[path].shape} >= set(expected)
    assert smaller.count_params() < classifier.count_params()
    run_model_checks(smaller, FEATURES, tmp_path)  # a narrower encoder saves and loads


def test_channel_importance_is_the_mean_activation_over_real_tokens(classifier):
    encoder = classifier.encoder
    x = encoder.embedding(FEATURES["token_ids"], FEATURES["segment_ids"])
    real = FEATURES["padding_mask"][..., None].astype("float32")  # (batch, seq, 1)
    expected = 0.0
    for block in encoder.transformer_layers:
        x = block(x, padding_mask=FEATURES["padding_mask"])  # (batch, seq, hidden)
        expected += (np.abs(np.asarray(x)) * real).sum(axis=(0, 1)) / real.sum()
    np.testing.assert_allclose(channel_scores(classifier), expected, rtol=1e-5)
    padded_differently = {**FEATURES, "token_ids": np.where(IDS > 0, IDS, 9)}
    np.testing.assert_allclose(channel_scores(classifier, padded_differently), expected,
                               rtol=1e-5)  # fmt: skip


def test_a_pruned_model_equals_the_original_with_those_heads_and_units_zeroed(
    classifier, tmp_path
):
    plan = plan_pruning(scores(classifier), unit_importance(classifier.encoder), 0.5, 0.25)
    assert sum(map(len, plan.heads)) == 4 and all(plan.heads)  # >= 1 head per layer
    assert [len(units) for units in plan.units] == [24, 24]
    smaller = pruned_model(classifier, plan)
    blocks = smaller.encoder.transformer_layers
    assert [block.self_attention_layer.query_dense.kernel.shape[1] for block in blocks] == \
        [len(heads) for heads in plan.heads]  # fmt: skip
    assert [block.feedforward_intermediate_dense.kernel.shape[1] for block in blocks] == [24, 24]
    assert smaller.count_params() < classifier.count_params()

    zeroed = Classifier.from_config(classifier.get_config())
    zeroed.set_weights(classifier.get_weights())
    for block, heads, units in zip(zeroed.encoder.transformer_layers, plan.heads, plan.units,
                                   strict=True):  # fmt: skip
        output = block.self_attention_layer.output_dense.kernel  # (heads, key_dim, hidden)
        keep = np.isin(np.arange(output.shape[0]), heads)[:, None, None]
        output.assign(np.asarray(output) * keep)
        ffn = block.feedforward_output_dense.kernel  # (units, hidden)
        ffn.assign(np.asarray(ffn) * np.isin(np.arange(ffn.shape[0]), units)[:, None])
    np.testing.assert_allclose(logits(smaller), logits(zeroed), atol=1e-6)
    run_model_checks(smaller, FEATURES, tmp_path)  # per-layer heads and widths save and load


def test_keeping_fewer_layers_runs_the_kept_layers_weights(classifier):
    plan = plan_pruning(scores(classifier), unit_importance(classifier.encoder), layers=1)
    assert plan.layers == [0] and len(plan.heads) == 1
    student = pruned_model(classifier, plan)
    assert student.encoder.num_layers == 1
    encoder = classifier.encoder  # embedding -> the first block -> pooler -> head, by hand
    x = encoder.embedding(FEATURES["token_ids"], FEATURES["segment_ids"])
    x = encoder.transformer_layers[0](x, padding_mask=FEATURES["padding_mask"])
    expected = classifier.output_dense(encoder.pooler(x[:, 0, :]))
    np.testing.assert_allclose(logits(student), expected, atol=1e-5)
    summary = plan.summary(encoder)  # the log says how many heads went with the dropped layer
    dropped = encoder.transformer_layers[1].num_heads
    assert summary["heads_in_dropped_layers"] == summary["heads_removed"] == dropped
    assert plan_pruning(scores(classifier), unit_importance(encoder), layers=2).layers == [0, 1]


def test_head_importance_is_the_loss_gradient_of_a_head_gate():
    """Michel et al.'s |dL/d xi_h|, checked by central differences (in float64)
    of a gate that scales head h's slice of the output projection."""
    keras.config.set_dtype_policy("float64")
    try:
        classifier = tiny_classifier()
    finally:
        keras.config.set_dtype_policy("float32")
    def loss(labels, logits):  # mean cross-entropy in float64
        logits = np.asarray(logits, np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return -log_p[np.arange(len(labels)), labels].mean()

    kernel = classifier.encoder.transformer_layers[1].self_attention_layer.output_dense.kernel
    original = np.asarray(kernel).copy()
    epsilon, head = 1e-4, 2
    values = []
    for gate in (1 + epsilon, 1 - epsilon):
        scaled = original.copy()
        scaled[head] *= gate
        kernel.assign(scaled)
        values.append(float(loss(LABELS, classifier(FEATURES, training=False))))
    kernel.assign(original)
    derivative = (values[0] - values[1]) / (2 * epsilon)
    assert abs(derivative) > 1e-8
    assert scores(classifier)[1][head] == pytest.approx(abs(derivative), rel=1e-4)


def test_plan_removes_the_least_important_heads_after_per_layer_normalisation():
    head_scores = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([100.0, 1.0, 1.0, 1.0])]
    plan = plan_pruning(head_scores, [np.arange(8.0)] * 2, heads=0.25, ffn=0.5)
    # normalised: layer 1's small heads (0.01) go before layer 0's smallest (0.18)
    assert plan.heads == [[0, 1, 2, 3], [0, 3]]
    assert plan.units == [[4, 5, 6, 7]] * 2  # the largest magnitudes
    assert plan_pruning(head_scores, [np.arange(8.0)] * 2, heads=0.99).heads == [[3], [0]]


def test_a_pruned_encoder_cannot_start_a_translator():
    encoder = Encoder(50, 2, [2, 1], 16, [32, 8], key_dim=4, max_sequence_length=8)
    config = build_config(overrides=["task=translate"])
    vocabulary = type("Vocabulary", (), {"vocabulary_size": 50, "pad_id": 0})()
    with pytest.raises(ConfigError, match="pruned encoder"):
        build_translator(config, vocabulary, vocabulary, encoder)


@pytest.mark.long_running
def test_prune_command_writes_a_smaller_run_that_recovers_evaluates_and_exports(
    classify_run, tmp_path, capsys
):
    out = tmp_path / "pruned"
    args = ["prune", str(classify_run), "--heads", "0.5", "--ffn", "0.5", "--hidden", "0.25",
            "--batches", "3", "--recover-steps", "6", "--out", str(out)]  # fmt: skip
    assert compress_main(args) == 0
    pruned = load_run(out / "pruned")
    assert pruned.info["pruned"]["heads_per_layer"] == [1, 1]  # tiny: 2 heads per layer
    assert pruned.info["pruned"]["intermediate_dim_per_layer"] == [256, 256]
    assert pruned.info["pruned"]["hidden_dim"] == 96 and pruned.model.encoder.hidden_dim == 96
    assert "its trained classifier head" in capsys.readouterr().out  # recovery kept the head
    recovered = load_run(out)
    assert recovered.model.count_params() == pruned.model.count_params()
    assert recovered.model.count_params() < load_run(classify_run).model.count_params()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["pruned"]["heads_removed"] == 2
    assert compress_main(args) == 2  # never over a finished run
    assert f"--out {out} holds a finished run" in capsys.readouterr().err
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n", encoding="utf-8")
    assert evaluate_main([str(out), "--data", str(dev)]) == 0
    assert export_main([str(out), "--name", "p", "--out", str(tmp_path / "sm")]) == 0
    served = tf.saved_model.load(str(tmp_path / "sm" / "p" / "1")).signatures["serving_default"]
    probabilities = served(texts=tf.constant(["a fine film"]))["probabilities"].numpy()
    expected = recovered.predict(["a fine film"])[0]["probabilities"]
    np.testing.assert_allclose(probabilities[0], list(expected.values()), atol=1e-5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--heads", "1.0"], "--heads is a share in [0, 1), got 1.0"),
    (["--ffn", "-0.1"], "--ffn is a share in [0, 1), got -0.1"),
    (["--hidden", "1"], "--hidden is a share in [0, 1), got 1.0"),
    (["--layers", "3"], "--layers 3: the encoder has 2 layers"),
])  # fmt: skip
def test_prune_command_says_what_is_wrong(classify_run, tmp_path, capsys, flags, message):
    assert compress_main(["prune", str(classify_run), *flags, "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_scheduled_sparsity_follows_the_cubic_schedule():
    values = [scheduled_sparsity(step, 0.8, 10, 50, 10) for step in (0, 9, 10, 19, 20, 30, 49, 50)]
    cubic = [0.8 * (1 - (1 - p) ** 3) for p in (0.25, 0.5, 0.75)]
    assert values == pytest.approx([0.0, 0.0, 0.0, 0.0, cubic[0], cubic[1], cubic[2], 0.8])
    mask = magnitude_mask(np.array([[0.1, -3.0], [2.0, -0.2]]), 0.5)
    np.testing.assert_array_equal(mask, [[0, 1], [1, 0]])


# keep_best: the better validation of this seed is step 6's, before the target
# sparsity; the kept model must be one pruned to the target.
SPARSE = {"sparsity.target": 0.6, "sparsity.every": 2, "sparsity.end_step": 8,
          "train.steps": 12, "train.checkpoint_every": 6,
          "train.keep_best": "accuracy"}  # fmt: skip


def kernel_values(model):
    return [np.asarray(kernel) for kernel in prunable_kernels(model)]


@pytest.mark.long_running
def test_magnitude_pruning_masks_stay_zero_through_training_resume_and_export(
    tmp_path, data_dir
):
    run = train_tiny_classifier("classify", "sst2.yaml", tmp_path / "sparse", **SPARSE)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.6, abs=1e-3)
    model = load_run(run).model
    kernels = kernel_values(model)
    for values in kernels:  # each kernel pruned to the target
        assert np.mean(values == 0) == pytest.approx(0.6, abs=1e-3)

    # A run killed after its step-6 backup resumes with its masks: the weights
    # pruned by then (zero in the backup) are still zero, and the target is reached.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "backup" / "step-00000012")
    (resumed / "metrics.json").unlink()
    train_tiny_classifier("classify", "sst2.yaml", resumed, **SPARSE)
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from_step"] == 6
    restore_backup(model, resumed / "backup" / "step-00000006")
    at_backup = kernel_values(model)
    assert 0.3 < np.mean([np.mean(values == 0) for values in at_backup]) < 0.6
    for final, backup in zip(kernel_values(load_run(resumed).model), at_backup, strict=True):
        assert np.all(final[backup == 0] == 0)
        assert np.mean(final == 0) == pytest.approx(0.6, abs=1e-3)

    assert export_main([str(run), "--name", "s", "--out", str(tmp_path / "sm")]) == 0
    saved = tf.train.load_checkpoint(str(tmp_path / "sm" / "s" / "1" / "variables" / "variables"))
    by_shape = {}
    for name, shape in saved.get_variable_to_shape_map().items():
        by_shape.setdefault(tuple(shape), []).append(saved.get_tensor(name))
    for values in kernels:  # every pruned kernel is in the SavedModel with its zeros
        assert any(np.array_equal(values, saved) for saved in by_shape[values.shape])


def test_sparsity_keys_are_checked():
    with pytest.raises(ConfigError, match=r"sparsity.target is a share in \[0, 1\), got 1.5"):
        build_config(overrides=["sparsity.target=1.5"])
    with pytest.raises(ConfigError, match="LoRA freezes them"):
        build_config(overrides=["task=classify", "sparsity.target=0.5", "finetune.method=lora"])
    with pytest.raises(ConfigError, match="sparsity.end_step=50"):
        build_config(overrides=["sparsity.target=0.5", "sparsity.end_step=50", "train.steps=40"])


def test_a_classify_run_continues_from_a_finished_run_with_its_head(classify_run, tmp_path):
    settings = {"model.init": str(classify_run), "train.steps": 1, "train.learning_rate": 1e-9}
    run = train_tiny_classifier("classify", "sst2.yaml", tmp_path / "more", **settings)
    before, after = load_run(classify_run).model, load_run(run).model
    np.testing.assert_allclose(after.get_layer("logits").kernel, before.get_layer("logits").kernel,
                               atol=1e-6)  # fmt: skip


@pytest.mark.long_running  # ~30 s: trains a run, then the tool exports and times two
def test_the_compression_table_measures_a_bfloat16_trained_run_in_float32(tmp_path, data_dir):
    # A run trained in mixed_bfloat16 loads computing in bfloat16, which the
    # TFLite converter rejects ("'tf.AddV2' op is neither a custom op nor a flex
    # op"); the table exports it in float32, as `fmkeras.export` does.
    run = train_tiny_classifier("classify", "sst2.yaml", tmp_path / "bf16",
                                **{"train.precision": "mixed_bfloat16"})  # fmt: skip
    dev = tmp_path / "dev.tsv"
    lines = (data_dir / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    dev.write_text("\n".join(lines[:41]) + "\n", encoding="utf-8")
    result = run_tool("compare_exports", run, run, "--dev", dev, "--variants",
                      "float32,tflite-dynamic,tflite-float32-fixed", "--single-calls", 2,
                      "--rounds", 2, "--markdown", tmp_path / "table.md")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["examples"] == 40
    ceilings = report["matmul_gops"]  # what the float32 and Keras int8 kernels multiply at
    assert set(ceilings) == {"float32", "int8"} and min(ceilings.values()) > 0
    # The run again as another run: its own exports, the reference's predictions.
    variants = [row["variant"] for row in report["variants"]]
    assert variants == ["float32", "tflite-dynamic", "tflite-float32-fixed", "float32"]
    assert report["variants"][3]["differing_from_reference"] == 0
    # Fixed shapes (batches of 1 and 32; the last 8 rows padded to 32): the float model's answers.
    assert report["variants"][2]["differing_from_reference"] == 0
    for row in report["variants"]:  # timed in two interleaved rounds, the best one reported
        assert len(row["ms_batch_1_rounds"]) == len(row["ms_batch_32_rounds"]) == 2
        assert row["ms_batch_1"] == min(row["ms_batch_1_rounds"]) > 0
    # Speed-ups are like for like: against the reference's same variant.
    reference = {row["variant"]: row for row in report["variants"][:3]}
    for row in report["variants"]:
        same = reference[row["variant"]]
        assert row["speedup_batch_1"] == round(same["ms_batch_1"] / row["ms_batch_1"], 2)
        assert row["speedup_batch_32"] == round(same["ms_batch_32"] / row["ms_batch_32"], 2)
    assert report["variants"][0]["speedup_batch_1"] == 1.0
    table = (tmp_path / "table.md").read_text(encoding="utf-8").splitlines()
    first = report["variants"][0]
    assert table[2].endswith(f"| {first['ms_batch_1']} ms (1.0×) | "
                             f"{first['ms_batch_32']} ms (1.0×) |")  # fmt: skip
    # Best against best: each run's fastest variant at batch 1 against the reference's fastest.
    fastest = min(report["variants"][:3], key=lambda row: row["ms_batch_1"])
    other = report["variants"][3]
    assert report["best_against_best"] == [
        {"run": str(run), "variant": fastest["variant"], "accuracy": fastest["accuracy"],
         "ms_batch_1": fastest["ms_batch_1"], "speedup_batch_1": 1.0},
        {"run": str(run), "variant": "float32", "accuracy": other["accuracy"],
         "ms_batch_1": other["ms_batch_1"],
         "speedup_batch_1": round(fastest["ms_batch_1"] / other["ms_batch_1"], 2)},
    ]  # fmt: skip
    assert table[-1].startswith("Best against best at batch 1")


def test_the_compression_table_refuses_zero_timing_rounds(tmp_path):
    result = run_tool("compare_exports", tmp_path, "--dev", "dev.tsv", "--variants", "float32",
                      "--rounds", 0)  # fmt: skip
    assert result.returncode == 2
    assert "--rounds and --single-calls must be 1 or more, got 0 and 200" in result.stderr
