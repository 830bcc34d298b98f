"""Sentence pairs (`data.text_pair_column`): reading, BERT's longest-first
truncation (against Hugging Face's tokenizer), segment ids in batches, and a
pair run through train, evaluate, predict, explain, export and the server."""

import json
import threading
import urllib.request

import numpy as np
import pytest
from run_helpers import serve_in_fresh_process, train_tiny_classifier

from fmkeras.errors import DataError
from fmkeras.evaluate import main as evaluate_main
from fmkeras.explain.command import main as explain_main
from fmkeras.export import main as export_main
from fmkeras.predict import main as predict_main
from fmkeras.serve import BadRequest, create_server, parse_request
from fmkeras.tasks import load_run
from fmkeras.text.labelled import batched, encode_text_pairs, read_tsv
from fmkeras.text.wordpiece import WordPieceTokenizer

PAIRS = [("He said hello to the whole room .", "He greeted everyone ."), ("dull", "flat")]


def test_tsv_pairs_are_read_and_checked(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("label\ts1\ts2\n1\ta b\tc\n0\tx\t \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p.tsv:3: empty 's2'"):
        read_tsv(path, "s1", "label", pair_column="s2")
    rows = read_tsv(path, "s1", "label", bad_rows="skip", pair_column="s2")
    assert rows.inputs == [("a b", "c")] and rows.labels == ["1"]
    with pytest.raises(DataError, match=r"no column 'sentence2' \(data.text_pair_column\)"):
        read_tsv(path, "s1", "label", pair_column="sentence2")


@pytest.mark.parametrize("length", [12, 17, 40, 128])
def test_pairs_truncate_longest_first_like_hugging_face(minilm_dir, data_dir, length):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    reference.no_padding()
    reference.enable_truncation(length, strategy="longest_first")
    rows = read_tsv(data_dir / "mrpc" / "dev.tsv", "sentence1", "label",
                    pair_column="sentence2", max_rows=60)  # fmt: skip
    pairs = [*rows.inputs, ("short", rows.inputs[0][1] * 3), (rows.inputs[1][0] * 3, "tiny")]
    tokenizer = WordPieceTokenizer(minilm_dir / "vocab.txt", lowercase=True)
    ids, segments = encode_text_pairs(tokenizer, pairs, length)
    for (first, second), row, segment in zip(pairs, ids.to_list(), segments.to_list(),
                                              strict=True):  # fmt: skip
        expected = reference.encode(first, second)
        assert (row, segment) == (expected.ids, expected.type_ids), (first, second)


def test_batches_carry_the_segment_ids():
    tokenizer = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"])
    encoded = encode_text_pairs(tokenizer, [("a b", "c"), ("a", "b c c")], 16)
    ((features, _, _),) = batched(encoded, np.array([0, 1], np.int32), 2, 16, 0)
    segments = features["segment_ids"].numpy()
    assert segments[0, :6].tolist() == [0, 0, 0, 0, 1, 1] and segments[0, 6:].sum() == 0
    assert segments[1, :7].tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_the_server_reads_two_inputs_in_both_forms():
    names = ("texts", "text_pairs")
    rows = json.dumps({"instances": [{"texts": "a", "text_pairs": "b"}]})
    assert parse_request(rows, 8, names) == ({"texts": ["a"], "text_pairs": ["b"]}, True)
    columns = json.dumps({"inputs": {"texts": ["a", "c"], "text_pairs": ["b", "d"]}})
    assert parse_request(columns, 8, names)[0]["text_pairs"] == ["b", "d"]
    bad = [
        ({"instances": ["a"]}, "each instance needs the inputs texts, text_pairs"),
        ({"inputs": {"texts": ["a"]}}, "input 'text_pairs'"),
        ({"inputs": {"texts": ["a"], "text_pairs": []}}, "different batch sizes"),
    ]
    for body, error in bad:
        with pytest.raises(BadRequest, match=error):
            parse_request(json.dumps(body), 8, names)


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("pairs") / "mrpc"
    return train_tiny_classifier("classify", "mrpc.yaml", run, **{"data.max_lines": 400})


@pytest.mark.long_running
def test_a_pair_run_evaluates_predicts_explains_exports_and_serves(pair_run, data_dir, tmp_path,
                                                                    capsys):  # fmt: skip
    metrics = json.loads((pair_run / "metrics.json").read_text())
    assert {"accuracy", "f1", "macro_f1"} <= set(metrics)
    assert evaluate_main([str(pair_run), "--data", str(data_dir / "mrpc" / "dev.tsv")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["examples"] == 408 and 0 <= evaluated["f1"] <= 1
    expected = load_run(pair_run).classify(PAIRS)
    assert predict_main([str(pair_run), *(f"{a}\t{b}" for a, b in PAIRS)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == [label for label, _ in expected]
    assert predict_main([str(pair_run), "no tab"]) == 2
    assert "give 'first sentence<TAB>second sentence'" in capsys.readouterr().err

    assert explain_main([str(pair_run), "\t".join(PAIRS[0]), "--json", "--steps", "8"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["tokens"].count("[SEP]") == 2  # both sentences, one explanation

    out = tmp_path / "saved_models"
    assert export_main([str(pair_run), "--name", "mrpc", "--out", str(out)]) == 0
    assert "serving_default: texts, text_pairs" in capsys.readouterr().out
    inputs = {"texts": [a for a, _ in PAIRS], "text_pairs": [b for _, b in PAIRS]}
    served = serve_in_fresh_process(out / "mrpc" / "1", inputs)
    probabilities = [list(scores.values()) for _, scores in expected]
    np.testing.assert_allclose(served["probabilities"], probabilities, atol=1e-5)
    server, _ = create_server(out / "mrpc", port=0, max_batch=8, timeout=5, max_connections=4)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = json.dumps({"instances": [{"texts": a, "text_pairs": b} for a, b in PAIRS]})
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/models/mrpc:predict"
        with urllib.request.urlopen(
            urllib.request.Request(url, body.encode()), timeout=60
        ) as reply:
            predictions = json.loads(reply.read())["predictions"]
        assert [p["label"] for p in predictions] == [label for label, _ in expected]
    finally:
        server.shutdown()
        server.server_close()
