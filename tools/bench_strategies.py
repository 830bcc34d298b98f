"""Pretraining throughput of one recipe under each tf.distribute setup, XLA off and on.

    python tools/bench_strategies.py [--recipe pretrain_gutenberg] [--steps 60] [--xla off on]

Runs `python -m fmkeras.train` (global batch and everything else from the
recipe) as: one device; MirroredStrategy over 2 logical CPU devices; and 2
local workers through `python -m fmkeras.launch` (MultiWorkerMirrored). Each
run trains `--steps` steps into a scratch directory; the table reports the
median tokens/s of its logging windows and the step time, plus the ratio to
one device without XLA. On a machine with 2 cores this measures the cost of
distribution (replicas share the same cores), not a speed-up.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SETUPS = {
    "one device": ([], []),
    "mirrored, 2 logical CPUs": (
        [],
        ["distribute.strategy=mirrored", "distribute.cpu_devices=2"],
    ),
    "2 local workers": ([sys.executable, "-m", "fmkeras.launch", "--workers", "2", "--"], []),
}


def run(recipe, prefix, settings, out, vocab):
    command = [*prefix, sys.executable, "-m", "fmkeras.train", "pretrain", "--recipe", recipe,
               "--out", str(out)]  # fmt: skip
    for setting in settings + ([f"data.vocab_file={vocab}"] if vocab else []):
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return json.loads((Path(out) / "metrics.json").read_text())


def main(args):
    with tempfile.TemporaryDirectory() as scratch:
        common = [f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
                  f"train.eval_every={args.steps}", "train.eval_steps=2", "train.log_every=10",
                  "train.steps_per_execution=10", f"data.max_lines={args.max_lines}"]  # fmt: skip
        rows, vocab, baseline = [], None, None
        for name, (prefix, settings) in SETUPS.items():
            for xla in args.xla:
                out = Path(scratch) / f"run{len(rows)}"
                jit = "true" if xla == "on" else "false"
                metrics = run(
                    args.recipe,
                    prefix,
                    common + settings + [f"train.jit_compile={jit}"],
                    out,
                    vocab,
                )
                vocab = vocab or out / "vocab.txt"
                tokens = metrics["tokens_per_second"]
                baseline = baseline or tokens
                row = {"setup": name, "xla": xla, "replicas": metrics["replicas"],
                       "tokens_per_second": round(tokens),
                       "step_ms": round(1000 * metrics["train_tokens"] / args.steps / tokens),
                       "vs_one_device_without_xla": round(tokens / baseline, 2)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("| setup | XLA | replicas | tokens/s | step | vs one device, no XLA |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['xla']} | {r['replicas']} | {r['tokens_per_second']:,} | "
              f"{r['step_ms']} ms | {r['vs_one_device_without_xla']:.2f}× |")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="pretrain_gutenberg")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-lines", type=int, default=20000, help="corpus lines read")
    parser.add_argument("--xla", nargs="+", default=["off", "on"], choices=["off", "on"])
    main(parser.parse_args())
