"""Per-task explanations of a finished run: what each output is explained
by (a class, an entity, an output token), the model as a function of the
input token embeddings, and the attention maps.

A task's `Predictor` names its explainer class in `explainer`; a task
without one cannot be explained (`fmkeras.explain` says so).
"""

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
from keras import ops
from seqeval.metrics.sequence_labeling import get_entities

from fmkeras.errors import ConfigError
from fmkeras.explain.attribution import Attributor, attention_rollout, completeness_error
from fmkeras.explain.choices import BASELINES, OUTPUTS
from fmkeras.text.labelled import IGNORE, encode_inputs, encode_texts, encode_words, split_pairs


@dataclass
class Target:
    """One explained output: its name, an attribution per method (one value
    per token) and F at the input and at the baseline."""

    name: str
    attributions: dict
    score: float
    baseline_score: float
    steps: int  # integration steps used (more than asked when the check needed them)

    @property
    def completeness_error(self):
        """|Σ IG − (F(x) − F(baseline))| ÷ |F(x) − F(baseline)|."""
        integrated = self.attributions["integrated_gradients"]
        return completeness_error(integrated, self.score, self.baseline_score)


@dataclass
class Explanation:
    """A text's tokens, the run's prediction, the explained targets and the
    attention maps (`{title: (row tokens, column tokens, [(heads, rows,
    columns) per layer])}`)."""

    text: str
    tokens: list
    prediction: dict
    targets: list
    attention: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def merged_words(self):
        """The same explanation with word pieces (`##...`) summed into words."""
        groups = []
        for index, token in enumerate(self.tokens):
            if token.startswith("##") and groups:
                groups[-1].append(index)
            else:
                groups.append([index])
        words = [self.tokens[g[0]] + "".join(self.tokens[i][2:] for i in g[1:]) for g in groups]
        targets = [
            Target(
                target.name,
                {
                    method: np.array([np.sum(values[g]) for g in groups])
                    for method, values in target.attributions.items()
                },
                target.score,
                target.baseline_score,
                target.steps,
            )
            for target in self.targets
        ]
        return Explanation(
            self.text,
            words,
            self.prediction,
            targets,
            self.attention,
            {**self.settings, "words": True},
        )

    def as_json(self):
        first = self.targets[0] if self.targets else None
        errors = [target.completeness_error for target in self.targets]
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prediction": self.prediction,
            "explained": first.name if first else None,
            "attributions": first.attributions["integrated_gradients"].tolist() if first else [],
            "completeness_error": max(errors) if errors else None,
            "targets": [
                {
                    "name": target.name,
                    "score": target.score,
                    "baseline_score": target.baseline_score,
                    "completeness_error": target.completeness_error,
                    "steps": target.steps,
                    "attributions": {m: v.tolist() for m, v in target.attributions.items()},
                }
                for target in self.targets
            ],
            "settings": self.settings,
        }


def baseline_vectors(table, ids, keep_ids, kind, tokenizer):
    """The baseline's embeddings for `ids`: every token replaced by `[PAD]`'s
    or `[MASK]`'s embedding, or by zeros, except `keep_ids` (`[CLS]`,
    `[SEP]`), which keep their own, so attributions fall on the text."""
    if kind not in BASELINES:
        raise ConfigError(f"--baseline {kind!r} is not one of {', '.join(BASELINES)}")
    ids = np.asarray(ids)
    replacement = {
        "pad": table[tokenizer.pad_id],
        "mask": table[tokenizer.mask_id],
        "zeros": np.zeros(table.shape[1], table.dtype),
    }[kind]
    keep = np.isin(ids, keep_ids)[:, None]
    return np.where(keep, table[ids], replacement).astype(np.float32)


class Explainer:
    """Integrated gradients, gradient × input and attention rollout for one
    finished run. Subclasses define `score(vectors, batch)`, `pad_values`
    and `explain(text)`.

    Args:
        predictor: the run's `Predictor`.
        baseline: `"pad"`, `"mask"` or `"zeros"` (see `baseline_vectors`).
        steps: int. Integrated-gradients steps.
        rule: integration rule (`attribution.RULES`).
        output: `"probability"` (softmax) or `"logit"`: what F is.
        tolerance: float. A target whose completeness error exceeds it is
            integrated again with 4× the steps (up to 800); 0: never.
    """

    pad_values = {}

    def __init__(self, predictor, baseline="pad", steps=50, rule="gausslegendre",
                 output="probability", tolerance=0.01):  # fmt: skip
        if output not in OUTPUTS:
            raise ConfigError(f"--output {output!r} is not one of {', '.join(OUTPUTS)}")
        self.predictor = predictor
        self.model = predictor.model
        self.encoder = self.model.encoder
        self.table = np.asarray(self.encoder.token_embedding.embeddings, np.float32)
        self.baseline, self.steps, self.rule, self.output = baseline, steps, rule, output
        self.tolerance = tolerance
        self.settings = {"baseline": baseline, "steps": steps, "rule": rule, "output": output,
                         "tolerance": tolerance}  # fmt: skip
        self.attributor = Attributor(self.score, self.pad_values)

    def transform(self, logits):
        logits = ops.cast(logits, "float32")
        return ops.softmax(logits, axis=-1) if self.output == "probability" else logits

    def item(self, ids, tokenizer, with_baseline=True, **inputs):
        """One example for the `Attributor`: its token vectors, the baseline's
        (unless only F(x) is wanted) and the task's `inputs`."""
        item = {"vectors": self.table[np.asarray(ids)], **inputs}
        if with_baseline:
            keep = [tokenizer.cls_id, tokenizer.sep_id]
            item["baseline"] = baseline_vectors(self.table, ids, keep, self.baseline, tokenizer)
        return item

    def attribute(self, items, names, relevance):
        """`Target`s for `items` (one per explained output): all three methods."""
        integrated = self.integrated_gradients(items)
        products = self.attributor.gradient_times_input(items)
        return [
            Target(
                name,
                {
                    "integrated_gradients": ig,
                    "gradient_x_input": product,
                    "attention_rollout": rollout,
                },
                score,
                baseline,
                steps,
            )
            for name, (ig, score, baseline, steps), product, rollout in zip(
                names, integrated, products, relevance, strict=True
            )
        ]

    def integrated_gradients(self, items):
        """`Attributor.integrated_gradients` with this explainer's settings."""
        return self.attributor.integrated_gradients(items, self.steps, self.rule, self.tolerance)

    def score(self, vectors, batch):
        raise NotImplementedError

    def explain(self, text):
        raise NotImplementedError


def pieces(tokenizer, ids):
    return [tokenizer.vocabulary[i] for i in ids]


def per_layer(scores):
    """Per-layer `(1, heads, rows, columns)` tensors -> `(heads, rows, columns)` arrays."""
    return [np.asarray(layer, np.float32)[0] for layer in scores]


class EncoderExplainer(Explainer):
    """Classify and tag runs: an encoder and a dense head on `head_input`."""

    head_input = "pooled_output"

    def head_values(self, vectors, batch):
        """F for every output of the head, `(rows, classes)` or `(rows, seq, tags)`."""
        outputs = self.encoder.call_with_token_vectors(
            vectors, batch["segment_ids"], batch["padding_mask"]
        )
        return self.transform(self.model.output_dense(outputs[self.head_input]))

    def forward(self, ids, segments):
        """Logits and per-layer attention of one example."""
        ids = np.asarray([ids], np.int32)
        outputs = self.encoder.call_with_token_vectors(
            self.table[ids], np.asarray([segments], np.int32), np.ones_like(ids),
            return_attention_scores=True,
        )  # fmt: skip
        logits = self.model.output_dense(outputs[self.head_input])
        return np.asarray(logits, np.float32)[0], per_layer(outputs["attention_scores"])

    def explanation(self, text, ids, prediction, targets, attention):
        tokens = pieces(self.predictor.tokenizer, ids)
        attention = {"self-attention": (tokens, tokens, attention)}
        return Explanation(text, tokens, prediction, targets, attention, self.settings)


class ClassifyExplainer(EncoderExplainer):
    """A classify run: F is the probability (or logit) of a class; every
    class is explained, the predicted one first."""

    def score(self, vectors, batch):
        values = self.head_values(vectors, batch)  # (rows, classes)
        return tf.gather(values, batch["target"], axis=1, batch_dims=1)  # (rows,)

    def encode(self, texts):
        """`(ids, segment ids)` per text: a string, or a `(text, second)` pair
        (or `first<TAB>second`) for a sentence-pair run."""
        texts = split_pairs(texts, self.predictor.info.get("text_pair_column"))
        length = self.predictor.info["sequence_length"]
        encoded = encode_inputs(self.predictor.tokenizer, texts, length)
        if isinstance(encoded, tuple):
            return list(zip(encoded[0].to_list(), encoded[1].to_list(), strict=True))
        return [(row, [0] * len(row)) for row in encoded.to_list()]

    def items(self, ids, segments, target, with_baseline=True):
        return self.item(ids, self.predictor.tokenizer, with_baseline,
                         segment_ids=np.asarray(segments, np.int32),
                         padding_mask=np.ones(len(ids), np.int32),
                         target=np.int32(target))  # fmt: skip

    def rollout(self, ids, segments):
        """Attention rollout into `[CLS]`: one relevance per token."""
        return attention_rollout(self.forward(ids, segments)[1])[0]

    def explain(self, text):
        ((ids, segments),) = self.encode([text])
        logits, attention = self.forward(ids, segments)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        labels = self.predictor.labels
        order = np.argsort(-probabilities, kind="stable")
        rollout = attention_rollout(attention)[0]  # what flows into [CLS]
        items = [self.items(ids, segments, c) for c in order]
        targets = self.attribute(items, [labels[c] for c in order], [rollout] * len(order))
        scores = dict(zip(labels, probabilities.tolist(), strict=True))
        prediction = {"label": labels[order[0]], "probabilities": scores}
        return self.explanation(text, ids, prediction, targets, attention)


class TagExplainer(EncoderExplainer):
    """A tag run: each predicted entity is explained; F is the mean
    probability (or logit) of its predicted tags over its words."""

    head_input = "sequence_output"

    def score(self, vectors, batch):
        values = self.head_values(vectors, batch)  # (rows, seq, tags)
        picked = tf.gather(values, batch["target_tags"], axis=2, batch_dims=2)  # (rows, seq)
        return tf.reduce_sum(picked * batch["target_weights"], axis=1)

    def explain(self, text):
        tokenizer, labels = self.predictor.tokenizer, self.predictor.labels
        words = text.split()
        length = self.predictor.info["sequence_length"]
        ids, first, _ = encode_words(tokenizer, [words], [[0] * len(words)], length)
        ids, first = ids.to_list()[0], np.flatnonzero(np.asarray(first.to_list()[0]) != IGNORE)
        logits, attention = self.forward(ids, [0] * len(ids))
        tag_ids = logits[first].argmax(-1)  # at each word's first piece
        tags = [labels[t] for t in tag_ids] + ["O"] * (len(words) - len(first))
        rollout = attention_rollout(attention)
        target_tags = np.zeros(len(ids), np.int32)
        target_tags[first] = tag_ids
        items, names, relevance = [], [], []
        for kind, start, end in get_entities(tags):
            weights = np.zeros(len(ids), np.float32)
            weights[first[start : end + 1]] = 1.0 / (end + 1 - start)
            items.append(self.item(ids, tokenizer, segment_ids=np.zeros(len(ids), np.int32),
                                   padding_mask=np.ones(len(ids), np.int32),
                                   target_tags=target_tags, target_weights=weights))  # fmt: skip
            names.append(f"{' '.join(words[start : end + 1])} ({kind})")
            relevance.append(weights @ rollout)
        targets = self.attribute(items, names, relevance) if items else []
        prediction = {"tags": [[word, tag] for word, tag in zip(words, tags, strict=True)]}
        return self.explanation(text, ids, prediction, targets, attention)


class TranslateExplainer(Explainer):
    """A translate run: each token of the greedy translation is explained by
    the source tokens; F is its probability (or logit) given the source and
    the tokens before it. Attention adds the cross-attention alignment."""

    def __init__(self, predictor, **options):
        pad = predictor.model.padding_id
        self.pad_values = {"source_ids": pad, "target_ids": pad}
        super().__init__(predictor, **options)

    def score(self, vectors, batch):
        logits = self.model.call_with_source_vectors(
            vectors, batch["source_ids"], batch["target_ids"]
        )
        at_position = tf.gather(logits, batch["position"], axis=1, batch_dims=1)  # (rows, vocab)
        return tf.gather(self.transform(at_position), batch["token"], axis=1, batch_dims=1)

    def explain(self, text):
        translate = self.predictor.translate
        source, target = translate.source_tokenizer, translate.target_tokenizer
        length = self.predictor.info["sequence_length"]
        ids = encode_texts(source, [text], length).to_list()[0]
        decoded = np.asarray(translate.decode_ids(tf.constant([ids], tf.int32)))[0].tolist()
        output = []
        for token in decoded:
            if token in (target.sep_id, target.pad_id):
                break
            output.append(token)
        target_ids = np.asarray([target.cls_id, *output], np.int32)
        source_ids = np.asarray(ids, np.int32)
        _, scores = self.model.call_with_source_vectors(
            self.table[source_ids][None],
            source_ids[None],
            target_ids[None],
            return_attention_scores=True,
        )
        encoder_attention, cross = per_layer(scores["encoder"]), per_layer(scores["cross"])
        # Source relevance of output t: the layers' mean cross-attention, through the rollout.
        alignment = np.mean([layer.mean(0) for layer in cross], axis=0)  # (target, source)
        relevance = alignment @ attention_rollout(encoder_attention)
        items = [
            self.item(
                source_ids,
                source,
                source_ids=source_ids,
                target_ids=target_ids,
                position=np.int32(t),
                token=np.int32(token),
            )
            for t, token in enumerate(output)
        ]
        output_pieces = pieces(target, output)
        names = [f"{t}: {piece}" for t, piece in enumerate(output_pieces)]
        targets = self.attribute(items, names, list(relevance[: len(output)])) if output else []
        tokens = pieces(source, ids)
        translation = translate.detokenizer(tf.constant([decoded], tf.int32)).numpy()[0]
        predicted = output_pieces + [target.vocabulary[target.sep_id]]  # what each row predicts
        return Explanation(
            text,
            tokens,
            {"translation": translation.decode("utf-8"), "tokens": output_pieces},
            targets,
            {
                "self-attention": (tokens, tokens, encoder_attention),
                "cross-attention": (predicted, tokens, cross),
            },
            self.settings,
        )
