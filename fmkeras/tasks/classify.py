"""Sequence classification fine-tuning (`python -m fmkeras.train classify`)."""

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from fmkeras.data import require_file
from fmkeras.models import Classifier
from fmkeras.tasks import finetune
from fmkeras.text.labelled import batched, encode_texts, label_vocabulary, read_tsv
from fmkeras.training.run_dir import RunDir


def read_rows(config, relative, data_dir, origin, labels=None):
    data = config.data
    path = require_file(relative, data_dir, origin)
    return read_tsv(
        path, data.text_column, data.label_column, data.bad_rows, data.max_lines, labels
    )


def classification_metrics(examples, names):
    """Accuracy, macro-F1, loss and the confusion matrix (rows: true, columns:
    predicted) of `finetune.collect`'s examples."""
    logits = np.stack([logit for logit, _ in examples])
    labels = np.array([label for _, label in examples])
    predicted = logits.argmax(-1)
    classes = list(range(len(names)))
    return {
        "loss": finetune.cross_entropy(logits, labels),
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro")),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
        "labels": names,
        "examples": int(len(labels)),
    }


def dataset(tokenizer, rows, names, sequence_length, batch_size, **kwargs):
    ids = encode_texts(tokenizer, rows.inputs, sequence_length)
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[label] for label in rows.labels], np.int32)
    return batched(ids, labels, batch_size, sequence_length, tokenizer.pad_id, **kwargs)


def run(config, run: RunDir, data_dir, origin, log=print):
    data, train = config.data, config.train
    train_rows = read_rows(config, data.train_file, data_dir, origin)
    names = label_vocabulary(train_rows.labels)
    valid_rows = read_rows(config, data.valid_file, data_dir, origin, labels=set(names))
    finetune.report_rows(config, train_rows, valid_rows, names, log)
    ready = finetune.prepare(
        config,
        run,
        train_rows.inputs,
        lambda encoder: Classifier(encoder, len(names), config.model.dropout, name="classifier"),
        data_dir,
        origin,
        log,
        skipped={"train": len(train_rows.skipped), "valid": len(valid_rows.skipped)},
    )
    tokenizer, length, batch = ready.tokenizer, data.sequence_length, train.batch_size
    seed = train.seed + ready.start_step
    train_data = dataset(
        tokenizer, train_rows, names, length, batch, shuffle=True, seed=seed, repeat=True
    )
    valid_data = dataset(tokenizer, valid_rows, names, length, batch)

    def evaluate(model):
        return classification_metrics(finetune.collect(model, valid_data), names)

    info = {
        "task": "classify",
        "labels": names,
        "lowercase": tokenizer.lowercase,
        "sequence_length": length,
        "text_column": data.text_column,
        "label_column": data.label_column,
        "init": config.model.init,
    }
    return finetune.train_and_save(ready, train_data, evaluate, config, run, info, log)
