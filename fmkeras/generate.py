"""`python -m fmkeras.generate RUN_DIR "prompt" ...`: continue prompts with a
finished causal_lm run.

Sampling uses the key/value cache: the prompt is run once, then one token
per step. Settings default to the run's `generate` section; `--temperature
0` is greedy, `--top-k 0` and `--top-p 1` switch those filters off, and a
`--seed` reproduces a sample. Prompts come from the arguments or one per line
from `--file` (`-`: stdin); each result is printed on its own line (or as
JSON with `--json`).
"""

import dataclasses
import json
import sys

from fmkeras import cli

EXAMPLES = """examples:
  python -m fmkeras.generate runs/causal_lm_gutenberg "It was a dark and stormy night"
  python -m fmkeras.generate runs/causal_lm_gutenberg "The old man" --temperature 0.7 --top-p 0.9
  python -m fmkeras.generate runs/causal_lm_gutenberg "The" --max-new-tokens 100 --seed 3 --json"""


def build_parser():
    parser = cli.parser("generate", __doc__, EXAMPLES)
    parser.add_argument("run_dir", help="a finished causal_lm run directory")
    parser.add_argument("prompts", nargs="*", help="texts to continue")
    parser.add_argument("--file", help="read prompts one per line ('-': stdin)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens to add to each prompt")
    parser.add_argument("--temperature", type=float, help="0: greedy; higher: more varied")
    parser.add_argument("--top-k", type=int, help="sample among the K likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float,
                        help="sample within the fewest tokens of probability P (1: all)")
    parser.add_argument("--seed", type=int, help="the same seed gives the same text")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (prompt, text, continuation)")
    return parser


@cli.command
def main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    from fmkeras.config import GenerateConfig, validate_generate
    from fmkeras.data import read_input_texts
    from fmkeras.tasks import load_run
    from fmkeras.training.run_dir import RunDir

    prompts = read_input_texts(args.prompts, args.file, keep_empty=True)
    if not prompts:
        parser.error("give prompts as arguments or --file")
    info = RunDir(args.run_dir).read_info()
    settings = GenerateConfig(**info.get("generate", {}))
    chosen = {name: getattr(args, name) for name in
              ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}  # fmt: skip
    settings = dataclasses.replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    validate_generate(settings)
    predictor = load_run(args.run_dir, tasks=("causal_lm",), generate=settings)
    for result in predictor.predict(prompts):
        print(json.dumps(result, ensure_ascii=False) if args.json else result["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
