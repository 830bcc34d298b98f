"""Explanations as a self-contained HTML report, PNG figures and TensorBoard
summaries (matplotlib draws the figures; the HTML embeds them)."""

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmkeras.explain.choices import METHODS  # noqa: E402
from fmkeras.training.checkpoints import atomic_path  # noqa: E402

POSITIVE = (22, 163, 74)  # green: raises F
NEGATIVE = (220, 38, 38)  # red: lowers F
TITLES = {
    "integrated_gradients": "integrated gradients",
    "gradient_x_input": "gradient × input",
    "attention_rollout": "attention rollout",
}

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #111; max-width: 1100px; }
.tokens { line-height: 2.2em; margin: 0.3em 0 1em 0; }
.token { padding: 0.25em 0.2em; margin: 0 0.08em; border-radius: 0.25em; }
table.scores td, table.scores th { padding: 0.2em 0.8em; text-align: left; }
img { max-width: 100%; }
.method { color: #555; font-size: 0.9em; }
"""


def shade(value, scale):
    """CSS background for an attribution: green for positive, red for
    negative, opaque at `scale` (the largest |value| of the row)."""
    strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    red, green, blue = POSITIVE if value >= 0 else NEGATIVE
    return f"rgba({red}, {green}, {blue}, {strength:.3f})"


SPECIAL = ("[CLS]", "[SEP]", "[PAD]")


def token_spans(tokens, values):
    """Shaded spans, scaled to the largest |value| of the text's own tokens
    (attention rollout gives `[CLS]` and `[SEP]` most of the mass)."""
    text = [abs(v) for t, v in zip(tokens, values, strict=True) if t not in SPECIAL]
    scale = max(text or [float(np.max(np.abs(values), initial=0.0))])
    return "".join(
        f'<span class="token" style="background: {shade(value, scale)}" '
        f'title="{value:+.4f}">{html.escape(token)}</span>'
        for token, value in zip(tokens, values, strict=True)
    )


def png_bytes(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def attribution_figure(explanation, target):
    """Horizontal bars: one panel per method, one bar per token."""
    tokens = explanation.tokens
    figure, axes = plt.subplots(
        1, len(METHODS), figsize=(4 * len(METHODS), 0.3 * len(tokens) + 1.2), sharey=True
    )
    positions = np.arange(len(tokens))
    for axis, method in zip(axes, METHODS, strict=True):
        values = target.attributions[method]
        colours = [np.array(POSITIVE if v >= 0 else NEGATIVE) / 255 for v in values]
        axis.barh(positions, values, color=colours)
        axis.set_title(TITLES[method], fontsize=10)
        axis.axvline(0, color="#888", linewidth=0.5)
    axes[0].set_yticks(positions, tokens, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle(target.name, fontsize=11)
    return png_bytes(figure)


def heatmap_figure(title, rows, columns, heads):
    """One layer's attention: the mean over heads, then each head."""
    panels = [heads.mean(0), *heads]
    names = ["mean of heads", *(f"head {h}" for h in range(len(heads)))]
    per_row = min(len(panels), 4)
    lines = -(-len(panels) // per_row)
    size = max(2.5, 0.18 * max(len(rows), len(columns)) + 1.0)
    figure, axes = plt.subplots(
        lines, per_row, figsize=(size * per_row, size * lines), squeeze=False
    )
    for axis, panel, name in zip(axes.flat, panels, names, strict=False):
        axis.imshow(panel, cmap="viridis", vmin=0, vmax=max(float(panel.max()), 1e-6))
        axis.set_title(name, fontsize=9)
        axis.set_xticks(range(len(columns)), columns, rotation=90, fontsize=6)
        axis.set_yticks(range(len(rows)), rows, fontsize=6)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(title, fontsize=11)
    return png_bytes(figure)


def figures(explanation):
    """`{file name: PNG bytes}`: attributions per target, attention per layer."""
    result = {}
    for index, target in enumerate(explanation.targets):
        result[f"attributions_{index}.png"] = attribution_figure(explanation, target)
    for kind, (rows, columns, layers) in explanation.attention.items():
        for layer, heads in enumerate(layers):
            name = f"{kind.replace('-', '_')}_layer_{layer}.png"
            result[name] = heatmap_figure(f"{kind}, layer {layer}", rows, columns, heads)
    return result


def image(data, alt):
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def html_report(explanation, pictures=None):
    """The report as one HTML string (images inlined as data URIs)."""
    pictures = pictures if pictures is not None else figures(explanation)
    settings = ", ".join(f"{key} {value}" for key, value in explanation.settings.items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fmkeras explanation: {html.escape(explanation.text[:60])}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Why the model said this</h1>",
        f"<p><b>Input:</b> {html.escape(explanation.text)}</p>",
        f"<p><b>Prediction:</b> {html.escape(prediction_text(explanation.prediction))}</p>",
        f'<p class="method">{html.escape(settings)}. Green raises the explained output, '
        "red lowers it; each row is scaled to its largest value over the text "
        "(not [CLS] and [SEP]).</p>",
    ]
    if not explanation.targets:
        parts.append("<p>Nothing to explain (no entity predicted).</p>")
    for index, target in enumerate(explanation.targets):
        change = target.score - target.baseline_score
        parts += [
            f'<h2 class="target">Explained: {html.escape(target.name)}</h2>',
            f'<p class="method">F(x) = {target.score:.4f}, F(baseline) = '
            f"{target.baseline_score:.4f}, sum of integrated gradients = "
            f"{np.sum(target.attributions['integrated_gradients']):.4f} "
            f"(completeness error {target.completeness_error:.2%} of {abs(change):.4f}, "
            f"{target.steps} steps)</p>",
        ]
        for method in METHODS:
            parts += [
                f'<div class="method">{TITLES[method]}</div>',
                f'<div class="tokens" data-method="{method}">'
                f"{token_spans(explanation.tokens, target.attributions[method])}</div>",
            ]
        parts.append(image(pictures[f"attributions_{index}.png"], f"attributions: {target.name}"))
    for kind, (_, _, layers) in explanation.attention.items():
        parts.append(f"<h2>{kind.capitalize()} by layer and head</h2>")
        for layer in range(len(layers)):
            name = f"{kind.replace('-', '_')}_layer_{layer}.png"
            parts.append(image(pictures[name], f"{kind}, layer {layer}"))
    parts.append("</body></html>")
    return "\n".join(parts)


def prediction_text(prediction):
    if "label" in prediction:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in prediction["probabilities"].items())
        return f"{prediction['label']} ({scores})"
    if "tags" in prediction:
        return " ".join(f"{word}/{tag}" for word, tag in prediction["tags"])
    return prediction["translation"]


def write_outputs(explanation, html_path=None, png_dir=None, tensorboard_dir=None, step=0):
    """Writes whichever of the HTML report, the PNGs and the TensorBoard
    summaries are asked for; returns the paths written."""
    if not (html_path or png_dir or tensorboard_dir):
        return []  # no figures to draw
    pictures = figures(explanation)
    written = []
    if html_path:
        with atomic_path(html_path) as temporary:
            temporary.write_text(html_report(explanation, pictures), encoding="utf-8")
        written.append(Path(html_path))
    if png_dir:
        directory = Path(png_dir)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in pictures.items():
            (directory / name).write_bytes(data)
            written.append(directory / name)
    if tensorboard_dir:
        write_summaries(explanation, pictures, tensorboard_dir, step)
        written.append(Path(tensorboard_dir))
    return written


def markdown_table(explanation, target):
    header = "| token | " + " | ".join(TITLES[m] for m in METHODS) + " |"
    lines = [header, "|" + " --- |" * (len(METHODS) + 1)]
    for i, token in enumerate(explanation.tokens):
        values = " | ".join(f"{target.attributions[m][i]:+.4f}" for m in METHODS)
        lines.append(f"| {token} | {values} |")
    return "\n".join(lines)


def write_summaries(explanation, pictures, directory, step):
    """TensorBoard: each figure as an image, each target's table as text."""
    import tensorflow as tf

    with tf.summary.create_file_writer(str(directory)).as_default():
        for name, data in pictures.items():
            picture = tf.expand_dims(tf.io.decode_png(data, channels=4), 0)
            tf.summary.image(f"explain/{Path(name).stem}", picture, step=step)
        for index, target in enumerate(explanation.targets):
            table = f"**{target.name}**\n\n{markdown_table(explanation, target)}"
            tf.summary.text(f"explain/target_{index}", table, step=step)
