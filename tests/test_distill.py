"""Knowledge distillation: the loss, and a tiny teacher -> student run that
evaluates, predicts and exports like any classify run."""

import json

import keras
import numpy as np
import pytest
from run_helpers import REPO, train_args, train_tiny_classifier

from fmkeras.export import main as export_main
from fmkeras.tasks import load_run
from fmkeras.tasks.distill import DistillationLoss
from fmkeras.train import main as train_main


def test_distillation_loss_mixes_soft_and_hard_targets():
    student = np.array([[2.0, -1.0], [0.5, 0.3]], "float32")
    teacher = np.array([[1.0, 0.0], [-2.0, 2.0]], "float32")
    labels = np.array([[0.0], [1.0]], "float32")
    y_true = np.concatenate([labels, teacher], axis=1)
    hard = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels[:, 0], student)
    assert float(DistillationLoss(3.0, alpha=0.0)(y_true, student)) == pytest.approx(float(hard))
    same = np.concatenate([labels, student], axis=1)  # student = teacher: no soft loss
    assert float(DistillationLoss(3.0, alpha=1.0)(same, student)) == pytest.approx(0.0, abs=1e-6)
    t = 3.0
    p, log_q = (keras.ops.softmax(teacher / t).numpy(),
                keras.ops.log_softmax(student / t).numpy())  # fmt: skip
    kl = (p * (np.log(p) - log_q)).sum(-1).mean() * t**2
    assert float(DistillationLoss(t, alpha=1.0)(y_true, student)) == pytest.approx(kl, rel=1e-5)


@pytest.fixture(scope="module")
def teacher(classify_run):
    return classify_run


def test_a_student_learns_from_its_teacher_and_acts_as_a_classifier(teacher, tmp_path, capsys,
                                                                     data_dir):  # fmt: skip
    student = tmp_path / "student"
    settings = {"data.max_lines": 400, "data.vocab_size": 600, "distill.teacher": teacher}
    train_tiny_classifier("distill", "sst2_distill.yaml", student, **settings)
    out = capsys.readouterr().out
    assert "logits of 400 training examples" in out
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["task"] == "distill" and 0.0 <= metrics["accuracy"] <= 1.0
    info = json.loads((student / "task.json").read_text())
    assert info["distill"]["teacher"] == str(teacher) and info["labels"] == ["0", "1"]
    found = load_run(student).predict(["a gorgeous film", "dull"])
    assert [sorted(r["probabilities"]) for r in found] == [["0", "1"], ["0", "1"]]
    assert export_main([str(student), "--name", "student", "--out", str(tmp_path / "sm")]) == 0
    # A teacher whose labels differ from the data's is refused in one line.
    for split in ("train", "dev"):
        lines = (data_dir / "sst2" / f"{split}.tsv").read_text().splitlines()[:200]
        renamed = [lines[0]] + [line.replace("\t0", "\tneg").replace("\t1", "\tpos")
                                for line in lines[1:]]  # fmt: skip
        (tmp_path / f"{split}.tsv").write_text("\n".join(renamed) + "\n")
    settings.update({"data.train_file": tmp_path / "train.tsv",
                     "data.valid_file": tmp_path / "dev.tsv"})  # fmt: skip
    settings.update({"model.init": "random", "model.size": "tiny"})
    recipe = REPO / "trainers" / "sst2_distill.yaml"
    assert train_main(train_args("distill", recipe, settings, tmp_path / "bad")) == 2
    assert "has the labels ['0', '1'], but" in capsys.readouterr().err


def test_distill_needs_a_teacher(tmp_path, capsys, data_dir):
    recipe = REPO / "trainers" / "sst2_distill.yaml"
    assert train_main(train_args("distill", recipe, {"distill.teacher": "null"}, tmp_path)) == 2
    assert "needs distill.teacher=RUN_DIR" in capsys.readouterr().err
    settings = {"distill.teacher": tmp_path / "nothing"}
    assert train_main(train_args("distill", recipe, settings, tmp_path)) == 2
    assert "nothing is not a finished run (no task.json)" in capsys.readouterr().err
