"""`python -m fmkeras.compress prune RUN --heads F --ffn F --out DIR`:
structured pruning of a finished classify (or distill) run.

Keeps `--layers` evenly spaced layers (a teacher-initialised student, as
DistilBERT's), scores every attention head by its gradient importance on training batches
(Michel et al. 2019), every feed-forward unit by magnitude and, with
`--hidden`, every hidden channel by its activations (Minitron)
(`fmkeras.compress.structured`), removes the share `--heads` of all heads,
`--ffn` of each layer's units and `--hidden` of the hidden width (the
embedding tables with it), and writes the smaller model as a
finished classify run: `evaluate`, `predict`, `explain`, `export` and
`model.init` take it like any. With `--recover-steps N` a short recovery
fine-tune follows: the pruned model goes to `DIR/pruned` and `DIR` is the
run trained from it for N steps with the source run's configuration (a
distill run keeps distilling from its teacher), `--set` on top.
"""

import json
import shutil
import time

from fmkeras import cli
from fmkeras.errors import ConfigError
from fmkeras.train import log

EXAMPLES = """examples:
  python -m fmkeras.compress prune runs/sst2 --heads 0.4 --out runs/sst2-heads40
  python -m fmkeras.compress prune runs/sst2 --heads 0.4 --ffn 0.3 --recover-steps 300 \\
      --out runs/sst2-pruned --set train.learning_rate=5e-5
  python -m fmkeras.compress prune runs/sst2 --layers 3 --recover-steps 1000 --out runs/student \\
      --set task=distill --set distill.teacher=runs/sst2
  python -m fmkeras.compress prune runs/sst2 --layers 4 --hidden 0.333 --out runs/narrow"""
COMPRESSIBLE = ("classify", "distill")


def build_parser():
    parser = cli.parser("compress", __doc__, EXAMPLES)
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="remove layers, attention heads, feed-forward "
                                "units and hidden channels",
                                description=__doc__, epilog=EXAMPLES,
                                formatter_class=cli.HelpFormatter)  # fmt: skip
    prune.add_argument("run_dir", help="a finished classify or distill run")
    prune.add_argument("--heads", type=float, default=0.0,
                       help="share of all attention heads to remove (least important first)")
    prune.add_argument("--ffn", type=float, default=0.0,
                       help="share of each layer's feed-forward units to remove")
    prune.add_argument("--hidden", type=float, default=0.0,
                       help="share of the hidden channels (the residual stream's width, "
                       "embedding tables included) to remove, by activation importance")
    prune.add_argument("--layers", type=int,
                       help="keep this many layers, evenly spaced from the first to the last "
                       "(default: all)")  # fmt: skip
    prune.add_argument("--out", required=True, help="the pruned run's directory")
    prune.add_argument("--batches", type=int, default=64,
                       help="training batches (of the run's batch size) scored for head importance")
    prune.add_argument("--recover-steps", type=int, default=0,
                       help="then fine-tune the pruned model this many steps (0: no recovery)")
    prune.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="recovery fine-tune: override a key of the "
                       "source run's configuration (repeatable)")  # fmt: skip
    prune.add_argument("--data-dir", help="data directory (default: data.dir, then "
                       "$FMKERAS_DATA_DIR)")  # fmt: skip
    return parser


def check_shares(args):
    for flag in ("heads", "ffn", "hidden"):
        value = getattr(args, flag)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--{flag} is a share in [0, 1), got {value}")
    if args.batches < 1 or args.recover_steps < 0:
        raise ConfigError("--batches must be positive and --recover-steps not negative")


def scoring_batches(predictor, config, data_dir, count):
    """The first `count` shuffled training batches of the source run (its data files)."""
    from fmkeras.tasks.classify import encode_rows
    from fmkeras.tasks.registry import get_spec
    from fmkeras.tasks.spec import resolve_files
    from fmkeras.text.labelled import batched, read_tsv

    files = resolve_files(get_spec(config.task), config, data_dir, log)
    data, info = config.data, predictor.info
    rows = read_tsv(files["train"], data.text_column, data.label_column, data.bad_rows,
                    data.max_lines, set(predictor.labels),
                    pair_column=data.text_pair_column)  # fmt: skip
    ids, labels = encode_rows(predictor.tokenizer, rows, predictor.labels,
                              info["sequence_length"])  # fmt: skip
    return batched(ids, labels, config.train.batch_size, info["sequence_length"],
                   predictor.tokenizer.pad_id, shuffle=True,
                   seed=config.train.seed).take(count)  # fmt: skip


def write_run(source, model, destination, details):
    """`destination` as a finished run: the pruned model and its encoder, and
    the source run's vocabulary, configuration and task.json."""
    from fmkeras.training.checkpoints import save_model, write_json
    from fmkeras.training.run_dir import RunDir

    run = RunDir(destination)
    run.root.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "config.yaml"):
        shutil.copyfile(source.root / name, run.root / name)
    save_model(model, run.model)
    save_model(model.encoder, run.encoder)
    info = source.read_info()
    run.write_info({**info, "pruned": details})
    write_json(run.metrics, {"pruned": details})
    return run


def prune(args):
    check_shares(args)
    from fmkeras.training.run_dir import RunDir

    source, out = RunDir(args.run_dir), RunDir(args.out)
    source.read_info()  # a directory that holds no finished run fails before TensorFlow loads
    if out.root.resolve() == source.root.resolve() or out.model.is_file():
        raise ConfigError(f"--out {out.root} holds a finished run; choose another --out")
    pruned = RunDir(out.root / "pruned")
    if args.recover_steps and pruned.model.is_file():  # a killed recovery: resume it
        log(f"{pruned.root} exists: resuming its recovery fine-tune")
        recover(args, source, pruned, json.loads(pruned.metrics.read_text())["pruned"])
        return
    import keras

    from fmkeras.compress.structured import (
        channel_importance,
        head_importance,
        plan_pruning,
        pooler_importance,
        pruned_model,
        unit_importance,
    )
    from fmkeras.config import build_config
    from fmkeras.tasks import load_run

    predictor = load_run(source.root, tasks=COMPRESSIBLE)
    config = build_config(source.config)
    model = predictor.model
    depth = model.encoder.num_layers
    if args.layers is not None and not 1 <= args.layers <= depth:
        raise ConfigError(f"--layers {args.layers}: the encoder has {depth} layers")
    started = time.time()
    batches = scoring_batches(predictor, config, args.data_dir, args.batches)
    head_scores = head_importance(model, batches)
    channel_scores = channel_importance(model.encoder, batches) if args.hidden else None
    plan = plan_pruning(head_scores, unit_importance(model.encoder), args.heads, args.ffn,
                        args.layers, channel_scores, pooler_importance(model),
                        args.hidden)  # fmt: skip
    smaller = pruned_model(model, plan)
    details = {**plan.summary(model.encoder), "source": str(source.root),
               "heads_share": args.heads, "ffn_share": args.ffn, "hidden_share": args.hidden,
               "parameters_before": model.count_params(),
               "parameters_after": smaller.count_params(),
               "head_importance": [scores.tolist() for scores in head_scores],
               "importance_batches": args.batches}  # fmt: skip
    dropped = details["heads_in_dropped_layers"]
    with_layers = f"{dropped} with the dropped layers; " if dropped else ""
    log(f"kept layers {plan.layers} of {depth}; "
        f"pruned {details['heads_removed']} of {details['heads_total']} heads ({with_layers}per "
        f"layer now {details['heads_per_layer']}) and {details['units_removed']:,} of "
        f"{details['units_total']:,} feed-forward units, hidden width "
        f"{details['hidden_dim_before']} -> {details['hidden_dim']}: {model.count_params():,} -> "
        f"{smaller.count_params():,} parameters ({time.time() - started:.0f} s)")  # fmt: skip
    if not args.recover_steps:
        run = write_run(source, smaller, args.out, details)
        log(f"pruned run {run.root}: evaluate, export or fine-tune it like any classify run")
        return
    write_run(source, smaller, pruned.root, details)
    keras.backend.clear_session()
    recover(args, source, pruned, details)


def recover(args, source, pruned, details):
    """The recovery fine-tune: the source run's configuration from the pruned model."""
    from fmkeras.config import build_config
    from fmkeras.training.driver import train

    steps = args.recover_steps
    cadence = build_config(source.config).train  # the source's cadence, capped at the steps
    overrides = [f"model.init={pruned.root}", f"train.steps={steps}",
                 f"train.warmup_steps={steps // 10}",
                 f"train.checkpoint_every={min(cadence.checkpoint_every, steps)}",
                 f"train.eval_every={min(cadence.eval_every, steps)}", *args.overrides]  # fmt: skip
    config = build_config(source.config, overrides)
    log(f"recovery fine-tune: {steps} steps from {pruned.root}")
    run, metrics = train(config, args.out, args.data_dir, log=log)
    write_json_merged(run, {"pruned": details})
    log(f"pruned and recovered run {run.root}: validation accuracy {metrics['accuracy']:.4f}")


def write_json_merged(run, extra):
    """Adds `extra` to the finished run's task.json and metrics.json."""
    from fmkeras.training.checkpoints import write_json

    for path in (run.task_info, run.metrics):
        write_json(path, {**json.loads(path.read_text(encoding="utf-8")), **extra})


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    {"prune": prune}[args.command](args)
    return 0
