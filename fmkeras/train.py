"""`python -m fmkeras.train [TASK] [--recipe FILE] [--set key=value ...]`: train a model.

With no task and no recipe it runs the quickstart on the local CPU in a few
minutes: a tiny encoder pretrained briefly on the Gutenberg corpus
(`runs/quickstart/pretrain`), then fine-tuned and evaluated on SST-2
(`runs/quickstart/sst2`); `--set` overrides apply to both stages.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

from fmkeras.config import TASKS, build_config
from fmkeras.data import resolve_data_dir
from fmkeras.distribute import configure_cpu_devices, create_strategy, worker_role
from fmkeras.errors import ConfigError, FmkerasError
from fmkeras.tasks import classify, pretrain, tag, translate
from fmkeras.training.run_dir import RunDir

QUICKSTART_PRETRAIN = {
    "model.size": "tiny",
    "data.max_lines": 6000,
    "data.vocab_size": 8000,
    "train.steps": 300,
    "train.learning_rate": 1e-3,
    "train.checkpoint_every": 100,
    "train.eval_every": 100,
    "train.eval_steps": 10,
    "train.log_every": 50,
}
QUICKSTART_CLASSIFY = {
    "task": "classify",
    "data.train_file": "sst2/train.tsv",
    "data.valid_file": "sst2/dev.tsv",
    "data.sequence_length": 64,
    "data.max_lines": 20000,
    "train.steps": 400,
    "train.learning_rate": 5e-4,
    "train.checkpoint_every": 200,
    "train.eval_every": 200,
    "train.log_every": 50,
}
SUMMARY_KEYS = (
    "valid_loss",
    "valid_masked_accuracy",
    "valid_perplexity",
    "tokens_per_second",
    "mfu",
    "accuracy",
    "macro_f1",
    "f1",
    "examples_per_second",
    "bleu",
    "chrf",
)


def log(message):
    print(f"[fmkeras {time.strftime('%H:%M:%S')}] {message}", flush=True)


def find_recipe(name):
    """A recipe path, or a bare name looked up in `trainers/`."""
    for candidate in (Path(name), Path("trainers") / name, Path("trainers") / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"recipe {name!r} not found (looked for it as a path and in trainers/)")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m fmkeras.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "task", nargs="?", choices=TASKS, help="what to train (default: the recipe's)"
    )
    parser.add_argument("--recipe", help="YAML recipe: a path or a name in trainers/")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.steps=100 (repeatable)",
    )
    parser.add_argument(
        "--data-dir", help="data directory (default: data.dir, then $FMKERAS_DATA_DIR)"
    )
    parser.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    return parser.parse_args(argv)


def train_one(config, out, data_dir_option):
    """Runs one task into run directory `out`; returns `(RunDir, metrics)`."""
    configure_cpu_devices(config.distribute.cpu_devices)  # before TensorFlow runs anything
    data_dir, origin = resolve_data_dir(data_dir_option, config.data.dir)
    index, is_chief = 0, True
    if config.distribute.strategy == "multi_worker":
        create_strategy(config.distribute)  # before TensorFlow runs ops; tasks reuse it
        index, is_chief = worker_role()
    # Only the chief writes the run directory (TensorBoard, model, metrics); other
    # workers keep their own backups (to resume) in workers/ and delete it when done.
    run = RunDir(out if is_chief else Path(out) / "workers" / f"worker-{index}")
    run.prepare(config)
    log(f"{config.task}: run directory {run.root}, data directory {data_dir} ({origin})")
    task = {"pretrain": pretrain, "classify": classify, "tag": tag, "translate": translate}[
        config.task
    ]
    metrics = task.run(config, run, data_dir, origin, log=log)
    if not is_chief:
        shutil.rmtree(run.root)
        if not any(run.root.parent.iterdir()):
            run.root.parent.rmdir()
        log(f"worker {index}: finished; the chief wrote the run directory {out}")
        return RunDir(out), metrics
    summary = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in metrics.items()
        if k in SUMMARY_KEYS
    )
    log(f"done: {summary}")
    log(
        f"run directory {run.root}: model {run.model.name}, encoder {run.encoder.name}, "
        f"vocabulary {run.vocab.name}, metrics {run.metrics.name}, "
        f"TensorBoard: tensorboard --logdir {run.logs}"
    )
    return run, metrics


def quickstart(args):
    root = Path(args.out or Path("runs") / "quickstart")
    config = build_config(None, args.overrides, base=QUICKSTART_PRETRAIN)
    pretrained, _ = train_one(config, root / "pretrain", args.data_dir)
    base = {**QUICKSTART_CLASSIFY, "model.init": str(pretrained.root)}
    config = build_config(None, args.overrides, base=base)
    classifier, metrics = train_one(config, root / "sst2", args.data_dir)
    log(
        f"quickstart finished: SST-2 dev accuracy {metrics['accuracy']:.1%}. Pretrained encoder: "
        f"{pretrained.encoder}; classifier: {classifier.model}. Next: "
        f'python -m fmkeras.predict {classifier.root} "a charming film"; '
        f"tensorboard --logdir {root}; recipes in trainers/ (see README)"
    )


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.recipe and not args.task:
            quickstart(args)
            return 0
        recipe = find_recipe(args.recipe) if args.recipe else None
        config = build_config(recipe, args.overrides)
        if args.task and recipe and config.task != args.task:
            raise ConfigError(f"{recipe} is a {config.task!r} recipe, not {args.task!r}")
        if args.task:
            config.task = args.task
        default_out = Path("runs") / (recipe.stem if recipe else config.task)
        train_one(config, args.out or default_out, args.data_dir)
    except FmkerasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to resume from the last backup",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
