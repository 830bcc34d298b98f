"""Causal LM speed: fmkeras's `CausalLM` vs keras-hub's `GPT2CausalLM`, side by side.

    python tools/bench_causal_lm.py [--modes train generate] [--size mini]
                                    [--precisions float32 mixed_bfloat16] [--xla on off]
                                    [--samplers greedy top_k] [--repeats 3] [--json PATH]

Both models get the same dimensions (a named fmkeras size; GPT-2's pre-LN
blocks, tied embeddings, no dropout), the same vocabulary (16,000, the
recipe's) and the same token ids. `train`: AdamW steps with `fit` on one
batch of 32 x 128 ids, tokens/s from the median step. `generate`: 4 prompts
of 16 tokens continued by 64 new tokens with the key/value cache —
fmkeras's `TextGenerator.generate_ids`, keras-hub's `generate` (its
`compile(sampler=...)`: `greedy`, or `top_k` = `TopKSampler(k=40)`, against
fmkeras's top-k 40 at temperature 1), new tokens/s from the median of five
calls after a compiling one. Each configuration runs in its own process,
rounds are interleaved, each configuration keeps its best round, and the
summary compares each implementation's best configuration with the other's.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_train import time_fit  # the median step time after warm-up (tools/ is on the path)

VOCABULARY_SIZE, SEQUENCE_LENGTH, BATCH_SIZE = 16000, 128, 32
PROMPTS, PROMPT_LENGTH, NEW_TOKENS = 4, 16, 64
IMPLS = ("fmkeras", "keras-hub")


def build(impl, dims, dtype_policy):
    if impl == "fmkeras":
        from fmkeras.models import CausalLM

        return CausalLM(VOCABULARY_SIZE, max_sequence_length=512, dtype=dtype_policy, **dims)
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=VOCABULARY_SIZE, dropout=0.0,
                                             max_sequence_length=512, dtype=dtype_policy, **dims)
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def token_ids(shape):
    import numpy as np

    return np.random.default_rng(0).integers(5, VOCABULARY_SIZE, shape).astype("int32")


def time_training(model, xla, steps, warmup):
    import keras
    import tensorflow as tf

    ids = token_ids((BATCH_SIZE, SEQUENCE_LENGTH + 1))
    inputs = {"token_ids": ids[:, :-1], "padding_mask": 1 + 0 * ids[:, :-1]}
    optimizer = keras.optimizers.AdamW(1e-4, weight_decay=0.01, global_clipnorm=1.0)
    model.compile(optimizer=optimizer, jit_compile=xla,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    dataset = tf.data.Dataset.from_tensors((inputs, ids[:, 1:])).repeat()
    seconds = time_fit(model, dataset, steps, warmup, keras.callbacks.Callback)
    return BATCH_SIZE * SEQUENCE_LENGTH / seconds


def generator_function(impl, model, xla, sampler):
    """A function that continues the prompts by `NEW_TOKENS` tokens."""
    import numpy as np
    import tensorflow as tf

    prompts = token_ids((PROMPTS, PROMPT_LENGTH))
    if impl == "keras-hub":
        import keras_hub

        chosen = "greedy" if sampler == "greedy" else keras_hub.samplers.TopKSampler(k=40, seed=1)
        model.compile(sampler=chosen, jit_compile=xla)
        width = PROMPT_LENGTH + NEW_TOKENS
        inputs = {"token_ids": np.pad(prompts, [[0, 0], [0, NEW_TOKENS]]),
                  "padding_mask": np.arange(width)[None, :].repeat(PROMPTS, 0) < PROMPT_LENGTH}
        return lambda: model.generate(inputs, stop_token_ids=None)
    from fmkeras.tasks.causal_lm import TextGenerator
    from fmkeras.text.wordpiece import RESERVED_TOKENS, WordPieceTokenizer

    vocabulary = RESERVED_TOKENS + [f"p{i}" for i in range(VOCABULARY_SIZE - len(RESERVED_TOKENS))]
    special = WordPieceTokenizer(vocabulary)
    generator = TextGenerator(model, special, special)
    top_k = 0 if sampler == "greedy" else 40
    temperature = 0.0 if sampler == "greedy" else 1.0
    lengths = tf.fill([PROMPTS], PROMPT_LENGTH)
    function = tf.function(
        lambda ids: generator.generate_ids(ids, lengths, NEW_TOKENS, temperature, top_k, 1.0, 1),
        jit_compile=xla,
    )
    ids = tf.constant(prompts)
    return lambda: [t.numpy() for t in function(ids)]


def time_generation(impl, model, xla, sampler, calls=5):
    generate = generator_function(impl, model, xla, sampler)
    generate()  # compiles
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return PROMPTS * NEW_TOKENS / statistics.median(times)


def child(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from fmkeras.config import SIZES

    keras.utils.set_random_seed(0)
    model = build(args.impl, SIZES[args.size], args.precision)
    xla = args.xla == "on"
    if args.mode == "train":
        rate = time_training(model, xla, args.steps, warmup=3)
    else:
        rate = time_generation(args.impl, model, xla, args.sampler)
    print(json.dumps({"tokens_per_s": rate}))


def measure(mode, impl, size, precision, xla, sampler, steps):
    command = [sys.executable, __file__, "--child", "--mode", mode, "--impl", impl, "--size", size,
               "--precision", precision, "--xla-child", xla, "--sampler", sampler,
               "--steps", str(steps)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"error": ((result.stderr.strip().splitlines() or ["no output"])[-1])[:300]}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["train", "generate"])
    parser.add_argument("--size", default="mini")
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--xla", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--samplers", nargs="+", default=["greedy", "top_k"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--mode", "--impl", "--precision", "--xla-child", "--sampler"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.xla = args.xla_child
        return child(args)

    configurations = [(mode, impl, precision, xla, sampler)
                      for mode in args.modes for impl in IMPLS for precision in args.precisions
                      for xla in args.xla
                      for sampler in (args.samplers if mode == "generate" else ["-"])]  # fmt: skip
    samples = {}
    for round_index in range(args.repeats):
        for configuration in configurations:
            result = measure(*configuration[:2], args.size, *configuration[2:], args.steps)
            samples.setdefault(configuration, []).append(result)
            print(f"round {round_index + 1}: {' '.join(configuration)} {result}", flush=True)
    records = []
    for (mode, impl, precision, xla, sampler), results in samples.items():
        rates = [r["tokens_per_s"] for r in results if "tokens_per_s" in r]
        records.append({"mode": mode, "impl": impl, "precision": precision, "xla": xla == "on",
                        "sampler": sampler, "tokens_per_s": max(rates) if rates else None,
                        "error": None if rates else results[-1]["error"]})  # fmt: skip
    print(f"\n{args.size}, vocabulary {VOCABULARY_SIZE}; train: batch {BATCH_SIZE} x "
          f"{SEQUENCE_LENGTH}; generate: {PROMPTS} prompts x {PROMPT_LENGTH} + {NEW_TOKENS} new "
          f"tokens; best of {args.repeats} interleaved rounds\n")  # fmt: skip
    print(f"{'mode':9}{'sampler':8}{'impl':11}{'precision':16}{'xla':5}{'tokens/s':>10}")
    for r in records:
        rate = f"{r['tokens_per_s']:>10,.0f}" if r["tokens_per_s"] else f"  failed: {r['error']}"
        print(f"{r['mode']:9}{r['sampler']:8}{r['impl']:11}{r['precision']:16}"
              f"{'on' if r['xla'] else 'off':5}{rate}")  # fmt: skip
    print("\nbest configuration against best configuration:")
    for mode in args.modes:
        for sampler in args.samplers if mode == "generate" else ["-"]:
            best = {}
            for r in records:
                if r["mode"] == mode and r["sampler"] == sampler and r["tokens_per_s"]:
                    if r["tokens_per_s"] > best.get(r["impl"], {}).get("tokens_per_s", 0):
                        best[r["impl"]] = r
            if len(best) == 2:
                ours, theirs = best["fmkeras"], best["keras-hub"]
                print(f"{mode} {sampler}: fmkeras {ours['tokens_per_s']:,.0f} tokens/s "
                      f"({ours['precision']}, XLA {'on' if ours['xla'] else 'off'}) vs keras-hub "
                      f"{theirs['tokens_per_s']:,.0f} ({theirs['precision']}, XLA "
                      f"{'on' if theirs['xla'] else 'off'}): "
                      f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
