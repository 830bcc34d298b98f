"""WordPiece vocabularies and in-graph BERT tokenization (tensorflow-text)."""

import collections
import threading
import time
from pathlib import Path

import tensorflow as tf
import tensorflow_text as tf_text
from tensorflow_text.python.ops.bert_tokenizer import BasicTokenizer
from tensorflow_text.tools.wordpiece_vocab import wordpiece_tokenizer_learner_lib as learner

from fmkeras.errors import DataError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
RESERVED_TOKENS = [PAD, UNK, CLS, SEP, MASK]


def normalize(texts, lowercase):
    """BERT's text clean-up and uncased normalization, as Hugging Face's
    `BasicTokenizer` does it: control/format characters and U+FFFD removed
    (tabs and newlines become spaces); if `lowercase`, lower-case, NFD and drop
    combining marks. Unlike tensorflow-text's built-in option this applies no
    NFKC, so e.g. a full-width comma stays itself."""
    texts = tf.strings.regex_replace(texts, r"[\t\n\r]", " ")
    texts = tf.strings.regex_replace(texts, r"[\p{C}\x{FFFD}]", "")
    if not lowercase:
        return texts
    texts = tf.strings.lower(texts, encoding="utf-8")
    texts = tf_text.normalize_utf8(texts, "NFD")
    return tf.strings.regex_replace(texts, r"\p{Mn}", "")


def learn_vocabulary(lines, vocabulary_size, lowercase=True, log=print, batch_size=4096):
    """Learns a BERT WordPiece vocabulary (reserved tokens first) from text lines.

    Words come from BERT's basic tokenizer (punctuation split, CJK characters
    one per word, optional lower-casing and accent stripping); pieces from
    tensorflow-text's WordPiece learner.
    """
    basic = BasicTokenizer(lower_case=False)
    counts = collections.Counter()
    started = time.time()
    for start in range(0, len(lines), batch_size):
        texts = tf.constant(lines[start : start + batch_size])
        words = basic.tokenize(normalize(texts, lowercase))
        counts.update(w.decode("utf-8") for w in words.flat_values.numpy())
        counted = min(start + batch_size, len(lines))
        if counted == len(lines) or (start // batch_size) % 10 == 0:
            seconds = time.time() - started
            log(f"vocabulary: counted words in {counted:,}/{len(lines):,} lines ({seconds:.0f} s)")
    log(f"vocabulary: learning {vocabulary_size:,} pieces from {len(counts):,} distinct words")
    finished = threading.Event()

    def heartbeat():  # the learner is one long call: say it is alive
        while not finished.wait(15):
            log(f"vocabulary: still learning ({time.time() - started:.0f} s)")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        vocabulary = learner.learn(counts, vocabulary_size, RESERVED_TOKENS)
    finally:
        finished.set()
    log(f"vocabulary: {len(vocabulary):,} pieces in {time.time() - started:.0f} s")
    return vocabulary


def read_vocabulary(path):
    """Reads a BERT `vocab.txt` (one piece per line; each non-empty and unique)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"vocabulary file {path} does not exist")
    try:
        vocabulary = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if vocabulary and vocabulary[-1] == "":  # the final newline
        vocabulary.pop()
    vocabulary = [piece.removesuffix("\r") for piece in vocabulary]
    check_vocabulary(vocabulary, path)
    return vocabulary


def check_vocabulary(vocabulary, source="the vocabulary"):
    """Raises `DataError` naming `source`:line for an empty or repeated piece,
    or for missing special tokens."""
    seen = {}
    for number, piece in enumerate(vocabulary, start=1):
        if not piece:
            raise DataError(f"{source}:{number}: empty piece")
        if piece in seen:
            raise DataError(f"{source}:{number}: piece {piece!r} repeats line {seen[piece]}")
        seen[piece] = number
    missing = [token for token in RESERVED_TOKENS if token not in seen]
    if missing:
        raise DataError(f"{source} lacks the special tokens {missing}")
    if len(seen) == len(RESERVED_TOKENS):
        raise DataError(f"{source} has no pieces besides the special tokens")


def write_vocabulary(vocabulary, path):
    Path(path).write_text("".join(f"{piece}\n" for piece in vocabulary), encoding="utf-8")


class WordPieceTokenizer:
    """BERT tokenization (basic + WordPiece) that runs inside TF graphs.

    Args:
        vocabulary: list of pieces, or the path of a `vocab.txt`. Must contain
            `[PAD] [UNK] [CLS] [SEP] [MASK]` (any ids).
        lowercase: bool. Lower-case and strip accents (uncased BERT).

    Example:

    >>> tokenizer = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hi", "##s"])
    >>> tokenizer.tokenize(["His hi"]).to_list()
    [[5, 6, 5]]
    """

    def __init__(self, vocabulary, lowercase=True):
        source = str(vocabulary) if isinstance(vocabulary, str | Path) else "the vocabulary"
        if isinstance(vocabulary, str | Path):
            vocabulary = read_vocabulary(vocabulary)
        else:
            check_vocabulary(vocabulary)
        self.vocabulary = list(vocabulary)
        self.lowercase = lowercase
        index = {piece: i for i, piece in enumerate(self.vocabulary)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            index[t] for t in RESERVED_TOKENS
        )
        try:
            self._tokenizer = tf_text.FastBertTokenizer(
                vocab=self.vocabulary,
                suffix_indicator="##",
                token_out_type=tf.int32,
                unknown_token=UNK,
                lower_case_nfd_strip_accents=False,  # see `normalize`
            )
        except RuntimeError as error:  # the trie builder's own checks
            raise DataError(f"{source}: {error}") from None

    @property
    def vocabulary_size(self):
        return len(self.vocabulary)

    @property
    def special_ids(self):
        return [self.pad_id, self.cls_id, self.sep_id, self.mask_id]

    def tokenize(self, texts):
        """`(batch,)` strings -> ragged int32 `(batch, pieces)`."""
        texts = tf.convert_to_tensor(texts)
        return self._tokenizer.tokenize(normalize(texts, self.lowercase))
