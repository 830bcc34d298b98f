"""`python -m fmkeras.evaluate RUN_DIR [--data PATH]`: score a finished run on a labelled file.

Without --data (or --src/--ref) it scores the run's own validation file, the
`data.valid_file` its config.yaml names, in the data directory (--data-dir,
then the run's `data.dir`, then $FMKERAS_DATA_DIR).

classify / tag runs: `--data` in the format the run was trained on (TSV with
the same columns, or CoNLL). mlm runs: `--data` is a text file (or a TSV,
whose text column the run was trained with is read); prints
masked-LM loss, accuracy and perplexity. translate runs: `--src` and `--ref`
are aligned line files; prints BLEU and chrF (sacreBLEU) and can write the
hypotheses. Prints the metrics as JSON (floats to 4 decimals) and optionally
writes them at full precision (`--out`). The keys are those of the run's
metrics.json (`loss`, `accuracy`, ...).
"""

import json
import sys
from pathlib import Path

from fmkeras import cli
from fmkeras.errors import ConfigError, DataError

EXAMPLES = """examples:
  python -m fmkeras.evaluate runs/sst2                # the run's validation file
  python -m fmkeras.evaluate runs/sst2 --data $FMKERAS_DATA_DIR/sst2/dev.tsv
  python -m fmkeras.evaluate runs/en_zh --src valid.en --ref valid.zh --beam 4
  python -m fmkeras.evaluate runs/pretrain_gutenberg \
      --data $FMKERAS_DATA_DIR/gutenberg_en/valid.txt"""


def build_parser():
    parser = cli.parser("evaluate", __doc__, EXAMPLES)
    parser.add_argument("run_dir", help="a finished run directory (any task)")
    parser.add_argument("--data",
                        help="classify/tag: labelled file; mlm, causal_lm: text file or TSV")
    parser.add_argument("--bad-rows", choices=["fail", "skip"], default="fail",
                        help="classify/tag, and mlm/causal_lm on a TSV: stop at the first "
                        "malformed row, or skip and count them")  # fmt: skip
    parser.add_argument("--src", help="translate: source sentences, one per line")
    parser.add_argument("--ref", help="translate: reference translations, aligned with --src")
    parser.add_argument("--hypotheses", help="translate: write the translations here")
    parser.add_argument("--data-dir", help="where the run's validation file is looked up when "
                        "no --data/--src/--ref is given (default: the run's data.dir, then "
                        "$FMKERAS_DATA_DIR)")  # fmt: skip
    cli.decode_arguments(parser)
    parser.add_argument("--out", help="also write the metrics JSON here")
    return parser


FILE_INPUTS = ("data", "src", "ref")
VALIDATION_ROLES = {"valid": "data", "valid_source": "src", "valid_target": "ref"}


def validation_inputs(run_dir, data_dir_option):
    """`{input name: path}` of the files the finished run `run_dir` validated
    on (its config.yaml's `data.valid_file`, or a translator's source and
    target files, in the data directory); a one-line error when the run names
    none or they are missing. Reads no model, so it fails fast."""
    from fmkeras.config import build_config
    from fmkeras.data import require_file, resolve_data_dir
    from fmkeras.tasks.registry import get_spec
    from fmkeras.training.run_dir import RunDir

    run = RunDir(run_dir)
    run.read_info()  # a one-line error for a directory that holds no finished run
    try:
        config = build_config(run.config)
    except ConfigError as error:
        raise ConfigError(f"--data (or --src and --ref) required: the run's validation file is "
                          f"unknown ({error})") from None  # fmt: skip
    files = get_spec(config.task).data_files(config)
    found = {VALIDATION_ROLES[role]: relative for role, relative in files.items()
             if role in VALIDATION_ROLES and relative}  # fmt: skip
    if not found:
        raise ConfigError(f"--data (or --src and --ref) required: the {config.task} run names "
                          "no validation file")  # fmt: skip
    data_dir, origin = resolve_data_dir(data_dir_option, config.data.dir)
    paths = {name: require_file(relative, data_dir, origin) for name, relative in found.items()}
    print(f"evaluating on the run's validation data: {', '.join(map(str, paths.values()))}",
          file=sys.stderr)  # fmt: skip
    return {name: str(path) for name, path in paths.items()}


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    given = {name: getattr(args, name) for name in FILE_INPUTS if getattr(args, name)}
    for path in given.values():  # before the model loads, so a typo fails at once
        if not Path(path).is_file():
            raise DataError(f"{path} does not exist")
    files = given or validation_inputs(args.run_dir, args.data_dir)
    from fmkeras.tasks import load_run
    from fmkeras.training.checkpoints import write_json

    predictor = load_run(args.run_dir, decode=cli.decode_config(args))
    wanted = [name for name in FILE_INPUTS if name in predictor.evaluate_inputs]
    if set(files) != set(wanted):
        raise ConfigError(f"{' and '.join(f'--{name}' for name in wanted)} required for "
                          f"{predictor.info['task']} runs")  # fmt: skip
    inputs = {name: getattr(args, name) for name in predictor.evaluate_inputs} | files
    metrics = predictor.evaluate(**inputs)
    if args.out:
        write_json(args.out, metrics)  # full precision
    print(json.dumps(cli.rounded(metrics), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
