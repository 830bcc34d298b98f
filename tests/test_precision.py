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
from fmkeras.training.precision import in_dtype_policy, resolve_precision


def profile_summary(path):
    return run_tool("profile_summary", path)


def test_auto_precision_follows_the_hardware():
    strategy = tf.distribute.get_strategy()
    assert resolve_precision("mixed_float16", strategy)[0] == "mixed_float16"
    policy, reason = resolve_precision("auto", strategy, cpu_flags=["avx512_bf16"])
    assert policy == "mixed_bfloat16" and "avx512_bf16" in reason
    policy, reason = resolve_precision("auto", strategy, cpu_flags=[])
    assert policy == "float32" and "no bfloat16 matrix path" in reason


def test_a_bfloat16_run_trains_resumes_reloads_and_exports_float32(tmp_path, small_vocab, capsys):
    settings = {"train.precision": "mixed_bfloat16", "train.checkpoint_every": 10,
                "train.eval_every": 10, "train.log_every": 5,
                "train.profile_steps": "12,14"}  # fmt: skip
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
    assert "| matmul |" in summary.stdout and "_MklMatMul" in summary.stdout
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
