"""Labelled text for fine-tuning: TSV classification files, CoNLL NER files,
their encoding into `[CLS] ... [SEP]` token ids, and length-bucketed batches.

Readers check every row and either fail on the first bad one (naming
`file:line`) or skip bad rows and count them (`data.bad_rows: skip`).
"""

import dataclasses

import tensorflow as tf

from fmkeras.errors import DataError

IGNORE = -1  # label of sub-tokens that carry no tag (not the first piece of a word)


@dataclasses.dataclass
class Rows:
    """What a reader returns: inputs, labels and the bad rows it skipped."""

    inputs: list  # texts (classify) or word lists (tag)
    labels: list  # label strings (classify) or tag lists (tag)
    skipped: list  # "file:line: reason" of each skipped row

    def __len__(self):
        return len(self.inputs)

    def head(self, count):
        """The first `count` rows (the skipped ones stay listed)."""
        return dataclasses.replace(self, inputs=self.inputs[:count], labels=self.labels[:count])


# How to skip bad rows, as the recipe says it; the evaluate command names its flag.
RECIPE_SKIP_HINT = "set data.bad_rows=skip"
EVALUATE_SKIP_HINT = "pass --bad-rows skip"


def skipped_summary(name, skipped):
    """The log line of the bad rows a reader skipped in file `name`."""
    return f"{name}: skipped {len(skipped)} bad rows, first: {skipped[0]}"


class _Rejecter:
    def __init__(self, path, bad_rows, skip_hint):
        self.path, self.bad_rows, self.skip_hint, self.skipped = path, bad_rows, skip_hint, []

    def __call__(self, line, reason):
        message = f"{self.path}:{line}: {reason}"
        if self.bad_rows != "skip":
            raise DataError(f"{message} ({self.skip_hint} to skip such rows)")
        self.skipped.append(message)


def _decoded_lines(path, reject):
    """`(line_number, text)` of a UTF-8 file; undecodable lines go to `reject`."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                reject(number, f"not valid UTF-8 ({error.reason} at byte {error.start})")


def read_tsv(path, text_column, label_column, bad_rows="fail", max_rows=None, labels=None,
             skip_hint=RECIPE_SKIP_HINT, pair_column=None):  # fmt: skip
    """Reads a TSV with a header line into `Rows` of (text, label string);
    with `pair_column`, each input is a `(text, second text)` pair; with
    `label_column=None`, the texts alone (no label is read; `labels` is empty).

    `labels`, if given, is the closed label set: other labels are bad rows.
    `skip_hint` tells, in a bad-row error, how to skip such rows.
    """
    reject = _Rejecter(path, bad_rows, skip_hint)
    lines = _decoded_lines(path, reject)
    first = next(lines, None)
    if first is None:
        raise DataError(f"{path} is empty; expected a header line naming the columns")
    header = first[1].split("\t")
    columns = [(text_column, "data.text_column")]
    if label_column is not None:
        columns.append((label_column, "data.label_column"))
    if pair_column:
        columns.append((pair_column, "data.text_pair_column"))
    for column, key in columns:
        if column not in header:
            raise DataError(f"{path}:1: no column {column!r} ({key}); the header has {header}")
    text_at = header.index(text_column)
    label_at = header.index(label_column) if label_column is not None else None
    pair_at = header.index(pair_column) if pair_column else None
    texts, found = [], []
    for number, line in lines:
        if max_rows is not None and len(texts) >= max_rows:
            break
        # Plain tab splitting (GLUE's TSVs have no quoting): the csv module rejected
        # NUL bytes and fields over 128 KiB with errors of its own (found by tests/test_fuzz.py).
        fields = line.split("\t")
        if len(fields) != len(header):
            reject(number, f"expected {len(header)} tab-separated columns, found {len(fields)}")
            continue
        text = fields[text_at].strip()
        label = fields[label_at].strip() if label_at is not None else None
        pair = fields[pair_at].strip() if pair_column else None
        if not text:
            reject(number, f"empty {text_column!r}")
        elif pair_column and not pair:
            reject(number, f"empty {pair_column!r}")
        elif label_at is not None and not label:
            reject(number, f"empty {label_column!r}")
        elif labels is not None and label not in labels:
            reject(number, f"label {label!r} is not one of the training labels {sorted(labels)}")
        else:
            texts.append((text, pair) if pair_column else text)
            if label_at is not None:
                found.append(label)
    if not texts:
        raise DataError(f"{path} has no usable rows ({len(reject.skipped)} skipped)")
    return Rows(texts, found, reject.skipped)


def iob1_to_iob2(tags):
    """IOB1 (`I-` may open an entity) -> IOB2 (every entity opens with `B-`)."""
    converted = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-"):
            previous = converted[i - 1] if i else "O"
            if previous == "O" or previous[2:] != tag[2:]:
                tag = "B-" + tag[2:]
        converted.append(tag)
    return converted


def read_conll(path, bad_rows="fail", max_rows=None, tags=None, skip_hint=RECIPE_SKIP_HINT):
    """Reads CoNLL-2003 style NER (word first, tag last, blank line between
    sentences, `-DOCSTART-` ignored; IOB1 or IOB2) into `Rows` of (words, IOB2
    tags). `tags`, if given, is the closed tag set: other tags are bad rows."""
    reject = _Rejecter(path, bad_rows, skip_hint)
    sentences, tag_lists = [], []
    words, labels, problem = [], [], None

    def close():
        nonlocal words, labels, problem
        converted = iob1_to_iob2(labels)
        unknown = sorted(set(converted) - set(tags)) if tags is not None else []
        if problem is None and unknown:
            problem = (start, f"tags {unknown} do not occur in the training data")
        if problem is not None:
            reject(*problem)
        elif words:
            sentences.append(words)
            tag_lists.append(converted)
        words, labels, problem = [], [], None

    start = 0
    for number, line in _decoded_lines(path, reject):
        if max_rows is not None and len(sentences) >= max_rows:
            break
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            close()
            continue
        if not words:
            start = number
        tag = fields[-1]
        if len(fields) < 2:
            problem = problem or (number, f"expected 'word ... tag', found {line!r}")
        elif not (tag == "O" or tag[:2] in ("B-", "I-")):
            problem = problem or (number, f"tag {tag!r} is not O, B-X or I-X")
        words.append(fields[0])  # a bad row rejects its whole sentence, at close()
        labels.append(tag if len(fields) >= 2 else "O")
    close()
    if not sentences:
        raise DataError(f"{path} has no usable sentences ({len(reject.skipped)} skipped)")
    return Rows(sentences, tag_lists, reject.skipped)


def add_cls_sep(ids, cls_id, sep_id):
    """Ragged `(batch, pieces)` -> `[CLS] pieces [SEP]` per row (core ops only)."""
    rows = ids.nrows()
    return tf.concat([tf.fill([rows, 1], cls_id), ids, tf.fill([rows, 1], sep_id)], axis=1)


def encode_texts(tokenizer, texts, sequence_length):
    """`[CLS] pieces [SEP]` ids per text, truncated to `sequence_length`: ragged int32."""
    ids = tokenizer.tokenize(tf.constant(texts))[:, : sequence_length - 2]
    return add_cls_sep(ids, tokenizer.cls_id, tokenizer.sep_id)


def truncate_longest_first(first, second, budget):
    """Ragged `(batch, pieces)` pairs cut to at most `budget` pieces together,
    longest first, as Hugging Face's tokenizers do (`longest_first`): when
    they do not fit, the shorter side keeps up to `budget // 2` pieces and
    the longer one (the second, on a tie) the rest. Core ops only."""
    first_length, second_length = first.row_lengths(), second.row_lengths()
    fits = first_length + second_length <= budget
    first_longer = first_length > second_length
    keep_short = tf.minimum(tf.where(first_longer, second_length, first_length), budget // 2)
    keep_long = budget - keep_short
    keep_first = tf.where(fits, first_length, tf.where(first_longer, keep_long, keep_short))
    keep_second = tf.where(fits, second_length, tf.where(first_longer, keep_short, keep_long))

    def cut(ids, keep):
        return tf.ragged.boolean_mask(ids, tf.ragged.range(ids.row_lengths()) < keep[:, None])

    return cut(first, keep_first), cut(second, keep_second)


def pack_pair(first, second, cls_id, sep_id):
    """`[CLS] first [SEP] second [SEP]` ids and their segment ids (0 then 1),
    both ragged `(batch, pieces)` (core ops only)."""
    rows = first.nrows()
    cls, sep = tf.fill([rows, 1], cls_id), tf.fill([rows, 1], sep_id)
    ids = tf.concat([cls, first, sep, second, sep], axis=1)
    zeros = tf.zeros_like(tf.concat([cls, first, sep], axis=1))
    ones = tf.ones_like(tf.concat([second, sep], axis=1))
    return ids, tf.concat([zeros, ones], axis=1)


def encode_text_pairs(tokenizer, pairs, sequence_length):
    """`(ids, segment ids)` of `(text, second text)` pairs: `[CLS] a [SEP] b
    [SEP]`, truncated longest-first to `sequence_length`; both ragged int32."""
    first = tokenizer.tokenize(tf.constant([a for a, _ in pairs]))
    second = tokenizer.tokenize(tf.constant([b for _, b in pairs]))
    first, second = truncate_longest_first(first, second, sequence_length - 3)
    return pack_pair(first, second, tokenizer.cls_id, tokenizer.sep_id)


def encode_inputs(tokenizer, inputs, sequence_length):
    """Texts -> ragged ids (`encode_texts`); `(text, second)` pairs -> `(ids,
    segment ids)` (`encode_text_pairs`)."""
    if inputs and isinstance(inputs[0], tuple):
        return encode_text_pairs(tokenizer, inputs, sequence_length)
    return encode_texts(tokenizer, inputs, sequence_length)


def split_pairs(texts, pair_column):
    """For a sentence-pair run (`pair_column` set), each text is
    `first<TAB>second` (or already a pair): the pairs; texts of other runs
    are returned as they are."""
    if not pair_column:
        return list(texts)
    pairs = []
    for index, text in enumerate(texts):
        if isinstance(text, tuple):
            pairs.append(text)
            continue
        first, tab, second = text.partition("\t")
        if not tab or not first.strip() or not second.strip():
            raise DataError(f"text {index + 1}: this run classifies sentence pairs; give "
                            f"'first sentence<TAB>second sentence', got {text[:60]!r}")  # fmt: skip
        pairs.append((first.strip(), second.strip()))
    return pairs


def encode_words(tokenizer, sentences, tag_ids, sequence_length):
    """Word lists -> `(token_ids, piece_labels, truncated_words)`.

    Each word is tokenized on its own; its first piece carries the word's tag
    id and the other pieces `IGNORE`. A word with no pieces becomes `[UNK]`.
    Sentences are cut to `sequence_length` ids with `[CLS]`/`[SEP]`; words
    cut off are counted in `truncated_words`.
    """
    flat = [word for words in sentences for word in words]
    pieces = tokenizer.tokenize(tf.constant(flat)).to_list()
    token_ids, piece_labels, truncated, at = [], [], 0, 0
    for words, tags in zip(sentences, tag_ids, strict=True):
        ids, labels = [tokenizer.cls_id], [IGNORE]
        for position, tag in enumerate(tags):
            word_pieces = pieces[at + position] or [tokenizer.unk_id]
            if len(ids) + len(word_pieces) > sequence_length - 1:
                truncated += len(tags) - position
                break
            ids += word_pieces
            labels += [tag] + [IGNORE] * (len(word_pieces) - 1)
        at += len(words)
        token_ids.append(ids + [tokenizer.sep_id])
        piece_labels.append(labels + [IGNORE])
    return (
        tf.ragged.constant(token_ids, dtype=tf.int32),
        tf.ragged.constant(piece_labels, dtype=tf.int32),
        truncated,
    )


def bucket_boundaries(sequence_length):
    """Padded lengths 16, 32, 64, ... up to `sequence_length` (few shapes for XLA)."""
    lengths, length = [], 16
    while length < sequence_length:
        lengths.append(length)
        length *= 2
    return lengths + [sequence_length]


def batched(
    token_ids,
    labels,
    batch_size,
    sequence_length,
    pad_id,
    shuffle=False,
    seed=0,
    repeat=False,
):
    """`((features, labels, sample_weight))` batches bucketed by length.

    `token_ids` is ragged `(N, pieces)`, or a `(token ids, segment ids)`
    pair of them (`encode_inputs` of sentence pairs). `labels` is int32
    `(N,)` (one per sequence) or ragged `(N, pieces)` (per token, `IGNORE`
    where no loss applies: weight 0). Batches are padded to the bucket's
    boundary so XLA sees at most a handful of shapes; training batches
    (`repeat=True`) are all full.
    """
    per_token = isinstance(labels, tf.RaggedTensor)
    if isinstance(token_ids, tuple):
        token_ids, segment_ids = token_ids
    else:
        segment_ids = tf.zeros_like(token_ids)
    data = tf.data.Dataset.from_tensor_slices((token_ids, segment_ids, labels))
    if shuffle:
        data = data.shuffle(int(token_ids.nrows()), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        data = data.repeat()

    def features(ids, segments, label):
        example = {"token_ids": ids, "segment_ids": segments, "padding_mask": tf.ones_like(ids)}
        if per_token:
            return example, tf.maximum(label, 0), tf.cast(label != IGNORE, tf.float32)
        return example, label, tf.ones([], tf.float32)

    boundaries = bucket_boundaries(sequence_length)
    padding = (
        {"token_ids": pad_id, "segment_ids": 0, "padding_mask": 0},
        0,
        0.0,
    )
    return (
        data.map(features, num_parallel_calls=tf.data.AUTOTUNE)
        .bucket_by_sequence_length(
            lambda example, *_: tf.shape(example["token_ids"])[0],
            # Bucket i holds lengths < boundaries[i] + 1, padded to boundaries[i]; the
            # extra last bucket stays empty (encoding truncates to sequence_length).
            bucket_boundaries=[b + 1 for b in boundaries],
            bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
            padded_shapes=(
                {k: [None] for k in ("token_ids", "segment_ids", "padding_mask")},
                [None] if per_token else [],
                [None] if per_token else [],
            ),
            padding_values=padding,
            pad_to_bucket_boundary=True,
            drop_remainder=repeat,
        )
        .prefetch(tf.data.AUTOTUNE)
    )


def label_vocabulary(labels):
    """Sorted distinct labels (numerically when they are all integers)."""
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)
