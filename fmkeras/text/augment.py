"""Text augmentation for distillation: perturbed copies of training texts
that a teacher labels (Tang et al. 2019, "Distilling Task-Specific Knowledge
from BERT into Simple Neural Networks", section 3.3; TinyBERT's data
augmentation plays the same role).

Each copy walks the words (whitespace-separated) of a text: with
probability `drop_rate` a word is left out (Tang et al. write `[MASK]`; the
WordPiece text path cannot, so the word goes), else with probability
`replace_rate` it becomes a word drawn from the unigram distribution of all
training words (Tang et al. draw from words of the same part of speech,
which needs a tagger). Then, with probability `ngram_rate`, only a random
n-gram of the result is kept (n from 1 to `max_ngram`). Copies equal to
their text or to an earlier copy are dropped.
"""

import numpy as np


def perturb(words, rng, vocabulary, drop_rate, replace_rate, ngram_rate, max_ngram):
    """One perturbed copy of `words` (a list), drawing from `rng`."""
    draws = rng.random(len(words))
    kept = []
    for word, draw in zip(words, draws, strict=True):
        if draw < drop_rate:
            continue
        if draw < drop_rate + replace_rate:
            word = vocabulary[rng.integers(len(vocabulary))]
        kept.append(word)
    if kept and rng.random() < ngram_rate:
        n = int(rng.integers(1, min(max_ngram, len(kept)) + 1))
        start = int(rng.integers(len(kept) - n + 1))
        kept = kept[start : start + n]
    return kept


def augment_texts(texts, copies, seed, drop_rate=0.1, replace_rate=0.1, ngram_rate=0.25,
                  max_ngram=5):  # fmt: skip
    """`(new texts, source index of each)`: up to `copies` distinct perturbed
    copies of each text of `texts` (strings, or tuples of strings for
    sentence pairs: each side is perturbed on its own).

    Example:

    >>> new, source = augment_texts(["a fine , moving film"], copies=2, seed=0)
    >>> len(new) <= 2 and set(source) <= {0}
    True
    """
    rng = np.random.default_rng(seed)
    pairs = bool(texts) and isinstance(texts[0], tuple | list)
    sides = [list(text) if pairs else [text] for text in texts]
    # Unigram distribution: every word occurrence once, so frequent words come up often.
    vocabulary = [word for text in sides for side in text for word in side.split()]
    if not vocabulary:
        return [], []
    settings = (vocabulary, drop_rate, replace_rate, ngram_rate, max_ngram)
    new, source = [], []
    for index, text in enumerate(sides):
        seen = {tuple(text)}
        for _ in range(copies):
            copy = tuple(" ".join(perturb(side.split(), rng, *settings)) for side in text)
            if copy in seen or not all(copy):
                continue
            seen.add(copy)
            new.append(copy if pairs else copy[0])
            source.append(index)
    return new, source
