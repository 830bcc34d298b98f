"""The benchmarks in tools/ at their smallest: each runs end to end and reports
what its docstring promises (the numbers are the hosts', only their form and
consistency are checked). Slow: each starts TensorFlow processes of its own.
`tools/bench_train.py` is checked in test_precision.py, `compare_exports.py`
in test_compress.py, `compare_federated.py` in test_federated.py."""

import json
import re

import pytest
from run_helpers import run_tool

from fmkeras.export import main as export_main

pytestmark = pytest.mark.slow


def test_the_input_benchmark_sets_the_stream_against_the_model(tmp_path, small_vocab):
    report = tmp_path / "input.json"
    result = run_tool("bench_input", "--size", "tiny", "--batch-size", 8, "--sequence-length", 32,
                      "--vocab", small_vocab, "--batches", 20, "--model-steps", 3,
                      "--json", report)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(report.read_text())
    rates = ("pack_tokens_per_second", "stream_tokens_per_second", "model_tokens_per_second")
    assert all(found[rate] > 0 for rate in rates)
    ratio = found["stream_tokens_per_second"] / found["model_tokens_per_second"]
    assert found["input_over_model"] == pytest.approx(ratio)
    assert f"input / model = {ratio:.0f}x" in result.stdout


def test_the_causal_lm_benchmark_sets_best_against_best(tmp_path):
    report = tmp_path / "causal.json"
    result = run_tool("bench_causal_lm", "--size", "tiny", "--precisions", "float32",
                      "--xla", "off", "--samplers", "greedy", "--repeats", 1, "--steps", 2,
                      "--json", report)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads(report.read_text())
    assert sorted((r["mode"], r["impl"]) for r in records) == [
        ("generate", "fmkeras"), ("generate", "keras-hub"),
        ("train", "fmkeras"), ("train", "keras-hub")]  # fmt: skip
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in records), records
    for line in ("train -", "generate greedy"):
        assert re.search(rf"{line}: fmkeras [\d,]+ tokens/s \(float32, XLA off\) vs keras-hub "
                         r"[\d,]+ \(float32, XLA off\): \d+\.\d\dx", result.stdout), result.stdout


def test_the_serving_benchmark_answers_every_request(tmp_path, classify_run):
    assert export_main([str(classify_run), "--name", "sst2", "--out", str(tmp_path)]) == 0
    result = run_tool("bench_serve", tmp_path / "sst2", "--requests", 30, "--clients", 3,
                      "--sample-every", 1)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["requests"], report["failed"], report["failures"]) == (30, 0, {})
    assert 0 < report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert report["requests_per_second"] > 0 and report["rss_mb"][0][1] > 100  # TensorFlow


def test_the_strategies_benchmark_compares_each_setup_with_one_device(small_vocab, data_dir):
    untimed = run_tool("bench_strategies", "--steps", 10)  # one compiled call, none timed
    assert untimed.returncode == 2 and "--steps must be at least 20" in untimed.stderr
    result = run_tool("bench_strategies", "--steps", 20, "--max-lines", 400, "--xla", "off",
                      "--setups", "mirrored", "one", "--set", "model.size=tiny",
                      "--set", "data.sequence_length=32", "--set", "train.batch_size=8",
                      "--set", f"data.vocab_file={small_vocab}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    runs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(run["setup"], run["xla"]) for run in runs] == [("mirrored", "off"), ("one", "off")]
    rates = {run["setup"]: run["tokens_per_second"] for run in runs}
    table = result.stdout.split("| setup")[1]
    assert "vs one device, XLA off |" in table  # the baseline, though it ran second
    assert re.search(r"\| mirrored, 2 logical CPUs \| off \| 2 \| [\d,]+ \| \d+ ms \| "
                     rf"{rates['mirrored'] / rates['one']:.2f}× \|", table), table
    assert re.search(r"\| one device \| off \| 1 \| [\d,]+ \| \d+ ms \| 1\.00× \|", table), table


def test_the_corpus_benchmark_streams_growing_corpora_against_the_model(tmp_path, small_vocab,
                                                                        data_dir):  # fmt: skip
    report = tmp_path / "corpus.json"
    result = run_tool("bench_corpus", "--scratch", tmp_path / "corpora", "--copies", 1, 2,
                      "--batches", 10, "--vocab", small_vocab, "--model-size", "tiny",
                      "--json", report)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(report.read_text())
    one, two = found["corpora"]
    assert (one["shards"], two["shards"]) == (1, 2) and two["bytes"] == 2 * one["bytes"]
    assert two["rows"] == 2 * one["rows"] > 0  # every shard counted, as a resume does
    assert min(one["input_tokens_per_s"], two["resumed_tokens_per_s"]) > 0
    assert found["model_config"][0] == "tiny" and found["model_tokens_per_s"] > 0
    assert "trains" in result.stdout and "peak RSS" in result.stdout


def test_the_scaling_sweep_fits_a_power_law_over_its_sizes(tmp_path, small_vocab, data_dir):
    result = run_tool("scaling", "--mode", "tiny", "--steps", 10, "--max-lines", 1000,
                      "--vocab", small_vocab, "--out", tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["name"] for row in rows] == ["L1-H32", "L1-H64", "L2-H64", "L2-H96", "L2-H128"]
    sizes = [row["non_embedding_params"] for row in rows]
    assert sizes == sorted(sizes) and len(set(sizes)) == 5
    assert {row["tokens"] for row in rows} == {10 * 32 * 64}  # one budget: steps x batch x length
    out = tmp_path / "tiny"
    assert len((out / "scaling.csv").read_text().splitlines()) == 1 + len(rows)
    fits = json.loads((out / "scaling_fit.json").read_text())["fits"]
    assert set(fits) == {"L(N)", "L(C)"} and all("alpha" in fit for fit in fits.values())
    assert (out / "scaling.png").stat().st_size > 0
    assert re.search(r"L\(N\): E=[\d.]+±\S+, alpha=[\d.]+±", result.stdout), result.stdout
    for flag, value, message in (("--steps", 0, "--steps must be at least 5, got 0"),
                                 ("--max-lines", 0, "--max-lines must be positive, got 0")):
        refused = run_tool("scaling", flag, value, "--out", tmp_path / "refused")
        assert refused.returncode == 2 and message in refused.stderr
    assert not (tmp_path / "refused").exists()
