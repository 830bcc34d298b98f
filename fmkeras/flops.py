"""Parameter, FLOP and memory arithmetic for encoder configs.

Training FLOPs per token follow Kaplan et al. / nanoGPT: `6 * N` for the
matmul parameters `N` a token passes through (forward 2, backward 4), plus
`12 * layers * seq * hidden` for the attention score/value matmuls. The MLM
head runs only on the masked positions, so it counts `predictions / seq` of
a token. Embedding lookups cost no FLOPs.

    python -m fmkeras.flops [--vocabulary-size 30522] [--sequence-length 128]
"""

import sys

from fmkeras import cli
from fmkeras.config import SIZES


def parameter_counts(arch):
    """Parameters of an `Encoder` (+ tied MLM head) from its kwargs."""
    d, f, layers = arch["hidden_dim"], arch["intermediate_dim"], arch["num_layers"]
    vocab = arch["vocabulary_size"]
    segments = arch.get("num_segments", 2)
    embedding = (vocab + arch.get("max_sequence_length", 512) + segments) * d + 2 * d
    biases = 4 * d + f + d if arch.get("use_bias", True) else 0  # attention, FFN in, FFN out
    per_layer = 4 * d * d + 2 * d * f + biases + 2 * 2 * d
    final_norm = 2 * d if arch.get("normalize_first") else 0
    pooler = d * d + d
    mlm_head = d * d + d + 2 * d + vocab  # transform, LayerNorm, output bias (kernel is tied)
    encoder = embedding + layers * per_layer + final_norm + pooler
    return {
        "embedding": embedding,
        "non_embedding": layers * per_layer + final_norm + pooler,
        "encoder": encoder,
        "masked_lm": encoder + mlm_head,
    }


def training_flops_per_token(arch, sequence_length, predictions_per_sequence, head_transform=True):
    """Training FLOPs per input token of one MLM step (forward + backward); a
    causal LM predicts every position (`predictions_per_sequence =
    sequence_length`) through a head without the dense transform. Causal
    attention is counted in full, as nanoGPT and keras-hub count it."""
    d, f, layers = arch["hidden_dim"], arch["intermediate_dim"], arch["num_layers"]
    matmul_params = layers * (4 * d * d + 2 * d * f)
    attention = 12 * layers * sequence_length * d
    head_params = d * arch["vocabulary_size"] + (d * d if head_transform else 0)
    head = 6 * head_params * predictions_per_sequence / sequence_length
    return 6 * matmul_params + attention + head


def training_memory_bytes(arch):
    """Weights + gradients + AdamW moments in float32 (16 bytes a parameter);
    activations come on top and scale with batch * sequence."""
    return 16 * parameter_counts(arch)["masked_lm"]


def size_table(vocabulary_size=30522, sequence_length=128, mask_rate=0.15):
    """One row per named size: parameters, FLOPs per token, optimizer memory."""
    predictions = round(mask_rate * sequence_length)
    rows = []
    for name, dims in SIZES.items():
        arch = dict(dims, vocabulary_size=vocabulary_size)
        counts = parameter_counts(arch)
        rows.append(
            {
                "size": name,
                **dims,
                "params_total": counts["masked_lm"],
                "params_non_embedding": counts["non_embedding"],
                "train_gflop_per_token": training_flops_per_token(
                    arch, sequence_length, predictions
                )
                / 1e9,
                "weights_and_optimizer_mib": training_memory_bytes(arch) / 2**20,
            }
        )
    return rows


def build_parser():
    example = "example:\n  python -m fmkeras.flops --sequence-length 512"
    parser = cli.parser("flops", __doc__, example)
    parser.add_argument("--vocabulary-size", type=int, default=30522,
                        help="vocabulary of the embedding and MLM head")  # fmt: skip
    parser.add_argument("--sequence-length", type=int, default=128,
                        help="tokens per sequence (attention FLOPs grow with it)")  # fmt: skip
    parser.add_argument("--mask-rate", type=float, default=0.15,
                        help="share of positions the MLM head predicts")  # fmt: skip
    return parser


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    rows = size_table(args.vocabulary_size, args.sequence_length, args.mask_rate)
    header = (
        f"{'size':8}{'L':>4}{'H':>6}{'A':>4}{'params':>12}{'non-emb':>12}"
        f"{'GFLOP/tok':>11}{'W+opt MiB':>11}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['size']:8}{r['num_layers']:>4}{r['hidden_dim']:>6}{r['num_heads']:>4}"
            f"{r['params_total'] / 1e6:>11.2f}M{r['params_non_embedding'] / 1e6:>11.2f}M"
            f"{r['train_gflop_per_token']:>11.4f}{r['weights_and_optimizer_mib']:>11.0f}"
        )


if __name__ == "__main__":
    sys.exit(main())
