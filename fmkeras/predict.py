"""`python -m fmkeras.predict RUN_DIR "text" ...`: labels (classify) or word tags (tag).

Texts come from the arguments, or one per line from `--file` (`-` for stdin).
Prints one JSON object per text.
"""

import argparse
import json
import sys

from fmkeras.data import read_input_texts
from fmkeras.errors import FmkerasError
from fmkeras.inference import load_run


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fmkeras.predict", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="a finished classify or tag run directory")
    parser.add_argument("texts", nargs="*", help="texts to label")
    parser.add_argument("--file", help="read texts one per line from this file ('-': stdin)")
    args = parser.parse_args(argv)
    try:
        texts = read_input_texts(args.texts, args.file)
        if not texts:
            parser.error("give texts as arguments or --file")
        run = load_run(args.run_dir)
        if run.info["task"] == "classify":
            for text, (label, scores) in zip(texts, run.classify(texts), strict=True):
                print(json.dumps({"text": text, "label": label, "probabilities": scores}))
        else:
            sentences = [text.split() for text in texts]
            for text, tagged in zip(texts, run.tag(sentences), strict=True):
                print(json.dumps({"text": text, "tags": [[w, t] for w, t in tagged]}))
    except FmkerasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
