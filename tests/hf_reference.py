"""A NumPy forward pass of Hugging Face `BertModel` (eval mode), written from
the transformers source, to check imported weights against without torch."""

import math

import numpy as np

_erf = np.vectorize(math.erf)


def _layer_norm(x, gamma, beta, epsilon):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * gamma + beta


def _linear(x, tensors, name):
    return x @ tensors[f"{name}.weight"].T + tensors[f"{name}.bias"]


def bert_forward(tensors, config, token_ids, segment_ids, padding_mask):
    """`(last_hidden_state, pooler_output)` as float64 arrays."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    batch, length = token_ids.shape
    x = (
        t["embeddings.word_embeddings.weight"][token_ids]
        + t["embeddings.position_embeddings.weight"][np.arange(length)][None]
        + t["embeddings.token_type_embeddings.weight"][segment_ids]
    )
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    # HF's extended attention mask: 0 for real tokens, dtype-min for padding.
    additive = (1.0 - padding_mask[:, None, None, :]) * np.finfo(np.float64).min
    head_dim = x.shape[-1] // heads
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def split(h):  # (batch, seq, hidden) -> (batch, heads, seq, head_dim)
            return h.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = (
            split(_linear(x, t, f"{p}attention.self.{n}")) for n in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + additive
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        attended = _linear(context, t, f"{p}attention.output.dense")
        x = _layer_norm(
            attended + x,
            t[f"{p}attention.output.LayerNorm.weight"],
            t[f"{p}attention.output.LayerNorm.bias"],
            eps,
        )
        hidden = _linear(x, t, f"{p}intermediate.dense")
        hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))  # exact GELU
        x = _layer_norm(
            _linear(hidden, t, f"{p}output.dense") + x,
            t[f"{p}output.LayerNorm.weight"],
            t[f"{p}output.LayerNorm.bias"],
            eps,
        )
    pooled = np.tanh(_linear(x[:, 0], t, "pooler.dense"))
    return x, pooled
