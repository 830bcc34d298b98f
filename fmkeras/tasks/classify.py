"""Sequence classification (`task: classify`): an encoder with a head on the
pooled output, trained on a TSV of texts and labels."""

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from fmkeras.explain.explainers import ClassifyExplainer
from fmkeras.models import Classifier
from fmkeras.signatures import classifier_functions
from fmkeras.tasks.finetune import (
    EncoderPredictor,
    EncoderTask,
    collect,
    cross_entropy,
)
from fmkeras.tasks.registry import register_task
from fmkeras.tasks.spec import ClassifySpec
from fmkeras.text.labelled import (
    EVALUATE_SKIP_HINT,
    encode_inputs,
    label_vocabulary,
    read_tsv,
    split_pairs,
)


def classification_metrics(examples, names):
    """Accuracy, macro-F1, loss and the confusion matrix (rows: true, columns:
    predicted) of `collect`'s examples; with two classes also `f1`, the F1
    of the positive class (the second label, e.g. `1`: MRPC's and GLUE's F1)."""
    logits = np.stack([logit for logit, _ in examples])
    labels = np.array([label for _, label in examples])
    predicted = logits.argmax(-1)
    classes = list(range(len(names)))
    binary = {}
    if len(names) == 2:
        positive = f1_score(labels, predicted, labels=classes, average="binary", zero_division=0.0)
        binary["f1"] = float(positive)
    return {
        "loss": cross_entropy(logits, labels),
        "accuracy": float((predicted == labels).mean()),
        **binary,
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro")),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
        "labels": names,
        "examples": int(len(labels)),
    }


def encode_rows(tokenizer, rows, names, sequence_length):
    """`(ids, label ids)` of TSV rows (ids: `encode_inputs`, pairs with segment ids)."""
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[label] for label in rows.labels], np.int32)
    return encode_inputs(tokenizer, rows.inputs, sequence_length), labels


class ClassifyPredictor(EncoderPredictor):
    warmup_texts = ("A gripping, beautifully acted film.", "dull")
    explainer = ClassifyExplainer

    def classify(self, texts, batch_size=32):
        """`[(label, {label: probability})]` per text (or `(text, second)` pair
        of a sentence-pair run), in input order."""
        ids = encode_inputs(self.tokenizer, texts, self.info["sequence_length"])
        order = np.arange(len(texts), dtype=np.int32)  # carried as the label: batches reorder
        results = [None] * len(texts)
        for logits, index in collect(self.model, self.batches(ids, order, batch_size)):
            probabilities = np.exp(logits - logits.max())
            probabilities /= probabilities.sum()
            scores = dict(zip(self.labels, probabilities.round(6).tolist(), strict=True))
            results[int(index)] = (self.labels[int(probabilities.argmax())], scores)
        return results

    def predict(self, texts):
        pairs = split_pairs(texts, self.info.get("text_pair_column"))
        results = zip(texts, self.classify(pairs), strict=True)
        return [{"text": text, "label": label, "probabilities": scores}
                for text, (label, scores) in results]  # fmt: skip

    def evaluate(self, data, bad_rows="fail", batch_size=32):
        """Metrics on a TSV with the run's columns."""
        rows = read_tsv(data, self.info["text_column"], self.info["label_column"], bad_rows,
                        labels=set(self.labels), skip_hint=EVALUATE_SKIP_HINT,
                        pair_column=self.info.get("text_pair_column"))  # fmt: skip
        ids, labels = encode_rows(self.tokenizer, rows, self.labels, self.info["sequence_length"])
        metrics = classification_metrics(collect(self.model, self.batches(ids, labels, batch_size)),
                                          self.labels)  # fmt: skip
        return {**metrics, "skipped_rows": {"data": len(rows.skipped)}, "file": str(data)}

    def serving_functions(self):
        return classifier_functions(self)

    def warmup_inputs(self):
        if not self.info.get("text_pair_column"):
            return super().warmup_inputs()
        return {"texts": ["He said hello .", "dull"], "text_pairs": ["He greeted us .", "flat"]}


@register_task
class ClassifyTask(ClassifySpec, EncoderTask):
    predictor = ClassifyPredictor

    def read_rows(self, path, labels=None):
        data = self.config.data
        return read_tsv(path, data.text_column, data.label_column, data.bad_rows, data.max_lines,
                        labels, pair_column=data.text_pair_column)  # fmt: skip

    def label_names(self, rows):
        return label_vocabulary(rows.labels)

    def vocabulary_texts(self):
        if self.config.data.text_pair_column:
            return [text for pair in self.train_rows.inputs for text in pair]
        return self.train_rows.inputs

    def encode(self, rows):
        return encode_rows(self.tokenizer, rows, self.names, self.config.data.sequence_length)

    def build_head(self, encoder):
        return Classifier(encoder, len(self.names), self.config.model.dropout, name="classifier")

    def metrics(self, examples):
        return classification_metrics(examples, self.names)

    def info(self):
        data = self.config.data
        return {**super().info(), "text_column": data.text_column,
                "label_column": data.label_column,
                "text_pair_column": data.text_pair_column}  # fmt: skip
