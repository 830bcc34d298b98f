"""Knowledge distillation: the losses, the `Distiller` model, and tiny
teacher -> student runs (cached logits; intermediate layers) that evaluate,
predict, resume and export like any classify run."""

import json
import shutil

import keras
import numpy as np
import pytest
from run_helpers import REPO, built_task, train_args, train_tiny_classifier

from fmkeras.compress.command import main as compress_main
from fmkeras.config import distill_teacher_blocks
from fmkeras.export import main as export_main
from fmkeras.models import Classifier, Distiller, Encoder
from fmkeras.models.distiller import (
    DistillationLoss,
    attention_loss,
    hidden_state_loss,
    uniform_layer_pairs,
    value_relation_loss,
)
from fmkeras.tasks import load_run
from fmkeras.tasks.distill import cached_logits
from fmkeras.text.augment import augment_texts
from fmkeras.train import main as train_main

IDS = np.array([[2, 5, 9, 7, 3, 0], [2, 8, 3, 0, 0, 0]], "int32")
INPUTS = {"token_ids": IDS, "segment_ids": 0 * IDS, "padding_mask": (IDS > 0).astype("int32")}


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


def test_augmented_copies_are_distinct_perturbations_of_their_texts():
    texts = ["a fine , moving film", "dull", "the plot is thin but the cast is great fun"]
    new, source = augment_texts(texts, copies=4, seed=0)
    assert (new, source) == augment_texts(texts, copies=4, seed=0)  # the seed decides
    assert new != augment_texts(texts, copies=4, seed=1)[0]
    assert source == sorted(source) and set(source) <= {0, 1, 2}  # in text order
    for index in set(source):
        copies = [text for text, i in zip(new, source, strict=True) if i == index]
        assert len(copies) == len(set(copies)) <= 4 and texts[index] not in copies
    words = {word for text in texts for word in text.split()}
    # Replacement only: every word is kept in place or swapped for a training word.
    replaced, source = augment_texts(texts, 3, 0, drop_rate=0.0, replace_rate=0.5,
                                     ngram_rate=0.0)  # fmt: skip
    for text, index in zip(replaced, source, strict=True):
        assert len(text.split()) == len(texts[index].split()) and set(text.split()) <= words
    # n-gram sampling only: a contiguous run of at most 5 of the text's words.
    grams, source = augment_texts(texts, 3, 0, drop_rate=0.0, replace_rate=0.0, ngram_rate=1.0)
    for text, index in zip(grams, source, strict=True):
        assert f" {text} " in f" {texts[index]} " and len(text.split()) <= 5
    assert augment_texts(texts, 3, 0, drop_rate=1.0) == ([], [])  # empty copies are dropped
    pairs, _ = augment_texts([("a b c d", "e f g h")], 2, 0, ngram_rate=1.0)
    assert pairs and all(isinstance(pair, tuple) and len(pair) == 2 for pair in pairs)


def classifier(layers, hidden=16, heads=2, seed=0):
    keras.utils.set_random_seed(seed)
    encoder = Encoder(20, layers, heads, hidden, 32, dropout=0.0, max_sequence_length=8)
    return Classifier(encoder, num_classes=2, dropout=0.0)


def test_intermediate_losses_are_zero_for_identical_states_and_ignore_padding():
    rng = np.random.default_rng(0)
    mask = INPUTS["padding_mask"].astype("float32")
    states = rng.normal(size=(2, 6, 4)).astype("float32")
    assert float(hidden_state_loss(states, states, mask)) == 0.0
    moved = states + 3.0 * (1 - mask)[..., None]  # differs at padding only
    assert float(hidden_state_loss(states, moved, mask)) == 0.0
    assert float(hidden_state_loss(states, states + 1.0, mask)) == pytest.approx(1.0)
    scores = keras.ops.softmax(rng.normal(size=(2, 2, 6, 6)).astype("float32")).numpy()
    assert float(attention_loss(scores, scores, mask)) == pytest.approx(0.0, abs=1e-6)
    other = keras.ops.softmax(rng.normal(size=(2, 2, 6, 6)).astype("float32")).numpy()
    p, q = scores[0, 1, 2], other[0, 1, 2]  # one real query of one head
    kl = (p * (np.log(p) - np.log(q))).sum()
    only = np.zeros((2, 6), "float32")
    only[0, 2] = 1.0
    assert float(attention_loss(scores[:, 1:], other[:, 1:], only)) == pytest.approx(kl, rel=1e-4)
    # Different head counts compare the head-averaged maps.
    averaged = scores.mean(1, keepdims=True)
    assert float(attention_loss(scores, averaged, mask)) == pytest.approx(0.0, abs=1e-6)
    assert uniform_layer_pairs(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert uniform_layer_pairs(2, 2) == [(0, 0), (1, 1)]
    assert distill_teacher_blocks("1, 3,5") == [1, 3, 5]
    assert distill_teacher_blocks("-,-,5") == [None, None, 5]  # MiniLM: the last block only
    assert distill_teacher_blocks(5) == [5]  # YAML reads a single block as an int


def numpy_value_relations(values, heads, mask):
    """The reference: concatenated heads split into `heads` groups, scaled
    dot products between real tokens only, softmax per query."""
    batch, length = values.shape[:2]
    split = values.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)
    logits = split @ split.transpose(0, 1, 3, 2) / np.sqrt(split.shape[-1])
    logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def test_value_relations_match_a_reference_across_head_counts():
    """MiniLM's value-relation KL: zero for the same values (whatever the
    padding holds), a numpy reference otherwise, and relation heads shared by
    4-head and 2-head models (their gcd, 2) whatever their head sizes."""
    rng = np.random.default_rng(1)
    mask = INPUTS["padding_mask"].astype("float32")
    teacher = rng.normal(size=(2, 6, 4, 2)).astype("float32")  # (batch, seq, heads, dim)
    student = rng.normal(size=(2, 6, 2, 3)).astype("float32")
    padded = teacher + 5.0 * (1 - mask)[..., None, None]
    assert float(value_relation_loss(teacher, padded, mask)) == pytest.approx(0.0, abs=1e-6)
    p, q = numpy_value_relations(teacher, 2, mask), numpy_value_relations(student, 2, mask)
    per_query = np.where(p > 0, p * (np.log(p + 1e-9) - np.log(q + 1e-9)), 0).sum(-1)
    expected = (per_query * mask[:, None, :]).sum() / (2 * mask.sum())  # over heads and queries
    assert float(value_relation_loss(teacher, student, mask)) == pytest.approx(expected, rel=1e-4)


def test_a_distiller_adds_no_loss_for_a_copy_of_its_teacher_and_trains_only_the_student():
    teacher = classifier(2)
    copy = classifier(2, seed=1)
    copy.set_weights(teacher.get_weights())
    distiller = Distiller(copy, teacher, [(0, 0), (1, 1)], alpha=1.0, hidden_weight=1.0,
                          attention_weight=1.0, value_weight=1.0)  # fmt: skip
    np.testing.assert_allclose(distiller(INPUTS), teacher(INPUTS), atol=1e-6)
    distiller(INPUTS, training=True)
    assert [float(loss) for loss in distiller.losses] == pytest.approx([0, 0, 0, 0], abs=1e-5)
    clone = Distiller.from_config(distiller.get_config())
    assert (clone.layer_pairs, clone.alpha, clone.hidden_weight, clone.value_weight) == \
        ([(0, 0), (1, 1)], 1.0, 1.0, 1.0)  # fmt: skip

    student = classifier(1, seed=2)
    distiller = Distiller(student, teacher, uniform_layer_pairs(1, 2), alpha=0.5,
                          hidden_weight=1.0, attention_weight=1.0, value_weight=1.0)  # fmt: skip
    hard = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), loss=hard, loss_weights=0.5)
    before = [w.copy() for w in teacher.get_weights()]
    x = {key: np.repeat(value, 8, axis=0) for key, value in INPUTS.items()}
    history = distiller.fit(x, np.array([0, 1] * 8), epochs=40, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]  # the student moves towards the teacher
    for kept, now in zip(before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(kept, now)
    assert len(distiller.trainable_weights) == len(student.trainable_weights)


def test_a_distiller_refuses_layer_pairs_its_shapes_do_not_allow():
    with pytest.raises(ValueError, match="equal hidden sizes; the student has 8, the teacher 16"):
        Distiller(classifier(1, hidden=8), classifier(2), [(0, 1)], hidden_weight=1.0)
    with pytest.raises(ValueError, match=r"the teacher has 2 blocks"):
        Distiller(classifier(1), classifier(2), [(0, 2)], attention_weight=1.0)


@pytest.fixture(scope="module")
def teacher(classify_run):
    return classify_run


def test_a_student_learns_from_its_teacher_and_acts_as_a_classifier(teacher, tmp_path, capsys,
                                                                     data_dir):  # fmt: skip
    student = tmp_path / "student"
    settings = {"data.max_lines": 400, "data.vocab_size": 600, "distill.teacher": teacher,
                "train.checkpoint_every": 3}  # fmt: skip
    train_tiny_classifier("distill", "sst2_distill.yaml", student, **settings)
    out = capsys.readouterr().out
    assert "logits of 400 training examples in" in out
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["task"] == "distill" and 0.0 <= metrics["accuracy"] <= 1.0
    # Resumed (from step 3), the run reads the teacher's logits it kept and ends as before.
    shutil.rmtree(student / "backup" / "step-00000006")
    (student / "metrics.json").unlink()
    train_tiny_classifier("distill", "sst2_distill.yaml", student, **settings)
    out = capsys.readouterr().out
    assert f"logits of 400 training examples from {student / 'teacher_logits.npz'}" in out
    resumed = json.loads((student / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == 3
    assert resumed["loss"] == pytest.approx(metrics["loss"], abs=1e-4)
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


def test_kept_teacher_logits_are_used_only_for_the_same_teacher_and_rows(tmp_path):
    path, logits = tmp_path / "teacher_logits.npz", np.arange(6, dtype=np.float32).reshape(3, 2)
    assert cached_logits(path, "abc") is None  # none kept yet
    np.savez(path, logits=logits, fingerprint="abc")
    np.testing.assert_array_equal(cached_logits(path, "abc"), logits)
    assert cached_logits(path, "another teacher or other rows") is None
    path.write_bytes(b"PK\x03\x04 cut short")
    assert cached_logits(path, "abc") is None  # unreadable: computed again


def test_augmented_copies_join_the_training_set_labelled_by_the_teacher(teacher, tmp_path,
                                                                         capsys):  # fmt: skip
    settings = {"model.init": "random", "model.size": "tiny", "data.max_lines": 200,
                "data.vocab_size": 600, "distill.teacher": teacher, "distill.augment": 2}
    task, _ = built_task(REPO / "trainers" / "sst2_distill.yaml", settings, tmp_path / "run")
    out = capsys.readouterr().out
    copies = task.augmented
    assert 200 < copies <= 400  # most short texts have two distinct copies
    assert f"distill.augment=2: {copies:,} perturbed copies of" in out
    assert f"logits of 200 training examples and {copies:,} copies in" in out
    assert len(task.train_labels) == len(task.teacher_logits) == 200 + copies
    labels = [task.names.index(label) for label in task.train_rows.labels[:200]]
    np.testing.assert_array_equal(task.train_labels[:200], labels)  # the file's
    np.testing.assert_array_equal(task.train_labels[200:], task.teacher_logits[200:].argmax(-1))


@pytest.fixture(scope="module")
def one_block_student(teacher, tmp_path_factory):
    """The teacher's first block and head: a student that reads its vocabulary."""
    pruned = tmp_path_factory.mktemp("pruned") / "one-block"
    assert compress_main(["prune", str(teacher), "--layers", "1", "--out", str(pruned)]) == 0
    return pruned


def test_an_ensemble_of_teachers_gives_the_mean_of_their_logits(teacher, one_block_student,
                                                                 tmp_path, capsys):  # fmt: skip
    settings = {"model.init": "random", "model.size": "tiny", "data.max_lines": 200,
                "data.vocab_size": 600}  # fmt: skip
    alone, fingerprints = [], set()
    for name, run in (("first", teacher), ("second", one_block_student)):
        task, _ = built_task(REPO / "trainers" / "sst2_distill.yaml",
                             {**settings, "distill.teacher": run}, tmp_path / name)  # fmt: skip
        alone.append(task.teacher_logits)
        fingerprints.add(task.teacher_fingerprint())
    assert np.abs(alone[0] - alone[1]).max() > 1e-3  # two different teachers
    capsys.readouterr()
    both = f"{teacher}, {one_block_student}"
    task, _ = built_task(REPO / "trainers" / "sst2_distill.yaml",
                         {**settings, "distill.teacher": both}, tmp_path / "ensemble")  # fmt: skip
    np.testing.assert_allclose(task.teacher_logits, (alone[0] + alone[1]) / 2, atol=1e-5)
    fingerprints.add(task.teacher_fingerprint())
    assert len(fingerprints) == 3  # kept logits are reused only for the same teachers
    assert f"teacher ensemble of 2 ({teacher}, {one_block_student}; mean logits)" in \
        capsys.readouterr().out  # fmt: skip


def test_a_student_learns_the_teachers_layers_and_resumes(teacher, one_block_student, tmp_path,
                                                          capsys):  # fmt: skip
    """Intermediate transfer: the run resumes, and saves a plain classifier."""
    student = tmp_path / "student"
    settings = {"data.max_lines": 200, "distill.teacher": teacher, "model.init": one_block_student,
                "distill.hidden_weight": 1.0, "distill.attention_weight": 1.0,
                "distill.value_weight": 1.0, "train.checkpoint_every": 2}  # fmt: skip
    train_tiny_classifier("distill", "sst2_distill.yaml", student, **settings)  # 6 steps
    out = capsys.readouterr().out
    assert "runs beside the student (2 -> 1 blocks, student<-teacher 0<-1;" in out
    assert "logits of" not in out  # no cached pass
    first = json.loads((student / "metrics.json").read_text())
    # A run killed after its step-4 backup resumes from it (the backup holds both models).
    shutil.rmtree(student / "backup" / "step-00000006")
    (student / "metrics.json").unlink()
    train_tiny_classifier("distill", "sst2_distill.yaml", student, **settings)
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 6
    assert metrics["loss"] == pytest.approx(first["loss"], abs=1e-3)
    info = json.loads((student / "task.json").read_text())["distill"]
    assert (info["hidden_weight"], info["attention_weight"], info["value_weight"]) == (1, 1, 1)
    model = load_run(student).model  # a plain classifier (exports as the cached-logit run's)
    assert isinstance(model, Classifier) and model.encoder.num_layers == 1


@pytest.mark.parametrize("settings, message", [
    ({"distill.hidden_weight": 1.0}, "need a student with the teacher's vocabulary"),
    ({"distill.attention_weight": 1.0, "distill.layers": "1,1"},
     "distill.layers=1,1 has 2 entries; the student has 1 blocks"),
    ({"distill.attention_weight": 1.0, "distill.layers": "x"},
     "distill.layers must name the teacher block of each student block"),
    ({"distill.hidden_weight": -1}, "distill.hidden_weight must be 0 or more"),
    ({"distill.value_weight": -1}, "distill.value_weight must be 0 or more"),
    ({"distill.hidden_weight": 1.0, "sparsity.target": 0.5}, "cannot be combined with"),
    ({"distill.hidden_weight": 1.0, "distill.augment": 2},
     "which intermediate transfer does not use: set distill.augment=0 or"),
    ({"distill.augment": -1}, "distill.augment must be 0 or more"),
    ({"distill.hidden_weight": 1.0, "distill.teacher": "TEACHER,TEACHER"},
     "pair the student's blocks with one teacher's, but distill.teacher names 2 runs"),
])  # fmt: skip
def test_intermediate_transfer_says_what_is_wrong(teacher, one_block_student, tmp_path, capsys,
                                                  settings, message):  # fmt: skip
    recipe = REPO / "trainers" / "sst2_distill.yaml"
    init = {"model.init": one_block_student} if "distill.layers" in settings else \
        {"model.init": "random", "model.size": "tiny", "data.vocab_size": 600}  # fmt: skip
    args = {"distill.teacher": teacher, "data.max_lines": 200, "train.steps": 2, **init,
            **settings}  # fmt: skip
    args["distill.teacher"] = str(args["distill.teacher"]).replace("TEACHER", str(teacher))
    assert train_main(train_args("distill", recipe, args, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_distill_needs_a_teacher(tmp_path, capsys, data_dir):
    recipe = REPO / "trainers" / "sst2_distill.yaml"
    assert train_main(train_args("distill", recipe, {"distill.teacher": "null"}, tmp_path)) == 2
    assert "needs distill.teacher=RUN_DIR" in capsys.readouterr().err
    settings = {"distill.teacher": tmp_path / "nothing"}
    assert train_main(train_args("distill", recipe, settings, tmp_path)) == 2
    assert "nothing is not a finished run (no task.json)" in capsys.readouterr().err
    settings = {"distill.teacher": f"{REPO / 'trainers'},{tmp_path / 'nothing'}"}  # a list
    assert train_main(train_args("distill", recipe, settings, tmp_path)) == 2
    assert f"distill.teacher: {REPO / 'trainers'} is not a finished run" in capsys.readouterr().err
    pretraining = tmp_path / "mlm-run"  # a finished run of another task
    pretraining.mkdir()
    (pretraining / "task.json").write_text('{"task": "mlm"}', encoding="utf-8")
    (pretraining / "model.keras").write_bytes(b"")
    assert train_main(train_args("distill", recipe, {"distill.teacher": pretraining},
                                 tmp_path)) == 2  # fmt: skip
    assert "holds a 'mlm' run; the teacher must be a classify run" in capsys.readouterr().err
    (pretraining / "model.keras").unlink()  # task.json alone: the error names the key
    assert train_main(train_args("distill", recipe, {"distill.teacher": pretraining},
                                 tmp_path)) == 2  # fmt: skip
    assert f"error: distill.teacher: {pretraining} is not an fmkeras run directory" in \
        capsys.readouterr().err  # fmt: skip
