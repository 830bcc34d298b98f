"""The compression table: exported variants of classify runs, measured from
the exported artifacts only (parameters, size, accuracy, latency).

    python tools/compare_exports.py runs/sst2 runs/sst2_distill runs/sst2-heads40-recovered \\
        --dev $FMKERAS_DATA_DIR/sst2/dev.tsv --calibration $FMKERAS_DATA_DIR/sst2/train.tsv \\
        --markdown compression.md

The first run (the reference, e.g. the teacher) is exported as every
variant of `--variants`; the other runs (students, pruned models) as those
of `--other-variants`:
- `float32`: the SavedModel of `python -m fmkeras.export`;
- `bfloat16`: `--precision bfloat16` (16-bit weights and compute);
- `int8`: `--quantize int8` (Keras int8 Dense/EinsumDense kernels);
- `tflite-dynamic`: `--tflite` (dynamic range: int8 weights, float activations);
- `tflite-float32`: float32 TFLite (the interpreter's default XNNPACK delegate);
- `tflite-int8`: full-integer TFLite, activation ranges calibrated on 200
  rows of `--calibration` (a training file: never the dev rows it is scored on);
- `tflite-dynamic-fixed`, `tflite-float32-fixed`: the same with the inputs'
  shape fixed (`--tflite-batch-size`): one model for batch 1 and one for 32
  (a shorter batch is padded with copies of its last row); the size is the
  batch-1 model's.
For each: parameters (of the Keras model), size on disk and gzipped (zeros
of unstructured pruning compress; dense shapes do not shrink), accuracy on
`--dev` and predictions that differ from the reference float32, and the
median milliseconds per call of the token-id signature at batch 1 and 32
(rows padded to the run's sequence length). Every variant is exported and
scored first, then timed in `--rounds` interleaved rounds (a round times
every variant once) and its best round counts: a slow spell of the host
touches all variants alike, so the ratios within one invocation hold.
Each row's speed-up is against the reference run's same variant (a student's
TFLite against the teacher's TFLite), the like-for-like comparison; a last
line compares each run's fastest variant at batch 1 with the reference's
fastest (best against best).
The last line also holds `matmul_gops`: float32 and int8 matmul throughput
of this TensorFlow in graph mode (1024³), which explains the Keras int8 row
(its kernels multiply int8 through TensorFlow's int8 `MatMul`).
Latency is measured on whatever else the machine is doing: run it on an
idle machine.
"""

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from fmkeras.export import export, write_tflite
from fmkeras.tasks import load_run
from fmkeras.text.labelled import encode_texts, read_tsv
from fmkeras.training.throughput import measure_matmul_gflops

VARIANTS = ("float32", "bfloat16", "int8", "tflite-dynamic", "tflite-float32", "tflite-int8",
            "tflite-dynamic-fixed", "tflite-float32-fixed")  # fmt: skip
FIXED = "-fixed"  # a variant whose TFLite models have fixed input shapes
BATCHES = (1, 32)  # the batch sizes timed


def files_of(path):
    path = Path(path)
    return [path] if path.is_file() else [path / "saved_model.pb",
                                          *(path / "variables").iterdir()]  # fmt: skip


def sizes(path):
    """`(bytes, gzipped bytes)` of a SavedModel (graph + variables) or a file."""
    files = files_of(path)
    raw = sum(f.stat().st_size for f in files)
    return raw, sum(len(gzip.compress(f.read_bytes(), 6)) for f in files)


def median_ms(call, batches):
    call(batches[0])  # warm-up: tracing / tensor allocation
    times = []
    for batch in batches:
        started = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 2)


def saved_model_call(path):
    ids = tf.saved_model.load(str(path)).signatures["serve_token_ids"]
    return lambda features: ids(**{k: tf.constant(v) for k, v in features.items()})[
        "probabilities"
    ].numpy()


def tflite_call(path, threads):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path), num_threads=threads).get_signature_runner(
        "serve_token_ids"
    )
    return lambda features: runner(**features)["probabilities"]


def fixed_tflite_call(paths, threads):
    """A call of TFLite models of fixed batch sizes (`{batch: path}`): rows go to
    the smallest model that takes them, padded with copies of the last row."""
    calls = {batch: tflite_call(path, threads) for batch, path in paths.items()}

    def call(features):
        rows = len(features["token_ids"])
        batch = min(size for size in calls if size >= rows)
        padded = {k: np.concatenate([v, np.repeat(v[-1:], batch - rows, axis=0)])
                  for k, v in features.items()}  # fmt: skip
        return calls[batch](padded)[:rows]

    return call


def token_features(run, texts):
    """`{token_ids, segment_ids, padding_mask}` of `texts`, padded to the run's length."""
    length = run.info["sequence_length"]
    ragged = encode_texts(run.tokenizer, texts, length)
    ids = ragged.to_tensor(run.tokenizer.pad_id, shape=[None, length]).numpy()
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids),
            "padding_mask": (ids != run.tokenizer.pad_id).astype("int32")}  # fmt: skip


def labelled(run, path):
    rows = read_tsv(path, run.info["text_column"], run.info["label_column"],
                    labels=set(run.labels))  # fmt: skip
    return token_features(run, rows.inputs), np.array([run.labels.index(y) for y in rows.labels])


def export_variants(run_dir, run, variants, out, calibration_file):
    """`{variant: artifact path}` of the exports of `run` (loaded from `run_dir`) in `out`."""
    exported = {}
    if any(variant == "float32" or variant.startswith("tflite-") for variant in variants):
        float_dir = export(run_dir, "float32", out)
        exported["float32"] = float_dir
        functions = run.serving_functions()
        for variant in [v for v in variants if v.startswith("tflite-")]:
            mode = variant.removeprefix("tflite-").removesuffix(FIXED)
            calibration = None
            if mode == "int8":
                features, _ = labelled(run, calibration_file)
                calibration = [{k: v[i : i + 1] for k, v in features.items()} for i in range(200)]
            if variant.endswith(FIXED):
                length = run.info["sequence_length"]
                exported[variant] = {batch: Path(out) / f"{variant}-{batch}.tflite"
                                     for batch in BATCHES}  # fmt: skip
                for batch, path in exported[variant].items():
                    write_tflite(functions, path, mode, input_shape=(batch, length))
                continue
            path = Path(out) / f"{variant}.tflite"
            write_tflite(functions, path, mode, calibration)
            exported[variant] = path
    if "bfloat16" in variants:
        exported["bfloat16"] = export(run_dir, "bfloat16", out, precision="bfloat16")
    if "int8" in variants:
        exported["int8"] = export(run_dir, "int8", out, quantize="int8")
    return {variant: exported[variant] for variant in variants}


def measure(run_dir, variants, args, reference, out):
    """`[(entry, call, singles, batches)]` of the variants of `run_dir`, exported
    into `out` and scored on `--dev`; `time_rounds` adds their latency."""
    # In float32 like `fmkeras.export`'s default: a run trained in mixed_bfloat16
    # loads computing in bfloat16, which TFLite cannot convert.
    run = load_run(run_dir, precision="float32")
    features, gold = labelled(run, args.dev)

    def rows(start, stop):
        return {k: v[start:stop] for k, v in features.items()}

    batches = [rows(i, i + 32) for i in range(0, len(gold), 32)]
    singles = [rows(i, i + 1) for i in range(args.single_calls)]
    measured = []
    for variant, path in export_variants(run_dir, run, variants, out, args.calibration).items():
        if variant.endswith(FIXED):
            call, path = fixed_tflite_call(path, args.threads), path[1]
        elif variant.startswith("tflite-"):
            call = tflite_call(path, args.threads)
        else:
            call = saved_model_call(path)
        predicted = np.concatenate([call(batch) for batch in batches]).argmax(-1)
        if reference.get("predictions") is None:
            reference["predictions"] = predicted
        size, gzipped = sizes(path)
        entry = {
            "run": str(run_dir),
            "variant": variant,
            "parameters": int(run.model.count_params()),
            "megabytes": round(size / 1e6, 1),
            "gzip_megabytes": round(gzipped / 1e6, 1),
            "accuracy": round(float((predicted == gold).mean()), 4),
            "differing_from_reference": int((predicted != reference["predictions"]).sum()),
        }
        measured.append((entry, call, singles, batches))
    return measured


def time_rounds(measured, rounds):
    """Latency of every variant in `rounds` interleaved rounds (a round times
    every variant once, so a slow spell of the host touches all of them); each
    entry gets its best round's median and the medians of all rounds."""
    for _ in range(rounds):
        for entry, call, singles, batches in measured:
            entry.setdefault("ms_batch_1_rounds", []).append(median_ms(call, singles))
            entry.setdefault("ms_batch_32_rounds", []).append(median_ms(call, batches))
    for entry, *_ in measured:
        entry["ms_batch_1"] = min(entry["ms_batch_1_rounds"])
        entry["ms_batch_32"] = min(entry["ms_batch_32_rounds"])


def add_speedups(report, reference_rows):
    """`speedup_batch_1/32`: the time of the reference run (the first
    `reference_rows` entries) in the same variant over the entry's (None where
    the reference was not exported in that variant)."""
    reference = {entry["variant"]: entry for entry in report[:reference_rows]}
    for entry in report:
        same = reference.get(entry["variant"])
        for batch in (1, 32):
            key = f"ms_batch_{batch}"
            entry[f"speedup_batch_{batch}"] = round(same[key] / entry[key], 2) if same else None


def best_against_best(report, reference_rows):
    """Each run's fastest variant at batch 1, and its speed-up against the
    fastest of the reference run (the first `reference_rows` entries): what a
    user serving each in its best format gets."""
    def fastest(entries):
        return min(entries, key=lambda entry: entry["ms_batch_1"])

    others = {}
    for entry in report[reference_rows:]:
        others.setdefault(entry["run"], []).append(entry)
    bests = [fastest(report[:reference_rows])] + [fastest(group) for group in others.values()]
    return [{"run": best["run"], "variant": best["variant"], "accuracy": best["accuracy"],
             "ms_batch_1": best["ms_batch_1"],
             "speedup_batch_1": round(bests[0]["ms_batch_1"] / best["ms_batch_1"], 2)}
            for best in bests]  # fmt: skip


def latency(entry, batch):
    """`4.4 ms (3.6×)`: the time and, if known, the like-for-like speed-up."""
    ratio = entry[f"speedup_batch_{batch}"]
    return f"{entry[f'ms_batch_{batch}']} ms" + (f" ({ratio}×)" if ratio else "")


def markdown(report, reference_rows):
    lines = ["| run | variant | parameters | size | gzipped | accuracy | ≠ reference | "
             "batch 1 | batch 32 |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in report:
        lines.append(f"| `{Path(e['run']).name}` | {e['variant']} | {e['parameters'] / 1e6:.1f} M "
                     f"| {e['megabytes']} MB | {e['gzip_megabytes']} MB | "
                     f"{100 * e['accuracy']:.2f} % | {e['differing_from_reference']} | "
                     f"{latency(e, 1)} | {latency(e, 32)} |")  # fmt: skip
    best = "; ".join(f"`{Path(b['run']).name}` {b['variant']} {b['ms_batch_1']} ms "
                     f"({100 * b['accuracy']:.2f} %, {b['speedup_batch_1']}×)"
                     for b in best_against_best(report, reference_rows))  # fmt: skip
    lines += ["", f"Best against best at batch 1 (each run's fastest variant): {best}."]
    return "\n".join(lines) + "\n"


def matmul_ceilings(size=1024):
    """GFLOP/s (GOP/s for int8) of a `size`³ matmul in graph mode, float32 and
    int8: how fast this TensorFlow multiplies what the float32 and Keras int8
    SavedModels multiply."""
    return {dtype: round(measure_matmul_gflops(size, dtype=dtype, jit_compile=False), 1)
            for dtype in ("float32", "int8")}  # fmt: skip


def variant_list(text):
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variants {sorted(unknown)}; use {VARIANTS}")
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="finished classify runs (the first: reference)")
    parser.add_argument("--dev", required=True, help="labelled TSV of the runs' format")
    parser.add_argument("--calibration", help="labelled TSV whose rows calibrate tflite-int8")
    parser.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                        help="variants of the first run")  # fmt: skip
    parser.add_argument("--other-variants", type=variant_list, default=["float32"],
                        help="variants of the other runs")  # fmt: skip
    parser.add_argument("--single-calls", type=int, default=200, help="batch-1 calls timed")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timing rounds of all variants (best counts)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="TFLite interpreter threads")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args()
    if "tflite-int8" in args.variants + args.other_variants and not args.calibration:
        parser.error("tflite-int8 needs --calibration (a training file)")
    if args.rounds < 1 or args.single_calls < 1:
        parser.error(f"--rounds and --single-calls must be 1 or more, got {args.rounds} and "
                     f"{args.single_calls}")  # fmt: skip

    reference, measured = {}, []
    with tempfile.TemporaryDirectory() as out:
        for index, run_dir in enumerate(args.runs):
            variants = args.variants if index == 0 else args.other_variants
            measured += measure(run_dir, variants, args, reference, Path(out) / str(index))
        time_rounds(measured, args.rounds)
    report = [entry for entry, *_ in measured]
    add_speedups(report, len(args.variants))
    for entry in report:
        print(json.dumps(entry), flush=True)
    if args.markdown:
        Path(args.markdown).write_text(markdown(report, len(args.variants)), encoding="utf-8")
    print(json.dumps({"examples": len(reference["predictions"]), "variants": report,
                      "best_against_best": best_against_best(report, len(args.variants)),
                      "matmul_gops": matmul_ceilings()}))  # fmt: skip


if __name__ == "__main__":
    main()
