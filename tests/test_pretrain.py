"""End-to-end pretraining: files, curves, errors, NaN, resume after SIGKILL."""

import json
import math
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from run_helpers import REPO, run_cli, scalars, tiny_args

import fmkeras
from fmkeras.evaluate import main as evaluate_main
from fmkeras.export import main as export_main
from fmkeras.predict import main as predict_main
from fmkeras.text.wordpiece import read_vocabulary
from fmkeras.train import main

pytestmark = pytest.mark.usefixtures("data_dir")  # every test here reads the datasets


def test_pretraining_writes_a_complete_run(tmp_path, small_vocab, capsys):
    run = tmp_path / "run"
    # 50 steps, backups every 20 and 4 steps per call: the last epoch (10 steps) runs 2 per call.
    args = tiny_args(small_vocab, steps=50, **{"train.steps_per_execution": 4})
    args += ["--out", str(run)]
    assert main(args) == 0
    for name in ("config.yaml", "vocab.txt", "model.keras", "encoder.keras", "metrics.json",
                 "task.json"):  # fmt: skip
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "backup").iterdir()) == ["step-00000040", "step-00000050"]
    assert "backups every 20 steps and at the final step 50" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 50 and metrics["tokens_per_second"] > 0 and 0 < metrics["mfu"]
    assert metrics["train_tokens"] == 50 * 16 * 128 and metrics["non_embedding_parameters"] > 0
    assert metrics["valid_perplexity"] == pytest.approx(math.exp(metrics["valid_loss"]))
    assert metrics["valid_loss"] < math.log(2000) - 1.0  # well below a uniform guess

    train_tags = ("loss", "accuracy", "perplexity", "learning_rate", "tokens_per_second", "mfu")
    for tag in train_tags:
        assert scalars(run / "logs" / "train", tag), f"no train/{tag} in TensorBoard"
    validation = scalars(run / "logs" / "validation", "loss")
    assert [step for step, _ in validation] == [20, 40, 50]
    assert validation[-1][1] < validation[0][1]  # the loss goes down
    learning_rates = [v for _, v in scalars(run / "logs" / "train", "learning_rate")]
    assert max(learning_rates) <= 1e-3 + 1e-9

    model = fmkeras.load_model(run / "model.keras")
    assert int(model.optimizer.iterations.numpy()) == 50
    ids = np.array([[2, 10, 4, 30, 3]], "int32")
    logits = model.predict(
        {
            "token_ids": ids,
            "segment_ids": 0 * ids,
            "padding_mask": 1 + 0 * ids,
            "mask_positions": np.array([[2]], "int32"),
        },
        verbose=0,
    )
    assert logits.shape == (1, 1, len(read_vocabulary(small_vocab)))

    # The same command on a finished run trains no more and reports the same result.
    assert main(args) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["resumed_from_step"] == 50
    assert again["valid_loss"] == pytest.approx(metrics["valid_loss"], abs=1e-6)


def test_config_and_data_errors_are_one_line(tmp_path, small_vocab, capsys):
    assert main(["--set", "train.stpes=3", "--out", str(tmp_path / "a")]) == 2
    assert "unknown key 'train.stpes'" in capsys.readouterr().err
    assert (
        main(tiny_args(small_vocab) + ["--data-dir", str(tmp_path), "--out", str(tmp_path / "b")])
        == 2
    )
    err = capsys.readouterr().err
    assert "gutenberg_en/train.txt" in err and str(tmp_path) in err and "Traceback" not in err
    assert main(["--recipe", "no_such_recipe"]) == 2
    assert "not found" in capsys.readouterr().err


def test_nan_loss_stops_with_a_clear_message(tmp_path, small_vocab, capsys):
    args = tiny_args(small_vocab, **{"train.learning_rate": 1e30, "train.warmup_steps": 0})
    assert main(args + ["--out", str(tmp_path / "nan")]) == 2
    err = capsys.readouterr().err
    assert "loss became NaN or infinite at step" in err and "train.learning_rate" in err
    assert not (tmp_path / "nan" / "model.keras").exists()


def test_changed_config_does_not_resume_silently(tmp_path, small_vocab, capsys):
    run = str(tmp_path / "run")
    assert main(tiny_args(small_vocab, steps=20) + ["--out", run]) == 0
    assert main(tiny_args(small_vocab, steps=20, **{"model.size": "mini"}) + ["--out", run]) == 2
    assert "model.size: 'tiny' -> 'mini'" in capsys.readouterr().err
    # A run made before keys were added (here: finetune.*, data.text_column) still resumes.
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["finetune"], saved["data"]["text_column"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(tiny_args(small_vocab, steps=20) + ["--out", run]) == 0


def test_killed_run_resumes_from_its_last_backup(tmp_path, small_vocab):
    run = tmp_path / "run"
    args = tiny_args(small_vocab, steps=100, **{"train.eval_every": 100}) + ["--out", str(run)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fmkeras.train", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (run / "backup" / "step-00000020").is_dir():
        assert process.poll() is None, "the run ended before its first backup"
        assert time.time() < deadline, "no backup within 300 s"
        time.sleep(0.05)
    process.kill()  # SIGKILL: no chance to clean up
    process.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it was killed"

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 100 and 20 <= metrics["resumed_from_step"] < 100
    model = fmkeras.load_model(run / "model.keras")
    assert int(model.optimizer.iterations.numpy()) == 100
    assert not list((run / "backup").glob(".partial-*"))

    # Same data, masks, weights and optimizer state: the result matches a run never killed.
    uninterrupted = run_cli(args[:-1] + [str(tmp_path / "uninterrupted")])
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    reference = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())
    assert metrics["valid_loss"] == pytest.approx(reference["valid_loss"], abs=1e-4)


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    result = run_cli(["--out", str(tmp_path / "quickstart")])
    assert result.returncode == 0, result.stderr
    root = tmp_path / "quickstart"
    pretrained = json.loads((root / "pretrain" / "metrics.json").read_text())
    assert pretrained["steps"] == 300 and pretrained["valid_loss"] < math.log(8000) - 1.5
    classified = json.loads((root / "sst2" / "metrics.json").read_text())
    assert classified["steps"] == 400 and classified["accuracy"] > 0.6
    assert "quickstart finished: SST-2 dev accuracy" in result.stdout


def test_too_little_data_is_reported_not_raised(tmp_path, small_vocab, capsys):
    args = tiny_args(small_vocab, **{"data.max_lines": 20, "train.batch_size": 64})
    assert main(args + ["--out", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert "gutenberg_en/train.txt: only 59 sequences" in err and "train.batch_size=64" in err


def test_runs_made_before_the_task_interface_still_work(tmp_path, mlm_run, small_vocab, data_dir,
                                                        capsys):  # fmt: skip
    """A pretraining run directory as older versions wrote it (task `pretrain`, no
    task.json, no train.precision key) evaluates, answers fill-mask, exports and resumes."""
    run = tmp_path / "old"
    shutil.copytree(mlm_run, run)
    settings = {"train.checkpoint_every": 10, "train.eval_every": 10}
    args = tiny_args(small_vocab, steps=20, **settings) + ["--out", str(run)]
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["task"] = "pretrain"
    del config["train"]["precision"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "task.json").unlink()

    capsys.readouterr()
    valid = str(data_dir / "gutenberg_en" / "valid.txt")
    assert evaluate_main([str(run), "--data", valid]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert predict_main([str(run), "the [MASK] of the house"]) == 0
    assert len(json.loads(capsys.readouterr().out)["masks"][0]["tokens"]) == 5
    assert export_main([str(run), "--name", "old", "--out", str(tmp_path / "sm")]) == 0

    # Resume an unfinished attempt of the old run with today's command line.
    (run / "model.keras").unlink()
    shutil.rmtree(run / "backup" / "step-00000020")
    assert main(args) == 0
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 10
