"""`python -m fmkeras.translate RUN_DIR "sentence" ...`: translate with a finished translate run.

Sentences come from the arguments or one per line from `--file` (`-`:
stdin); translations are printed one per line (or written to `--out`),
aligned with the input lines.
"""

import sys

from fmkeras import cli

EXAMPLES = """examples:
  python -m fmkeras.translate runs/en_zh "How are you?" "Thank you."
  python -m fmkeras.translate runs/en_de --file input.en --out output.de --beam 1"""


def build_parser():
    parser = cli.parser("translate", __doc__, EXAMPLES)
    parser.add_argument("run_dir", help="a finished translate run directory")
    parser.add_argument("texts", nargs="*", help="sentences to translate")
    parser.add_argument("--file", help="read sentences one per line ('-': stdin)")
    parser.add_argument("--out", help="write translations here instead of printing")
    cli.decode_arguments(parser)
    return parser


@cli.command
def main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    from fmkeras.data import read_input_texts
    from fmkeras.tasks import load_run

    texts = read_input_texts(args.texts, args.file, keep_empty=True)
    if not texts:
        parser.error("give sentences as arguments or --file")
    predictor = load_run(args.run_dir, tasks=("translate",), decode=cli.decode_config(args))
    outputs = predictor.translations(texts)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.writelines(f"{line}\n" for line in outputs)
    else:
        print("\n".join(outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
