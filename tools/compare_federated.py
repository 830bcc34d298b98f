"""Federated runs against centralised training: validation accuracy per round,
bytes and epsilon, as one markdown table (the README's federated results).

    python tools/compare_federated.py runs/central runs/iid runs/dirichlet ... \\
        --steps-per-round 45

Each argument is a finished run directory. A federated run
(`python -m fmkeras.federated`) contributes its `metrics.json` history; a
centralised run (`python -m fmkeras.train` with `train.eval_every` set to
the examples of one federated round) contributes its TensorBoard validation
accuracy at every `--steps-per-round` steps, so both are compared at an
equal number of training examples seen. The round columns are the
validation accuracy after that round; the last columns are the final
accuracy, the bytes per round (both directions, all sampled clients) and
epsilon where differential privacy was on.
"""

import argparse
import json
from pathlib import Path

from fmkeras.training.run_dir import RunDir


def centralised_curve(run, steps_per_round):
    """`{round: accuracy}` of a centralised run, read from TensorBoard."""
    accuracy = dict(RunDir(run).validation_curve("accuracy"))
    return {step // steps_per_round: value for step, value in accuracy.items()
            if step % steps_per_round == 0}  # fmt: skip


def row(run, steps_per_round):
    """`(name, {round: accuracy}, final accuracy, MiB per round, epsilon)` of a run."""
    metrics = json.loads((Path(run) / "metrics.json").read_text())
    if "history" not in metrics:  # a centralised run
        return Path(run).name, centralised_curve(run, steps_per_round), metrics["accuracy"], 0, None
    curve = {entry["round"]: entry["validation"]["accuracy"] for entry in metrics["history"]}
    federated = metrics["federated"]
    per_round = federated["bytes_total"] / max(1, federated["rounds"]) / 2**20
    return Path(run).name, curve, metrics["accuracy"], per_round, federated.get("epsilon")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories")
    parser.add_argument("--steps-per-round", type=int, default=45,
                        help="centralised steps that see one federated round's examples")
    args = parser.parse_args()
    rows = [row(run, args.steps_per_round) for run in args.runs]
    rounds = sorted({number for _, curve, *_ in rows for number in curve if number > 0})
    print("| run | " + " | ".join(f"round {n}" for n in rounds)
          + " | final | MiB per round | ε |")  # fmt: skip
    print("| --- |" + " ---: |" * (len(rounds) + 3))
    for name, curve, final, mib, epsilon in rows:
        cells = [f"{curve[n]:.1%}" if n in curve else "" for n in rounds]
        print(f"| {name} | " + " | ".join(cells) + f" | **{final:.1%}** | {mib:,.1f} | "
              + (f"{epsilon:,.1f}" if epsilon is not None else "—") + " |")  # fmt: skip


if __name__ == "__main__":
    main()
