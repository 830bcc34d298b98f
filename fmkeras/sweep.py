"""`python -m fmkeras.sweep --recipe R --grid KEY=V1,V2,... --out DIR`: a grid of runs.

Trains one run per point of the Cartesian product of the `--grid` values
(on top of the recipe and `--set`), each in its own run directory under
`--out` named by its values (`DIR/learning_rate=5e-5,steps=3200`), one after
another in this process, and writes `DIR/sweep.json` and `DIR/sweep.md`: per
point the kept validation metric (the best step's where `train.keep_best` is
set), its step, the metric at the last step, the validation curve and the
training time. With `train.seed` in the grid, a second table gives each
setting's mean, minimum and maximum over the seeds.

Every configuration is built and checked before the first run starts. A
point whose directory holds a finished run of the same configuration is
read, not trained again; an unfinished one resumes from its backup; so a
killed sweep continues where it stopped when the same command runs again.
`--report` writes the tables of the points finished so far and trains none.
"""

import dataclasses
import itertools
import json
import statistics
import sys
from pathlib import Path

from fmkeras import cli
from fmkeras.errors import ConfigError, DataError
from fmkeras.train import find_recipe, log, train_one, warn_ignored_settings

EXAMPLES = """examples:
  python -m fmkeras.sweep --recipe sst2 --grid train.learning_rate=5e-5,1e-4,2e-4 \\
      --grid train.steps=1600,3200 --set train.warmup_steps=null --out runs/sweep-sst2
  python -m fmkeras.sweep --recipe sst2 --grid train.seed=0,1,2 --out runs/sst2-seeds
  python -m fmkeras.sweep --recipe sst2 --grid train.seed=0,1 --set model.size=tiny \\
      --set model.init=random --set train.steps=20 --out runs/sweep-tiny --dry-run"""


@dataclasses.dataclass
class Point:
    """One configuration of the grid and where it runs."""

    name: str
    settings: dict  # {dotted key: value as typed}
    config: object  # RunConfig
    out: Path


def build_parser():
    parser = cli.parser("sweep", __doc__, EXAMPLES)
    parser.add_argument("--recipe", help="YAML recipe: a path or a bundled recipe's name")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a key and the comma-separated values to try (repeatable: "
                        "the sweep runs every combination)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a key set in every run (repeatable)")
    parser.add_argument("--metric", help="the validation metric that ranks the points (default: "
                        "train.keep_best)")  # fmt: skip
    parser.add_argument("--out", required=True, help="directory of the sweep's run directories")
    parser.add_argument("--data-dir", help="data directory (default: data.dir, then "
                        "$FMKERAS_DATA_DIR)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true",
                        help="list the points and whether each is new, unfinished or "
                        "finished, and exit")  # fmt: skip
    parser.add_argument("--report", action="store_true",
                        help="write the tables of the finished points, train nothing (a sweep "
                        "still running elsewhere, or cut short)")  # fmt: skip
    return parser


def parse_grid(texts, overrides):
    """`[(key, [value text, ...])]` of the `--grid` arguments, checked."""
    from fmkeras.config import parse_override

    fixed = {parse_override(text)[0] for text in overrides}
    grid = []
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        values = [value.strip() for value in raw.split(",")]
        if not sep or not key or not all(values):
            raise ConfigError(f"--grid expects KEY=V1,V2,... with no empty value, got {text!r}")
        if key in dict(grid):
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        if key in fixed:
            raise ConfigError(f"{key} is both swept (--grid) and fixed (--set); drop one")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {text!r} repeats a value")
        grid.append((key, values))
    if not grid:
        raise ConfigError("name at least one --grid KEY=V1,V2,...")
    return grid


def point_name(settings):
    """`learning_rate=5e-5,steps=3200`: the last part of each key (the whole key
    where two share it) and the value as typed (`/` as `_`: one directory)."""
    short = [key.rsplit(".", 1)[-1] for key in settings]
    return ",".join(f"{key if short.count(part) > 1 else part}={value.replace('/', '_')}"
                    for (key, value), part in zip(settings.items(), short, strict=True))


def build_points(args):
    """Every point of the grid with its validated configuration; a swept key
    the task does not read is an error, a fixed one a warning."""
    from fmkeras.config import build_config, unread_keys

    grid = parse_grid(args.grid, args.overrides)
    recipe = find_recipe(args.recipe) if args.recipe else None
    points = []
    for values in itertools.product(*(values for _, values in grid)):
        settings = dict(zip((key for key, _ in grid), values, strict=True))
        sweep_settings = [f"{key}={value}" for key, value in settings.items()]
        try:
            config = build_config(recipe, [*args.overrides, *sweep_settings])
        except ConfigError as error:
            raise ConfigError(f"sweep point {point_name(settings)}: {error}") from None
        name = point_name(settings)
        if any(point.name == name for point in points):
            raise ConfigError(f"two sweep points would share the directory {name}")
        points.append(Point(name, settings, config, Path(args.out) / name))
    task = points[0].config.task
    unread = unread_keys(task, [key for key, _ in grid])
    if unread:
        raise ConfigError(f"--grid {unread[0]}: task {task} does not read it, so every point "
                          f"would train the same model")  # fmt: skip
    warn_ignored_settings(task, args.overrides, recipe)
    return points


def metric_name(args, points):
    metric = args.metric or points[0].config.train.keep_best
    if not metric:
        raise ConfigError("name the validation metric that ranks the points: --metric "
                          "(e.g. accuracy, loss, bleu), or set train.keep_best")  # fmt: skip
    return metric


def check_points(args, points, metric):
    """What the driver checks before a run (the task's settings, `train.keep_best`,
    the data files) and the ranking metric, for every point before the first trains."""
    from fmkeras.tasks.registry import get_spec
    from fmkeras.tasks.spec import check_run

    option = "--metric" if args.metric else "train.keep_best"
    for point in points:
        try:
            check_run(point.config, args.data_dir, log=lambda _: None)
            get_spec(point.config.task).check_metric(point.config, metric, option)
        except (ConfigError, DataError) as error:
            raise type(error)(f"sweep point {point.name}: {error}") from None


def status(point):
    """`finished`, `unfinished` (resumes from a backup) or `new`; raises
    ConfigError if the directory holds a run of another configuration."""
    from fmkeras.training.checkpoints import latest_backup
    from fmkeras.training.run_dir import RunDir

    run = RunDir(point.out)
    run.check_same_run(point.config)
    if run.metrics.is_file():
        return "finished"
    return "unfinished" if latest_backup(run.backups)[0] is not None else "new"


def result(point, metric):
    """The summary row of a finished point."""
    from fmkeras.training.checkpoints import BestKeeper
    from fmkeras.training.run_dir import RunDir

    run = RunDir(point.out)
    metrics = json.loads(run.metrics.read_text(encoding="utf-8"))
    if not isinstance(metrics.get(metric), float):
        known = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, float)))
        raise ConfigError(f"{run.metrics} has no metric {metric!r}; it has {known}")
    curve = run.validation_curve(metric)
    steps = point.config.train.steps
    last = dict(curve).get(steps)
    return {
        "name": point.name,
        "run": str(point.out),
        "settings": point.settings,
        metric: metrics[metric],
        "step": metrics.get("best_step", steps),
        "last": last,
        "curve": curve,
        "train_seconds": metrics.get("train_seconds_this_attempt"),
        "resumed_from_step": metrics.get("resumed_from_step", 0),
        "lower_is_better": metric in BestKeeper.LOWER_IS_BETTER,
    }


def best_row(rows, metric):
    pick = min if rows[0]["lower_is_better"] else max
    return pick(rows, key=lambda row: row[metric])


def seed_summary(rows, metric):
    """Per setting of the keys other than `train.seed`: the kept metric's mean,
    minimum and maximum over its seeds, and the last step's mean."""
    groups = {}
    for row in rows:
        others = {k: v for k, v in row["settings"].items() if k != "train.seed"}
        groups.setdefault(point_name(others) if others else "all", []).append(row)
    summary = []
    for name, members in groups.items():
        kept = [row[metric] for row in members]
        lasts = [row["last"] for row in members if row["last"] is not None]
        summary.append({"name": name, "seeds": len(members), "mean": statistics.fmean(kept),
                        "min": min(kept), "max": max(kept),
                        "last_mean": statistics.fmean(lasts) if lasts else None})  # fmt: skip
    return summary


def markdown(rows, metric, seeds):
    def value(number):
        if number is None:
            return "—"
        return f"{100 * number:.2f} %" if metric in ("accuracy", "macro_f1", "f1") \
            else f"{number:.4g}"  # fmt: skip

    best = best_row(rows, metric)
    lines = [f"| point | {metric} (kept) | kept step | last step | validation curve | minutes |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]  # fmt: skip
    for row in rows:
        kept = f"**{value(row[metric])}**" if row is best else value(row[metric])
        curve = ", ".join(value(v) for _, v in row["curve"])
        minutes = f"{row['train_seconds'] / 60:.1f}" if row["train_seconds"] is not None else "—"
        if row["resumed_from_step"]:
            minutes += f" (from step {row['resumed_from_step']})"
        lines.append(f"| `{row['name']}` | {kept} | {row['step']} | {value(row['last'])} | "
                     f"{curve} | {minutes} |")  # fmt: skip
    if seeds:
        lines += ["", f"| setting | seeds | mean {metric} (kept) | min | max | mean at last step |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for group in seed_summary(rows, metric):
            lines.append(f"| `{group['name']}` | {group['seeds']} | {value(group['mean'])} | "
                         f"{value(group['min'])} | {value(group['max'])} | "
                         f"{value(group['last_mean'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_summary(out, rows, metric, seeds):
    from fmkeras.training.checkpoints import atomic_path, write_json

    summary = {"metric": metric, "points": rows, "best": best_row(rows, metric)["name"]}
    if seeds:
        summary["over_seeds"] = seed_summary(rows, metric)
    write_json(out / "sweep.json", summary)
    table = markdown(rows, metric, seeds)
    with atomic_path(out / "sweep.md") as temporary:
        temporary.write_text(table, encoding="utf-8")
    return table


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    points = build_points(args)
    metric = metric_name(args, points)
    check_points(args, points, metric)
    states = [status(point) for point in points]
    log(f"sweep: {len(points)} points into {args.out}, ranked by validation {metric}")
    for point, state in zip(points, states, strict=True):
        log(f"  {point.name}: {state}")
    if args.dry_run:
        return 0
    import keras

    seeds = any("train.seed" in point.settings for point in points)
    if args.report:
        points = [point for point, state in zip(points, states, strict=True) if state == "finished"]
        states = ["finished"] * len(points)
        if not points:
            raise ConfigError(f"--report: no point under {args.out} has finished yet")
    rows = []
    for number, (point, state) in enumerate(zip(points, states, strict=True), 1):
        if state != "finished":
            log(f"sweep point {number}/{len(points)}: {point.name}")
            keras.backend.clear_session()  # the previous point's graphs and layer names
            train_one(point.config, point.out, args.data_dir)
        rows.append(result(point, metric))
        table = write_summary(Path(args.out), rows, metric, seeds)
    print(table, end="")
    best = best_row(rows, metric)
    log(f"best: {best['name']} ({metric} {best[metric]:.4g} at step {best['step']}); "
        f"{Path(args.out) / 'sweep.md'}, sweep.json")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
