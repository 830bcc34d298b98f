"""Load a finished classify/tag run and use it: predictions and evaluation."""

import dataclasses
from pathlib import Path

import keras
import numpy as np

from fmkeras.errors import ConfigError, DataError
from fmkeras.tasks import finetune
from fmkeras.tasks.classify import classification_metrics
from fmkeras.tasks.tag import tagging_metrics
from fmkeras.text.labelled import batched, encode_texts, encode_words, read_conll, read_tsv
from fmkeras.text.wordpiece import WordPieceTokenizer
from fmkeras.training.run_dir import RunDir


@dataclasses.dataclass
class FinetunedRun:
    model: keras.Model
    tokenizer: WordPieceTokenizer
    info: dict  # task.json

    @property
    def labels(self):
        return self.info["labels"]

    def _batches(self, ids, labels, batch_size):
        length = self.info["sequence_length"]
        return batched(ids, labels, batch_size, length, self.tokenizer.pad_id)

    def classify(self, texts, batch_size=32):
        """`[(label, {label: probability})]` per text, in input order."""
        ids = encode_texts(self.tokenizer, texts, self.info["sequence_length"])
        order = np.arange(len(texts), dtype=np.int32)  # carried as the label: batches reorder
        results = [None] * len(texts)
        for logits, index in finetune.collect(self.model, self._batches(ids, order, batch_size)):
            probabilities = np.exp(logits - logits.max())
            probabilities /= probabilities.sum()
            scores = dict(zip(self.labels, probabilities.round(6).tolist(), strict=True))
            results[int(index)] = (self.labels[int(probabilities.argmax())], scores)
        return results

    def tag(self, sentences, batch_size=32):
        """`[[(word, tag)]]` per word list, in input order; words beyond the
        sequence length are tagged `O`."""
        length = self.info["sequence_length"]
        # Label each word with its sentence's index: the first pieces then say which
        # sentence a batch row is, since bucketing reorders sentences.
        marks = [[i] * len(words) for i, words in enumerate(sentences)]
        ids, pieces, _ = encode_words(self.tokenizer, sentences, marks, length)
        tags = [["O"] * len(words) for words in sentences]  # also for empty sentences
        for logits, index in finetune.collect(self.model, self._batches(ids, pieces, batch_size)):
            if len(index):
                predicted = [self.labels[i] for i in logits.argmax(-1)]
                tags[int(index[0])][: len(predicted)] = predicted
        return [list(zip(s, t, strict=True)) for s, t in zip(sentences, tags, strict=True)]

    def evaluate(self, path, bad_rows="fail", batch_size=32):
        """Metrics of the run's task on a labelled file of the training format."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        length, names = self.info["sequence_length"], self.labels
        index = {name: i for i, name in enumerate(names)}
        if self.info["task"] == "classify":
            rows = read_tsv(path, self.info["text_column"], self.info["label_column"], bad_rows,
                            labels=set(names))  # fmt: skip
            ids = encode_texts(self.tokenizer, rows.inputs, length)
            labels = np.array([index[label] for label in rows.labels], np.int32)
            examples = finetune.collect(self.model, self._batches(ids, labels, batch_size))
            metrics = classification_metrics(examples, names)
        else:
            rows = read_conll(path, bad_rows, tags=set(names))
            tag_ids = [[index[tag] for tag in tags] for tags in rows.labels]
            ids, pieces, truncated = encode_words(self.tokenizer, rows.inputs, tag_ids, length)
            examples = finetune.collect(self.model, self._batches(ids, pieces, batch_size))
            metrics = tagging_metrics(examples, names, truncated)
        metrics["skipped_rows"] = len(rows.skipped)
        metrics["file"] = str(path)
        return metrics


def load_run(directory):
    """A `FinetunedRun` from a run directory of `classify` or `tag`."""
    run = RunDir(directory)
    if not run.root.is_dir():
        raise ConfigError(f"run directory {run.root} does not exist")
    info = finetune.read_task_info(run.root)
    for path in (run.model, run.vocab):
        if not path.is_file():
            raise ConfigError(f"{run.root} is not a finished run: {path.name} is missing")
    model = keras.saving.load_model(run.model)
    tokenizer = WordPieceTokenizer(run.vocab, lowercase=info["lowercase"])
    return FinetunedRun(model, tokenizer, info)
