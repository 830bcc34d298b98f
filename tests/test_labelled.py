"""Labelled-data readers and encoders: bad rows named by file:line, IOB
conversion, sub-token label alignment, bucketed batches."""

import numpy as np
import pytest

from fmkeras.errors import DataError
from fmkeras.text.labelled import (
    IGNORE,
    batched,
    encode_words,
    iob1_to_iob2,
    label_vocabulary,
    read_conll,
    read_tsv,
)
from fmkeras.text.wordpiece import WordPieceTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "new", "york", "##er", "is", "big", "."]


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_tsv_reads_named_columns_and_string_labels(tmp_path):
    path = write(tmp_path / "a.tsv", "id\tlabel\ttext\n1\tpos\tgood film\n2\tneg\tbad\n")
    rows = read_tsv(path, "text", "label")
    assert rows.inputs == ["good film", "bad"] and rows.labels == ["pos", "neg"]
    assert label_vocabulary(rows.labels) == ["neg", "pos"]
    assert label_vocabulary(["10", "2", "-1"]) == ["-1", "2", "10"]


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"good\t1\nonly one column\n", "a.tsv:3: expected 2 tab-separated columns, found 1"),
        (b"good\t1\nbad \xff\xfe bytes\t0\n", "a.tsv:3: not valid UTF-8"),
        (b"good\t1\nfine\t7\n", "a.tsv:3: label '7' is not one of the training labels"),
        (b"good\t1\n\t0\n", "a.tsv:3: empty 'sentence'"),
    ],
)
def test_tsv_bad_rows_fail_with_file_and_line_or_are_skipped(tmp_path, body, reason):
    path = write(tmp_path / "a.tsv", b"sentence\tlabel\n" + body + b"last\t0\n")
    with pytest.raises(DataError, match=reason):
        read_tsv(path, "sentence", "label", labels={"0", "1"})
    rows = read_tsv(path, "sentence", "label", bad_rows="skip", labels={"0", "1"})
    assert rows.inputs == ["good", "last"] and len(rows.skipped) == 1
    assert reason in rows.skipped[0]


def test_tsv_missing_column_names_the_key(tmp_path):
    path = write(tmp_path / "a.tsv", "text\ty\nhi\t1\n")
    with pytest.raises(DataError, match=r"a.tsv:1: no column 'label' \(data.label_column\)"):
        read_tsv(path, "text", "label")


def test_iob1_becomes_iob2():
    assert iob1_to_iob2(["I-ORG", "I-ORG", "O", "I-PER", "B-PER", "I-LOC", "I-PER"]) == [
        "B-ORG", "I-ORG", "O", "B-PER", "B-PER", "B-LOC", "B-PER"
    ]  # fmt: skip


def test_conll_reader_and_bad_sentences(tmp_path):
    text = (
        "-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n\n"
        "Peter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\n\nbroken\n\nx NN I-NP BAD\n\n"
        "Rome NNP I-NP I-LOC\n"
    )
    path = write(tmp_path / "c.txt", text)
    with pytest.raises(DataError, match=r"c.txt:9: expected 'word ... tag'"):
        read_conll(path)
    rows = read_conll(path, bad_rows="skip")
    assert rows.inputs == [["EU", "rejects"], ["Peter", "Blackburn"], ["Rome"]]
    assert rows.labels == [["B-ORG", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert [s.split(": ", 1)[0] for s in rows.skipped] == [f"{path}:9", f"{path}:11"]
    rows = read_conll(path, bad_rows="skip", tags={"O", "B-ORG", "B-PER", "I-PER"})
    assert rows.skipped[-1] == f"{path}:13: tags ['B-LOC'] do not occur in the training data"


def test_first_sub_token_carries_the_word_label():
    tokenizer = WordPieceTokenizer(VOCAB)
    ids, labels, truncated = encode_words(
        tokenizer, [["New", "Yorker", "is", "big"]], [[1, 2, 0, 0]], 16
    )
    assert ids.to_list() == [[2, 5, 6, 7, 8, 9, 3]]  # [CLS] new york ##er is big [SEP]
    assert labels.to_list() == [[IGNORE, 1, 2, IGNORE, 0, 0, IGNORE]]
    assert truncated == 0
    ids, labels, truncated = encode_words(
        tokenizer, [["New", "Yorker", "is", "big"]], [[1, 2, 0, 0]], 5
    )
    assert ids.to_list() == [[2, 5, 6, 7, 3]] and truncated == 2


def test_batches_are_bucketed_padded_and_weighted():
    tokenizer = WordPieceTokenizer(VOCAB)
    sentences = [["new"] * n for n in (1, 3, 20, 2)]
    ids, labels, _ = encode_words(tokenizer, sentences, [[1] * len(s) for s in sentences], 64)
    shapes, weights = [], 0.0
    for features, label, weight in batched(ids, labels, 2, 64, tokenizer.pad_id):
        shapes.append(features["token_ids"].shape[1])
        mask = features["padding_mask"].numpy()
        assert (features["token_ids"].numpy()[mask == 0] == tokenizer.pad_id).all()
        assert (label.numpy()[weight.numpy() == 0] == 0).all()
        weights += float(weight.numpy().sum())
    assert sorted(shapes) == [16, 16, 32] and weights == 26  # one weight per word
    assert np.all(np.isin(shapes, [16, 32, 64]))


def test_inference_input_files(tmp_path):
    from fmkeras.data import read_input_texts

    path = write(tmp_path / "in.txt", "first\n\n second \n")
    assert read_input_texts(["arg"], str(path)) == ["arg", "first", "second"]
    assert read_input_texts([], str(path), keep_empty=True) == ["first", "", "second"]
    write(path, b"ok\nbad \xff\n")
    with pytest.raises(DataError, match=r"in.txt:2: not valid UTF-8"):
        read_input_texts([], str(path))
    with pytest.raises(DataError, match="input file .*missing.txt does not exist"):
        read_input_texts([], str(tmp_path / "missing.txt"))
