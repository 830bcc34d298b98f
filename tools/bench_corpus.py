"""Streamed corpora: peak memory from a 10 MB to a >= 1 GB corpus, and input
throughput against what the model consumes.

    python tools/bench_corpus.py [--data-dir ../shared/data] [--scratch /tmp/corpora]
                                 [--copies 1 105] [--batches 600] [--vocab PATH]
                                 [--model-size mini] [--json PATH]

Corpora are built from copies of `gutenberg_en/train.txt` (9.6 MB), one
shard per copy, under `--scratch`. For each corpus a fresh process builds
the masked-LM training stream exactly as `task: mlm` does with a glob
`data.train_file` (the recipe's vocabulary size, sequence 128, batch 32),
then (1) reads `--batches` batches from step 0 (input tokens/s), and (2)
resumes in the middle of the corpus, which counts the rows of every shard
(tokenizing the whole corpus, streamed) and reads `--batches` more. Peak
RSS (`ru_maxrss`, which includes TensorFlow's start-up) and the current RSS
are reported after each phase. A last process times a
`pretrain_gutenberg` training step (`--model-size`, mini by default;
float32 and bfloat16, XLA off and on; the fastest) to give the rate the
input has to keep up with. The vocabulary is `--vocab`, or the recipe's
16,000 pieces learned once into `--scratch`.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

BATCH_SIZE, SEQUENCE_LENGTH = 32, 128


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stream_child(args):
    from fmkeras.text.corpus import ShardedCorpus, expand_shards
    from fmkeras.text.mlm import mlm_dataset
    from fmkeras.text.wordpiece import WordPieceTokenizer

    tokenizer = WordPieceTokenizer(args.vocab)
    shards = expand_shards(Path(args.corpus) / "*.txt")
    corpus = ShardedCorpus(shards, tokenizer, SEQUENCE_LENGTH, log=lambda _: None)
    predictions = round(0.25 * SEQUENCE_LENGTH)
    result = {"shards": len(shards), "bytes": sum(path.stat().st_size for path in shards),
              "rss_at_start_mib": peak_rss_mib()}  # fmt: skip

    def read(start_step):
        dataset = mlm_dataset(corpus, tokenizer, BATCH_SIZE, predictions, start_step=start_step)
        iterator = iter(dataset)
        next(iterator)  # the pipeline's first batch (graph building) is not timed
        started = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        return BATCH_SIZE * SEQUENCE_LENGTH * args.batches / (time.perf_counter() - started)

    result["input_tokens_per_s"] = read(0)
    result["peak_rss_fresh_mib"] = peak_rss_mib()
    result["rss_fresh_mib"] = current_rss_mib()
    started = time.perf_counter()
    rows = len(corpus)  # counts every shard (what a resume does first)
    result["count_seconds"] = time.perf_counter() - started
    result["rows"] = rows
    result["resumed_tokens_per_s"] = read(rows // 2 // BATCH_SIZE)
    result["peak_rss_resumed_mib"] = peak_rss_mib()
    result["rss_resumed_mib"] = current_rss_mib()
    print(json.dumps(result))


def model_child(args):
    """A training step of the pretrain_gutenberg model (an MLM of `args.size`)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from fmkeras.config import SIZES
    from fmkeras.models import Encoder, MaskedLM

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 16000, (BATCH_SIZE, SEQUENCE_LENGTH)).astype("int32")
    positions = np.sort(rng.random((BATCH_SIZE, SEQUENCE_LENGTH - 2)).argsort(1)[:, :32] + 1, 1)
    inputs = {"token_ids": ids, "segment_ids": 0 * ids, "padding_mask": 1 + 0 * ids,
              "mask_positions": positions.astype("int32")}  # fmt: skip
    labels = np.take_along_axis(ids, positions, 1)
    keras.mixed_precision.set_global_policy(args.precision)
    model = MaskedLM(Encoder(16000, max_sequence_length=512, **SIZES[args.size]))
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), jit_compile=args.xla == "on",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    dataset = tf.data.Dataset.from_tensors((inputs, labels)).repeat()
    model.fit(dataset, steps_per_epoch=3, verbose=0)
    started = time.perf_counter()
    model.fit(dataset, steps_per_epoch=20, verbose=0)
    print(json.dumps({"tokens_per_s": 20 * BATCH_SIZE * SEQUENCE_LENGTH
                      / (time.perf_counter() - started)}))  # fmt: skip


def run_child(*arguments):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True,
                            text=True, timeout=7200, env=environment)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise SystemExit(f"child {arguments} failed: {result.stderr[-2000:]}")
    return json.loads(lines[-1])


def build_corpus(source, directory, copies):
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(copies):
        shard = directory / f"shard-{index:04d}.txt"
        if not shard.is_file():
            shutil.copyfile(source, shard)
    return directory


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("FMKERAS_DATA_DIR",
                                                             "../shared/data"))  # fmt: skip
    parser.add_argument("--scratch", default="/tmp/fmkeras-corpora")
    parser.add_argument("--copies", nargs="+", type=int, default=[1, 105])
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--vocab", help="vocab.txt (default: learn 16,000 pieces into --scratch)")
    parser.add_argument("--model-size", dest="size", default="mini", help="the model timed")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", choices=["stream", "model"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--xla", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "stream":
        return stream_child(args)
    if args.child == "model":
        return model_child(args)

    source = Path(args.data_dir) / "gutenberg_en" / "train.txt"
    scratch = Path(args.scratch)
    vocab = Path(args.vocab) if args.vocab else scratch / "vocab.txt"
    if not vocab.is_file():  # the recipe's vocabulary, learned once
        from fmkeras.data import read_lines
        from fmkeras.text.wordpiece import learn_vocabulary, write_vocabulary

        scratch.mkdir(parents=True, exist_ok=True)
        write_vocabulary(learn_vocabulary(read_lines(source), 16000, log=lambda _: None), vocab)
    results = []
    for copies in args.copies:
        corpus = build_corpus(source, scratch / f"copies-{copies}", copies)
        found = run_child("--child", "stream", "--corpus", str(corpus), "--vocab", str(vocab),
                          "--batches", str(args.batches))  # fmt: skip
        results.append(found)
        print(json.dumps(found), flush=True)
    model = max((run_child("--child", "model", "--model-size", args.size,
                           "--precision", precision, "--xla", xla)
                 ["tokens_per_s"], precision, xla)
                for precision in ("float32", "mixed_bfloat16")
                for xla in ("off", "on"))  # fmt: skip
    print(f"\nmodel (pretrain_gutenberg: {args.size} MLM, batch {BATCH_SIZE} x {SEQUENCE_LENGTH}) "
          f"trains {model[0]:,.0f} tokens/s at best ({model[1]}, XLA {model[2]})\n")  # fmt: skip
    print(f"{'corpus':>10}{'shards':>8}{'rows':>11}{'input tok/s':>13}{'x model':>9}"
          f"{'count s':>9}{'RSS fresh':>11}{'RSS resumed':>13}{'peak RSS':>10}")  # fmt: skip
    for r in results:
        print(f"{r['bytes'] / 2**20:>8.0f}MB{r['shards']:>8}{r['rows']:>11,}"
              f"{r['input_tokens_per_s']:>13,.0f}{r['input_tokens_per_s'] / model[0]:>8.1f}x"
              f"{r['count_seconds']:>9.0f}{r['rss_fresh_mib']:>9.0f}MB"
              f"{r['rss_resumed_mib']:>11.0f}MB{r['peak_rss_resumed_mib']:>8.0f}MB")  # fmt: skip
    first, last = results[0], results[-1]
    for key, name in (("peak_rss_resumed_mib", "peak RSS"), ("rss_resumed_mib", "RSS")):
        change = last[key] / first[key] - 1
        print(f"{name} {first['bytes'] / 2**20:.0f} MB -> {last['bytes'] / 2**20:.0f} MB corpus: "
              f"{change:+.1%}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"corpora": results, "model_tokens_per_s": model[0],
                                               "model_config": [args.size, *model[1:]]},
                                              indent=2))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
