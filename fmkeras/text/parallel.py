"""Parallel text for translation: aligned line files, encoding and bucketed
batches.

A corpus is two UTF-8 files whose line `i` are translations of each other,
e.g. `train.en` + `train.zh`. Line-count mismatches are errors; empty lines
and pairs longer than the sequence length are dropped and counted.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from fmkeras.data import read_lines
from fmkeras.errors import DataError
from fmkeras.text.labelled import add_cls_sep


@dataclasses.dataclass
class Pairs:
    sources: list
    targets: list
    dropped: dict  # reason -> count


def read_parallel(source_path, target_path, max_lines=None):
    """Aligned non-empty pairs of two line files (empty on either side dropped)."""
    sources = read_lines(source_path, keep_empty=True)
    targets = read_lines(target_path, keep_empty=True)
    if len(sources) != len(targets):
        raise DataError(
            f"{source_path} has {len(sources):,} lines but {target_path} has "
            f"{len(targets):,}; parallel files must be aligned line by line"
        )
    pairs = [(s, t) for s, t in zip(sources, targets, strict=True) if s and t]
    empty = len(sources) - len(pairs)
    if max_lines is not None:
        pairs = pairs[:max_lines]
    if not pairs:
        raise DataError(f"{source_path} / {target_path} hold no non-empty pairs")
    return Pairs([s for s, _ in pairs], [t for _, t in pairs], {"empty_line": empty})


def encode_pairs(pairs, source_tokenizer, target_tokenizer, sequence_length):
    """`(source_ids, target_ids)` ragged int32: `[CLS] source [SEP]` and
    `[CLS] target [SEP]` (the target's `[CLS]`/`[SEP]` are start/end);
    pairs longer than `sequence_length` on either side are dropped and counted."""
    source = source_tokenizer.tokenize(tf.constant(pairs.sources))
    target = target_tokenizer.tokenize(tf.constant(pairs.targets))
    keep = tf.logical_and(
        source.row_lengths() <= sequence_length - 2, target.row_lengths() <= sequence_length - 2
    ).numpy()
    pairs.dropped["too_long"] = int((~keep).sum())
    if not keep.any():
        raise DataError(f"every pair is longer than data.sequence_length={sequence_length}")
    source = tf.ragged.boolean_mask(source, keep)
    target = tf.ragged.boolean_mask(target, keep)

    kept = np.flatnonzero(keep)
    return (
        add_cls_sep(source, source_tokenizer.cls_id, source_tokenizer.sep_id),
        add_cls_sep(target, target_tokenizer.cls_id, target_tokenizer.sep_id),
        kept,
    )


def translation_batches(source_ids, target_ids, batch_size, sequence_length, boundaries,
                        shuffle=False, seed=0, repeat=False):  # fmt: skip
    """`({"source_ids", "target_ids"}, labels, weights)` batches bucketed by the
    longer side; `target_ids` is the target without its last token (teacher
    forcing), `labels` without its first, `weights` 0 on padding."""
    data = tf.data.Dataset.from_tensor_slices((source_ids, target_ids))
    if shuffle:
        data = data.shuffle(int(source_ids.nrows()), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        data = data.repeat()

    def split(source, target):
        inputs = {"source_ids": source, "target_ids": target[:-1]}
        return inputs, target[1:], tf.ones_like(target[1:], tf.float32)

    return (
        data.map(split, num_parallel_calls=tf.data.AUTOTUNE)
        .bucket_by_sequence_length(
            lambda inputs, *_: tf.maximum(
                tf.shape(inputs["source_ids"])[0], tf.shape(inputs["target_ids"])[0]
            ),
            bucket_boundaries=[b + 1 for b in boundaries],
            bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
            padded_shapes=({"source_ids": [None], "target_ids": [None]}, [None], [None]),
            padding_values=({"source_ids": 0, "target_ids": 0}, 0, 0.0),
            pad_to_bucket_boundary=True,
            drop_remainder=repeat,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
