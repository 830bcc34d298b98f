"""Where the time of a profiled training step goes, from the command line.

    python tools/profile_summary.py runs/RUN/logs/profile [--steps N] [--top 25] [--markdown F]

Reads the newest `*.xplane.pb` that `--set train.profile_steps=START,END` wrote
(or the file given) with TensorFlow's own protobuf (no profiler plugin needed)
and prints the self time of the TensorFlow ops executed in it: per op type, per
kind of work (matmuls, casts, normalisation, softmax, element-wise, optimizer,
gathers, the XLA clusters of `fmkeras.fused`, ...) and per layer (the op name's
scope), each as milliseconds per step and as a share of all op time. Op time is
summed over the executor threads, so with two inter-op threads it can exceed the
wall time; the shares are what to compare. The wall time per step is the
profiled span divided by `--steps` (default: END - START of the run's
`train.profile_steps`, when found).
"""

import argparse
import collections
import pathlib
import re
import sys
import types

from tensorflow.tsl.profiler.protobuf import xplane_pb2

from fmkeras.config import profile_range
from fmkeras.training.run_dir import RunDir

# Kinds of work by op type (after dropping oneDNN's `_Mkl`/`_MklNative` prefix).
KINDS = (
    ("matmul", r"(Fused)?(Batch)?MatMul.*|Einsum|Conv.*"),
    ("XLA clusters (fmkeras.fused: GELU, softmax, AdamW)", r"XlaRun"),
    ("cast", r"Cast"),
    (
        "optimizer update",
        r"ResourceApply.*|AssignVariableOp|AssignAddVariableOp|AssignSubVariableOp"
        r"|ResourceScatter.*",
    ),
    ("gather / scatter", r"(Resource)?Gather.*|Scatter.*|UnsortedSegmentSum|TensorScatter.*"),
    ("softmax / log-softmax", r"(Log)?Softmax.*|SparseSoftmaxCrossEntropyWithLogits"),
    ("reductions", r"Sum|Mean|Max|Min|Prod|ArgMax|L2Loss|SquaredDifference"),
    (
        "transcendental (gelu, tanh, exp, rsqrt)",
        r"Erf|Erfc|Tanh|TanhGrad|Exp|Log|Rsqrt|RsqrtGrad"
        r"|Sqrt|Pow|Gelu.*|Relu.*|Sigmoid.*",
    ),
    (
        "element-wise arithmetic",
        r"AddV2|Add|AddN|Sub|Mul|RealDiv|Div.*|Neg|Square|Maximum"
        r"|Minimum|Select.*|BiasAdd.*|Where|Less.*|Greater.*|Equal|NotEqual|LogicalAnd|Sign",
    ),
    (
        "layout (reshape, transpose, concat, slice)",
        r"Reshape|Transpose|ConcatV2|Slice|StridedSlice.*"
        r"|Tile|ExpandDims|Squeeze|Pack|Unpack|Split.*|Pad.*|BroadcastTo|Fill|ZerosLike|OnesLike",
    ),
    ("input pipeline", r"IteratorGetNext.*|OptionalGetValue|.*Dataset.*"),
)
OP_EVENT = re.compile(r"[^\s:]+:\w+")  # `op/name:OpType`, as the executor records a kernel
# An XLA-compiled function inside a graph runs as an asynchronous kernel with
# no op event of its own (its HLO fusions are recorded under arbitrary names).
ASYNC_KERNEL = "ExecutorState::ProcessAsync::Start"
XLA_CLUSTER = ("XLA clusters", "XlaRun")


def find_xplane(path):
    """The newest `*.xplane.pb` under `path` (or `path` itself)."""
    path = pathlib.Path(path)
    if path.is_file():
        return path
    found = sorted(path.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"profile_summary: no *.xplane.pb under {path} (run with "
                 "--set train.profile_steps=START,END first)")  # fmt: skip
    return found[-1]


def profiled_steps(xplane):
    """END - START of the run's `train.profile_steps` (its config.yaml above
    `xplane`), or None."""
    for parent in xplane.parents:
        if (parent / "config.yaml").is_file():
            train = RunDir(parent).read_config().get("train", {})
            if not train.get("profile_steps"):
                return None
            start, end = profile_range(types.SimpleNamespace(**train))
            return end - start
    return None


def op_self_times(xplane):
    """`({(op name, op type): self picoseconds}, profiled span in picoseconds)`
    over the host plane's executor threads; an op's self time excludes the ops
    nested in it on the same thread."""
    space = xplane_pb2.XSpace()
    space.ParseFromString(xplane.read_bytes())
    times = collections.Counter()
    first, last = None, None
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            ops = []
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name == ASYNC_KERNEL:
                    op = XLA_CLUSTER
                elif OP_EVENT.fullmatch(name):
                    op = tuple(name.rsplit(":", 1))
                else:
                    continue  # a runtime event, not a TensorFlow op kernel
                start = line.timestamp_ns * 1000 + event.offset_ps
                ops.append((start, start + event.duration_ps, op))
            ops.sort(key=lambda op: (op[0], -op[1]))
            open_ops = []  # (end, (op name, op type)) of the ops enclosing the current one
            for start, end, op in ops:
                while open_ops and open_ops[-1][0] <= start:
                    open_ops.pop()
                times[op] += end - start
                if open_ops:
                    times[open_ops[-1][1]] -= end - start
                open_ops.append((end, op))
                first = start if first is None else min(first, start)
                last = end if last is None else max(last, end)
    span = (last - first) if first is not None else 0
    return times, span


def kind_of(op_type):
    bare = re.sub(r"^_Mkl(Native)?", "", op_type)
    for kind, pattern in KINDS:
        if re.fullmatch(pattern, bare):
            return kind
    return "other"


OP_SCOPES = {"add", "mul", "sub", "truediv", "einsum", "transpose", "moments", "sqrt", "rsqrt",
             "cast", "mean", "sum", "where", "clip_by_value"}  # fmt: skip


def layer_of(op_name):
    """The Keras layer an op belongs to, with Transformer blocks summed
    (`.../transformer_layer/self_attention_layer/query`): the op name after
    the last function-call scope, Keras's `_N` suffixes dropped, cut at the
    first op-like component; ops of the backward pass get " (backward)"."""
    name = op_name.rsplit("PartitionedCall/", 1)[-1]
    backward = "gradient_tape/" in name or name.startswith("gradients/")
    parts = [re.sub(r"(_\d+)+$", "", part) for part in name.split("/")]
    scope = []
    for part in parts:
        if part in ("gradient_tape", "gradients"):
            continue
        if not part or part[0].isupper() or part in OP_SCOPES or part[0] == "_":
            break
        scope.append(part)
    label = "/".join(scope) or parts[0]
    return f"{label} (backward)" if backward else label


def table(rows, total, steps, title, top):
    lines = [f"| {title} | ms per step | share |", "| --- | ---: | ---: |"]
    for name, picoseconds in rows.most_common(top):
        per_step = picoseconds / 1e9 / steps
        lines.append(f"| {name} | {per_step:,.1f} | {100 * picoseconds / total:.1f} % |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", help="a run's logs/profile directory or an .xplane.pb file")
    parser.add_argument("--steps", type=int, help="steps in the profile (default: from config)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--markdown", help="also write the tables here")
    args = parser.parse_args()

    xplane = find_xplane(args.profile)
    steps = args.steps or profiled_steps(xplane) or 1
    times, span = op_self_times(xplane)
    total = sum(times.values())
    if not total:
        sys.exit(f"profile_summary: {xplane} holds no TensorFlow op events")
    by_type, by_kind, by_layer = collections.Counter(), collections.Counter(), collections.Counter()
    for (op_name, op_type), picoseconds in times.items():
        by_type[op_type] += picoseconds
        by_kind[kind_of(op_type)] += picoseconds
        by_layer[layer_of(op_name)] += picoseconds
    header = (f"{xplane}\n{steps} step(s); wall {span / 1e9 / steps:,.1f} ms per step; "
              f"op time {total / 1e9 / steps:,.1f} ms per step (summed over threads)")  # fmt: skip
    report = "\n\n".join([
        header,
        table(by_kind, total, steps, "kind of work", args.top),
        table(by_type, total, steps, "op type", args.top),
        table(by_layer, total, steps, "layer (blocks summed)", args.top),
    ])  # fmt: skip
    print(report)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(report + "\n")


if __name__ == "__main__":
    main()
