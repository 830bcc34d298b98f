"""Scaling sweep: validation MLM loss against model size at a fixed token budget.

    python tools/scaling.py --mode tiny   # 5 sizes x 1.2 M tokens, ~5 minutes on 2 cores
    python tools/scaling.py --mode full   # 5 sizes x 6.1 M tokens, ~35 minutes on 2 cores
    python tools/scaling.py --mode tiny --steps 10 --max-lines 1000   # a one-minute check

Trains every size on `gutenberg_en` for the same number of tokens (same
vocabulary, data order, masks and schedule), records the validation loss,
fits `L(N) = E + A * N^-alpha` over non-embedding parameters `N` (and the
same form against training compute `C`), and writes `scaling.csv`,
`scaling_fit.json` and `scaling.png` into `--out`, printing the fitted
exponent with its standard error. Needs the `bench` extra (scipy,
matplotlib).
"""

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np

from fmkeras.config import build_config
from fmkeras.training.driver import train

# (layers, width): heads = width // 32 (at least 2), feed-forward = 4 * width.
SWEEPS = {
    "tiny": [(1, 32), (1, 64), (2, 64), (2, 96), (2, 128)],
    "full": [(1, 64), (2, 64), (2, 128), (3, 192), (4, 256)],
}
BUDGETS = {  # steps x batch x sequence length
    "tiny": dict(steps=600, batch_size=32, sequence_length=64, max_lines=None),
    "full": dict(steps=1500, batch_size=32, sequence_length=128, max_lines=None),
}


def power_law(x, e, a, alpha):
    return e + a * np.power(x, -alpha)


def fit(xs, losses):
    """Least-squares `E + A x^-alpha` with standard errors from the covariance."""
    from scipy.optimize import curve_fit

    xs, losses = np.asarray(xs, float), np.asarray(losses, float)
    scale = xs.min()  # fit in units of the smallest x for conditioning
    guess = (losses.min() * 0.9, losses.max() - losses.min() * 0.9, 0.3)
    params, covariance = curve_fit(
        power_law,
        xs / scale,
        losses,
        p0=guess,
        bounds=([0, 0, 0], [np.inf, np.inf, 3]),
        maxfev=20000,
    )
    errors = np.sqrt(np.clip(np.diag(covariance), 0, None))
    e, a, alpha = params
    return {
        "E": e,
        "A": a * scale**alpha,  # back to raw units of x
        "alpha": alpha,
        "E_stderr": errors[0],
        "alpha_stderr": errors[2],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=sorted(SWEEPS), default="tiny")
    parser.add_argument("--vocab", help="vocab.txt shared by all sizes (default: learn once)")
    parser.add_argument("--steps", type=int, help="steps per size (default: the mode's budget)")
    parser.add_argument("--max-lines", type=int, help="read only the corpus's first N lines")
    parser.add_argument("--out", default="runs/scaling")
    args = parser.parse_args()

    budget = dict(BUDGETS[args.mode])
    if args.steps is not None:
        if args.steps < 5:
            parser.error(f"--steps must be at least 5, got {args.steps}")
        budget["steps"] = args.steps
    if args.max_lines is not None:
        if args.max_lines < 1:
            parser.error(f"--max-lines must be positive, got {args.max_lines}")
        budget["max_lines"] = args.max_lines
    out = Path(args.out) / args.mode
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers, width in SWEEPS[args.mode]:
        name = f"L{layers}-H{width}"
        settings = [
            "model.size=custom",
            f"model.num_layers={layers}",
            f"model.hidden_dim={width}",
            f"model.num_heads={max(2, width // 32)}",
            f"model.intermediate_dim={4 * width}",
            "model.dropout=0.0",
            f"data.sequence_length={budget['sequence_length']}",
            "data.mask_rate=0.25",
            f"train.steps={budget['steps']}",
            f"train.batch_size={budget['batch_size']}",
            "train.learning_rate=2e-3",
            f"train.checkpoint_every={budget['steps']}",
            f"train.eval_every={budget['steps']}",
            f"train.log_every={budget['steps'] // 5}",
            "train.steps_per_execution=10",
        ]
        if budget["max_lines"]:
            settings.append(f"data.max_lines={budget['max_lines']}")
        vocab = args.vocab or (out / "vocab.txt" if (out / "vocab.txt").is_file() else None)
        if vocab:
            settings.append(f"data.vocab_file={Path(vocab).resolve()}")
        config = build_config(None, settings)
        run, metrics = train(config, out / name, log=lambda m: None)
        if not (out / "vocab.txt").is_file():
            os.link(run.vocab, out / "vocab.txt")
        row = {
            "name": name,
            "non_embedding_params": metrics["non_embedding_parameters"],
            "params": metrics["parameters"],
            "tokens": metrics["train_tokens"],
            "compute_flops": metrics["train_tokens"] * metrics["train_flops_per_token"],
            "valid_loss": metrics["valid_loss"],
            "valid_masked_accuracy": metrics["valid_masked_accuracy"],
            "tokens_per_second": metrics["tokens_per_second"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    with open(out / "scaling.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    losses = [r["valid_loss"] for r in rows]
    fits = {
        "L(N)": fit([r["non_embedding_params"] for r in rows], losses),
        "L(C)": fit([r["compute_flops"] for r in rows], losses),
    }
    with open(out / "scaling_fit.json", "w", encoding="utf-8") as handle:
        json.dump({"mode": args.mode, "budget": budget, "fits": fits}, handle, indent=2)
    plot(rows, fits, out / "scaling.png")
    for key, result in fits.items():
        print(
            f"{key}: E={result['E']:.3f}±{result['E_stderr']:.3f}, "
            f"alpha={result['alpha']:.3f}±{result['alpha_stderr']:.3f}"
        )
    print(f"wrote {out}/scaling.csv, scaling_fit.json, scaling.png")


def plot(rows, fits, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, column, label in (
        (axes[0], "L(N)", "non_embedding_params", "non-embedding parameters N"),
        (axes[1], "L(C)", "compute_flops", "training compute C (FLOPs)"),
    ):
        xs = np.array([r[column] for r in rows], float)
        axis.scatter(xs, [r["valid_loss"] for r in rows], color="C0", zorder=3)
        grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 100)
        result = fits[key]
        axis.plot(
            grid,
            power_law(grid, result["E"], result["A"], result["alpha"]),
            color="C1",
            label=f"E + A·x^-α, α = {result['alpha']:.2f} ± {result['alpha_stderr']:.2f}",
        )
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("validation MLM loss")
        axis.legend()
    tokens = rows[0]["tokens"]
    figure.suptitle(f"fmkeras MLM on Gutenberg, {tokens / 1e6:.1f} M tokens per model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
