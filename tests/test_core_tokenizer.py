"""The core-ops BERT tokenizer gives exactly the training tokenizer's ids.
(That it loads in a process with neither tensorflow-text nor fmkeras is
checked with every export: `serve_in_fresh_process` in tests/run_helpers.py.)"""

import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from fmkeras.text.core_tokenizer import MIN_DELETED_RUN, CoreBertTokenizer, character_rules
from fmkeras.text.wordpiece import WordPieceTokenizer, read_vocabulary


def shared_lines(data_dir):
    def lines(name):
        return (data_dir / name).read_text(encoding="utf-8").splitlines()

    conll = [line.split(" ")[0] for line in lines("conll2003/valid.txt") if line.strip()]
    return (
        [row.split("\t")[0] for row in lines("sst2/dev.tsv")[1:]]
        + conll
        + lines("tatoeba_en_zh/valid.en")
        + lines("tatoeba_en_zh/valid.zh")
        + lines("multi30k_en_de/valid.de")
        + [
            "soft\u00adhyphen zero\u200bwidth \x00control\x07 tab\there",
            "İstanbul ß ﬁ don't U.S.A. Héllo Wörld",
            "ＡＢＣ，全角 東京タワー is 333m",
            "x" * 150,
            "supercalifragilisticexpialidocious" * 3,
        ]
    )


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_same_ids_as_the_training_tokenizer(minilm_dir, data_dir, lowercase):
    vocabulary = read_vocabulary(minilm_dir / "vocab.txt")
    lines = shared_lines(data_dir)
    expected = WordPieceTokenizer(vocabulary, lowercase=lowercase).tokenize(lines).to_list()
    got = CoreBertTokenizer(vocabulary, lowercase=lowercase).tokenize(tf.constant(lines)).to_list()
    mismatches = [line for line, a, b in zip(lines, got, expected, strict=True) if a != b]
    assert not mismatches, mismatches[:3]


# Words the vocabulary knows, and any character: every plane, including the unassigned
# and private-use ones the tokenizer deletes with a regular expression, not its table.
WORD = st.sampled_from(["film", "funny", "don't", "Héllo", "東京", "ＡＢＣ"]) | st.text(
    st.characters(codec="utf-8") | st.integers(0, 0x10FFFF).filter(
        lambda code: not 0xD800 <= code <= 0xDFFF).map(chr), max_size=12)  # fmt: skip
LINES = st.lists(st.lists(WORD, max_size=6).map(" ".join), min_size=1, max_size=16)


@pytest.fixture(scope="module")
def tokenizer_pairs(minilm_dir):
    vocabulary = read_vocabulary(minilm_dir / "vocab.txt")
    return [(WordPieceTokenizer(vocabulary, lowercase=lowercase),
             CoreBertTokenizer(vocabulary, lowercase=lowercase)) for lowercase in (True, False)]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(lines=LINES)
def test_any_unicode_gets_the_training_tokenizers_ids(tokenizer_pairs, lines):
    for training, core in tokenizer_pairs:
        assert core.tokenize(tf.constant(lines)).to_list() == training.tokenize(lines).to_list()


def test_long_deleted_runs_leave_the_table_small():
    """The ~138k deleted code points (private use, mostly) are regex ranges, not table rows."""
    for lowercase in (True, False):
        table, deleted = character_rules(lowercase)
        assert len(table) < 20_000 and sum(b - a + 1 for a, b in deleted) > 130_000
        assert all(b - a + 1 >= MIN_DELETED_RUN for a, b in deleted)
        assert table["\ufffd"] == ""  # what decoding puts in place of invalid UTF-8
