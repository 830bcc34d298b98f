"""`python -m fmkeras.train [TASK] [--recipe NAME] [--set key=value ...]`: train a model.

With no task and no recipe it runs the quickstart on the local CPU in a few
minutes: a tiny encoder pretrained briefly on the Gutenberg corpus
(`runs/quickstart/pretrain`), then fine-tuned and evaluated on SST-2
(`runs/quickstart/sst2`); `--set` overrides apply to both stages.
"""

import sys
import time
from pathlib import Path

from fmkeras import cli
from fmkeras.errors import ConfigError

RECIPES = Path(__file__).resolve().parent / "recipes"  # bundled with the package
QUICKSTART_PRETRAIN = {
    "task": "mlm",
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
    "loss",
    "accuracy",
    "perplexity",
    "macro_f1",
    "f1",
    "bleu",
    "chrf",
    "tokens_per_second",
    "mfu",
    "examples_per_second",
)


def log(message):
    print(f"[fmkeras {time.strftime('%H:%M:%S')}] {message}", flush=True)


def warn_ignored_settings(task, overrides, recipe=None):
    """One warning per key of the `recipe` file and per `--set key=value` of
    `overrides` that `task` does not read."""
    from fmkeras.config import load_recipe, parse_override, unread_keys

    sources = [("--set", [parse_override(text)[0] for text in overrides])]
    if recipe is not None:
        sources.insert(0, (f"{recipe}:", list(load_recipe(recipe))))
    for where, keys in sources:
        for key in unread_keys(task, keys):
            log(f"warning: {where} {key} is ignored: task {task} does not read it (--list-keys "
                f"shows the keys it reads)")  # fmt: skip


def bundled_recipes():
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def find_recipe(name):
    """A recipe path, or a bundled recipe's name (`sst2`, `sst2.yaml`,
    `trainers/sst2.yaml`), from any working directory."""
    stem = Path(name).name.removesuffix(".yaml")
    for candidate in (Path(name), RECIPES / f"{stem}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"recipe {name!r} not found as a path or among the bundled recipes "
                      f"({', '.join(bundled_recipes())})")  # fmt: skip


def build_parser():
    from fmkeras.tasks.registry import task_names

    examples = (
        "examples:\n"
        "  python -m fmkeras.train                          # the quickstart\n"
        "  python -m fmkeras.train --recipe sst2\n"
        "  python -m fmkeras.train --recipe pretrain_gutenberg --set model.size=tiny "
        "--set train.steps=30\n\n"
        f"bundled recipes: {', '.join(bundled_recipes())}\n"
        "keys: see README, 'Recipes and keys'"
    )
    parser = cli.parser("train", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                        examples)  # fmt: skip
    parser.add_argument(
        "task", nargs="?", metavar="TASK",
        help=f"what to train: {', '.join(task_names())} (pretrain = mlm); "
        "default: the recipe's",
    )  # fmt: skip
    parser.add_argument("--recipe", help="YAML recipe: a path or a bundled recipe's name")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.steps=100 "
                        "(repeatable)")  # fmt: skip
    parser.add_argument("--data-dir", help="data directory (default: data.dir, then "
                        "$FMKERAS_DATA_DIR)")  # fmt: skip
    parser.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--list-keys", action="store_true",
                        help="print the keys the task reads, with their values after the "
                        "recipe and --set, and exit")  # fmt: skip
    return parser


def train_one(config, out, data_dir_option):
    """Runs one task into run directory `out`; returns `(RunDir, metrics)`."""
    from fmkeras.training.driver import train

    run, metrics = train(config, out, data_dir_option, log=log)
    shown = [(key, metrics[key]) for key in SUMMARY_KEYS if metrics.get(key) is not None]
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown)
    log(f"done: {summary}")
    encoder = f", encoder {run.encoder.name}" if run.encoder.is_file() else ""
    log(f"run directory {run.root}: model {run.model.name}{encoder}, "
        f"vocabulary {run.vocab.name}, metrics {run.metrics.name}, "
        f"TensorBoard: tensorboard --logdir {run.logs}")  # fmt: skip
    return run, metrics


def quickstart(args):
    from fmkeras.config import build_config
    from fmkeras.tasks.registry import get_spec
    from fmkeras.tasks.spec import check_run, resolve_files

    root = Path(args.out or Path("runs") / "quickstart")
    pretrain_config = build_config(None, args.overrides, base=QUICKSTART_PRETRAIN)
    classify_config = build_config(None, args.overrides, base={**QUICKSTART_CLASSIFY,
                                   "model.init": str(root / "pretrain")})  # fmt: skip
    # Both stages' data before the first trains (the second's model.init does not exist yet).
    check_run(pretrain_config, args.data_dir, log=lambda _: None)
    resolve_files(get_spec("classify"), classify_config, args.data_dir, log=lambda _: None)
    pretrained, _ = train_one(pretrain_config, root / "pretrain", args.data_dir)
    classifier, metrics = train_one(classify_config, root / "sst2", args.data_dir)
    log(
        f"quickstart finished: SST-2 dev accuracy {metrics['accuracy']:.1%}. Pretrained encoder: "
        f"{pretrained.encoder}; classifier: {classifier.model}. Next: "
        f'python -m fmkeras.predict {classifier.root} "a charming film"; '
        f"tensorboard --logdir {root}; recipes: {', '.join(bundled_recipes())}"
    )


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    from fmkeras.config import build_config, keys_for
    from fmkeras.tasks.registry import canonical_task
    from fmkeras.tasks.spec import check_run

    if not args.recipe and not args.task and not args.list_keys:
        quickstart(args)
        return 0
    recipe = find_recipe(args.recipe) if args.recipe else None
    config = build_config(recipe, args.overrides)
    if args.task:
        task = canonical_task(args.task)
        if recipe and config.task != task:
            raise ConfigError(f"{recipe} is a {config.task!r} recipe, not {args.task!r}")
        config.task = task
    warn_ignored_settings(config.task, args.overrides, recipe)
    if args.list_keys:
        for key, value in keys_for(config.task, config):
            print(f"{key}: {value}")
        return 0
    default_out = Path("runs") / (recipe.stem if recipe else config.task)
    check_run(config, args.data_dir, log=lambda _: None)  # before the TensorFlow import
    train_one(config, args.out or default_out, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
