"""`python -m fmkeras.evaluate RUN_DIR --data PATH`: score a finished run on a labelled file.

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
    cli.decode_arguments(parser)
    parser.add_argument("--out", help="also write the metrics JSON here")
    return parser


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    from fmkeras.tasks import load_run
    from fmkeras.training.checkpoints import write_json

    predictor = load_run(args.run_dir, decode=cli.decode_config(args))
    inputs = {name: getattr(args, name) for name in predictor.evaluate_inputs}
    missing = [f"--{name}" for name in ("data", "src", "ref") if name in inputs
               and not inputs[name]]  # fmt: skip
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required for {predictor.info['task']} runs")
    for name in ("data", "src", "ref"):
        if inputs.get(name) and not Path(inputs[name]).is_file():
            raise DataError(f"{inputs[name]} does not exist")
    metrics = predictor.evaluate(**inputs)
    if args.out:
        write_json(args.out, metrics)  # full precision
    print(json.dumps(cli.rounded(metrics), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
