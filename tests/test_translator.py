"""Encoder-decoder model and decoding: cached steps equal full recomputation,
beam search finds what greedy misses, XLA gives the same tokens."""

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from model_checks import run_model_checks
from run_helpers import built_task, scalars, serve_in_fresh_process, train_args

import fmkeras
from fmkeras.config import DecodeConfig
from fmkeras.decoding import beam_search, greedy_search
from fmkeras.errors import DataError
from fmkeras.evaluate import main as evaluate_main
from fmkeras.export import main as export_main
from fmkeras.models import Encoder, Translator
from fmkeras.tasks import load_run
from fmkeras.text.detokenizer import Detokenizer
from fmkeras.text.parallel import read_parallel
from fmkeras.text.wordpiece import WordPieceTokenizer, learn_vocabulary, write_vocabulary
from fmkeras.train import main
from fmkeras.training.precision import in_dtype_policy
from fmkeras.translate import main as translate_main

PAD, START, END = 0, 1, 2
SOURCE = np.array([[5, 9, 4, 7, 3, 0], [8, 6, 3, 0, 0, 0]], "int32")


@pytest.fixture(scope="module", params=[False, True], ids=["post-ln", "pre-ln"])
def model(request):
    keras.utils.set_random_seed(3)
    encoder = Encoder(30, 2, 2, 16, 32, dropout=0.0, max_sequence_length=16,
                      normalize_first=request.param)  # fmt: skip
    return Translator(encoder, 25, 2, 2, 32, dropout=0.0, max_sequence_length=16)


def test_the_decoder_follows_the_encoders_use_bias():
    encoder = Encoder(30, 1, 2, 16, 32, max_sequence_length=16, use_bias=False)
    decoder = [w.path for w in Translator(encoder, 25, 1, 2, 32).weights
               if w.path.startswith("decoder_layer_")]  # fmt: skip
    assert decoder and not [path for path in decoder if path.endswith("bias")]


def full_logits(model, target):
    """The translator's logits for the whole `target`, recomputed (no cache)."""
    with warnings.catch_warnings():  # a 1-token target's self-attention: a softmax over one key
        warnings.filterwarnings("ignore", "You are using a softmax over axis -1", UserWarning)
        return np.asarray(model({"source_ids": SOURCE, "target_ids": target}))


def test_translator_round_trips(model, tmp_path):
    target = np.array([[START, 4, 5], [START, 6, PAD]], "int32")
    assert full_logits(model, target).shape == (2, 3, 25)
    run_model_checks(model, {"source_ids": SOURCE, "target_ids": target}, tmp_path)
    reloaded = fmkeras.load_model(tmp_path / f"{model.name}.keras")
    assert reloaded.lm_head.token_embedding is reloaded.target_embedding.token_embedding  # tied


def test_source_vectors_give_the_logits_of_source_ids(model):
    """`call_with_source_vectors` (explanations) is the functional forward pass."""
    target = np.array([[START, 4, 5], [START, 6, PAD]], "int32")
    vectors = model.encoder.token_embedding(SOURCE)
    logits, scores = model.call_with_source_vectors(vectors, SOURCE, target,
                                                    return_attention_scores=True)  # fmt: skip
    np.testing.assert_allclose(logits, full_logits(model, target), atol=1e-5)
    assert len(scores["cross"]) == 2 and scores["cross"][0].shape == (2, 2, 3, SOURCE.shape[1])
    np.testing.assert_allclose(np.sum(scores["cross"][-1], -1), 1.0, atol=1e-5)


def test_cached_steps_equal_full_recomputation(model):
    state = model.initial_state(SOURCE, max_length=8)
    target = np.full((2, 1), START, "int32")
    for index in range(6):
        logits, state = model.decode_step(target[:, -1:], index, state)
        np.testing.assert_allclose(logits, full_logits(model, target)[:, -1], atol=1e-5)
        target = np.concatenate([target, np.argmax(logits, -1)[:, None].astype("int32")], 1)


def uncached_greedy(model, max_length):
    target = np.full((2, 1), START, "int32")
    done = np.zeros(2, bool)
    for _ in range(max_length):
        chosen = full_logits(model, target)[:, -1].argmax(-1).astype("int32")
        chosen = np.where(done, PAD, chosen)
        target = np.concatenate([target, chosen[:, None]], 1)
        done |= chosen == END
        if done.all():
            break
    out = np.full((2, max_length), PAD, "int32")
    out[:, : target.shape[1] - 1] = target[:, 1:]
    return out


def test_greedy_with_cache_and_xla_matches_uncached(model):
    expected = uncached_greedy(model, 8)

    def decode(source):
        state = model.initial_state(source, 8)
        return greedy_search(model.decode_step, state, 2, 8, START, END)

    np.testing.assert_array_equal(decode(SOURCE), expected)
    compiled = tf.function(decode, jit_compile=True)
    np.testing.assert_array_equal(compiled(tf.constant(SOURCE)), expected)
    beam_one, _ = beam_search(model.decode_step, model.initial_state(SOURCE, 8), 2, 8, START, END,
                              beam_width=1, length_penalty=0.0)  # fmt: skip
    np.testing.assert_array_equal(beam_one, expected)


def test_a_bfloat16_copy_decodes_in_a_graph(model):
    """`export --precision bfloat16`: the decoding caches follow the layers' dtype
    (a float32 cache fed bfloat16 keys broke the graph's while loop)."""
    half = in_dtype_policy(model, "bfloat16")

    @tf.function
    def decode(source):
        state = half.initial_state(source, 8)
        return beam_search(half.decode_step, state, 2, 8, START, END, beam_width=2)

    tokens, _ = decode(tf.constant(SOURCE))
    assert tokens.shape == (2, 8) and np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < 25))


def test_beam_search_finds_the_sequence_greedy_misses():
    # Vocabulary: 0 pad, 1 start, 2 end, 3 "a", 4 "b". After start, "a" (0.6) beats
    # "b" (0.4), but after "a" every continuation has 0.25 while "b" is followed by
    # end with 0.9: greedy returns "a ...", p <= 0.15; beam returns "b end", p = 0.36.
    table = np.full((5, 5), 1e-6)
    table[START, 3], table[START, 4] = 0.6, 0.4
    table[3, [2, 3, 4]] = [0.25, 0.25, 0.5]
    table[4, 2], table[4, 3] = 0.9, 0.1
    table[[2, 0], 0] = 1.0
    log_table = np.log(table / table.sum(-1, keepdims=True)).astype("float32")

    def step(token_ids, index, state):
        return keras.ops.take(log_table, token_ids[:, 0], axis=0), state

    state = {"unused": np.zeros((1, 1), "float32")}
    greedy = greedy_search(step, state, 1, 3, START, END)
    beam, score = beam_search(step, state, 1, 3, START, END, beam_width=2, length_penalty=0.0)
    assert np.asarray(greedy)[0, 0] == 3
    np.testing.assert_array_equal(beam, [[4, 2, 0]])
    assert float(score[0]) == pytest.approx(np.log(0.4 * 0.9), abs=1e-3)


def test_parallel_files_must_align_and_decode(tmp_path):
    source, target = tmp_path / "a.en", tmp_path / "a.zh"
    source.write_text("one\ntwo\n\nfour\n", encoding="utf-8")
    target.write_text("一\n二\n三\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a.en has 4 lines but .*a.zh has 3"):
        read_parallel(source, target)
    target.write_bytes("一\n二\n三\n".encode() + b"\xff\n")
    with pytest.raises(DataError, match=r"a.zh:4: not valid UTF-8"):
        read_parallel(source, target)
    target.write_text("一\n二\n三\n四\n", encoding="utf-8")
    pairs = read_parallel(source, target)
    assert pairs.sources == ["one", "two", "four"] and pairs.dropped == {"empty_line": 1}


def detokenize(pieces):
    vocabulary = ["[PAD]", "[SEP]", *dict.fromkeys(pieces)]
    ids = [[vocabulary.index(piece) for piece in pieces] + [1, 3, 0]]  # stops at [SEP]
    return Detokenizer(vocabulary, end_id=1, padding_id=0)(tf.constant(ids)).numpy()[0].decode()


def test_detokenize_joins_pieces_cjk_and_punctuation():
    assert (
        detokenize(["i", "don", "'", "t", "like", "new", "##york", "."]) == "i don't like newyork."
    )
    assert (
        detokenize(["you", "don", "\u2019", "t", "go"]) == "you don\u2019t go"
    )
    assert detokenize(["'", "t", "'"]) == "' t '"  # no word character on both sides
    assert detokenize(["我", "喜", "欢", "茶", "。"]) == "我喜欢茶。"
    assert detokenize(["ein", "hund", "(", "braun", ")", "!"]) == "ein hund (braun)!"
    assert detokenize(["tom", "喜", "欢", "ok"]) == "tom 喜欢 ok"


@pytest.mark.parametrize(
    "path, lowercase", [("tatoeba_en_zh/valid.zh", True), ("multi30k_en_de/valid.de", False)]
)
def test_detokenized_references_tokenize_to_the_same_ids(tmp_path, data_dir, path, lowercase):
    """Detokenizing what the tokenizer made of each valid reference loses no
    token (references with an `[UNK]` piece are left out: it has no text)."""
    lines = (data_dir / path).read_text(encoding="utf-8").splitlines()[:500]
    write_vocabulary(learn_vocabulary(lines, 4000, lowercase=lowercase), tmp_path / "vocab.txt")
    tokenizer = WordPieceTokenizer(tmp_path / "vocab.txt", lowercase=lowercase)
    ids = tokenizer.tokenize(tf.constant(lines))
    ids = tf.ragged.boolean_mask(ids, ~tf.reduce_any(ids == tokenizer.unk_id, axis=1))
    assert int(ids.nrows()) > 0.8 * len(lines)
    detokenizer = Detokenizer(tokenizer.vocabulary, tokenizer.sep_id, tokenizer.pad_id)
    texts = detokenizer(ids.to_tensor(tokenizer.pad_id))
    assert tokenizer.tokenize(texts).to_list() == ids.to_list()


@pytest.mark.long_running
def test_translate_end_to_end(tmp_path, data_dir, capsys):
    run = tmp_path / "en_zh"
    settings = {
        "model.size": "tiny",
        "data.max_lines": 16,  # also the first 16 valid pairs (the validation decodes them)
        "data.vocab_size": 1500,
        "data.sequence_length": 32,
        "decode.max_length": 12,  # an untrained decoder rarely stops early
        "train.steps": 40,
        "train.batch_size": 16,
        "train.checkpoint_every": 20,
        "train.eval_every": 40,
        "train.log_every": 10,
        "train.jit_compile": "false",
        "decode.beam_width": 2,
    }
    assert main(train_args("translate", REPO / "trainers" / "en_zh.yaml", settings, run)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"bleu", "chrf", "greedy", "beam2"} <= set(metrics)
    assert metrics["dropped_pairs"]["valid"]["too_long"] >= 0
    losses = [value for _, value in scalars(run / "logs" / "train", "loss")]
    assert losses[-1] < losses[0]
    assert [step for step, _ in scalars(run / "logs" / "validation", "chrf")] == [40]
    capsys.readouterr()
    assert translate_main([str(run), "I like tea.", "Where is it?", "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    valid = data_dir / "tatoeba_en_zh"
    for side in ("en", "zh"):  # the validation pairs the run decoded
        lines = (valid / f"valid.{side}").read_text(encoding="utf-8").splitlines(keepends=True)
        (tmp_path / f"valid.{side}").write_text("".join(lines[:16]), encoding="utf-8")
    out = ["--src", str(tmp_path / "valid.en"), "--ref", str(tmp_path / "valid.zh"), "--beam", "1"]
    assert evaluate_main([str(run), *out]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["chrf"] == pytest.approx(metrics["greedy"]["chrf"], abs=0.5)
    assert evaluate_main([str(run), *out[:2]]) == 2  # a source without its references
    assert "--src and --ref required for translate runs" in capsys.readouterr().err

    # Exported: beam search and detokenization in the serving graph, as the run decodes.
    decode = ["--beam", "2", "--max-length", "8"]
    assert export_main([str(run), "--name", "zh", "--out", str(tmp_path / "sm"), *decode]) == 0
    texts = ["I like tea.", "Where is the station?", "Héllo 東京 !", ""]
    served = serve_in_fresh_process(tmp_path / "sm" / "zh" / "1", texts)
    translator = load_run(run, decode=DecodeConfig(beam_width=2, max_length=8))
    assert served["translation"] == translator.translations(texts)
    assert np.asarray(served["token_ids"]).shape == (4, 8)
    info = json.loads((tmp_path / "sm" / "zh" / "1" / "assets.extra" / "fmkeras.json").read_text())
    assert (info["task"], info["beam_width"], info["max_length"]) == ("translate", 2, 8)


def test_shared_vocabulary_is_learned_from_both_sides(tmp_path, data_dir):
    """The task builds one vocabulary for both sides and a model of its size
    (no training: the end-to-end test trains)."""
    settings = {"model.size": "tiny", "data.shared_vocabulary": "true", "data.max_lines": 300,
                "data.vocab_size": 800, "data.sequence_length": 32}  # fmt: skip
    task, model = built_task(REPO / "trainers" / "en_de.yaml", settings, tmp_path / "shared")
    vocabulary = task.run.vocab.read_text(encoding="utf-8").split()
    assert task.run.target_vocab.read_text(encoding="utf-8").split() == vocabulary
    assert {"the", "ein", "und"} <= set(vocabulary)  # English and German words
    assert model.target_vocabulary_size == len(vocabulary)


def test_shared_vocabulary_excludes_a_target_vocabulary_file(tmp_path, capsys):
    settings = {"data.shared_vocabulary": True, "data.target_vocab_file": "x.txt"}
    args = train_args("translate", REPO / "trainers" / "en_de.yaml", settings, tmp_path / "r")
    assert main(args) == 2
    assert "data.shared_vocabulary and data.target_vocab_file" in capsys.readouterr().err


@pytest.mark.slow  # a 6-layer MiniLM encoder and decoder: ~1 minute
def test_translation_warm_starts_the_encoder_from_a_checkpoint(tmp_path, minilm_dir, data_dir):
    run = tmp_path / "warm"
    settings = {
        "model.init": str(minilm_dir),
        "data.max_lines": 200,
        "data.vocab_size": 500,
        "data.sequence_length": 32,
        "train.steps": 2,
        "train.batch_size": 8,
        "train.checkpoint_every": 2,
        "train.eval_every": 2,
        "train.jit_compile": "false",
        "decode.beam_width": 1,
        "decode.max_length": 4,
    }
    assert main(train_args("translate", REPO / "trainers" / "en_de.yaml", settings, run)) == 0
    model = fmkeras.load_model(run / "model.keras")
    assert (model.encoder.num_layers, model.encoder.hidden_dim) == (6, 384)
    assert len(model.decoder_layers) == 6
    assert (run / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
