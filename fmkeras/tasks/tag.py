"""Token classification (NER) fine-tuning (`python -m fmkeras.train tag`).

Each word's first sub-token carries its tag; the other sub-tokens are left
out of the loss. Metrics are entity-level precision/recall/F1 (seqeval,
CoNLL evaluation) over the words, with IOB1 input converted to IOB2.
"""

import numpy as np
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from fmkeras.data import require_file
from fmkeras.models import Tagger
from fmkeras.tasks import finetune
from fmkeras.text.labelled import batched, encode_words, read_conll
from fmkeras.training.run_dir import RunDir


def read_rows(config, relative, data_dir, origin, tags=None):
    path = require_file(relative, data_dir, origin)
    return read_conll(path, config.data.bad_rows, config.data.max_lines, tags)


def tag_vocabulary(tag_lists):
    """`O` first, then entity tags sorted by type and B before I."""
    distinct = {tag for tags in tag_lists for tag in tags} - {"O"}
    return ["O", *sorted(distinct, key=lambda tag: (tag[2:], tag[:2]))]


def encode(tokenizer, rows, names, sequence_length):
    index = {name: i for i, name in enumerate(names)}
    tag_ids = [[index[tag] for tag in tags] for tags in rows.labels]
    return encode_words(tokenizer, rows.inputs, tag_ids, sequence_length)


def tagging_metrics(examples, names, truncated_words=0):
    """Entity-level P/R/F1 (seqeval) and token accuracy of `finetune.collect`'s examples."""
    gold = [[names[i] for i in labels] for _, labels in examples]
    predicted = [[names[i] for i in logits.argmax(-1)] for logits, _ in examples]
    logits = np.concatenate([logit for logit, _ in examples])
    labels = np.concatenate([label for _, label in examples])
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    return {
        "loss": finetune.cross_entropy(logits, labels),
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


def run(config, run: RunDir, data_dir, origin, log=print):
    data, train = config.data, config.train
    train_rows = read_rows(config, data.train_file, data_dir, origin)
    names = tag_vocabulary(train_rows.labels)
    valid_rows = read_rows(config, data.valid_file, data_dir, origin, tags=set(names))
    finetune.report_rows(config, train_rows, valid_rows, names, log)
    ready = finetune.prepare(
        config,
        run,
        [" ".join(words) for words in train_rows.inputs],  # for a vocabulary (model.init=random)
        lambda encoder: Tagger(encoder, len(names), config.model.dropout, name="tagger"),
        data_dir,
        origin,
        log,
        skipped={"train": len(train_rows.skipped), "valid": len(valid_rows.skipped)},
    )
    tokenizer, length, batch = ready.tokenizer, data.sequence_length, train.batch_size
    train_ids, train_labels, _ = encode(tokenizer, train_rows, names, length)
    valid_ids, valid_labels, truncated = encode(tokenizer, valid_rows, names, length)
    if truncated:
        log(
            f"{data.valid_file}: {truncated} words beyond data.sequence_length={length} "
            "are left out of the scores"
        )
    pad, seed = tokenizer.pad_id, train.seed + ready.start_step
    train_data = batched(
        train_ids, train_labels, batch, length, pad, shuffle=True, seed=seed, repeat=True
    )
    valid_data = batched(valid_ids, valid_labels, batch, length, pad)

    def evaluate(model):
        return tagging_metrics(finetune.collect(model, valid_data), names, truncated)

    info = {
        "task": "tag",
        "labels": names,
        "lowercase": tokenizer.lowercase,
        "sequence_length": length,
        "init": config.model.init,
    }
    return finetune.train_and_save(ready, train_data, evaluate, config, run, info, log)
