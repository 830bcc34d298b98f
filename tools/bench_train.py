"""MLM training throughput: fmkeras vs keras-hub vs Model Garden, side by side.

    python tools/bench_train.py [--sizes mini small] [--impls fmkeras keras-hub model-garden]
                                [--xla on off] [--precisions float32 mixed_bfloat16]
                                [--repeats 3] [--steps 20] [--json PATH]

Every run trains the same configuration (BERT vocabulary 30,522, sequence
128, global batch 32, 20 masked positions, AdamW 1e-4 with weight decay and
global-norm clipping) on the same synthetic batch with `fit`, in its own
process (fair peak-RSS numbers; Model Garden is Keras 2 and cannot share a
process with Keras 3 models), under each Keras dtype policy (Model Garden
through tf_keras's own mixed-precision policy). Runs are interleaved —
every configuration once per round — and each configuration keeps its best
round (this host's noise only ever slows a run down). MFU is measured
against the matmul ceiling of the precision in use (the best of graph mode
and XLA, 2048^3, measured in the same invocation; all four ceilings are
printed). The summary compares each implementation's best configuration
with the others' best. Model Garden needs the `bench` extra
(`pip install -e ".[bench]"`); without it those rows are skipped.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SEQUENCE_LENGTH, BATCH_SIZE, VOCABULARY_SIZE, PREDICTIONS = 128, 32, 30522, 20
IMPLS = ("fmkeras", "keras-hub", "model-garden")


def synthetic_batch():
    import numpy as np

    rng = np.random.default_rng(0)
    token_ids = rng.integers(1000, VOCABULARY_SIZE, (BATCH_SIZE, SEQUENCE_LENGTH)).astype("int32")
    positions = np.sort(
        np.stack(
            [
                rng.choice(np.arange(1, SEQUENCE_LENGTH - 1), PREDICTIONS, replace=False)
                for _ in range(BATCH_SIZE)
            ]
        ),
        axis=1,
    ).astype("int32")
    labels = np.take_along_axis(token_ids, positions, 1)
    return token_ids, positions, labels


def keras3_model(impl, dims, dtype_policy):
    if impl == "fmkeras":
        from fmkeras.models import Encoder, MaskedLM

        encoder = Encoder(
            vocabulary_size=VOCABULARY_SIZE, max_sequence_length=512, dtype=dtype_policy, **dims
        )
        return MaskedLM(encoder)
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY_SIZE, max_sequence_length=512, dtype=dtype_policy, **dims
    )
    return keras_hub.models.BertMaskedLM(backbone, preprocessor=None)


def run_keras3(impl, dims, xla, steps, warmup, dtype_policy):
    import keras
    import tensorflow as tf

    token_ids, positions, labels = synthetic_batch()
    model = keras3_model(impl, dims, dtype_policy)
    if impl == "fmkeras":  # the driver's AdamW and loss: Keras's, fused inside fit
        from fmkeras.training.losses import SparseCategoricalCrossentropy
        from fmkeras.training.optimizer import AdamW
    else:
        AdamW = keras.optimizers.AdamW
        SparseCategoricalCrossentropy = keras.losses.SparseCategoricalCrossentropy
    optimizer = AdamW(1e-4, weight_decay=0.01, global_clipnorm=1.0)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=xla,
    )
    inputs = {
        "token_ids": token_ids,
        "segment_ids": 0 * token_ids,
        "padding_mask": 1 + 0 * token_ids,
        "mask_positions": positions,
    }
    dataset = tf.data.Dataset.from_tensors((inputs, labels)).repeat()
    if impl != "fmkeras":
        return time_fit(model, dataset, steps, warmup, keras.callbacks.Callback)
    from fmkeras.fused import fused_elementwise

    with fused_elementwise():  # as fmkeras's training driver runs fit
        return time_fit(model, dataset, steps, warmup, keras.callbacks.Callback)


def run_model_garden(dims, xla, steps, warmup, dtype_policy):
    import tensorflow as tf
    import tf_keras
    from official.nlp.modeling import models, networks

    tf_keras.mixed_precision.set_global_policy(dtype_policy)
    token_ids, positions, labels = synthetic_batch()
    encoder = networks.BertEncoderV2(
        vocab_size=VOCABULARY_SIZE,
        hidden_size=dims["hidden_dim"],
        num_layers=dims["num_layers"],
        num_attention_heads=dims["num_heads"],
        inner_dim=dims["intermediate_dim"],
        max_sequence_length=512,
        type_vocab_size=2,
    )
    pretrainer = models.BertPretrainerV2(
        encoder_network=encoder, mlm_activation=tf_keras.activations.gelu
    )
    names = ("input_word_ids", "input_mask", "input_type_ids")
    inputs = {n: tf_keras.Input((SEQUENCE_LENGTH,), dtype=tf.int32, name=n) for n in names}
    inputs["masked_lm_positions"] = tf_keras.Input(
        (PREDICTIONS,), dtype=tf.int32, name="masked_lm_positions"
    )
    model = tf_keras.Model(inputs, pretrainer(inputs)["mlm_logits"])
    optimizer = tf_keras.optimizers.AdamW(1e-4, weight_decay=0.01, global_clipnorm=1.0)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "LayerNorm"])
    model.compile(
        optimizer=optimizer,
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=xla,
    )
    features = {
        "input_word_ids": token_ids,
        "input_mask": 1 + 0 * token_ids,
        "input_type_ids": 0 * token_ids,
        "masked_lm_positions": positions,
    }
    dataset = tf.data.Dataset.from_tensors((features, labels)).repeat()
    return time_fit(model, dataset, steps, warmup, tf_keras.callbacks.Callback)


def time_fit(model, dataset, steps, warmup, callback_base):
    """Median seconds per step over `steps` steps after `warmup` (compile) steps.

    `callback_base` is Keras 3's or tf_keras's `Callback`, matching the model.
    """
    times = []

    class StepTimer(callback_base):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch >= warmup:
                times.append(time.perf_counter() - self.start)

    model.fit(dataset, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[StepTimer()])
    return statistics.median(times)


def child(args):
    """Runs one measurement in this process and prints one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.child == "ceiling":
        from fmkeras.training.throughput import device_name, measure_matmul_gflops

        ceilings = {f"{dtype} {'XLA' if xla else 'graph'}":
                    measure_matmul_gflops(repeats=10, dtype=dtype, jit_compile=xla)
                    for dtype in ("float32", "bfloat16") for xla in (False, True)}  # fmt: skip
        print(json.dumps({**ceilings, "machine": device_name()}))
        return
    from fmkeras.config import SIZES

    dims = SIZES[args.size]
    xla = args.xla == "on"
    if args.child == "model-garden":
        seconds = run_model_garden(dims, xla, args.steps, args.warmup, args.dtype_policy)
    else:
        seconds = run_keras3(args.child, dims, xla, args.steps, args.warmup, args.dtype_policy)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_seconds": seconds, "peak_rss_mib": rss_mib}))


def measure(kind, size="mini", xla="on", steps=20, warmup=3, dtype_policy="float32"):
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--size",
        size,
        "--xla",
        xla,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--dtype-policy-child",
        dtype_policy,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


def model_garden_available():
    import importlib.util

    return importlib.util.find_spec("official") is not None


def compute_dtype(policy):
    return {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(policy, policy)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["mini", "small"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--xla", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--precisions", "--dtype-policy", nargs="+", dest="precisions",
                        default=["float32", "mixed_bfloat16"],
                        help="Keras dtype policies to run")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write one record per run here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--dtype-policy-child", dest="dtype_policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from fmkeras.config import SIZES
    from fmkeras.flops import training_flops_per_token

    impls = [i for i in args.impls if i != "model-garden" or model_garden_available()]
    if len(impls) < len(args.impls):
        print("model-garden skipped: install the bench extra (pip install -e '.[bench]')")
    ceilings, samples = [], {}
    for round_index in range(args.repeats):
        ceilings.append(measure("ceiling"))
        machine = ceilings[-1].pop("machine")  # the CPU's model, widest matrix path and cores
        for size in args.sizes:
            for impl in impls:
                for precision in args.precisions:
                    for xla in args.xla:
                        result = measure(impl, size, xla, args.steps, args.warmup, precision)
                        samples.setdefault((impl, size, precision, xla), []).append(result)
                        print(f"round {round_index + 1}: {impl:13} {size:6} {precision:15} "
                              f"xla={xla:3} {result}", flush=True)  # fmt: skip
    best_ceiling = {name: max(c[name] for c in ceilings) for name in ceilings[0]}
    peak = {dtype: max(best_ceiling[f"{dtype} graph"], best_ceiling[f"{dtype} XLA"])
            for dtype in ("float32", "bfloat16")}  # fmt: skip
    tokens = BATCH_SIZE * SEQUENCE_LENGTH
    records = []
    for (impl, size, precision, xla), results in samples.items():
        good = [r for r in results if "error" not in r]
        arch = dict(SIZES[size], vocabulary_size=VOCABULARY_SIZE)
        flops_per_token = training_flops_per_token(arch, SEQUENCE_LENGTH, PREDICTIONS)
        record = {"impl": impl, "size": size, "precision": precision, "xla": xla == "on",
                  "rounds": len(good)}  # fmt: skip
        if good:
            step = min(r["step_seconds"] for r in good)
            ceiling = peak.get(compute_dtype(precision), peak["float32"])
            record.update(
                step_ms=1000 * step,
                tokens_per_s=tokens / step,
                gflop_per_s=tokens / step * flops_per_token / 1e9,
                mfu=tokens / step * flops_per_token / (ceiling * 1e9),
                peak_rss_mib=max(r["peak_rss_mib"] for r in good),
            )
        else:
            record["error"] = results[-1]["error"]
        records.append(record)

    print(f"\nmachine: {machine}")
    print(f"matmul ceilings (2048^3, best of {len(ceilings)} rounds), GFLOP/s: "
          + ", ".join(f"{name} {value:.0f}" for name, value in best_ceiling.items()))  # fmt: skip
    print(
        f"sequence {SEQUENCE_LENGTH}, batch {BATCH_SIZE}, vocabulary {VOCABULARY_SIZE}, "
        f"{PREDICTIONS} predictions; each configuration's best of {args.repeats} interleaved "
        f"rounds x {args.steps} steps (median step); MFU against the ceiling of its precision\n"
    )
    print(f"{'impl':14}{'size':7}{'precision':16}{'xla':5}{'step ms':>9}{'tokens/s':>10}"
          f"{'GFLOP/s':>9}{'MFU':>7}{'RSS MiB':>9}")  # fmt: skip
    order = sorted(records, key=lambda r: (r["size"], IMPLS.index(r["impl"]), r["precision"],
                                           not r["xla"]))  # fmt: skip
    for r in order:
        head = f"{r['impl']:14}{r['size']:7}{r['precision']:16}{'on' if r['xla'] else 'off':5}"
        if "error" in r:
            print(f"{head}  failed: {r['error']}")
            continue
        print(f"{head}{r['step_ms']:>9.0f}{r['tokens_per_s']:>10,.0f}{r['gflop_per_s']:>9.1f}"
              f"{r['mfu']:>7.1%}{r['peak_rss_mib']:>9.0f}")  # fmt: skip

    print("\nbest configuration against best configuration:")
    for size in args.sizes:
        best = {}
        for r in records:
            if r["size"] == size and "tokens_per_s" in r:
                if r["tokens_per_s"] > best.get(r["impl"], {}).get("tokens_per_s", 0):
                    best[r["impl"]] = r
        if "fmkeras" not in best:
            continue
        ours = best["fmkeras"]
        for impl, r in best.items():
            ratio = ours["tokens_per_s"] / r["tokens_per_s"]
            print(f"  {size:6} {impl:13} {r['tokens_per_s']:>8,.0f} tokens/s "
                  f"({r['precision']}, XLA {'on' if r['xla'] else 'off'}, MFU {r['mfu']:.1%})"
                  f"  fmkeras / {impl}: {ratio:.2f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine, "ceilings_gflops": best_ceiling, "runs": records},
                      handle, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
