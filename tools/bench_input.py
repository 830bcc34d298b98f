"""Input-pipeline throughput against what the model consumes.

    python tools/bench_input.py [--size mini] [--batch-size 32] [--sequence-length 128]

Measures, on the Gutenberg training file: (1) tokenize + pack, done once per
run; (2) the streaming part (shuffle by index, gather, 80/10/10 masking,
batching) in tokens/s; (3) the MLM train step of the chosen model size in
tokens/s (XLA, synthetic-free: the real pipeline feeds it). Prints a table
and the ratio (2)/(3), which should stay far above 1.
"""

import argparse
import json
import time

import keras

from fmkeras.config import ModelConfig, TrainConfig
from fmkeras.data import read_lines, require_file, resolve_data_dir
from fmkeras.models import Encoder, MaskedLM, encoder_kwargs
from fmkeras.text.mlm import mlm_dataset, pack_sequences
from fmkeras.text.wordpiece import WordPieceTokenizer, learn_vocabulary
from fmkeras.training.optimizer import create_optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="mini")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--vocab", help="vocab.txt (default: learn 8k pieces from 5,000 lines)")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--model-steps", type=int, default=30)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    data_dir, origin = resolve_data_dir()
    lines = read_lines(require_file("gutenberg_en/train.txt", data_dir, origin))
    vocab = args.vocab or learn_vocabulary(lines[:5000], 8000, log=lambda _: None)
    tokenizer = WordPieceTokenizer(vocab)
    predictions = round(0.15 * args.sequence_length)

    start = time.perf_counter()
    sequences = pack_sequences(lines, tokenizer, args.sequence_length)
    pack_seconds = time.perf_counter() - start
    packed_tokens = sequences.size

    dataset = mlm_dataset(sequences, tokenizer, args.batch_size, predictions)
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    tokens_per_batch = args.batch_size * args.sequence_length
    stream_rate = args.batches * tokens_per_batch / (time.perf_counter() - start)

    model = MaskedLM(
        Encoder(**encoder_kwargs(ModelConfig(size=args.size), len(tokenizer.vocabulary)))
    )
    model.compile(
        optimizer=create_optimizer(TrainConfig(steps=args.model_steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    model.fit(dataset, steps_per_epoch=5, epochs=1, verbose=0)  # compile
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=args.model_steps, epochs=1, verbose=0)
    model_rate = args.model_steps * tokens_per_batch / (time.perf_counter() - start)

    results = {
        "pack_tokens_per_second": packed_tokens / pack_seconds,
        "pack_seconds": pack_seconds,
        "stream_tokens_per_second": stream_rate,
        "model_tokens_per_second": model_rate,
        "input_over_model": stream_rate / model_rate,
        "size": args.size,
        "batch_size": args.batch_size,
        "sequence_length": args.sequence_length,
    }
    print(f"{'stage':38}{'tokens/s':>14}")
    print(f"{'tokenize + pack (once per run)':38}{results['pack_tokens_per_second']:>14,.0f}")
    print(f"{'stream: shuffle + mask + batch':38}{stream_rate:>14,.0f}")
    print(f"{f'model train step ({args.size}, XLA)':38}{model_rate:>14,.0f}")
    print(f"input / model = {results['input_over_model']:.0f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
