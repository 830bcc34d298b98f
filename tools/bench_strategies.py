"""Pretraining throughput of one recipe under each tf.distribute setup, XLA off and on.

    python tools/bench_strategies.py [--recipe pretrain_gutenberg] [--steps 60] [--xla off on]
                                     [--setups one mirrored workers] [--repeats 1]
                                     [--set KEY=VALUE ...]

Runs `python -m fmkeras.train` (global batch and everything else from the
recipe) as: one device; MirroredStrategy over 2 logical CPU devices; and 2
local workers through `python -m fmkeras.launch` (MultiWorkerMirrored). Each
run trains `--steps` steps into a scratch directory; the table reports the
median tokens/s of its logging windows (median again over `--repeats`
interleaved rounds) and the step time, plus the ratio to one device without
XLA (to the first row when that setup is not measured). `--set` passes
recipe settings to every run (e.g. `model.size=tiny` for a quick check). On
a machine with 2 cores this measures the cost of distribution (replicas
share the same cores), not a speed-up.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETUPS = {  # name: (label, command prefix, settings)
    "one": ("one device", [], []),
    "mirrored": (
        "mirrored, 2 logical CPUs",
        [],
        ["distribute.strategy=mirrored", "distribute.cpu_devices=2"],
    ),
    "workers": (
        "2 local workers",
        [sys.executable, "-m", "fmkeras.launch", "--workers", "2", "--"],
        [],
    ),
}


def run(recipe, prefix, settings, out, vocab):
    command = [*prefix, sys.executable, "-m", "fmkeras.train", "mlm", "--recipe", recipe,
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
                  "train.steps_per_execution=10", f"data.max_lines={args.max_lines}",
                  *args.set]  # fmt: skip
        measured, vocab = {}, None  # (setup, xla) -> [(tokens/s, replicas)]
        for _ in range(args.repeats):
            for setup in args.setups:
                _, prefix, settings = SETUPS[setup]
                for xla in args.xla:
                    out = Path(scratch) / f"run{sum(map(len, measured.values()))}"
                    jit = [f"train.jit_compile={'true' if xla == 'on' else 'false'}"]
                    metrics = run(args.recipe, prefix, common + settings + jit, out, vocab)
                    vocab = vocab or out / "vocab.txt"
                    result = (metrics["tokens_per_second"], metrics["replicas"])
                    tokens_per_step = metrics["train_tokens"] / args.steps
                    measured.setdefault((setup, xla), []).append(result)
                    print(json.dumps({"setup": setup, "xla": xla, "tokens_per_second": result[0]}),
                          flush=True)  # fmt: skip
    medians = {key: statistics.median(t for t, _ in results) for key, results in measured.items()}
    base = ("one", "off") if ("one", "off") in medians else next(iter(medians))
    print(f"| setup | XLA | replicas | tokens/s | step | vs {SETUPS[base[0]][0]}, XLA {base[1]} |")
    print("|---|---|---|---|---|---|")
    for (setup, xla), results in measured.items():
        tokens, ratio = medians[setup, xla], medians[setup, xla] / medians[base]
        print(f"| {SETUPS[setup][0]} | {xla} | {results[0][1]} | {tokens:,.0f} | "
              f"{1000 * tokens_per_step / tokens:.0f} ms | {ratio:.2f}× |")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="pretrain_gutenberg")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-lines", type=int, default=20000, help="corpus lines read")
    parser.add_argument("--xla", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (median)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe setting for every run (repeatable)")
    args = parser.parse_args()
    if args.steps < 20:  # steps run 10 per call and log every 10; the first call compiles
        parser.error("--steps must be at least 20: the first 10 steps compile and are not timed")
    main(args)
