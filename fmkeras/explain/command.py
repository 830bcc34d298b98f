"""`python -m fmkeras.explain RUN "text" [--json] [--html OUT.html]`: why a
finished run predicted what it did.

classify runs explain each class (the predicted one first), tag runs each
predicted entity, translate runs each output token, with three methods over
the input token embeddings: integrated gradients (IG), gradient × input, and
attention rollout. Every explanation prints IG's completeness check: the
attributions add up to F(x) − F(baseline), where F is the explained
probability (or logit) and the baseline replaces every token but [CLS] and
[SEP] by [PAD] (or [MASK], or zeros).

`--data FILE --faithfulness` (classify runs) instead scores the methods on a
labelled TSV: ERASER comprehensiveness and sufficiency (AOPC over the top 1,
5, 10, 20 and 50 % of tokens) and the deletion curve, against random.
"""

import json
import sys

from fmkeras import cli
from fmkeras.explain.choices import BASELINES, OUTPUTS, RULES

EXAMPLES = """examples:
  python -m fmkeras.explain runs/sst2 "a gripping, beautifully acted film" --html why.html
  python -m fmkeras.explain runs/conll2003 "Angela Merkel visited Paris ." --json
  python -m fmkeras.explain runs/en_de "A man rides a bike ." --png figures/
  python -m fmkeras.explain runs/sst2 --data sst2/dev.tsv --faithfulness --out faith.json"""


def build_parser():
    parser = cli.parser("explain", __doc__, EXAMPLES)
    parser.add_argument("run_dir", help="a finished classify, tag or translate run")
    parser.add_argument("texts", nargs="*", help="texts to explain")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per text (full precision)"
    )
    parser.add_argument("--html", help="write a self-contained HTML report (one text)")
    parser.add_argument("--png", help="write the figures as PNGs into this directory (one text)")
    parser.add_argument(
        "--tensorboard", help="write image and text summaries to this log directory"
    )
    parser.add_argument("--words", action="store_true", help="merge word pieces into words")
    group = parser.add_argument_group("integrated gradients")
    group.add_argument("--steps", type=int, default=50, help="interpolation steps")
    group.add_argument("--rule", default="gausslegendre", choices=RULES, help="integration rule")
    group.add_argument(
        "--baseline",
        default="pad",
        choices=BASELINES,
        help="what replaces the tokens at the baseline",
    )
    group.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="integrate again with 4x the steps (up to 800) while the completeness error "
        "exceeds this share of |F(x) - F(baseline)|; 0: never",
    )
    group.add_argument(
        "--output",
        default="probability",
        choices=OUTPUTS,
        help="what F is: a softmax probability or a logit",
    )
    parser.add_argument_group("translate runs").add_argument(
        "--max-length", type=int, help="output tokens (default: the training sequence length)"
    )
    group = parser.add_argument_group("faithfulness (classify runs)")
    group.add_argument("--data", help="a TSV with the run's text column")
    group.add_argument(
        "--faithfulness",
        action="store_true",
        help="score the methods on --data (ERASER AOPC and deletion curves)",
    )
    group.add_argument("--limit", type=int, help="only the first N rows of --data")
    group.add_argument(
        "--bad-rows",
        default="fail",
        choices=("fail", "skip"),
        help="what a malformed row of --data does",
    )
    group.add_argument("--out", help="also write the faithfulness results to this JSON file")
    group.add_argument("--seed", type=int, default=0, help="seed of the random ranking")
    return parser


def check_arguments(parser, args):
    if args.faithfulness:
        if not args.data:
            parser.error("--faithfulness needs --data FILE")
        if args.texts:
            parser.error("give texts or --data --faithfulness, not both")
    elif not args.texts:
        parser.error("give texts to explain (or --data FILE --faithfulness)")
    if (args.html or args.png) and len(args.texts) != 1:
        parser.error("--html and --png write one text's report: give one text")
    if args.steps < 1:
        parser.error("--steps must be at least 1")


def make_explainer(predictor, args, output=None):
    from fmkeras.errors import ConfigError

    if predictor.explainer is None:
        raise ConfigError(
            f"{predictor.info['task']} runs cannot be explained; "
            "explain classify, tag and translate runs"
        )
    return predictor.explainer(
        predictor,
        baseline=args.baseline,
        steps=args.steps,
        rule=args.rule,
        output=output or args.output,
        tolerance=args.tolerance,
    )


def print_explanation(explanation):
    from fmkeras.explain.report import TITLES, prediction_text

    print(f"text: {explanation.text}")
    print(f"prediction: {prediction_text(explanation.prediction)}")
    if not explanation.targets:
        print("nothing to explain")
    for target in explanation.targets:
        change = target.score - target.baseline_score
        total = float(target.attributions["integrated_gradients"].sum())
        print(
            f"\nexplained: {target.name}: F(x) {target.score:.4f}, F(baseline) "
            f"{target.baseline_score:.4f}, sum of IG {total:.4f}, completeness error "
            f"{target.completeness_error:.2%} of {abs(change):.4f} ({target.steps} steps)"
        )
        width = max(len(token) for token in explanation.tokens)
        methods = list(target.attributions)
        print(f"  {'token':{width}}  " + "  ".join(f"{TITLES[m]:>22}" for m in methods))
        for i, token in enumerate(explanation.tokens):
            values = "  ".join(f"{target.attributions[m][i]:>+22.4f}" for m in methods)
            print(f"  {token:{width}}  {values}")


def print_faithfulness(result):
    print(
        f"faithfulness on {result['texts']} texts ({result['settings']['steps']}-step IG, "
        f"{result['seconds']['total']:.0f} s; integrated gradients "
        f"{result['seconds']['integrated_gradients']:.0f} s)"
    )
    print(f"{'method':22} {'comprehensiveness ↑':>20} {'sufficiency ↓':>14} {'deletion AUC ↓':>15}")
    for method, row in result["methods"].items():
        print(
            f"{method:22} {row['comprehensiveness']:>20.4f} {row['sufficiency']:>14.4f} "
            f"{row['deletion_auc']:>15.4f}"
        )
    completeness = result["integrated_gradients_completeness"]
    print(
        f"IG completeness error: median {completeness['median_error']:.3%}, "
        f"{completeness['share_below_1_percent']:.1%} of texts below 1 %, max "
        f"{completeness['max_error']:.2%} ({completeness['share_integrated_again']:.1%} "
        "integrated again with more steps)"
    )


def run_faithfulness(predictor, args):
    from fmkeras.errors import ConfigError
    from fmkeras.explain.faithfulness import faithfulness
    from fmkeras.text.labelled import EVALUATE_SKIP_HINT, read_tsv
    from fmkeras.training.checkpoints import write_json

    if predictor.info["task"] != "classify":
        raise ConfigError(
            f"--faithfulness scores classify runs; {args.run_dir} is a {predictor.info['task']} run"
        )
    path = args.data
    rows = read_tsv(
        path,
        predictor.info["text_column"],
        predictor.info["label_column"],
        args.bad_rows,
        args.limit,
        skip_hint=EVALUATE_SKIP_HINT,
        pair_column=predictor.info.get("text_pair_column"),
    )
    explainer = make_explainer(predictor, args, output="probability")
    result = faithfulness(
        explainer, list(rows.inputs), seed=args.seed, log=lambda line: print(line, file=sys.stderr)
    )
    result = {**result, "file": str(path), "skipped_rows": {"data": len(rows.skipped)}}
    if args.out:
        write_json(args.out, result)
    if args.json:
        print(json.dumps(cli.rounded(result)))
    else:
        print_faithfulness(result)


@cli.command
def main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    from fmkeras.config import DecodeConfig
    from fmkeras.explain.report import write_outputs
    from fmkeras.tasks import load_run

    predictor = load_run(
        args.run_dir, decode=DecodeConfig(beam_width=1, max_length=args.max_length)
    )
    if args.faithfulness:
        run_faithfulness(predictor, args)
        return 0
    explainer = make_explainer(predictor, args)
    for step, text in enumerate(args.texts):
        explanation = explainer.explain(text)
        if args.words:
            explanation = explanation.merged_words()
        if args.json:
            print(json.dumps(explanation.as_json(), ensure_ascii=False))  # full precision
        else:
            print_explanation(explanation)
        for path in write_outputs(explanation, args.html, args.png, args.tensorboard, step):
            print(f"wrote {path}", file=sys.stderr)
    return 0
