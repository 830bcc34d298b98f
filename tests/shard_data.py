"""The input pipelines that the two-worker sharding test distributes, as flat
tuples of arrays, plus which of the 64 examples each row of a batch is."""

import os

import keras
import numpy as np
import tensorflow as tf

from fmkeras.data import read_lines
from fmkeras.text.labelled import batched
from fmkeras.text.mlm import mlm_dataset, pack_sequences
from fmkeras.text.wordpiece import WordPieceTokenizer


def sequences(tokenizer):
    corpus = os.path.join(os.environ["FMKERAS_DATA_DIR"], "gutenberg_en", "train.txt")
    return pack_sequences(read_lines(corpus, max_lines=400), tokenizer, 32)[:64]


def pipeline(kind, vocab):
    """`mlm`: pretraining batches `(token_ids, mask_positions, mask_ids)`;
    `labelled`: shuffled fine-tuning batches `(token_ids, labels)`, label = example."""
    # As training does (train.seed) before building datasets: the shuffle's op seed
    # is combined with the global seed, which must agree across processes.
    keras.utils.set_random_seed(0)
    tokenizer = WordPieceTokenizer(vocab)
    rows = sequences(tokenizer)
    if kind == "mlm":
        data = mlm_dataset(rows, tokenizer, 16, 5, seed=7)
        return data.map(lambda inputs, ids, _: (inputs["token_ids"], inputs["mask_positions"], ids))
    ids = tf.ragged.constant([row[: 8 + i % 8].tolist() for i, row in enumerate(rows)])
    data = batched(ids, np.arange(64, dtype=np.int32), 16, 16, tokenizer.pad_id,
                   shuffle=True, seed=3, repeat=True)  # fmt: skip
    return data.map(lambda features, labels, _: (features["token_ids"], labels))


def examples(kind, vocab, batches):
    """Which example each row of each (joined) batch is, in order."""
    if kind == "labelled":
        return [int(label) for batch in batches for label in batch[1]]
    index = {tuple(row): i for i, row in enumerate(sequences(WordPieceTokenizer(vocab)))}
    found = []
    for token_ids, positions, mask_ids in batches:
        token_ids = np.array(token_ids)
        np.put_along_axis(token_ids, np.array(positions), np.array(mask_ids), 1)  # unmask
        found += [index[tuple(row)] for row in token_ids]
    return found
