"""`python -m fmkeras.evaluate RUN_DIR --data PATH`: score a trained run on a labelled file.

Classify/tag runs: `--data` in the format the run was trained on (TSV with
the same columns, or CoNLL). Translate runs: `--src` and `--ref` aligned line
files; prints BLEU and chrF (sacreBLEU) and can write the hypotheses. Prints
the metrics as JSON and optionally writes them (`--out`).
"""

import argparse
import json
import sys
from pathlib import Path

from fmkeras.errors import ConfigError, FmkerasError
from fmkeras.inference import load_run
from fmkeras.tasks.finetune import read_task_info
from fmkeras.tasks.translate import load_translator, score
from fmkeras.text.parallel import read_parallel
from fmkeras.training.checkpoints import write_json
from fmkeras.translate import decode_arguments, decode_config


def evaluate_translation(args):
    if not (args.src and args.ref):
        raise ConfigError("translation runs need --src and --ref")
    pairs = read_parallel(args.src, args.ref)
    translate, info = load_translator(args.run_dir, decode_config(args))
    hypotheses = translate(pairs.sources, beam_width=args.beam)
    if args.hypotheses:
        Path(args.hypotheses).write_text("".join(f"{h}\n" for h in hypotheses), encoding="utf-8")
    metrics = score(hypotheses, pairs.targets, info["target_language"])
    return {**metrics, "sentences": len(hypotheses), "beam_width": args.beam,
            "dropped_pairs": pairs.dropped}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fmkeras.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="a finished classify or tag run directory")
    parser.add_argument("--data", help="classify/tag: labelled file to evaluate on")
    parser.add_argument("--src", help="translate: source sentences, one per line")
    parser.add_argument("--ref", help="translate: reference translations, aligned with --src")
    parser.add_argument("--hypotheses", help="translate: write the translations here")
    decode_arguments(parser)
    parser.add_argument("--bad-rows", choices=["fail", "skip"], default="fail")
    parser.add_argument("--out", help="also write the metrics JSON here")
    args = parser.parse_args(argv)
    try:
        if read_task_info(Path(args.run_dir))["task"] == "translate":
            metrics = evaluate_translation(args)
        elif not args.data:
            raise ConfigError("--data is required for classify/tag runs")
        else:
            metrics = load_run(args.run_dir).evaluate(args.data, args.bad_rows)
    except FmkerasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
