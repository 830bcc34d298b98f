"""How faithful an attribution method is (DeYoung et al., 2020, ERASER):
delete the tokens it ranks highest and see the prediction fall.

For each text, with ŷ the predicted class and p its probability:
- comprehensiveness at k: p(ŷ | x) − p(ŷ | x without its top k % tokens);
- sufficiency at k: p(ŷ | x) − p(ŷ | only its top k % tokens);
- AOPC: their mean over k in 1, 5, 10, 20, 50 %;
- the deletion curve: p(ŷ) as the top 0, 10, ..., 100 % are deleted, and its
  area (lower is more faithful).
Higher comprehensiveness and lower sufficiency are better. Tokens are word
pieces; `[CLS]` and `[SEP]` always stay; at least one token goes per bin.
"""

import math
import time

import numpy as np

from fmkeras.explain.attribution import completeness_error

BINS = (0.01, 0.05, 0.10, 0.20, 0.50)
FRACTIONS = np.linspace(0, 1, 11)
RANKINGS = ("integrated_gradients", "gradient_x_input", "attention_rollout", "random")


def content_positions(ids, keep_ids):
    return [i for i, token in enumerate(ids) if token not in keep_ids]


def without(ids, segments, dropped):
    """`(ids, segments)` with the positions in `dropped` deleted."""
    kept = [i for i in range(len(ids)) if i not in dropped]
    return [ids[i] for i in kept], [segments[i] for i in kept]


def perturbations(ids, segments, ranking, keep_ids):
    """Per bin, the text without and with only its top-ranked tokens, and the
    deletion-curve texts; `ranking` lists content positions, best first."""
    content = content_positions(ids, keep_ids)
    counts = [max(1, math.ceil(fraction * len(content))) for fraction in BINS]
    removed = [without(ids, segments, set(ranking[:n])) for n in counts]
    only = [without(ids, segments, set(ranking[n:])) for n in counts]
    curve = [without(ids, segments, set(ranking[: round(f * len(content))])) for f in FRACTIONS]
    return removed, only, curve


def faithfulness(explainer, texts, seed=0, log=print):
    """The ERASER table for a classify run's `explainer` on `texts`:
    `{method: {comprehensiveness, sufficiency, deletion_auc, per-bin lists}}`
    plus `integrated_gradients_completeness` and timings."""
    started = time.time()
    encoded = explainer.encode(texts)
    labels = {label: i for i, label in enumerate(explainer.predictor.labels)}
    predicted = [labels[label] for label, _ in explainer.predictor.classify(texts)]
    items = [
        explainer.items(ids, segments, c)
        for (ids, segments), c in zip(encoded, predicted, strict=True)
    ]
    order = np.argsort([len(ids) for ids, _ in encoded], kind="stable")  # less padding
    integrated = [None] * len(items)
    sorted_items = [items[i] for i in order]
    for index, result in zip(order, explainer.integrated_gradients(sorted_items), strict=True):
        integrated[index] = result
    attributed = time.time()
    log(
        f"integrated gradients ({explainer.steps} steps) for {len(texts)} texts: "
        f"{attributed - started:.0f} s"
    )
    products = explainer.attributor.gradient_times_input(items)
    rollouts = [explainer.rollout(ids, segments) for ids, segments in encoded]
    random = np.random.default_rng(seed)
    tokenizer = explainer.predictor.tokenizer
    keep_ids = {tokenizer.cls_id, tokenizer.sep_id}

    scores = {method: [] for method in RANKINGS}
    for index, (ids, segments) in enumerate(encoded):
        content = content_positions(ids, keep_ids)
        values = {
            "integrated_gradients": integrated[index][0],
            "gradient_x_input": products[index],
            "attention_rollout": rollouts[index],
            "random": random.permutation(len(ids)).astype(float),
        }
        for method in RANKINGS:
            ranking = sorted(content, key=lambda i, v=values[method]: -v[i])
            scores[method].append(perturbations(ids, segments, ranking, keep_ids))

    # Every perturbed text of every method, scored in a few large batches.
    flat = [
        (ids, segments, predicted[index])
        for method in RANKINGS
        for index, groups in enumerate(scores[method])
        for group in groups
        for ids, segments in group
    ]
    probabilities = score_texts(explainer, flat)
    full = np.array([result[1] for result in integrated])
    table, at = {}, 0
    per_text = len(BINS) * 2 + len(FRACTIONS)
    for method in RANKINGS:
        count = len(texts) * per_text
        block = probabilities[at : at + count].reshape(len(texts), per_text)
        at += count
        removed, only = block[:, : len(BINS)], block[:, len(BINS) : 2 * len(BINS)]
        curve = block[:, 2 * len(BINS) :]
        comprehensiveness = (full[:, None] - removed).mean(0)
        sufficiency = (full[:, None] - only).mean(0)
        table[method] = {
            "comprehensiveness": float(comprehensiveness.mean()),
            "sufficiency": float(sufficiency.mean()),
            "deletion_auc": float(np.trapezoid(curve.mean(0), FRACTIONS)),
            "comprehensiveness_by_bin": comprehensiveness.round(6).tolist(),
            "sufficiency_by_bin": sufficiency.round(6).tolist(),
            "deletion_curve": curve.mean(0).round(6).tolist(),
        }
    errors = np.array([completeness_error(*result[:3]) for result in integrated])
    steps = np.array([result[3] for result in integrated])
    return {
        "texts": len(texts),
        "methods": table,
        "bins": list(BINS),
        "integrated_gradients_completeness": {
            "median_error": float(np.median(errors)),
            "share_below_1_percent": float((errors < 0.01).mean()),
            "max_error": float(errors.max()),
            "share_integrated_again": float((steps > explainer.steps).mean()),
        },
        "seconds": {
            "integrated_gradients": round(attributed - started, 1),
            "total": round(time.time() - started, 1),
        },
        "settings": dict(explainer.settings),
    }


def score_texts(explainer, texts):
    """p(class) of `(ids, segments, class)` triples, sorted by length for batching."""
    order = np.argsort([len(ids) for ids, _, _ in texts], kind="stable")
    items = [explainer.items(*texts[i], with_baseline=False) for i in order]
    scores = np.empty(len(texts), np.float32)
    scores[order] = explainer.attributor.scores(items)
    return scores
