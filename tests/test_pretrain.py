"""End-to-end pretraining: files, curves, errors, NaN, and the training faults
(SIGTERM, SIGKILL, a damaged backup, a full disk)."""

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml
from run_helpers import REPO, assert_model_holds_backup, run_cli, scalars, tiny_args, wait_for

import fmkeras
from fmkeras.errors import DataError
from fmkeras.evaluate import main as evaluate_main
from fmkeras.export import main as export_main
from fmkeras.predict import main as predict_main
from fmkeras.tasks.language_model import read_passages
from fmkeras.text.mlm import pack_sequences
from fmkeras.text.wordpiece import WordPieceTokenizer, read_vocabulary
from fmkeras.train import main
from fmkeras.training.checkpoints import backup_problem

pytestmark = pytest.mark.usefixtures("data_dir")  # every test here reads the datasets


@pytest.mark.long_running
def test_pretraining_writes_a_complete_run(tmp_path, small_vocab, capsys):
    run = tmp_path / "run"
    # 50 steps, backups every 20, validation every 10 and 4 steps per call: epochs of 10
    # steps (run 2 per call) end at every backup and validation.
    args = tiny_args(small_vocab, steps=50, **{"train.steps_per_execution": 4,
                                              "train.eval_every": 10})  # fmt: skip
    args += ["--out", str(run)]
    assert main(args) == 0
    for name in ("config.yaml", "vocab.txt", "model.keras", "encoder.keras", "metrics.json",
                 "task.json"):  # fmt: skip
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "backup").iterdir()) == ["step-00000040", "step-00000050"]
    assert "backups every 20 steps and at the final step 50" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 50 and metrics["tokens_per_second"] > 0 and 0 < metrics["mfu"]
    assert metrics["train_tokens"] == 50 * 16 * 32 and metrics["non_embedding_parameters"] > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["loss"] < math.log(2000) - 1.0  # well below a uniform guess
    # The names metrics.json used before every task reported `loss`, kept for scripts.
    assert (metrics["valid_loss"], metrics["valid_perplexity"]) == (metrics["loss"],
                                                                    metrics["perplexity"])

    train_tags = ("loss", "accuracy", "perplexity", "learning_rate", "tokens_per_second", "mfu")
    for tag in train_tags:
        assert scalars(run / "logs" / "train", tag), f"no train/{tag} in TensorBoard"
    validation = scalars(run / "logs" / "validation", "loss")
    assert [step for step, _ in validation] == [10, 20, 30, 40, 50]
    assert validation[-1][1] < validation[0][1]  # the loss goes down
    learning_rates = [v for _, v in scalars(run / "logs" / "train", "learning_rate")]
    assert max(learning_rates) <= 1e-3 + 1e-9

    assert_model_holds_backup(run / "model.keras", run / "backup" / "step-00000050")
    model = fmkeras.load_model(run / "model.keras")
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


def start_run(args):
    """`python -m fmkeras.train ARGS` in the background (stderr readable)."""
    command = [sys.executable, "-m", "fmkeras.train", *args]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def optimizer_state(backup):
    """The optimizer's arrays in a backup's weights file, in file order."""
    import h5py

    arrays = []
    with h5py.File(backup / "state.weights.h5", "r") as store:
        store["optimizer"].visititems(
            lambda _, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None
        )
    return arrays


@pytest.mark.long_running
def test_faults_lose_at_most_the_steps_since_the_last_backup(tmp_path, small_vocab, capsys):
    """SIGTERM -> a backup and exit 0; SIGKILL -> resume from the last backup; a damaged
    newest backup -> fall back to the previous one. The finished run equals one never
    interrupted (same data, masks, weights and optimizer state)."""
    run = tmp_path / "run"
    args = tiny_args(small_vocab, steps=60, **{"train.eval_every": 60}) + ["--out", str(run)]
    backups = run / "backup"

    first = start_run(args)
    wait_for(backups / "step-00000020", first)
    first.send_signal(signal.SIGTERM)  # preemption's notice
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 60: backup (\S+) written\. "
                        r"Run the same command again", err)  # fmt: skip
    assert stopped, err
    step = int(stopped.group(1))
    assert 20 <= step < 40 and (backups / f"step-{step:08d}").is_dir(), step

    second = start_run(args)  # resumes from the SIGTERM backup, mid-interval
    wait_for(backups / "step-00000040", second)
    second.kill()  # SIGKILL: no chance to clean up
    second.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it was killed"

    # Damage the newest backup as a bad disk would: resume falls back to the one before.
    weights = backups / "step-00000040" / "state.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step-00000040 is unusable (checksum mismatch in state.weights.h5)" in out
    assert f"resuming from {backups / f'step-{step:08d}'}" in out
    assert (backups / "corrupt-step-00000040").is_dir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["resumed_from_step"] == step
    assert not list(backups.glob(".partial-*"))

    uninterrupted = tmp_path / "uninterrupted"
    assert main(args[:-1] + [str(uninterrupted)]) == 0
    reference = json.loads((uninterrupted / "metrics.json").read_text())
    assert metrics["valid_loss"] == pytest.approx(reference["valid_loss"], abs=1e-4)
    # The same weights in model.keras, the same optimizer state in the last backup.
    for ours, theirs in zip(*(fmkeras.load_model(r / "model.keras").weights
                              for r in (run, uninterrupted)), strict=True):  # fmt: skip
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)
    ours, theirs = (optimizer_state(r / "backup" / "step-00000060") for r in (run, uninterrupted))
    assert len(ours) == len(theirs) > 1 and ours[0] == theirs[0] == 60  # iterations first
    for got, expected in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_failed_backup_write_stops_the_run_keeping_the_last(tmp_path, small_vocab, monkeypatch,
                                                              capsys):  # fmt: skip
    run = tmp_path / "run"
    settings = {"train.checkpoint_every": 10, "train.keep_backups": 1}
    args = tiny_args(small_vocab, steps=20, **settings) + ["--out", str(run)]
    save_weights, calls = keras.Model.save_weights, []

    def disk_full_on_second_backup(model, path, *rest, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save_weights(model, path, *rest, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", disk_full_on_second_backup)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"could not write the backup {run / 'backup' / 'step-00000020'}: No space left on " \
        "device; the previous backups (step-00000010) are intact" in err  # fmt: skip
    assert backup_problem(run / "backup" / "step-00000010") is None
    assert [p.name for p in (run / "backup").iterdir()] == ["step-00000010"]

    monkeypatch.setattr(keras.Model, "save_weights", save_weights)  # space freed
    assert main(args) == 0
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 10
    assert [p.name for p in (run / "backup").iterdir()] == ["step-00000020"]  # keep_backups=1


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


def test_continued_pretraining_starts_where_the_checkpoint_ended(tmp_path, mlm_run, small_vocab,
                                                                capsys):  # fmt: skip
    """model.init=<an earlier MLM run>: its vocabulary, encoder and masked-LM head;
    with a negligible learning rate the first validation is the checkpoint's own."""
    run = tmp_path / "continued"
    settings = {"model.init": str(mlm_run), "train.learning_rate": 1e-12, "train.eval_every": 1,
                "train.checkpoint_every": 1}  # fmt: skip
    assert main(tiny_args(small_vocab, steps=1, **settings) + ["--out", str(run)]) == 0
    assert f"model: fmkeras encoder from {mlm_run} + the run's masked-LM head" in (
        capsys.readouterr().out
    )
    before = json.loads((mlm_run / "metrics.json").read_text())
    after = json.loads((run / "metrics.json").read_text())
    assert after["loss"] == pytest.approx(before["loss"], abs=1e-4)  # a new head: ~log(vocab)
    assert after["non_embedding_parameters"] == before["non_embedding_parameters"]
    assert (run / "vocab.txt").read_bytes() == (mlm_run / "vocab.txt").read_bytes()


def test_task_adaptive_pretraining_reads_only_a_tsvs_text_column(tmp_path, mlm_run, small_vocab,
                                                                 data_dir, capsys):  # fmt: skip
    """A `.tsv` train or valid file is read through `data.text_column` alone (the
    labels never reach the language model), in training and in evaluate."""
    dev = data_dir / "sst2" / "dev.tsv"
    sentences = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:]]
    assert read_passages(dev) == (sentences, [])  # "sentence", the key's default
    assert read_passages(dev, max_lines=3) == (sentences[:3], [])
    with pytest.raises(DataError, match=r"dev.tsv:1: no column 'text' \(data.text_column\)"):
        read_passages(dev, text_column="text")

    run, recipe = tmp_path / "tapt", REPO / "trainers" / "sst2_tapt.yaml"  # sst2/*.tsv
    settings = {"model.init": str(mlm_run), "data.max_lines": 400,
                "train.checkpoint_every": 4, "train.eval_every": 4}  # fmt: skip
    assert main(tiny_args(small_vocab, 4, recipe, **settings) + ["--out", str(run)]) == 0
    tokenizer = WordPieceTokenizer(run / "vocab.txt", lowercase=True)
    valid_rows = len(pack_sequences(sentences[:400], tokenizer, 32))  # with labels: more tokens
    assert f"/ {valid_rows:,} valid sequences" in capsys.readouterr().out
    assert json.loads((run / "task.json").read_text())["text_column"] == "sentence"
    assert evaluate_main([str(run), "--data", str(dev)]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    torn = tmp_path / "torn.tsv"  # row 3 lost its label column
    lines = dev.read_text().splitlines()
    torn.write_text("\n".join([*lines[:2], sentences[1], *lines[3:]]) + "\n")
    assert evaluate_main([str(run), "--data", str(torn)]) == 2
    assert "torn.tsv:3: expected 2 tab-separated columns" in capsys.readouterr().err
    assert evaluate_main([str(run), "--data", str(torn), "--bad-rows", "skip"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_rows"] == {"data": 1}  # stdout: JSON

    settings["data.train_file"] = "sst2/*.tsv"  # shards stream as plain text, labels included
    assert main(tiny_args(small_vocab, 4, recipe, **settings) + ["--out", str(tmp_path / "x")]) == 2
    assert "data.train_file: sst2/*.tsv is a glob of TSVs" in capsys.readouterr().err


def test_next_sentence_prediction_trains_and_reports(tmp_path, small_vocab, capsys):
    """data.objective=mlm_nsp: NSP loss and accuracy in the logs, TensorBoard and
    metrics.json; fill-mask and the encoder work as for MLM alone."""
    run = tmp_path / "nsp"
    args = tiny_args(small_vocab, steps=20, **{"data.objective": "mlm_nsp"})
    assert main(args + ["--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "nsp_accuracy" in out and "validation loss" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["nsp_accuracy"] <= 1 and metrics["nsp_loss"] > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))  # the MLM's alone
    assert [step for step, _ in scalars(run / "logs" / "validation", "nsp_accuracy")] == [20]
    train_nsp = scalars(run / "logs" / "train", "nsp_loss")
    assert train_nsp and all(math.isfinite(value) for _, value in train_nsp)
    assert predict_main([str(run), "the old man [MASK] the door ."]) == 0
    assert len(json.loads(capsys.readouterr().out)["masks"][0]["tokens"]) == 5
    encoder = fmkeras.load_model(run / "encoder.keras")
    assert encoder.num_segments == 2


def test_too_little_data_is_reported_not_raised(tmp_path, small_vocab, capsys):
    settings = {"data.max_lines": 20, "data.sequence_length": 128, "train.batch_size": 64}
    args = tiny_args(small_vocab, **settings)
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
