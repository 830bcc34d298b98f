"""Token classification, e.g. NER (`task: tag`).

Each word's first sub-token carries its tag; the other sub-tokens are left
out of the loss. Metrics are entity-level precision/recall/F1 (seqeval,
CoNLL evaluation) over the words, with IOB1 input converted to IOB2.
"""

import numpy as np
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from fmkeras.explain.explainers import TagExplainer
from fmkeras.models import Tagger
from fmkeras.signatures import tagger_functions
from fmkeras.tasks.finetune import (
    EncoderPredictor,
    EncoderTask,
    collect,
    cross_entropy,
)
from fmkeras.tasks.registry import register_task
from fmkeras.tasks.spec import TagSpec
from fmkeras.text.labelled import EVALUATE_SKIP_HINT, encode_words, read_conll


def tag_vocabulary(tag_lists):
    """`O` first, then entity tags sorted by type and B before I."""
    distinct = {tag for tags in tag_lists for tag in tags} - {"O"}
    return ["O", *sorted(distinct, key=lambda tag: (tag[2:], tag[:2]))]


def encode_rows(tokenizer, rows, names, sequence_length):
    """`(ids, first-piece tag ids, words left out by the length)` of CoNLL rows."""
    index = {name: i for i, name in enumerate(names)}
    tag_ids = [[index[tag] for tag in tags] for tags in rows.labels]
    return encode_words(tokenizer, rows.inputs, tag_ids, sequence_length)


def tagging_metrics(examples, names, truncated_words=0):
    """Entity-level P/R/F1 (seqeval) and token accuracy of `collect`'s examples."""
    gold = [[names[i] for i in labels] for _, labels in examples]
    predicted = [[names[i] for i in logits.argmax(-1)] for logits, _ in examples]
    logits = np.concatenate([logit for logit, _ in examples])
    labels = np.concatenate([label for _, label in examples])
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    return {
        "loss": cross_entropy(logits, labels),
        "accuracy": float((logits.argmax(-1) == labels).mean()),
        "precision": float(precision_score(gold, predicted, zero_division=0)),
        "recall": float(recall_score(gold, predicted, zero_division=0)),
        "f1": float(f1_score(gold, predicted, zero_division=0)),
        "per_type": {
            name: {k: float(v) for k, v in scores.items()}
            for name, scores in report.items()
            if "avg" not in name
        },
        "sentences": len(examples),
        "truncated_words": truncated_words,
    }


class TagPredictor(EncoderPredictor):
    warmup_texts = ("Angela Merkel visited Paris on Monday .", "hello")
    explainer = TagExplainer

    def tag(self, sentences, batch_size=32):
        """`[[(word, tag)]]` per word list, in input order; words beyond the
        sequence length are tagged `O`."""
        length = self.info["sequence_length"]
        # Label each word with its sentence's index: the first pieces then say which
        # sentence a batch row is, since bucketing reorders sentences.
        marks = [[i] * len(words) for i, words in enumerate(sentences)]
        ids, pieces, _ = encode_words(self.tokenizer, sentences, marks, length)
        tags = [["O"] * len(words) for words in sentences]  # also for empty sentences
        for logits, index in collect(self.model, self.batches(ids, pieces, batch_size)):
            if len(index):
                predicted = [self.labels[i] for i in logits.argmax(-1)]
                tags[int(index[0])][: len(predicted)] = predicted
        return [list(zip(s, t, strict=True)) for s, t in zip(sentences, tags, strict=True)]

    def predict(self, texts):
        tagged = self.tag([text.split() for text in texts])
        return [{"text": text, "tags": [[word, tag] for word, tag in words]}
                for text, words in zip(texts, tagged, strict=True)]  # fmt: skip

    def evaluate(self, data, bad_rows="fail", batch_size=32):
        """Entity-level metrics on a CoNLL file."""
        rows = read_conll(data, bad_rows, tags=set(self.labels), skip_hint=EVALUATE_SKIP_HINT)
        ids, pieces, truncated = encode_rows(self.tokenizer, rows, self.labels,
                                             self.info["sequence_length"])  # fmt: skip
        examples = collect(self.model, self.batches(ids, pieces, batch_size))
        metrics = tagging_metrics(examples, self.labels, truncated)
        return {**metrics, "skipped_rows": {"data": len(rows.skipped)}, "file": str(data)}

    def serving_functions(self):
        return tagger_functions(self)


@register_task
class TagTask(TagSpec, EncoderTask):
    predictor = TagPredictor

    def read_rows(self, path, labels=None):
        data = self.config.data
        return read_conll(path, data.bad_rows, data.max_lines, labels)

    def label_names(self, rows):
        return tag_vocabulary(rows.labels)

    def vocabulary_texts(self):  # for a learned vocabulary (model.init=random)
        return [" ".join(words) for words in self.train_rows.inputs]

    def encode(self, rows):
        length = self.config.data.sequence_length
        ids, tag_ids, truncated = encode_rows(self.tokenizer, rows, self.names, length)
        if rows is self.valid_rows:
            self.truncated = truncated
            if truncated:
                self.log(f"{self.config.data.valid_file}: {truncated} words beyond "
                         f"data.sequence_length={length} are left out of the scores")  # fmt: skip
        return ids, tag_ids

    def build_head(self, encoder):
        return Tagger(encoder, len(self.names), self.config.model.dropout, name="tagger")

    def metrics(self, examples):
        return tagging_metrics(examples, self.names, self.truncated)
