"""The Task interface: a task defined outside fmkeras plugs into the registry
and is trained, evaluated, used and exported by the same commands as the
built-in ones; old task names and run directories keep working."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from run_helpers import REPO, assert_model_holds_backup, built_task, train_args

import fmkeras
from fmkeras.config import TrainConfig, applies_to, build_config, to_dict
from fmkeras.errors import ConfigError
from fmkeras.evaluate import main as evaluate_main
from fmkeras.export import main as export_main
from fmkeras.predict import main as predict_main
from fmkeras.signatures import ServingFunctions
from fmkeras.tasks import load_run
from fmkeras.tasks.base import Predictor, Task
from fmkeras.tasks.registry import (
    BUILT_IN,
    canonical_task,
    get_spec,
    get_task,
    register_task,
    task_names,
)
from fmkeras.tasks.spec import BUILT_IN_SPECS
from fmkeras.train import main as train_main
from fmkeras.training.checkpoints import read_state, restore_backup
from fmkeras.training.optimizer import create_optimizer
from fmkeras.training.run_dir import RunDir

BUCKETS = 64


@dataclasses.dataclass
class WordCountConfig:
    max_words: int = 6

    def validate(self):
        if self.max_words < 1:
            raise ConfigError("word_count.max_words must be at least 1")


def hashed_words(texts, length=12):
    """`(batch, length)` word-hash ids (0: padding), with TensorFlow string ops only."""
    words = tf.strings.split(texts)[:, :length]
    return (tf.strings.to_hash_bucket_fast(words, BUCKETS) + 1).to_tensor(0, shape=[None, length])


def read_texts(path):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


class WordCountPredictor(Predictor):
    def classes(self, texts):
        return np.asarray(self.model(hashed_words(tf.constant(texts)))).argmax(-1)

    def predict(self, texts):
        return [{"text": t, "words": int(c)} for t, c in zip(texts, self.classes(texts),
                                                                strict=True)]  # fmt: skip

    def evaluate(self, data):
        texts = read_texts(data)
        truth = np.minimum([len(t.split()) for t in texts], self.info["max_words"])
        return {"accuracy": float((self.classes(texts) == truth).mean()), "examples": len(texts)}

    def serving_functions(self):
        model = self.model

        def serve_ids(ids):
            return {"words": tf.argmax(model(ids), axis=-1, output_type=tf.int32)}

        return ServingFunctions(types.SimpleNamespace(tables=[]),
                                lambda texts: serve_ids(hashed_words(texts)), serve_ids,
                                ("word_ids",))  # fmt: skip


class WordCountTask(Task):
    """Counts the words of a line (capped at `word_count.max_words`): a task
    written only against the Task interface."""

    name = "word_count"
    aliases = ("count_words",)
    sections = {"word_count": WordCountConfig}

    def read_data(self):
        self.max_words = self.config.section("word_count").max_words
        self.texts = {split: read_texts(self.files[split]) for split in ("train", "valid")}

    def dataset(self, split, repeat=False):
        texts = self.texts[split]
        labels = np.minimum([len(t.split()) for t in texts], self.max_words)
        data = tf.data.Dataset.from_tensor_slices((texts, labels))
        data = data.repeat() if repeat else data
        batch = data.batch(self.config.train.batch_size)
        return batch.map(lambda t, y: (hashed_words(t), y))

    def build_model(self):
        ids = keras.Input((None,), dtype="int32")
        x = keras.layers.Embedding(BUCKETS + 1, 16)(ids)
        x = keras.layers.GlobalAveragePooling1D()(keras.layers.Dense(32, "relu")(x))
        x = keras.layers.Dense(32, "relu")(x)
        return keras.Model(ids, keras.layers.Dense(self.max_words + 1)(x), name="word_count")

    def compile_args(self, model):
        return {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                "metrics": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]}  # fmt: skip

    def train_dataset(self, step):
        return self.dataset("train", repeat=True)

    def evaluate(self, model):
        loss, accuracy = model.evaluate(self.dataset("valid"), verbose=0)
        return {"loss": float(loss), "accuracy": float(accuracy)}

    def info(self):
        return {**super().info(), "max_words": self.max_words}

    @classmethod
    def load(cls, run, info, **options):
        return WordCountPredictor(fmkeras.load_model(run.model), info)


@pytest.fixture(scope="module")
def word_count_task():
    return register_task(WordCountTask)


def write_lines(path, count, seed):
    rng = np.random.default_rng(seed)
    words = ["tea", "film", "cat", "runs", "blue", "sky", "a", "the"]
    path.write_text("".join(" ".join(rng.choice(words, rng.integers(1, 9))) + "\n"
                            for _ in range(count)), encoding="utf-8")  # fmt: skip
    return path


def test_a_registered_task_trains_evaluates_predicts_and_exports(tmp_path, word_count_task,
                                                                capsys):  # fmt: skip
    train = write_lines(tmp_path / "train.txt", 600, seed=0)
    valid = write_lines(tmp_path / "valid.txt", 100, seed=1)
    recipe = tmp_path / "count.yaml"
    recipe.write_text("task: count_words\nword_count:\n  max_words: 5\n", encoding="utf-8")
    run = tmp_path / "run"
    settings = {"data.train_file": train, "data.valid_file": valid, "train.steps": 120,
                "train.checkpoint_every": 50, "train.eval_every": 50, "train.batch_size": 32,
                "train.learning_rate": 1e-2, "train.jit_compile": "false"}  # fmt: skip
    args = ["--recipe", str(recipe), "--out", str(run)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert train_main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "word_count" and metrics["steps"] == 120
    assert metrics["accuracy"] > 0.5  # chance is about 1/6
    assert json.loads((run / "task.json").read_text())["max_words"] == 5
    assert sorted(p.name for p in (run / "backup").iterdir()) == ["step-00000100", "step-00000120"]

    capsys.readouterr()
    assert evaluate_main([str(run), "--data", str(valid)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == round(metrics["accuracy"], 4)
    assert predict_main([str(run), "one two three"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "one two three"
    assert export_main([str(run), "--name", "count", "--out", str(tmp_path / "sm")]) == 0
    loaded = tf.saved_model.load(str(tmp_path / "sm" / "count" / "1"))
    served = loaded.signatures["serving_default"](texts=tf.constant(["a b", "x y z w"]))
    expected = load_run(run).classes(["a b", "x y z w"])
    np.testing.assert_array_equal(served["words"].numpy(), expected)


def test_task_sections_are_typed_and_validated(word_count_task):
    config = build_config(None, ["task=word_count", "word_count.max_words=3"])
    assert config.section("word_count").max_words == 3
    assert to_dict(config)["word_count"] == {"max_words": 3}  # written to config.yaml
    assert applies_to("word_count.max_words", "word_count")
    assert not applies_to("word_count.max_words", "classify")
    with pytest.raises(ConfigError, match="word_count.max_words must be at least 1"):
        build_config(None, ["word_count.max_words=0"])
    with pytest.raises(ConfigError, match="Did you mean 'word_count.max_words'"):
        build_config(None, ["word_count.max_word=2"])


def test_names_and_aliases():
    assert canonical_task("pretrain") == "mlm" and get_task("pretrain") is get_task("mlm")
    assert task_names()[:4] == ["mlm", "classify", "tag", "translate"]
    with pytest.raises(ConfigError, match="task='clasify' is not one of mlm, classify"):
        build_config(None, ["task=clasify"])


def test_every_task_is_its_spec(word_count_task):
    """What `train` checks before importing TensorFlow (a built-in task's spec)
    is what the task itself declares; a registered task is its own spec."""
    assert list(BUILT_IN_SPECS) == list(BUILT_IN)
    for name, spec in BUILT_IN_SPECS.items():
        assert issubclass(get_task(name), spec) and get_task(name).name == name
    assert get_spec("pretrain").name == "mlm"
    assert get_spec("word_count") is word_count_task


class PeakedWordCountTask(WordCountTask):
    """Validation that peaks at step 50, whatever the weights: `train.keep_best`
    must save the step-50 model, not the last one."""

    name = "peaked_count"
    aliases = ()

    def evaluate(self, model):
        step = int(model.optimizer.iterations.numpy())
        return {"loss": float(abs(step - 50)), "accuracy": 1.0 - abs(step - 50) / 200}


def with_optimizer(model, **train):
    """`model` (loaded from a run's model.keras, which holds no optimizer)
    compiled with the optimizer a run of `train` settings creates, so a
    backup's optimizer state loads into it."""
    model.compile(optimizer=create_optimizer(TrainConfig(**train)))
    return model


def test_keep_best_saves_the_best_validation_not_the_last(tmp_path, capsys):
    register_task(PeakedWordCountTask)
    train = write_lines(tmp_path / "train.txt", 200, seed=0)
    args = ["peaked_count", "--out", str(tmp_path / "run")]
    for key, value in {"data.train_file": train, "data.valid_file": train, "train.steps": 120,
                       "train.checkpoint_every": 25, "train.eval_every": 25,
                       "train.keep_best": "accuracy", "train.jit_compile": "false"}.items():
        args += ["--set", f"{key}={value}"]  # fmt: skip
    assert train_main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["best_step"], metrics["accuracy"]) == (50, 1.0)
    assert read_state(tmp_path / "run" / "best")["step"] == 50
    assert_model_holds_backup(tmp_path / "run" / "model.keras", tmp_path / "run" / "best")
    assert train_main([*args, "--set", "train.keep_best=f1"]) == 2
    assert "train.keep_best='f1': validation reports loss, accuracy" in capsys.readouterr().err


class RecordingWordCountTask(WordCountTask):
    """Records the weights each validation sees, by optimizer step; its loss
    is best at step 40 (so `keep_best` restores an earlier backup)."""

    name = "recorded_count"
    aliases = ()
    seen = {}

    def evaluate(self, model):
        step = int(model.optimizer.iterations.numpy())
        self.seen[step] = [w.numpy() for w in model.trainable_weights]
        return {**super().evaluate(model), "loss": float(abs(step - 40))}


def test_ema_validates_keeps_and_saves_the_moving_average_and_resumes_raw(tmp_path):
    register_task(RecordingWordCountTask)
    train = write_lines(tmp_path / "train.txt", 200, seed=0)
    args = ["recorded_count", "--out", str(tmp_path / "run")]
    for key, value in {"data.train_file": train, "data.valid_file": train, "train.steps": 60,
                       "train.checkpoint_every": 20, "train.eval_every": 20,
                       "train.keep_backups": 3, "train.ema": 0.9, "train.learning_rate": 1e-2,
                       "train.keep_best": "loss", "train.jit_compile": "false"}.items():
        args += ["--set", f"{key}={value}"]  # fmt: skip
    assert train_main(args) == 0
    assert sorted(RecordingWordCountTask.seen) == [20, 40, 60]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    saved = with_optimizer(fmkeras.load_model(tmp_path / "run" / "model.keras"), ema=0.9)
    for step, seen in RecordingWordCountTask.seen.items():
        # A backup holds the weights training goes on from (a resumed run continues
        # them exactly) and their averages, which are what validation saw.
        restore_backup(saved, tmp_path / "run" / "backup" / f"step-{step:08d}")
        raw = [w.numpy() for w in saved.trainable_weights]
        with saved.optimizer.averaged_weights():
            averaged = [w.numpy() for w in saved.trainable_weights]
        for got, average in zip(seen, averaged, strict=True):
            np.testing.assert_array_equal(got, average)
        assert not all(np.array_equal(a, w) for a, w in zip(averaged, raw, strict=True))
        if step == metrics["best_step"]:
            best = averaged
    assert metrics["best_step"] == 40
    saved = fmkeras.load_model(tmp_path / "run" / "model.keras")  # the best step's average
    for weight, average in zip(saved.trainable_weights, best, strict=True):
        np.testing.assert_array_equal(weight.numpy(), average)


def test_tasks_outside_fmkeras_work_from_the_command_line(tmp_path):
    plugin = tmp_path / "my_tasks.py"
    plugin.write_text("from test_tasks import WordCountTask\n"
                      "from fmkeras.tasks.registry import register_task\n"
                      "register_task(WordCountTask)\n", encoding="utf-8")  # fmt: skip
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "FMKERAS_TASK_MODULES": "my_tasks",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(tests)])}  # fmt: skip
    command = [sys.executable, "-m", "fmkeras.train", "count_words", "--list-keys",
               "--set", "word_count.max_words=4"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "word_count.max_words: 4" in result.stdout and "finetune.method" not in result.stdout
    env["FMKERAS_TASK_MODULES"] = "no_such_module"
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "$FMKERAS_TASK_MODULES: cannot import 'no_such_module'" in result.stderr


def test_run_directories_say_what_is_wrong_with_them(tmp_path):
    with pytest.raises(ConfigError, match="run directory .*/nope does not exist"):
        RunDir(tmp_path / "nope").read_info()
    with pytest.raises(ConfigError, match="is not an fmkeras run directory \\(no config.yaml\\)"):
        RunDir(tmp_path).read_info()
    run = RunDir(tmp_path / "unfinished")
    run.prepare(build_config(None, []))
    with pytest.raises(ConfigError, match="is not finished \\(no backup yet\\); run the same"):
        run.read_info()
    (run.backups / "step-00000040").mkdir(parents=True)
    for name in ("state.json", "state.weights.h5"):
        (run.backups / "step-00000040" / name).write_text('{"step": 40}')
    with pytest.raises(ConfigError, match="its newest backup is step 40"):
        run.read_info()
    with pytest.raises(ConfigError, match="holds a 'mlm' run; this command needs a 'translate'"):
        run.model.write_text("")
        run.write_info({"task": "pretrain", "sequence_length": 8})
        load_run(run.root, tasks=("translate",))


@pytest.mark.parametrize("task, recipe", [
    ("classify", "sst2"),
    # The same driver path as classify (~9 and ~24 s):
    pytest.param("tag", "conll2003", marks=pytest.mark.slow),
    pytest.param("translate", "en_zh", marks=pytest.mark.slow),
])  # fmt: skip
def test_a_nan_loss_stops_every_task_with_its_last_good_backup(task, recipe, tmp_path, data_dir,
                                                               capsys):  # fmt: skip
    settings = {"model.size": "tiny", "model.init": "random", "data.max_lines": 200,
                "data.vocab_size": 500, "train.batch_size": 8, "train.steps": 6,
                "train.checkpoint_every": 2, "train.eval_every": 6, "train.warmup_steps": 0,
                "train.learning_rate": 1e30, "train.jit_compile": "false"}  # fmt: skip
    assert train_main(train_args(task, recipe, settings, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert re.search(r"loss became NaN or infinite at step \d; training stopped\. Last good "
                     r"backup: (none|\S+step-0000000\d)\.", err), err  # fmt: skip
    assert not (tmp_path / "run" / "model.keras").exists()


# Where a task keeps its validation examples (the encoder tasks: `valid_rows.inputs`).
VALIDATION_EXAMPLES = {"en_zh": "valid_sources", "pretrain_gutenberg": "valid_sequences"}


@pytest.mark.parametrize("recipe", ["sst2", "conll2003", "en_zh", "pretrain_gutenberg"])
def test_eval_steps_validates_every_task_on_the_first_examples(recipe, tmp_path, data_dir,
                                                               capsys):  # fmt: skip
    """`train.eval_steps` x `train.batch_size` examples: the valid file's first
    (the language models take the first `eval_steps` batches of theirs)."""
    settings = {"model.size": "tiny", "model.init": "random", "data.max_lines": 100,
                "data.vocab_size": 500, "data.sequence_length": 32, "train.batch_size": 4}

    def validated(eval_steps, out):
        """`(rows validation reads, the task's validation examples)`."""
        with_steps = {**settings, "train.eval_steps": eval_steps or "null"}
        task, _ = built_task(REPO / "trainers" / f"{recipe}.yaml", with_steps, tmp_path / out)
        rows = sum(int(labels.shape[0]) for _, labels, *_ in task.valid_data)
        if recipe in VALIDATION_EXAMPLES:
            return rows, getattr(task, VALIDATION_EXAMPLES[recipe])
        return rows, task.valid_rows.inputs

    rows, everything = validated(None, "all")
    assert rows == len(everything) > 20
    assert "validation: the first" not in capsys.readouterr().out
    rows, first = validated(3, "first")
    assert rows == 12
    if recipe != "pretrain_gutenberg":  # the others keep the examples they validate on
        assert first == everything[:12]
    assert (f"validation: the first 12 of {len(everything)} examples (train.eval_steps=3 x "
            "train.batch_size=4)") in capsys.readouterr().out  # fmt: skip
    assert validated(1000, "more")[0] == len(everything)  # more than there are: all
