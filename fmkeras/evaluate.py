"""`python -m fmkeras.evaluate RUN_DIR --data PATH`: score a trained run on a labelled file.

The file has the format the run was trained on (TSV with the same columns,
or CoNLL). Prints the metrics as JSON and optionally writes them (`--out`).
"""

import argparse
import json
import sys

from fmkeras.errors import FmkerasError
from fmkeras.inference import load_run
from fmkeras.training.checkpoints import write_json


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fmkeras.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="a finished classify or tag run directory")
    parser.add_argument("--data", required=True, help="labelled file to evaluate on")
    parser.add_argument("--bad-rows", choices=["fail", "skip"], default="fail")
    parser.add_argument("--out", help="also write the metrics JSON here")
    args = parser.parse_args(argv)
    try:
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
