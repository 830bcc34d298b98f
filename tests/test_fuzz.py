"""Property-based tests (Hypothesis): arbitrary bytes and lines fed to every
reader -- classification TSV, CoNLL, parallel text, vocabulary files,
recipes and `--set` values -- are either parsed or rejected with the
project's one-line error naming the file (and line) or key; nothing else
escapes, so the command line never shows a traceback."""

import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fmkeras.config import build_config
from fmkeras.data import read_lines
from fmkeras.errors import FmkerasError
from fmkeras.text.labelled import read_conll, read_tsv
from fmkeras.text.parallel import read_parallel
from fmkeras.text.wordpiece import RESERVED_TOKENS, WordPieceTokenizer

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

# Lines of text with the characters that matter to these formats (tabs,
# quotes, carriage returns, NULs, non-ASCII, YAML punctuation) over-represented.
SPECIAL = "\t\"'\r\x00 #:-[]{}!&*|>%@`,?\\\u00e9\u6771\u2028\ufeff"
LINE = st.text(alphabet=st.sampled_from(string.ascii_letters + string.digits + SPECIAL) |
               st.characters(blacklist_categories=("Cs",)), max_size=40)  # fmt: skip
TEXT_FILE = st.lists(LINE, max_size=12).map(lambda lines: "\n".join(lines).encode("utf-8"))
# Raw bytes (invalid UTF-8 included), text, or text with a bad byte spliced in.
CONTENT = st.one_of(st.binary(max_size=300), TEXT_FILE,
                    st.tuples(TEXT_FILE, st.binary(min_size=1, max_size=3), TEXT_FILE)
                    .map(lambda parts: b"".join(parts)))  # fmt: skip


def check_rejection(error, *names):
    """A rejection is one line that names what was wrong (a path, a key; as
    typed or escaped)."""
    message = str(error)
    assert isinstance(error, FmkerasError), f"{type(error).__name__}: {message}"
    assert message and "\n" not in message, repr(message)
    assert any(name in message or repr(name)[1:-1] in message for name in names), (names, message)


def parsed_or_rejected(read, *names):
    try:
        return read()
    except Exception as error:  # noqa: BLE001 - the property is about what escapes
        check_rejection(error, *names)
        return None


@pytest.fixture
def write(tmp_path):
    def write(name, content):
        path = tmp_path / name
        path.write_bytes(content)
        return path

    return write


@FUZZ
@given(body=CONTENT, with_header=st.booleans(), bad_rows=st.sampled_from(["fail", "skip"]))
@example(body=b"a\x00b\t1\n", with_header=True, bad_rows="fail")
@example(body=b"x" * 200_000 + b"\t1\n", with_header=True, bad_rows="skip")
def test_classification_tsv(write, body, with_header, bad_rows):
    path = write("train.tsv", (b"sentence\tlabel\n" if with_header else b"") + body)
    rows = parsed_or_rejected(lambda: read_tsv(path, "sentence", "label", bad_rows), str(path))
    if rows is not None:
        assert len(rows.inputs) == len(rows.labels) > 0
        assert all(text and "\n" not in text for text in rows.inputs)


@FUZZ
@given(body=CONTENT, bad_rows=st.sampled_from(["fail", "skip"]))
@example(body=b"EU B-ORG\n\nrejects O\nX\n", bad_rows="fail")
def test_conll(write, body, bad_rows):
    path = write("train.txt", body)
    rows = parsed_or_rejected(lambda: read_conll(path, bad_rows), str(path))
    if rows is not None:
        pairs = zip(rows.inputs, rows.labels, strict=True)
        assert all(len(words) == len(tags) > 0 for words, tags in pairs)


@FUZZ
@given(source=CONTENT, target=CONTENT)
def test_parallel_text(write, source, target):
    source_path, target_path = write("train.en", source), write("train.zh", target)
    pairs = parsed_or_rejected(lambda: read_parallel(source_path, target_path),
                               str(source_path), str(target_path))  # fmt: skip
    if pairs is not None:
        assert len(pairs.sources) == len(pairs.targets) > 0


@FUZZ
@given(body=CONTENT)
def test_plain_text_corpus(write, body):
    path = write("corpus.txt", body)
    lines = parsed_or_rejected(lambda: read_lines(path), str(path))
    assert lines is None or all(lines)


@FUZZ
@given(pieces=st.lists(LINE, max_size=10), specials=st.booleans(), body=CONTENT)
@example(pieces=["", "##", "a", "a"], specials=True, body=b"")
def test_vocabulary_file(write, pieces, specials, body):
    lines = [*(RESERVED_TOKENS if specials else ()), *pieces]
    content = "\n".join(lines).encode("utf-8") if body == b"" else body
    path = write("vocab.txt", content)
    tokenizer = parsed_or_rejected(lambda: WordPieceTokenizer(path), str(path))
    if tokenizer is not None:
        ids = tokenizer.tokenize(["hello world", ""]).to_list()
        assert all(0 <= i < tokenizer.vocabulary_size for row in ids for i in row)


@FUZZ
@given(body=CONTENT)
@example(body=b"train:\n  steps: [" + b"[" * 3000 + b"]")
@example(body=b"train: {steps: .nan}")
@example(body=b"model:\n  size: tiny\n bad indent: 1\n")
def test_recipe_file(write, body):
    path = write("recipe.yaml", body)
    parsed_or_rejected(lambda: build_config(path), str(path))


KEYS = ["task", "model.size", "model.dropout", "data.sequence_length", "data.train_file",
        "train.steps", "train.learning_rate", "train.precision", "train.profile_steps",
        "finetune.lora_targets", "decode.beam_width", "distribute.strategy"]  # fmt: skip


@FUZZ
@given(key=st.sampled_from(KEYS) | LINE, value=LINE, separator=st.sampled_from(["=", " ", ""]))
@example(key="train.learning_rate", value="inf", separator="=")
@example(key="train.steps", value="[" * 2000, separator="=")
def test_set_values(key, value, separator):
    override = f"{key}{separator}{value}"
    named = override.partition("=")[0].strip()  # what a message about the key quotes
    parsed_or_rejected(lambda: build_config(None, [override]), named, "--set")
