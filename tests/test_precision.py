"""`train.precision`: the policy `auto` picks, and a bfloat16 run that trains,
resumes exactly, reloads with float32 variables and exports float32 outputs
(and writes the TensorBoard profile that `train.profile_steps` asks for, which
`tools/profile_summary.py` breaks down), and the cached matmul peak MFU is
measured against."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from run_helpers import run_tool, scalars, tiny_args

import fmkeras
from fmkeras.export import main as export_main
from fmkeras.tasks import load_run
from fmkeras.train import main
from fmkeras.training.precision import (
    cpu_bf16_flags,
    cpu_kind,
    in_dtype_policy,
    resolve_precision,
)


def profile_summary(path):
    return run_tool("profile_summary", path)


def test_auto_precision_follows_the_hardware():
    strategy = tf.distribute.get_strategy()
    assert resolve_precision("mixed_float16", strategy)[0] == "mixed_float16"
    policy, reason = resolve_precision("auto", strategy, flags=["avx512_bf16", "avx2"])
    assert policy == "mixed_bfloat16" and "avx512_bf16" in reason
    policy, reason = resolve_precision("auto", strategy, flags=["avx2"])
    assert policy == "float32" and "no bfloat16 matrix path" in reason


def test_auto_xla_follows_the_measurements_of_each_kind_of_cpu(monkeypatch):
    from fmkeras.training import trainer

    strategy = tf.distribute.get_strategy()
    monkeypatch.setattr(trainer.tf.config, "list_logical_devices", lambda kind=None: [])
    cpus = {  # /proc/cpuinfo flags of each kind (a Sapphire Rapids, a Zen 4, a Zen 3)
        "amx_bf16": ["avx2", "avx512f", "avx512_bf16", "amx_bf16"],
        "avx512_bf16": ["avx2", "avx512f", "avx512_bf16"],
        "avx2": ["sse4_2", "avx2"],
        "other": ["sse4_2"],
    }
    decided = {(kind, dtype): trainer.resolve_jit_compile("auto", strategy, dtype, flags)
               for kind, flags in cpus.items() for dtype in ("float32", "bfloat16")}  # fmt: skip
    # Without AMX, XLA's fusions win the bfloat16 step; with it, oneDNN's graph-mode kernels.
    assert decided["avx512_bf16", "bfloat16"] == (
        True, "auto: on for bfloat16 on a CPU avx512_bf16, as measured")  # fmt: skip
    assert decided["amx_bf16", "bfloat16"][0] is False
    assert decided["avx2", "bfloat16"] == (  # emulated bfloat16: graph mode ahead, measured
        False, "auto: off for bfloat16 on a CPU avx2, as measured")  # fmt: skip
    assert not any(decided[kind, "float32"][0] for kind in ("amx_bf16", "avx512_bf16", "avx2"))
    assert decided["other", "float32"] == (
        False, "auto: off for float32 on a CPU other (not measured there; "
        "train.jit_compile=true tries it)")  # fmt: skip
    assert trainer.resolve_jit_compile("true", strategy) == (True, "set by train.jit_compile")


def test_a_bfloat16_run_trains_resumes_reloads_and_exports_float32(tmp_path, small_vocab, capsys):
    settings = {"train.precision": "mixed_bfloat16", "train.checkpoint_every": 10,
                "train.eval_every": 10, "train.log_every": 5,
                "train.profile_steps": "12,14",
                # Graph mode on every host (auto turns XLA on for bfloat16 on AVX512-BF16
                # CPUs without AMX, and one XLA cluster hides the kernels checked below).
                "train.jit_compile": "false"}  # fmt: skip
    run = tmp_path / "bf16"
    args = tiny_args(small_vocab, steps=20, **settings) + ["--out", str(run)]
    assert main(args) == 0
    assert "precision mixed_bfloat16: set by train.precision" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["precision"] == "mixed_bfloat16"
    assert list((run / "logs" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    summary = profile_summary(run / "logs" / "profile")
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert "2 step(s)" in summary.stdout  # 12,14 from the run's config
    # oneDNN runs bfloat16 matmuls only where the CPU has a bf16 matrix path (AMX or
    # AVX512-BF16); elsewhere (an AVX2-only CPU) they are TensorFlow's Eigen `MatMul`.
    matmul_kernel = "_MklMatMul" if cpu_bf16_flags() else "| MatMul |"
    assert "| matmul |" in summary.stdout and matmul_kernel in summary.stdout
    assert "| XLA clusters (fmkeras.fused" in summary.stdout  # the driver's fit fuses
    assert "transformer_layer/feedforward_intermediate_dense (backward)" in summary.stdout
    (tmp_path / "empty").mkdir()
    missing = profile_summary(tmp_path / "empty")
    assert missing.returncode != 0 and "no *.xplane.pb under" in missing.stderr
    losses = [value for _, value in scalars(run / "logs" / "train", "loss")]
    assert losses[-1] < losses[0]
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run

    # Exact resume: drop the final backup and model, run the same command again.
    shutil.rmtree(run / "backup" / "step-00000020")
    (run / "metrics.json").unlink()
    assert main(args) == 0
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == 10
    assert resumed["valid_loss"] == pytest.approx(metrics["valid_loss"], abs=1e-3)

    model = fmkeras.load_model(run / "model.keras")
    assert {variable.dtype for variable in model.weights} == {"float32"}
    assert model.encoder.dtype_policy.name == "mixed_bfloat16"  # it computes as it trained
    exported = load_run(run, precision="float32").model  # what the default export serves
    assert exported.encoder.dtype_policy.name == "float32"
    assert in_dtype_policy(exported, "float32") is exported  # nothing to rebuild
    assert export_main([str(run), "--name", "mlm", "--out", str(tmp_path / "sm")]) == 0
    loaded = tf.saved_model.load(str(tmp_path / "sm" / "mlm" / "1"))
    outputs = loaded.signatures["serving_default"](texts=tf.constant(["the [MASK] of it"]))
    assert outputs["probabilities"].dtype == tf.float32
    assert np.all(np.isfinite(outputs["probabilities"].numpy()))


def test_the_peak_is_cached_only_when_calibrated_on_an_idle_machine(tmp_path, monkeypatch):
    from fmkeras.training import throughput

    cache = tmp_path / "peaks.json"
    monkeypatch.setattr(throughput, "measure_matmul_gflops", lambda **kwargs: 100.0)
    monkeypatch.setattr(throughput, "load_average", lambda: 4.0 * (os.cpu_count() or 1))
    gflops, origin = throughput.peak_gflops("bfloat16", cache=cache, rounds=1)
    assert gflops == 100.0 and "not cached: the load average was" in origin
    assert not cache.exists()
    probed = []  # idle before the probe, loaded by the probe's own threads afterwards
    monkeypatch.setattr(throughput, "measure_matmul_gflops",
                        lambda **kwargs: probed.append(1) or 100.0)  # fmt: skip
    monkeypatch.setattr(throughput, "load_average", lambda: 100.0 if probed else 0.0)
    assert "calibrated now, cached" in throughput.peak_gflops("bfloat16", cache=cache, rounds=1)[1]
    monkeypatch.setattr(throughput, "measure_matmul_gflops", lambda **kwargs: 1.0)
    assert throughput.peak_gflops("bfloat16", cache=cache, rounds=1)[0] == 100.0  # from the cache
    # One model name covers CPUs with and without a bf16 matrix path ("AMD EPYC"): the
    # cache keeps their peaks apart.
    assert f"({cpu_kind()}) x" in throughput.device_name()
    other = "avx2" if cpu_kind() != "avx2" else "avx512_bf16"
    monkeypatch.setattr(throughput, "cpu_kind", lambda: other)
    gflops, origin = throughput.peak_gflops("bfloat16", cache=cache, rounds=1)
    assert gflops == 1.0 and origin.startswith("calibrated now")


@pytest.mark.slow  # ~1 min: a ceiling probe and one training process, each importing TF
def test_the_training_benchmark_names_the_machine_and_uses_the_mfu_definition(tmp_path):
    report_path = tmp_path / "bench.json"
    result = run_tool("bench_train", "--sizes", "tiny", "--impls", "fmkeras", "--xla", "off",
                      "--precisions", "float32", "--repeats", 1, "--steps", 2, "--warmup", 1,
                      "--json", report_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert f"({cpu_kind()}) x" in report["machine"]
    assert f"machine: {report['machine']}" in result.stdout
    [run] = report["runs"]
    assert (run["impl"], run["size"], run["precision"], run["xla"]) == (
        "fmkeras", "tiny", "float32", False)  # fmt: skip
    assert run["tokens_per_s"] == pytest.approx(32 * 128 / (run["step_ms"] / 1000))
    ceilings = report["ceilings_gflops"]
    peak = max(ceilings["float32 graph"], ceilings["float32 XLA"])  # of the precision in use
    assert run["mfu"] == pytest.approx(run["gflop_per_s"] / peak)
    assert "tiny   fmkeras" in result.stdout and "fmkeras / fmkeras: 1.00x" in result.stdout
