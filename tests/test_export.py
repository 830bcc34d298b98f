"""SavedModel export of a classifier, loaded the ways TF Serving loads it, in
a process without tensorflow-text or fmkeras."""

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from run_helpers import serve_in_fresh_process, train_args

import fmkeras
from fmkeras.export import main as export_main
from fmkeras.serve import create_server
from fmkeras.tasks import load_run
from fmkeras.text.wordpiece import WordPieceTokenizer
from fmkeras.train import main as train_main

pytestmark = pytest.mark.usefixtures("data_dir")  # every test here reads the datasets

TEXTS = ["a gorgeous , witty , seductive movie .", "dull and tedious", "Héllo 東京 !"]

@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "sst2"
    settings = {
        "model.size": "tiny",
        "model.init": "random",
        "data.max_lines": 800,
        "data.vocab_size": 800,
        "train.batch_size": 16,
        "train.steps": 6,
        "train.checkpoint_every": 6,
        "train.eval_every": 6,
        "train.jit_compile": "false",
    }
    assert train_main(train_args("classify", REPO / "trainers" / "sst2.yaml", settings, run)) == 0
    return run


def test_export_loads_like_tf_serving_with_the_same_outputs(classify_run, tmp_path, capsys):
    out = tmp_path / "saved_models"
    assert export_main([str(classify_run), "--name", "sst2", "--out", str(out)]) == 0
    version = out / "sst2" / "1"
    assert (version / "saved_model.pb").is_file()
    served = serve_in_fresh_process(version, TEXTS)
    expected = load_run(classify_run).classify(TEXTS)
    np.testing.assert_allclose(
        served["probabilities"], [list(scores.values()) for _, scores in expected], atol=1e-5
    )
    assert served["label"] == [label for label, _ in expected]

    cli = shutil.which("saved_model_cli", path=str(REPO / ".venv" / "bin")) or "saved_model_cli"
    shown = subprocess.run([cli, "show", "--all", "--dir", str(version)], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "serving_default" in shown.stdout and "serve_token_ids" in shown.stdout
    # Every weight is stored once (keras#23553 stores them twice with `track(model)`).
    stored = tf.train.load_checkpoint(str(version / "variables" / "variables"))
    shapes = stored.get_variable_to_shape_map()
    values = sum(np.prod(shapes[key]) for key in shapes if key.endswith("VARIABLE_VALUE"))
    assert values == load_run(classify_run).model.count_params()


def test_versions_are_never_overwritten_silently(classify_run, tmp_path, capsys):
    out = str(tmp_path / "saved_models")
    assert export_main([str(classify_run), "--name", "m", "--out", out]) == 0
    assert export_main([str(classify_run), "--name", "m", "--out", out]) == 0
    assert sorted(p.name for p in (tmp_path / "saved_models" / "m").iterdir()) == ["1", "2"]
    assert export_main([str(classify_run), "--name", "m", "--out", out, "--version", "1"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert export_main([str(classify_run), "--name", "m", "--out", out, "--version", "1",
                        "--overwrite"]) == 0  # fmt: skip


def test_local_server_speaks_tf_serving_rest(classify_run, tmp_path):
    out = tmp_path / "saved_models"
    assert export_main([str(classify_run), "--name", "sst2", "--out", str(out)]) == 0
    server, _ = create_server(out / "sst2", port=0, max_batch=8)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/models"

    def call(path, body=None):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(url + path, data=data)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        status, body = call("/sst2")
        assert status == 200 and body["model_version_status"][0]["version"] == "1"
        expected = load_run(classify_run).classify(TEXTS)
        status, body = call("/sst2:predict", {"instances": TEXTS})
        assert status == 200
        assert [p["label"] for p in body["predictions"]] == [label for label, _ in expected]
        status, body = call("/sst2/versions/1:predict", {"inputs": {"texts": TEXTS[:2]}})
        assert status == 200 and len(body["outputs"]["probabilities"]) == 2
        for bad, fragment in [
            (b"{not json", "JSON Parse error"),
            ({"instances": [1, 2]}, "expected a list of strings"),
            ({"instances": ["x"] * 9}, "exceeds the maximum of 8"),
            ({"rows": ["x"]}, "Missing 'inputs' or 'instances'"),
        ]:
            status, body = call("/sst2:predict", bad)
            assert status == 400 and fragment in body["error"]
        assert call("/other:predict", {"instances": ["x"]})[0] == 404
        assert call("/sst2/versions/7:predict", {"instances": ["x"]})[0] == 404

        # A new export is served without a restart.
        assert export_main([str(classify_run), "--name", "sst2", "--out", str(out)]) == 0
        assert [s["version"] for s in call("/sst2")[1]["model_version_status"]] == ["1", "2"]

        def one(i):
            return call("/sst2:predict", {"instances": [TEXTS[i % 3]]})[0]

        with ThreadPoolExecutor(16) as pool:  # concurrent requests are batched together
            statuses = list(pool.map(one, range(200)))
        assert statuses == [200] * 200
    finally:
        server.shutdown()


def test_fill_mask_export_ranks_pieces_for_every_mask(mlm_run, tmp_path):
    run = mlm_run
    assert (
        export_main([str(run), "--name", "mlm", "--out", str(tmp_path / "sm"), "--top-k", "3"]) == 0
    )
    texts = ["the house is [MASK] .", "no mask", "[MASK][MASK] and [MASK]"]
    served = serve_in_fresh_process(tmp_path / "sm" / "mlm" / "1", texts)
    assert served["mask_positions"] == [[4, -1, -1], [-1, -1, -1], [1, 2, 4]]

    model = fmkeras.load_model(run / "model.keras")
    tokenizer = WordPieceTokenizer(run / "vocab.txt")
    ids = [tokenizer.cls_id, *tokenizer.tokenize(tf.constant(["the house is"])).to_list()[0],
           tokenizer.mask_id, *tokenizer.tokenize(tf.constant(["."])).to_list()[0],
           tokenizer.sep_id]  # fmt: skip
    features = {
        "token_ids": np.array([ids], "int32"),
        "segment_ids": np.zeros((1, len(ids)), "int32"),
        "padding_mask": np.ones((1, len(ids)), "int32"),
        "mask_positions": np.array([[ids.index(tokenizer.mask_id)]], "int32"),
    }
    logits = np.asarray(model(features))[0, 0]
    expected = [tokenizer.vocabulary[i] for i in np.argsort(-logits)[:3]]
    assert served["tokens"][0][0] == expected
    assert served["tokens"][1] == [["", "", ""]] * 3
    probabilities = np.asarray(served["probabilities"])
    assert np.all(np.diff(probabilities[0, 0]) <= 0) and probabilities[1].sum() == 0


def test_int8_and_tflite_variants_answer_like_the_float_model(classify_run, tmp_path, capsys):
    out = str(tmp_path / "sm")
    assert export_main([str(classify_run), "--name", "f", "--out", out, "--tflite"]) == 0
    assert export_main([str(classify_run), "--name", "q", "--out", out, "--quantize", "int8"]) == 0
    assert export_main([str(classify_run), "--name", "x", "--out", out, "--quantize", "int8",
                        "--tflite"]) == 2  # fmt: skip
    assert "leave out --quantize" in capsys.readouterr().err
    expected = np.array([list(s.values()) for _, s in load_run(classify_run).classify(TEXTS)])

    quantized = serve_in_fresh_process(tmp_path / "sm" / "q" / "1", TEXTS)
    np.testing.assert_allclose(quantized["probabilities"], expected, atol=0.05)
    stored = tf.train.load_checkpoint(str(tmp_path / "sm" / "q" / "1" / "variables" / "variables"))
    assert tf.int8 in stored.get_variable_to_dtype_map().values()

    from ai_edge_litert.interpreter import Interpreter

    tokenizer = load_run(classify_run).tokenizer
    ids = tokenizer.tokenize(tf.constant(TEXTS))
    token_ids = np.array(
        [
            [tokenizer.cls_id, *row, tokenizer.sep_id] + [0] * (20 - len(row))
            for row in ids.to_list()
        ],
        "int32",
    )
    interpreter = Interpreter(
        model_path=str(tmp_path / "sm" / "f" / "1" / "assets.extra" / "model.tflite")
    )
    runner = interpreter.get_signature_runner("serve_token_ids")
    lite = runner(token_ids=token_ids, segment_ids=np.zeros_like(token_ids),
                  padding_mask=(token_ids > 0).astype("int32"))  # fmt: skip
    np.testing.assert_allclose(lite["probabilities"], expected, atol=0.05)
