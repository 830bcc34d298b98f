"""The causal LM: model and cache, sampling, and the task end to end (train,
generate, evaluate, export)."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from conftest import built_once
from model_checks import run_model_checks
from run_helpers import (
    REPO,
    built_task,
    request_json,
    scalars,
    serve_in_fresh_process,
    train_args,
)

from fmkeras.config import GenerateConfig
from fmkeras.decoding import filter_logits, sample, sample_search
from fmkeras.evaluate import main as evaluate_main
from fmkeras.export import main as export_main
from fmkeras.generate import main as generate_main
from fmkeras.models import CausalLM
from fmkeras.serve import create_server
from fmkeras.tasks import load_run
from fmkeras.train import main as train_main

RECIPE = REPO / "trainers" / "causal_lm_gutenberg.yaml"


@pytest.fixture(scope="module")
def model():
    return CausalLM(50, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
                    max_sequence_length=24)  # fmt: skip


def test_causal_lm_passes_the_model_checks(model, tmp_path):
    ids = np.random.default_rng(0).integers(1, 50, (2, 7)).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    run_model_checks(model, inputs, tmp_path)


def test_use_bias_false_drops_the_projection_biases_and_reloads(tmp_path):
    lm = CausalLM(50, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
                  max_sequence_length=24, use_bias=False)  # fmt: skip
    blocks = [w.path for w in lm.weights if w.path.startswith("transformer_layer_")]
    assert blocks and not [path for path in blocks if path.endswith("bias")]
    ids = np.random.default_rng(0).integers(1, 50, (2, 7)).astype("int32")
    run_model_checks(lm, {"token_ids": ids, "padding_mask": np.ones_like(ids)}, tmp_path)


def test_logits_depend_only_on_earlier_tokens(model):
    ids = np.random.default_rng(1).integers(1, 50, (1, 8)).astype("int32")
    changed = ids.copy()
    changed[0, 5] = (ids[0, 5] + 1) % 50
    a, b = (np.asarray(model({"token_ids": x, "padding_mask": np.ones_like(x)}))
            for x in (ids, changed))  # fmt: skip
    np.testing.assert_allclose(a[0, :5], b[0, :5], atol=1e-6)
    assert not np.allclose(a[0, 5:], b[0, 5:])


def test_prefill_then_cached_steps_equal_the_full_forward_pass(model):
    ids = np.random.default_rng(2).integers(1, 50, (2, 10)).astype("int32")
    full = np.asarray(model({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    cache = model.initial_cache(2, 12)
    logits, cache = model.call_with_cache(ids[:, :4], 0, cache)
    steps = [np.asarray(logits)]
    for index in range(4, 10):
        logits, cache = model.decode_step(ids[:, index : index + 1], index, cache)
        steps.append(np.asarray(logits)[:, None])
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    logits = tf.constant([[3.0, 2.0, 1.0, 0.0, -1.0]])  # probabilities .64 .23 .09 .03 .01
    kept = lambda **kw: (filter_logits(logits, **kw).numpy()[0] > -1e8).tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False, False]
    assert kept(top_p=0.8) == [True, True, False, False, False]  # .64 < .8 <= .87
    assert kept(top_p=0.9) == [True, True, True, False, False]
    assert kept(top_k=1, top_p=0.9) == [True, False, False, False, False]
    assert kept(top_p=0.01) == [True, False, False, False, False]  # the best always stays
    assert kept() == [True] * 5
    # Top-p applies within the renormalized top-k (Hugging Face's order): .73 .27 here.
    assert kept(top_k=2, top_p=0.7) == [True, False, False, False, False]
    graph = tf.function(filter_logits)  # settings as tensors, as the export feeds them
    found = graph(logits, tf.constant(2), tf.constant(0.8)).numpy()[0] > -1e8
    assert found.tolist() == [True, True, False, False, False]


def test_sampling_follows_the_distribution_and_the_seed():
    """Rows of one call draw independently: 3,000 copies of a row are 3,000 draws."""
    logits = tf.constant([[2.0, 1.0, 0.0, -1.0]])
    rows = tf.tile(logits, [3000, 1])
    draws = sample(rows, 7, temperature=1.0, seed=5).numpy()
    frequencies = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(frequencies, tf.nn.softmax(logits)[0], atol=0.03)
    cold = sample(rows[:500], 7, temperature=0.25, seed=5).numpy()
    assert np.mean(cold == 0) > 0.95  # a low temperature sharpens
    assert sample(rows[:5], 7, temperature=0.0).numpy().tolist() == [0] * 5  # greedy
    assert sample(rows, 7, temperature=1.0, seed=5).numpy().tolist() == draws.tolist()
    for other in ({"index": 8, "seed": 5}, {"index": 7, "seed": 6}):  # either moves the noise
        assert np.mean(sample(rows, temperature=1.0, **other).numpy() != draws) > 0.3
    one_row = [int(sample(logits, index, seed=5)[0]) for index in range(40)]  # a generation's draws
    assert len(set(one_row)) > 1
    top_two = sample(rows[:2000], 7, temperature=1.0, top_k=2, seed=5).numpy()
    frequencies = np.bincount(top_two, minlength=4) / len(top_two)
    np.testing.assert_allclose(frequencies, [np.e / (np.e + 1), 1 / (np.e + 1), 0, 0], atol=0.03)


def test_batched_prompts_of_different_lengths_generate_as_alone(model):
    """Right padding, the full-width prefill and per-row stopping: each row of a
    batch gets the greedy continuation it gets on its own."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 50, length).astype("int32") for length in (3, 6, 1)]
    choose = lambda logits, index: sample(logits, index, temperature=0.0)  # noqa: E731

    def generate(rows, new=5, total=14):
        width = max(len(row) for row in rows)
        ids = np.zeros((len(rows), width), "int32")
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        tokens = np.pad(ids, [[0, 0], [0, total - width]])
        lengths = np.array([len(row) for row in rows], "int32")
        cache = model.initial_cache(len(rows), total)
        logits, cache = model.call_with_cache(ids, 0, cache)
        start = int(lengths.min())
        found, ends = sample_search(model.decode_step, cache, logits[:, start - 1], tokens,
                                    lengths, start, new, end_id=-1, choose=choose)  # fmt: skip
        return [np.asarray(row)[:end].tolist() for row, end in zip(found, ends, strict=True)]

    together = generate(prompts)
    for prompt, row in zip(prompts, together, strict=True):
        assert row[: len(prompt)] == prompt.tolist() and len(row) == len(prompt) + 5
        assert generate([prompt]) == [row]


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, data_dir, small_vocab):
    settings = {"model.size": "tiny", "data.max_lines": 1500, "data.vocab_file": small_vocab,
                "data.sequence_length": 64,
                "train.steps": 40, "train.batch_size": 16, "train.learning_rate": 3e-3,
                "train.log_every": 10, "train.eval_every": 20, "train.checkpoint_every": 20,
                "train.eval_steps": 4, "train.steps_per_execution": 1,
                "train.keep_best": "perplexity", "generate.max_new_tokens": 8}  # fmt: skip

    def build(directory):
        assert train_main(train_args("causal_lm", RECIPE, settings, directory / "run")) == 0

    return built_once(tmp_path_factory, "causal", build) / "run"


def test_causal_lm_trains_and_reports_perplexity_and_samples(causal_run):
    losses = [value for _, value in scalars(causal_run / "logs" / "train", "loss")]
    assert losses[-1] < losses[0] - 1.0, losses
    metrics = json.loads((causal_run / "metrics.json").read_text())
    assert metrics["task"] == "causal_lm" and metrics["perplexity"] == pytest.approx(
        np.exp(metrics["loss"]), rel=1e-6)  # fmt: skip
    assert metrics["perplexity"] < 1000 and metrics["tokens_per_second"] > 0
    assert metrics["sample"].count("→") == 3  # the three default prompts
    curve = scalars(causal_run / "logs" / "validation", "perplexity")
    assert [step for step, _ in curve] == [20, 40]
    best_step, best = min(curve, key=lambda point: point[1])  # keep_best: perplexity
    assert metrics["best_step"] == best_step
    assert metrics["perplexity"] == pytest.approx(best, rel=1e-5)


def test_empty_prompts_validate_without_samples(tmp_path, small_vocab, data_dir):
    settings = {"model.size": "tiny", "data.max_lines": 200, "data.vocab_file": small_vocab,
                "data.sequence_length": 32, "train.batch_size": 4, "train.eval_steps": 2,
                "generate.prompts": ""}  # fmt: skip
    task, model = built_task(RECIPE, settings, tmp_path / "run")
    assert task.config.generate.prompts is None  # `--set generate.prompts=`
    model.compile(**task.compile_args(model))
    found = task.evaluate(model)
    assert found["samples"] == "" and found["perplexity"] > 1


def test_generate_command_samples_reproducibly(causal_run, capsys):
    prompts = ["It was a dark and stormy night", "The old man"]

    def generate(*flags):
        assert generate_main([str(causal_run), *prompts, "--json", *flags]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    first, again = generate("--seed", "1"), generate("--seed", "1")
    assert first == again and [r["prompt"] for r in first] == prompts
    assert first[0]["text"].startswith("it was a dark and stormy night")  # lower-cased run
    greedy = generate("--temperature", "0", "--max-new-tokens", "6")
    assert greedy == generate("--temperature", "0", "--max-new-tokens", "6", "--seed", "9")
    assert all(len(r["continuation"].split()) <= 6 for r in greedy)
    assert generate_main([str(causal_run), "x", "--top-p", "0"]) == 2
    assert "top_p=0.0 must be in (0, 1]" in capsys.readouterr().err


def test_held_out_perplexity_through_evaluate(causal_run, data_dir, tmp_path, capsys):
    lines = (data_dir / "gutenberg_en" / "valid.txt").read_text().splitlines()[:200]
    (tmp_path / "held_out.txt").write_text("\n".join(lines))
    assert evaluate_main([str(causal_run), "--data", str(tmp_path / "held_out.txt")]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["perplexity"] == pytest.approx(np.exp(found["loss"]), rel=1e-3)  # rounded
    assert 1 < found["perplexity"] < 1000


@pytest.mark.long_running
def test_export_generates_the_same_text_without_tensorflow_text(causal_run, tmp_path):
    assert export_main([str(causal_run), "--name", "lm", "--out", str(tmp_path / "sm")]) == 0
    prompts = ["It was a dark and stormy night", "The"]
    settings = {"max_new_tokens": 6, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
    served = serve_in_fresh_process(tmp_path / "sm" / "lm" / "1", {"texts": prompts, **settings})
    greedy = GenerateConfig(max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0)
    expected = load_run(causal_run, generate=greedy).predict(prompts)
    assert served["text"] == [r["text"] for r in expected]
    assert served["continuation"] == [r["continuation"] for r in expected]

    # The local server: settings in the columnar form; requests batch only with equal settings.
    server, _ = create_server(tmp_path / "sm" / "lm", port=0, max_batch=8, batch_wait_ms=50)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/models/lm:predict"

    def post(body):
        return request_json(url, body)

    try:
        status, body = post({"inputs": {"texts": prompts, **settings}})
        assert status == 200 and body["outputs"]["text"] == served["text"]
        shorter = {**settings, "max_new_tokens": 2}
        with ThreadPoolExecutor(4) as pool:  # different settings arrive together
            found = list(pool.map(post, [{"inputs": {"texts": prompts[:1], **s}}
                                         for s in (settings, shorter) * 2]))  # fmt: skip
        lengths = [body["outputs"]["lengths"][0] for _, body in found]
        assert lengths[0] == lengths[2] == served["lengths"][0]
        assert lengths[1] == lengths[3] < lengths[0]  # two new tokens, not six
        status, body = post({"instances": prompts})
        assert status == 400 and "missing the scalar settings max_new_tokens, seed, " \
            "temperature, top_k, top_p" in body["error"]  # fmt: skip
        status, body = post({"inputs": {"texts": prompts, **settings, "top_k": 1.5}})
        assert status == 400 and "expected a int32 for input 'top_k'" in body["error"]
    finally:
        server.shutdown()
