"""`python -m fmkeras.sweep`: a grid of runs, ranked, that skips finished points
and refuses bad grids and directories of another configuration in one line."""

import json

import pytest
from conftest import REPO
from run_helpers import TINY_CLASSIFIER

from fmkeras.sweep import main as sweep_main
from fmkeras.sweep import point_name

RECIPE = str(REPO / "trainers" / "sst2.yaml")


def sweep_args(out, grids, **extra):
    settings = {**TINY_CLASSIFIER, "train.precision": "float32", "train.eval_every": 3,
                "train.keep_best": "accuracy", **extra}  # fmt: skip
    args = ["--recipe", RECIPE, "--out", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    for grid in grids:
        args += ["--grid", grid]
    return args


def test_point_names_use_the_last_key_part_unless_two_share_it():
    assert point_name({"train.learning_rate": "5e-5", "train.steps": "3200"}) == \
        "learning_rate=5e-5,steps=3200"  # fmt: skip
    assert point_name({"model.dropout": "0.1", "lora.dropout": "0"}) == \
        "model.dropout=0.1,lora.dropout=0"  # fmt: skip
    assert point_name({"model.init": "runs/sst2"}) == "init=runs_sst2"  # one directory


@pytest.mark.long_running
def test_sweep_trains_every_point_ranks_them_and_reads_finished_ones(tmp_path, data_dir, capsys):
    out = tmp_path / "sweep"
    assert sweep_main(sweep_args(out, ["train.seed=0,1"])) == 0
    summary = json.loads((out / "sweep.json").read_text())
    rows = summary["points"]
    assert [row["name"] for row in rows] == ["seed=0", "seed=1"]
    for row in rows:
        metrics = json.loads((out / row["name"] / "metrics.json").read_text())
        assert row["accuracy"] == metrics["accuracy"]  # the kept step's
        assert row["step"] == metrics.get("best_step", 6)
        assert [step for step, _ in row["curve"]] == [3, 6]
        assert row["last"] == row["curve"][-1][1]
        assert row["accuracy"] == pytest.approx(max(v for _, v in row["curve"]))  # keep_best
    assert summary["best"] == max(rows, key=lambda row: row["accuracy"])["name"]
    (seeds,) = summary["over_seeds"]
    assert seeds["seeds"] == 2 and seeds["min"] <= seeds["mean"] <= seeds["max"]
    assert seeds["mean"] == pytest.approx(sum(row["accuracy"] for row in rows) / 2)
    table = (out / "sweep.md").read_text()
    assert f"| `{summary['best']}` | **" in table and "mean accuracy (kept)" in table

    first = (out / "seed=0" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert sweep_main(sweep_args(out, ["train.seed=0,1"])) == 0
    assert "seed=0: finished" in capsys.readouterr().out
    assert (out / "seed=0" / "metrics.json").stat().st_mtime_ns == first  # not trained again
    (out / "seed=1" / "metrics.json").unlink()  # as if killed after its last backup
    assert sweep_main(sweep_args(out, ["train.seed=0,1"]) + ["--dry-run"]) == 0
    assert "seed=1: unfinished" in capsys.readouterr().out
    assert sweep_main(sweep_args(out, ["train.seed=0,1"]) + ["--report"]) == 0  # trains nothing
    assert not (out / "seed=1" / "metrics.json").exists()
    assert [row["name"] for row in json.loads((out / "sweep.json").read_text())["points"]] == \
        ["seed=0"]  # fmt: skip
    assert sweep_main(sweep_args(out, ["train.seed=2"]) + ["--report"]) == 2
    assert "--report: no point under" in capsys.readouterr().err

    assert sweep_main(sweep_args(out, ["train.seed=0,1"], **{"train.learning_rate": 1e-2})) == 2
    error = capsys.readouterr().err.strip()
    assert "seed=0 holds a run with a different configuration (train.learning_rate" in error
    assert len(error.splitlines()) == 1


@pytest.mark.parametrize("grids, extra, message", [
    (["train.steps"], {}, "--grid expects KEY=V1,V2,... with no empty value, got 'train.steps'"),
    (["train.steps=4,"], {}, "--grid expects KEY=V1,V2,... with no empty value"),
    (["train.seed=4,4"], {}, "repeats a value"),
    (["data.dir=a/b,a_b"], {}, "two sweep points would share the directory dir=a_b"),
    (["train.seed=1", "train.seed=2"], {}, "--grid train.seed is given twice"),
    (["train.steps=4,5"], {"train.steps": 4}, "train.steps is both swept (--grid) and fixed"),
    (["train.stepz=4,5"], {}, "sweep point stepz=4: unknown key 'train.stepz'"),
    (["train.warmup_steps=4,-5"], {}, "sweep point warmup_steps=-5: train.warmup_steps must be 0"),
    (["decode.beam_width=1,4"], {},
     "--grid decode.beam_width: task classify does not read it, so every point would train"),
    ([], {}, "name at least one --grid"),
    (["train.seed=0,1"], {"train.keep_best": "null"}, "name the validation metric"),
    (["train.seed=0,1"], {"train.keep_best": "acc"},
     "sweep point seed=0: train.keep_best='acc': task=classify validation reports loss"),
    (["train.seed=0,1"], {"model.init": "/no/such/run"},
     "sweep point seed=0: model.init='/no/such/run'"),
    (["data.valid_file=sst2/dev.tsv,sst2/nope.tsv"], {},
     "sweep point valid_file=sst2_nope.tsv: expected the file sst2/nope.tsv"),
])  # fmt: skip
def test_bad_sweeps_fail_in_one_line_before_training(tmp_path, capsys, grids, extra, message):
    assert sweep_main(sweep_args(tmp_path / "sweep", grids, **extra)) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_a_metric_the_task_never_reports_fails_before_training(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep_main([*sweep_args(out, ["train.seed=0,1"]), "--metric", "bleu"]) == 2
    error = capsys.readouterr().err.strip()
    assert "sweep point seed=0: --metric='bleu': task=classify validation reports loss, " \
        "accuracy, macro_f1, f1" in error  # fmt: skip
    assert not out.exists()
