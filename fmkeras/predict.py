"""`python -m fmkeras.predict RUN_DIR "text" ...`: use a finished run on raw texts.

classify runs print a label and probabilities, tag runs word tags, translate
runs the translation, and mlm runs the likeliest pieces for each `[MASK]`.
Texts come from the arguments, or one per line from `--file` (`-` for
stdin). Prints one JSON object per text (probabilities to 4 decimals), in
input order: an empty (or blank) text gets `{"text": "", "empty": true}` and
no prediction, so the output stays aligned with the input lines.
"""

import json
import sys

from fmkeras import cli

EXAMPLES = """examples:
  python -m fmkeras.predict runs/quickstart/sst2 "a charming film" "dull"
  python -m fmkeras.predict runs/conll2003 --file sentences.txt
  python -m fmkeras.predict runs/pretrain_gutenberg "The old man [MASK] the door ." """


def build_parser():
    parser = cli.parser("predict", __doc__, EXAMPLES)
    parser.add_argument("run_dir", help="a finished run directory (any task)")
    parser.add_argument("texts", nargs="*", help="texts to use the run on")
    parser.add_argument("--file", help="read texts one per line from this file ('-': stdin)")
    parser.add_argument("--top-k", type=int, default=5, help="mlm: pieces per [MASK]")
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
        parser.error("give texts as arguments or --file")
    predictor = load_run(args.run_dir, decode=cli.decode_config(args), top_k=args.top_k)
    given = [text for text in texts if text.strip()]
    results = iter(predictor.predict(given) if given else [])
    for text in texts:
        result = next(results) if text.strip() else {"text": text, "empty": True}
        print(json.dumps(cli.rounded(result), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
