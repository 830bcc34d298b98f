"""`python -m fmkeras.translate RUN_DIR "sentence" ...`: translate with a trained run.

Sentences come from the arguments or one per line from `--file` (`-`: stdin);
translations are printed one per line (or written to `--out`).
"""

import argparse
import sys

from fmkeras.config import DecodeConfig
from fmkeras.data import read_input_texts
from fmkeras.errors import FmkerasError
from fmkeras.tasks.translate import load_translator


def decode_arguments(parser):
    parser.add_argument("--beam", type=int, default=4, help="beam width (1: greedy)")
    parser.add_argument("--length-penalty", type=float, default=0.6)
    parser.add_argument("--max-length", type=int, help="target tokens (default: training length)")


def decode_config(args):
    return DecodeConfig(beam_width=args.beam, length_penalty=args.length_penalty,
                        max_length=args.max_length)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fmkeras.translate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="a finished translate run directory")
    parser.add_argument("texts", nargs="*", help="sentences to translate")
    parser.add_argument("--file", help="read sentences one per line ('-': stdin)")
    parser.add_argument("--out", help="write translations here instead of printing")
    decode_arguments(parser)
    args = parser.parse_args(argv)
    try:
        texts = read_input_texts(args.texts, args.file, keep_empty=True)
        if not texts:
            parser.error("give sentences as arguments or --file")
        translate, _ = load_translator(args.run_dir, decode_config(args))
        outputs = translate(texts, beam_width=args.beam)
    except FmkerasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.writelines(f"{line}\n" for line in outputs)
    else:
        print("\n".join(outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
