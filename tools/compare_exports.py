"""Float32 vs `--quantize int8` vs `--tflite` exports of a classify run: size, latency, accuracy.

    python tools/compare_exports.py runs/sst2 --dev $FMKERAS_DATA_DIR/sst2/dev.tsv

Exports the run twice (float32 with `--tflite`, and `--quantize int8`) into
a temporary directory, then for each variant measures
- size: `saved_model.pb` + `variables/` (SavedModels), the `.tflite` file;
- latency: median milliseconds per call of the token-id signature at batch
  1 and batch 32 (rows padded to the run's sequence length, the same ids for
  every variant), and of `serving_default` (raw texts) for the SavedModels;
- accuracy on the dev file, and how many predictions differ from float32.
Prints a JSON list, one object per variant. Latency is measured on whatever
else the machine is doing: run it on an idle machine.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from fmkeras.export import export
from fmkeras.tasks import load_run
from fmkeras.text.labelled import encode_texts, read_tsv


def directory_bytes(path):
    files = [Path(path) / "saved_model.pb", *Path(path, "variables").iterdir()]
    return sum(f.stat().st_size for f in files)


def median_ms(call, batches):
    call(batches[0])  # warm-up: tracing / tensor allocation
    times = []
    for batch in batches:
        started = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 2)


def saved_model_variant(path):
    loaded = tf.saved_model.load(str(path))
    texts = loaded.signatures["serving_default"]
    ids = loaded.signatures["serve_token_ids"]

    def call_ids(features):
        return ids(**{k: tf.constant(v) for k, v in features.items()})["probabilities"].numpy()

    def call_texts(batch):
        return texts(texts=tf.constant(batch))["probabilities"].numpy()

    return call_ids, call_texts, directory_bytes(path)


def tflite_variant(path, threads):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path), num_threads=threads).get_signature_runner(
        "serve_token_ids"
    )
    return (lambda features: runner(**features)["probabilities"]), None, Path(path).stat().st_size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a finished classify run")
    parser.add_argument("--dev", required=True, help="labelled TSV of the run's format")
    parser.add_argument("--single-calls", type=int, default=200, help="batch-1 calls timed")
    parser.add_argument("--threads", type=int, default=2, help="TFLite interpreter threads")
    args = parser.parse_args()

    run = load_run(args.run_dir)
    length, labels = run.info["sequence_length"], run.labels
    rows = read_tsv(args.dev, run.info["text_column"], run.info["label_column"],
                    labels=set(labels))  # fmt: skip
    gold = np.array([labels.index(label) for label in rows.labels])
    ids = (
        encode_texts(run.tokenizer, rows.inputs, length)
        .to_tensor(run.tokenizer.pad_id, shape=[None, length])
        .numpy()
    )  # (examples, length), the same ids for every variant
    features = {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": (ids != run.tokenizer.pad_id).astype("int32"),
    }

    def rows_of(start, stop):
        return {k: v[start:stop] for k, v in features.items()}

    batches_of_32 = [rows_of(i, i + 32) for i in range(0, len(ids), 32)]
    singles = [rows_of(i, i + 1) for i in range(args.single_calls)]
    text_batches = [rows.inputs[i : i + 32] for i in range(0, len(ids), 32)]
    text_singles = [rows.inputs[i : i + 1] for i in range(args.single_calls)]

    with tempfile.TemporaryDirectory() as out:
        float_dir = export(args.run_dir, "float32", out, tflite=True)
        int8_dir = export(args.run_dir, "int8", out, quantize="int8")
        variants = {
            "float32 SavedModel": saved_model_variant(float_dir),
            "int8 SavedModel (--quantize int8)": saved_model_variant(int8_dir),
            "TFLite dynamic-range (--tflite)": tflite_variant(
                float_dir / "assets.extra" / "model.tflite", args.threads
            ),
        }
        report, reference = [], None
        for name, (call_ids, call_texts, size) in variants.items():
            predicted = np.concatenate([call_ids(b) for b in batches_of_32]).argmax(-1)
            reference = predicted if reference is None else reference
            entry = {
                "variant": name,
                "megabytes": round(size / 1e6, 1),
                "accuracy": round(float((predicted == gold).mean()), 4),
                "predictions_differing_from_float32": int((predicted != reference).sum()),
                "token_ids_ms_batch_1": median_ms(call_ids, singles),
                "token_ids_ms_batch_32": median_ms(call_ids, batches_of_32),
            }
            if call_texts is not None:
                entry["texts_ms_batch_1"] = median_ms(call_texts, text_singles)
                entry["texts_ms_batch_32"] = median_ms(call_texts, text_batches)
            report.append(entry)
            print(json.dumps(entry), flush=True)
    print(json.dumps({"examples": len(ids), "sequence_length": length, "variants": report}))


if __name__ == "__main__":
    main()
