"""BERT tokenization with core TensorFlow ops only (no tensorflow-text).

For serving graphs: stock TF Serving ships an older tensorflow-text whose
custom ops do not match (tensorflow/serving#2267), so a SavedModel that
tokenizes with tensorflow-text may not load there. This tokenizer gives the
same ids as `WordPieceTokenizer` (and Hugging Face's BERT tokenizer) using
only `tf.strings`, `tf.lookup` and a while loop:

1. Basic tokenization is one character -> string table, built in Python
   with `unicodedata` from Hugging Face's rules: control/format characters
   and U+FFFD map to nothing, whitespace to a space, CJK ideographs and
   punctuation to themselves between spaces, and (uncased) every character
   to its lower-cased, accent-stripped form. Then split on spaces. Code
   points unassigned in Python's Unicode stay as they are, as in
   tensorflow-text (Hugging Face's Python tokenizer deletes them). Long runs
   of the code points it deletes (the private-use planes, ~138k characters)
   are a regular-expression class instead of table rows, which keeps an
   export's graph under 1 MB.
2. WordPiece is greedy longest-match-first over all words at once: each
   round looks up every candidate piece starting at each word's cursor and
   takes the longest one in the vocabulary; a word with an unmatched rest
   (or over 100 characters) becomes `[UNK]`.
"""

import functools
import sys
import unicodedata

import tensorflow as tf

MAX_WORD_CHARACTERS = 100  # Hugging Face's max_input_chars_per_word
MIN_DELETED_RUN = 32  # deleted code-point runs this long go to a regex class, not the table


def _is_punctuation(char):
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


CJK_RANGES = (  # Hugging Face's _is_chinese_char
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def character_class(ranges):
    """A regular-expression class of the code-point ranges `[(first, last)]`."""
    return "[" + "".join(f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges) + "]"


CJK_PATTERN = f"({character_class(CJK_RANGES)})"


def _is_cjk(code):
    return any(first <= code <= last for first, last in CJK_RANGES)


def _normalized(char, lowercase):
    """What Hugging Face's BasicTokenizer turns one character into, except that
    code points unassigned in Python's Unicode stay as they are: the training
    tokenizer (tensorflow-text) keeps them where Hugging Face's deletes them."""
    code = ord(char)
    if code in (0, 0xFFFD):
        return ""
    category = unicodedata.category(char)
    if char in " \t\n\r" or category == "Zs":
        return " "
    if category == "Cn":
        return char
    if category.startswith("C"):
        return ""
    if _is_cjk(code):
        return char  # spaced by a regular expression (a table would hold ~90k entries)
    text = char
    if lowercase:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return "".join(f" {c} " if _is_punctuation(c) else c for c in text)


@functools.cache  # ~0.5 s over all of Unicode: once per process and casing
def character_rules(lowercase):
    """What the basic tokenizer changes, as `(table, deleted_ranges)`:
    `{character: replacement}`, and `[(first, last)]` code-point runs of at
    least `MIN_DELETED_RUN` characters it deletes (not in the table). U+FFFD,
    which decoding puts in place of invalid UTF-8, stays in the table."""
    table, deleted = {}, []  # deleted: [first, last] runs of consecutive code points
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code <= 0xDFFF:  # surrogates are not characters
            continue
        char = chr(code)
        replacement = _normalized(char, lowercase)
        if replacement == "" and code != 0xFFFD:
            if deleted and deleted[-1][1] == code - 1:
                deleted[-1][1] = code
            else:
                deleted.append([code, code])
        elif replacement != char:
            table[char] = replacement
    ranges = []
    for first, last in deleted:
        if last - first + 1 >= MIN_DELETED_RUN:
            ranges.append((first, last))
        else:
            table.update((chr(code), "") for code in range(first, last + 1))
    return table, ranges


class CoreBertTokenizer(tf.Module):
    """BERT basic tokenization + WordPiece with core TensorFlow ops.

    Args:
        vocabulary: list of pieces (continuations start with `##`).
        lowercase: bool. Uncased BERT (lower-case and strip accents).
        unknown_token: the piece for words that cannot be split.

    Example:

    >>> tokenizer = CoreBertTokenizer(["[UNK]", "hi", "##s", "!"])
    >>> tokenizer.tokenize(tf.constant(["His hi!"])).to_list()
    [[1, 2, 1, 3]]
    """

    def __init__(self, vocabulary, lowercase=True, unknown_token="[UNK]"):
        super().__init__()
        self.lowercase = lowercase
        self.unknown_id = vocabulary.index(unknown_token)
        table, deleted = character_rules(lowercase)
        self._deleted = character_class(deleted)
        self._characters = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(list(table)), tf.constant(list(table.values()))
            ),
            default_value="\x00",  # "unchanged" (NUL itself maps to "" in the table)
        )
        self._pieces = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(vocabulary), tf.range(len(vocabulary), dtype=tf.int32)
            ),
            default_value=-1,
        )

    @property
    def tables(self):
        """The lookup tables, for exporters that track resources by hand."""
        return [self._characters, self._pieces]

    def words(self, texts):
        """`(batch,)` strings -> ragged `(batch, words)` after basic tokenization."""
        texts = tf.strings.regex_replace(texts, self._deleted, "")
        characters = tf.strings.unicode_split(texts, "UTF-8")  # (batch, chars)
        mapped = self._characters.lookup(characters.flat_values)
        mapped = tf.where(mapped == "\x00", characters.flat_values, mapped)
        normalized = tf.strings.reduce_join(characters.with_flat_values(mapped), axis=-1)
        normalized = tf.strings.regex_replace(normalized, CJK_PATTERN, r" \1 ")
        return tf.strings.split(normalized, sep=None)

    def _wordpiece(self, words):
        """Flat words `(n,)` -> ragged piece ids `(n, pieces)`."""
        lengths = tf.strings.length(words, unit="UTF8_CHAR")
        count = tf.size(words)
        spans = tf.range(1, MAX_WORD_CHARACTERS + 1, dtype=tf.int32)  # candidate lengths
        cursor = tf.zeros([count], tf.int32)
        failed = lengths > MAX_WORD_CHARACTERS
        pieces = tf.TensorArray(tf.int32, size=0, dynamic_size=True)

        def round_(step, cursor, failed, pieces):
            active = tf.logical_and(cursor < lengths, tf.logical_not(failed))
            remaining = lengths - cursor
            longest = tf.minimum(tf.reduce_max(tf.where(active, remaining, 0)), MAX_WORD_CHARACTERS)
            span = spans[:longest]  # (span,)
            position = tf.broadcast_to(cursor[:, None], [count, longest])
            candidates = tf.strings.substr(
                tf.broadcast_to(words[:, None], [count, longest]),
                position,
                tf.broadcast_to(span[None, :], [count, longest]),
                unit="UTF8_CHAR",
            )
            candidates = tf.where(cursor[:, None] > 0, "##" + candidates, candidates)
            ids = self._pieces.lookup(candidates)  # (words, span)
            fits = tf.logical_and(ids >= 0, span[None, :] <= remaining[:, None])
            best = tf.reduce_max(tf.where(fits, span[None, :], 0), axis=1)  # 0: no match
            chosen = tf.gather(ids, tf.maximum(best - 1, 0), batch_dims=1)
            matched = tf.logical_and(active, best > 0)
            pieces = pieces.write(step, tf.where(matched, chosen, -1))
            failed = tf.logical_or(failed, tf.logical_and(active, best == 0))
            return step + 1, cursor + tf.where(matched, best, 0), failed, pieces

        def unfinished(step, cursor, failed, pieces):
            return tf.reduce_any(tf.logical_and(cursor < lengths, tf.logical_not(failed)))

        _, _, failed, pieces = tf.while_loop(
            unfinished, round_, (0, cursor, failed, pieces), maximum_iterations=MAX_WORD_CHARACTERS
        )
        rounds = tf.reshape(tf.transpose(pieces.stack()), [count, -1])  # (words, rounds)
        rounds = tf.concat([rounds, tf.fill([count, 1], -1)], axis=1)  # at least one column
        # -1 where a round took nothing; an unsplittable word is [UNK] alone.
        first = tf.range(tf.shape(rounds)[1]) == 0
        unknown = tf.where(first[None, :], self.unknown_id, -1)
        rounds = tf.where(failed[:, None], unknown, rounds)
        return tf.ragged.boolean_mask(rounds, rounds >= 0)

    def tokenize(self, texts):
        """`(batch,)` strings -> ragged int32 piece ids `(batch, pieces)`."""
        words = self.words(texts)
        ids = self._wordpiece(words.flat_values)  # (words, pieces)
        return tf.RaggedTensor.from_row_splits(
            ids.flat_values, tf.gather(ids.row_splits, words.row_splits)
        )
