"""WordPiece ids -> text with core TensorFlow ops (decoding and serving graphs).

Pieces are joined with a space, except (each decided from a piece and its
neighbours, so it vectorises over a batch):
- a `##` continuation joins the previous piece;
- between two CJK characters (Chinese, Japanese and Korean are written
  without spaces);
- before closing punctuation `.,!?;:%)]}` and after an opening bracket `([{`;
- around an apostrophe (`'` or `’`) between two word characters (`don ' t`
  -> `don't`).
Text stops at the first end or padding token.
"""

import tensorflow as tf

# Han, kana, hangul and CJK punctuation (RE2 syntax).
_CJK = (
    r"\x{3000}-\x{303f}\x{3040}-\x{30ff}\x{3400}-\x{4dbf}\x{4e00}-\x{9fff}\x{ac00}-\x{d7af}"
    r"\x{f900}-\x{faff}\x{ff00}-\x{ffef}"
)
_WORD = r"\pL\pN_"


class Detokenizer(tf.Module):
    """Token ids `(batch, length)` -> `(batch,)` UTF-8 strings.

    Args:
        vocabulary: list of pieces (continuations start with `##`).
        end_id: int. Token that ends a sequence (e.g. `[SEP]`).
        padding_id: int.

    Example:

    >>> detokenizer = Detokenizer(["[PAD]", "[SEP]", "don", "'", "t", "go", "##ne", "."], 1, 0)
    >>> detokenizer(tf.constant([[2, 3, 4, 5, 6, 7, 1, 5]])).numpy()[0].decode()
    "don't gone."
    """

    def __init__(self, vocabulary, end_id, padding_id):
        super().__init__()
        self.vocabulary = tf.constant(vocabulary)
        self.end_id = end_id
        self.padding_id = padding_id

    def __call__(self, ids):
        ids = tf.convert_to_tensor(ids, tf.int32)
        stop = tf.logical_or(tf.equal(ids, self.end_id), tf.equal(ids, self.padding_id))
        keep = tf.equal(tf.cumsum(tf.cast(stop, tf.int32), axis=1), 0)
        ids = tf.ragged.boolean_mask(ids, keep)  # (batch, pieces) up to the end token
        pieces = tf.gather(self.vocabulary, ids.flat_values)  # (pieces,)
        first = tf.equal(tf.range(tf.size(pieces), dtype=ids.row_splits.dtype),
                         tf.gather(ids.row_splits, ids.value_rowids()))  # fmt: skip
        last = tf.concat([first[1:], [True]], axis=0)
        continuation = tf.strings.regex_full_match(pieces, "##.+")
        body = tf.strings.regex_replace(pieces, "^##", "")
        previous = tf.concat([[""], body[:-1]], axis=0)
        following = tf.concat([body[1:], [""]], axis=0)
        following_continues = tf.concat([continuation[1:], [False]], axis=0)

        def ends(text, characters):
            return tf.strings.regex_full_match(text, f"(?s).*[{characters}]")

        def starts(text, characters):
            return tf.strings.regex_full_match(text, f"(?s)[{characters}].*")

        apostrophe = (
            (tf.equal(pieces, "'") | tf.equal(pieces, "\u2019"))  # ' or the typographic ’
            & ~first
            & ~last
            & ends(previous, _WORD)
            & starts(following, _WORD)
            & ~following_continues
        )
        after_apostrophe = tf.concat([[False], apostrophe[:-1]], axis=0)
        joined = (
            first
            | continuation
            | (ends(previous, _CJK) & starts(body, _CJK))
            | starts(body, r".,!?;:%)\]}")
            | ends(previous, r"(\[{")
            | apostrophe
            | (after_apostrophe & ~first)
        )
        spaced = tf.where(joined, "", " ") + body
        return tf.strings.reduce_join(ids.with_flat_values(spaced), axis=1)
