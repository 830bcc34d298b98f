import numpy as np
import pytest
import tensorflow as tf

from fmkeras.data import read_lines, require_file, resolve_data_dir
from fmkeras.errors import DataError
from fmkeras.text.mlm import (
    causal_lm_dataset,
    mask_tokens,
    mlm_dataset,
    next_sentence_pairs,
    pack_sequences,
)
from fmkeras.text.wordpiece import RESERVED_TOKENS, WordPieceTokenizer, read_vocabulary

VOCAB = RESERVED_TOKENS + ["hello", "world", "##s", "cafe", "中", "国", ",", "!", "the"]


def test_tokenizer_splits_cjk_lowercases_and_strips_accents():
    tokenizer = WordPieceTokenizer(VOCAB)
    ids = tokenizer.tokenize(tf.constant(["Hello Worlds, 中国!", "Café THE 日"])).to_list()
    piece = {p: i for i, p in enumerate(VOCAB)}
    assert ids[0] == [piece[p] for p in ["hello", "world", "##s", ",", "中", "国", "!"]]
    assert ids[1] == [piece["cafe"], piece["the"], tokenizer.unk_id]
    assert (tokenizer.pad_id, tokenizer.mask_id) == (0, 4)


def test_cased_tokenizer_keeps_case():
    tokenizer = WordPieceTokenizer(VOCAB, lowercase=False)
    assert tokenizer.tokenize(tf.constant(["Hello hello"])).to_list() == [[1, 5]]


def test_tokenizer_requires_special_tokens(tmp_path):
    with pytest.raises(DataError, match=r"\[MASK\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])
    with pytest.raises(DataError, match="does not exist"):
        WordPieceTokenizer(tmp_path / "missing.txt")


def test_learned_vocabulary_covers_its_corpus(small_vocab, gutenberg_lines):
    vocabulary = read_vocabulary(small_vocab)
    assert vocabulary[:5] == RESERVED_TOKENS
    assert 500 < len(vocabulary) <= 2000
    ids = WordPieceTokenizer(small_vocab).tokenize(tf.constant(gutenberg_lines[:200])).flat_values
    assert np.mean(ids.numpy() == 1) < 0.01  # [UNK] is rare on the training text


def test_pack_sequences_keeps_the_token_stream(small_vocab, gutenberg_lines):
    tokenizer = WordPieceTokenizer(small_vocab)
    lines = gutenberg_lines[:100]
    packed = pack_sequences(lines, tokenizer, 32)
    assert packed.dtype == np.int32 and packed.shape[1] == 32
    assert (packed[:, 0] == tokenizer.cls_id).all() and (packed[:, -1] == tokenizer.sep_id).all()
    stream = []
    for ids in tokenizer.tokenize(tf.constant(lines)).to_list():
        stream += ids + [tokenizer.sep_id]
    np.testing.assert_array_equal(packed[:, 1:-1].reshape(-1), stream[: packed.shape[0] * 30])
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_sequences(["a b"], tokenizer, 32)


def test_masking_follows_bert_80_10_10():
    rng = np.random.default_rng(0)
    token_ids = rng.integers(5, 1000, size=(256, 64)).astype("int32")
    token_ids[:, 0], token_ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    masked, positions, original, weights = (
        t.numpy() for t in mask_tokens(tf.constant(token_ids), [1, 2], 10, 4, 1000, [0, 2, 3, 4])
    )
    assert positions.shape == (256, 10) and weights.min() == 1.0
    assert (np.diff(positions, axis=1) > 0).all()  # distinct, sorted
    assert ((positions > 0) & (positions < 63)).all()  # never the special tokens
    np.testing.assert_array_equal(original, np.take_along_axis(token_ids, positions, 1))
    at = np.take_along_axis(masked, positions, 1)
    assert 0.76 < np.mean(at == 4) < 0.84
    unchanged = np.mean(at == original)  # 10 % kept + random ids that hit the original
    assert 0.07 < unchanged < 0.13
    outside = np.ones_like(token_ids, bool)
    np.put_along_axis(outside, positions, False, 1)
    np.testing.assert_array_equal(masked[outside], token_ids[outside])


def test_masking_weights_zero_when_sequence_is_short():
    token_ids = tf.constant([[2, 9, 8, 3, 0, 0, 0, 0]], tf.int32)
    _, positions, _, weights = mask_tokens(token_ids, [0, 0], 4, 4, 50, [0, 2, 3, 4])
    assert sorted(weights.numpy()[0]) == [0.0, 0.0, 1.0, 1.0]
    real = positions.numpy()[0][weights.numpy()[0] > 0]
    assert set(real) == {1, 2}


@pytest.fixture(scope="module")
def packed(small_vocab, gutenberg_lines):
    tokenizer = WordPieceTokenizer(small_vocab)
    sequences = pack_sequences(gutenberg_lines[:400], tokenizer, 32)[:64]
    return tokenizer, sequences


def _batches(dataset, count):
    return [
        tuple(t.numpy() if not isinstance(t, dict) else t for t in b) for b in dataset.take(count)
    ]


def test_stream_visits_every_sequence_once_per_pass_with_fresh_masks(packed):
    tokenizer, sequences = packed
    dataset = mlm_dataset(sequences, tokenizer, batch_size=16, max_predictions=5, seed=3)
    passes = [[], []]
    for step, (inputs, mask_ids, _) in enumerate(dataset.take(8)):  # 2 passes of 4 batches
        ids = inputs["token_ids"].numpy()
        np.put_along_axis(ids, inputs["mask_positions"].numpy(), mask_ids.numpy(), 1)  # unmask
        passes[step // 4] += [tuple(row) for row in ids]
    for seen in passes:
        assert sorted(seen) == sorted(tuple(row) for row in sequences)
    assert passes[0] != passes[1]  # a new order each pass


def test_stream_resumes_exactly_and_shards_disjointly(packed):
    tokenizer, sequences = packed
    full = list(mlm_dataset(sequences, tokenizer, 16, 5, seed=7).take(6))
    resumed = list(mlm_dataset(sequences, tokenizer, 16, 5, seed=7, start_step=4).take(2))
    for (a, _, _), (b, _, _) in zip(full[4:], resumed, strict=True):
        np.testing.assert_array_equal(a["token_ids"], b["token_ids"])
    halves = [
        next(iter(mlm_dataset(sequences, tokenizer, 16, 5, seed=7, shard_index=i, num_shards=2)))
        for i in (0, 1)
    ]
    joined = np.concatenate([h[0]["token_ids"] for h in halves])
    np.testing.assert_array_equal(joined, full[0][0]["token_ids"])


def test_next_sentence_pairs_continue_or_jump_far():
    """Row r of the table holds r * 100 + position, so every piece says where it came from."""
    count, length, cls, sep = 64, 16, -1, -2
    table = (np.arange(count)[:, None] * 100 + np.arange(length)[None, :]).astype(np.int32)
    table[:, 0], table[:, -1] = cls, sep
    positions = np.arange(count, dtype=np.int64)
    seed = tf.constant([5, 0], tf.int64)
    pairs = next_sentence_pairs(tf.constant(table), tf.constant(table), tf.constant(positions),
                                seed, cls, sep)  # fmt: skip
    ids, segments, is_next = (t.numpy() for t in pairs)
    assert 20 < is_next.sum() < 44  # about half
    for row, (pieces, segment, label) in enumerate(zip(ids, segments, is_next, strict=True)):
        seps = np.flatnonzero(pieces == sep)
        assert pieces[0] == cls and len(seps) == 2 and seps[-1] == length - 1
        split = seps[0]  # [CLS] a [SEP] b [SEP]
        assert segment.tolist() == [0] * (split + 1) + [1] * (length - split - 1)
        assert (pieces[1:split] == table[row, 1:split]).all()  # a: the row's own first pieces
        source = pieces[split + 1 : -1] // 100
        if label:  # b: the pieces that follow a in the same row
            assert (pieces[split + 1 : -1] == table[row, split : length - 2]).all()
        else:  # b: the same place in a row at least a quarter of the corpus away
            distance = abs(int(source[0]) - row)
            assert (source == source[0]).all() and min(distance, count - distance) >= count // 4


def test_next_sentence_stream_resumes_exactly_and_shards_the_same(packed):
    tokenizer, sequences = packed
    make = lambda **kw: mlm_dataset(sequences, tokenizer, 16, 5, seed=7, next_sentence=True, **kw)
    full = list(make().take(6))
    inputs, targets, weights = full[0]
    assert set(targets) == {"mlm", "nsp"} and inputs["segment_ids"].numpy().max() == 1
    assert weights["nsp"].numpy().tolist() == [1.0] * 16
    for (a, ta, _), (b, tb, _) in zip(full[4:], make(start_step=4).take(2), strict=True):
        np.testing.assert_array_equal(a["token_ids"], b["token_ids"])
        np.testing.assert_array_equal(ta["nsp"], tb["nsp"])
    halves = [next(iter(make(shard_index=i, num_shards=2))) for i in (0, 1)]
    for key in ("token_ids", "segment_ids"):
        joined = np.concatenate([h[0][key] for h in halves])
        np.testing.assert_array_equal(joined, inputs[key])
    joined = np.concatenate([h[1]["nsp"] for h in halves])
    np.testing.assert_array_equal(joined, targets["nsp"])


@pytest.mark.parametrize("batch_size, sizes", [(16, [16, 16, 16, 12]), (100, [60])])
def test_validation_stream_is_fixed_and_reads_every_sequence_once(packed, batch_size, sizes):
    """One pass in file order: whole batches, then the rows that remain (or
    one short batch when there are fewer rows than a batch)."""
    tokenizer, sequences = packed
    sequences = sequences[:60]
    make = lambda **kw: mlm_dataset(sequences, tokenizer, batch_size, 5, seed=1, shuffle=False,
                                    repeat=False, **kw)  # fmt: skip
    first, second = list(make()), list(make())
    assert [len(mask_ids) for _, mask_ids, _ in first] == sizes
    for (a, _, _), (b, _, _) in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["token_ids"], b["token_ids"])
    unmasked = []
    for inputs, mask_ids, weights in first:
        ids = inputs["token_ids"].numpy()
        np.put_along_axis(ids, inputs["mask_positions"].numpy(), mask_ids.numpy(), 1)
        unmasked.append(ids)
        assert weights.shape == mask_ids.shape == (len(ids), 5) and weights.numpy().all()
    np.testing.assert_array_equal(np.concatenate(unmasked), sequences)
    pairs = list(make(next_sentence=True))
    assert [len(targets["nsp"]) for _, targets, _ in pairs] == sizes
    assert [len(weights["nsp"]) for _, _, weights in pairs] == sizes
    causal = causal_lm_dataset(sequences, batch_size, seed=1, shuffle=False, repeat=False)
    assert [labels.shape[0] for _, labels in causal] == sizes


def test_a_training_stream_needs_one_whole_batch(packed):
    tokenizer, sequences = packed
    with pytest.raises(ValueError, match="only 64 sequences, fewer than one batch of 100"):
        mlm_dataset(sequences, tokenizer, 100, 5)


def test_bad_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"fine line\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"corpus.txt:2: not valid UTF-8"):
        read_lines(path)


def test_missing_file_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("FMKERAS_DATA_DIR", str(tmp_path))
    data_dir, origin = resolve_data_dir()
    assert origin == "$FMKERAS_DATA_DIR"
    with pytest.raises(DataError) as error:
        require_file("gutenberg_en/train.txt", data_dir, origin)
    message = str(error.value)
    assert "gutenberg_en/train.txt" in message and str(tmp_path) in message
    assert "Project Gutenberg" in message and "$FMKERAS_DATA_DIR" in message
    assert resolve_data_dir("/x", "/y")[1] == "--data-dir"
    monkeypatch.delenv("FMKERAS_DATA_DIR")
    with pytest.raises(DataError, match="no data directory"):
        require_file("sst2/train.tsv", *resolve_data_dir())
