"""SavedModel export of a classifier, loaded the ways TF Serving loads it, in
a process without tensorflow-text or fmkeras."""

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from run_helpers import request_json, serve_in_fresh_process

import fmkeras
from fmkeras.errors import ConfigError
from fmkeras.export import export
from fmkeras.export import main as export_main
from fmkeras.serve import ModelVersions, create_server
from fmkeras.tasks import load_run
from fmkeras.text.wordpiece import WordPieceTokenizer

pytestmark = pytest.mark.usefixtures("data_dir")  # every test here reads the datasets

TEXTS = ["a gorgeous , witty , seductive movie .", "dull and tedious", "Héllo 東京 !"]

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
    # Trained inside fmkeras.fused's context, exported with ordinary ops only.
    assert b"_XlaMustCompile" not in (version / "saved_model.pb").read_bytes()
    # Every weight is stored once (keras#23553 stores them twice with `track(model)`).
    stored = tf.train.load_checkpoint(str(version / "variables" / "variables"))
    shapes = stored.get_variable_to_shape_map()
    values = sum(np.prod(shapes[key]) for key in shapes if key.endswith("VARIABLE_VALUE"))
    assert values == load_run(classify_run).model.count_params()


def test_a_killed_export_leaves_no_version_a_server_could_see(classify_run, tmp_path):
    base = tmp_path / "sm" / "m"
    exporting = subprocess.Popen(
        [sys.executable, "-m", "fmkeras.export", str(classify_run), "--name", "m", "--out",
         str(tmp_path / "sm")], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(base.glob(".1-*/model/*")):  # the SavedModel is being written
        assert exporting.poll() is None and time.time() < deadline, "export ended before the kill"
        time.sleep(0.01)
    exporting.kill()
    exporting.wait()
    assert [p.name for p in base.iterdir() if not p.name.startswith(".")] == []
    assert ModelVersions(base).versions() == []
    assert export_main([str(classify_run), "--name", "m", "--out", str(tmp_path / "sm")]) == 0
    assert [p.name for p in base.iterdir()] == ["1"]  # the leftover was removed
    assert ModelVersions(base).versions() == [1]


def test_versions_are_never_overwritten_silently(classify_run, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "saved_models")
    assert export_main([str(classify_run), "--name", "m", "--out", out]) == 0
    assert export_main([str(classify_run), "--name", "m", "--out", out]) == 0
    assert sorted(p.name for p in (tmp_path / "saved_models" / "m").iterdir()) == ["1", "2"]
    with monkeypatch.context() as patched:  # refused before the run is loaded
        patched.setattr("fmkeras.tasks.load_run", lambda *a, **k: pytest.fail("loaded"))
        assert export_main([str(classify_run), "--name", "m", "--out", out, "--version", "1"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert export_main([str(classify_run), "--name", "m", "--out", out, "--version", "1",
                        "--overwrite"]) == 0  # fmt: skip


def raw_exchange(port, data, timeout=30):
    """Sends raw bytes on a fresh connection; returns `(status, json body, headers)`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, json.loads(response.read() or b"{}"), dict(response.getheaders())


def post(path, body, headers=None):
    """A raw POST request with `Content-Length` unless `headers` say otherwise."""
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if v is not None)
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode() + body


# Every bad request gets a 4xx and a JSON error naming the problem (README, "Reliability").
BAD_REQUESTS = [
    (post("/v1/models/sst2:predict", b"{not json"), 400, "JSON Parse error"),
    (post("/v1/models/sst2:predict", b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
     400, "nested too deeply"),
    (post("/v1/models/sst2:predict", b'{"instances": [1, 2]}'), 400, "expected a list of strings"),
    (post("/v1/models/sst2:predict", b'{"instances": []}'), 400, "empty batch"),
    (post("/v1/models/sst2:predict", b'{"instances": ["x", "x", "x", "x", "x", "x", "x", "x", '
          b'"x"]}'), 400, "exceeds the maximum of 8"),
    (post("/v1/models/sst2:predict", b'{"rows": ["x"]}'), 400, "Missing 'inputs' or 'instances'"),
    (post("/v1/models/sst2:predict", b'{"instances": ["\xff\xfe"]}'), 400, "JSON Parse error"),
    (post("/v1/models/sst2:predict", b'{"instances": ["\\ud800"]}'), 400, "not valid Unicode"),
    (post("/v1/models/sst2:predict", b"x" * 10, {"Content-Length": str(2 << 20)}), 413, "exceeds"),
    (post("/v1/models/sst2:predict", b"{}", {"Content-Length": "-3"}), 400, "bad Content-Length"),
    (post("/v1/models/sst2:predict", b"{}", {"Content-Length": None}), 411, "Content-Length"),
    (post("/v1/models/sst2:predict", b"2\r\n{}\r\n0\r\n\r\n",
          {"Content-Length": None, "Transfer-Encoding": "chunked"}), 411, "chunked"),
    (post("/v1/models/other:predict", b'{"instances": ["x"]}'), 404, "Servable not found"),
    (post("/v1/models/sst2/versions/7:predict", b'{"instances": ["x"]}'), 404, "Specific(sst2, 7)"),
    (post("/v1/models/sst2:classify", b'{"instances": ["x"]}'), 404, "only :predict"),
    (b"PUT /v1/models/sst2 HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "use GET or POST"),
]


def test_local_server_speaks_tf_serving_rest(classify_run, tmp_path):
    out = tmp_path / "saved_models"
    assert export_main([str(classify_run), "--name", "sst2", "--out", str(out)]) == 0
    server, _ = create_server(out / "sst2", port=0, max_batch=8, timeout=1, max_connections=20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}/v1/models"

    def call(path, body=None):
        return request_json(url + path, body)

    try:
        status, body = call("/sst2")
        assert status == 200 and body["model_version_status"][0]["version"] == "1"
        expected = load_run(classify_run).classify(TEXTS)
        status, body = call("/sst2:predict", {"instances": TEXTS})
        assert status == 200
        assert [p["label"] for p in body["predictions"]] == [label for label, _ in expected]
        status, body = call("/sst2/versions/1:predict", {"inputs": {"texts": TEXTS[:2]}})
        assert status == 200 and len(body["outputs"]["probabilities"]) == 2
        for request, expected_status, fragment in BAD_REQUESTS:
            status, body, _ = raw_exchange(port, request)
            assert (status, fragment in body["error"]) == (expected_status, True), request[:60]

        # Keep-alive: one connection answers a bad request, then a good one.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/models/sst2:predict", b'{"instances": [7]}')
        assert connection.getresponse().read() and connection.sock is not None
        connection.request("POST", "/v1/models/sst2:predict", b'{"instances": ["fine"]}')
        assert connection.getresponse().status == 200
        connection.close()

        # A client that stops in the middle of its body gets 408 after --timeout (1 s).
        start = time.perf_counter()
        request = post("/v1/models/sst2:predict", b'{"inst', {"Content-Length": "40"})
        assert raw_exchange(port, request)[0] == 408 and time.perf_counter() - start < 10

        # Beyond --max-connections (20), a connection gets 503 at once; then service resumes.
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        status, body, headers = raw_exchange(port, post("/v1/models/sst2:predict", b"{}"))
        assert (status, headers.get("Retry-After")) == (503, "1") and "overloaded" in body["error"]
        for connection in idle:
            connection.close()
        time.sleep(0.2)
        assert call("/sst2:predict", {"instances": ["back"]})[0] == 200

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


def test_server_drains_in_flight_requests_on_sigterm(classify_run, tmp_path):
    out = tmp_path / "sm"
    assert export_main([str(classify_run), "--name", "sst2", "--out", str(out)]) == 0
    # --batch-wait-ms 3000: a lone request waits 3 s for company, so it is in flight at SIGTERM.
    server = subprocess.Popen(
        [sys.executable, "-m", "fmkeras.serve", str(out / "sst2"), "--port", "0",
         "--batch-wait-ms", "3000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        started = server.stdout.readline()
        assert "serving sst2 versions [1] at http://127.0.0.1:" in started, server.stderr.read()
        port = int(started.rsplit(":", 1)[1].split("/")[0])
        request = post("/v1/models/sst2:predict", b'{"instances": ["late"]}')
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(raw_exchange, port, request)
            time.sleep(1.0)
            server.send_signal(signal.SIGTERM)
            status, body, headers = answer.result(timeout=60)
        assert status == 200 and len(body["predictions"]) == 1
        assert headers.get("Connection") == "close"
        assert server.wait(timeout=60) == 0
        assert "every request in flight was answered" in server.stdout.read()
        with pytest.raises(OSError):  # no longer listening
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        server.kill()


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


@pytest.mark.long_running
def test_quantized_and_bfloat16_variants_answer_like_the_float_model(classify_run, tmp_path,
                                                                     capsys):
    out = str(tmp_path / "sm")
    assert export_main([str(classify_run), "--name", "f", "--out", out, "--tflite"]) == 0
    assert export_main([str(classify_run), "--name", "g", "--out", out, "--tflite",
                        "float32"]) == 0  # fmt: skip
    assert export_main([str(classify_run), "--name", "gf", "--out", out, "--tflite", "float32",
                        "--tflite-batch-size", "3"]) == 0  # fmt: skip
    assert export_main([str(classify_run), "--name", "z", "--out", out,
                        "--tflite-batch-size", "2"]) == 2  # fmt: skip
    assert "--tflite-batch-size shapes the TFLite model; add --tflite" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # full-integer TFLite is the table tool's, not an export's
        export_main([str(classify_run), "--name", "z", "--out", out, "--tflite", "int8"])
    with pytest.raises(ConfigError, match="--tflite 'int8': use one of dynamic, float32"):
        export(classify_run, "z", out, tflite="int8")
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    assert export_main([str(classify_run), "--name", "q", "--out", out, "--quantize", "int8"]) == 0
    assert export_main([str(classify_run), "--name", "x", "--out", out, "--quantize", "int8",
                        "--tflite"]) == 2  # fmt: skip
    assert "leave out --quantize" in capsys.readouterr().err
    expected = np.array([list(s.values()) for _, s in load_run(classify_run).classify(TEXTS)])

    quantized = tf.saved_model.load(str(tmp_path / "sm" / "q" / "1")).signatures["serving_default"]
    answers = quantized(texts=tf.constant(TEXTS))["probabilities"].numpy()
    np.testing.assert_allclose(answers, expected, atol=0.05)
    stored = tf.train.load_checkpoint(str(tmp_path / "sm" / "q" / "1" / "variables" / "variables"))
    kernels = [w for w in load_run(classify_run).model.weights if w.path.endswith("/kernel")]
    # every Dense and EinsumDense kernel, the attention projections' too
    assert list(stored.get_variable_to_dtype_map().values()).count(tf.int8) == len(kernels)

    # bfloat16: 16-bit weights on disk, float32 outputs, the float model's answers.
    assert export_main([str(classify_run), "--name", "h", "--out", out, "--precision",
                        "bfloat16"]) == 0  # fmt: skip
    assert export_main([str(classify_run), "--name", "y", "--out", out, "--precision",
                        "bfloat16", "--tflite"]) == 2  # fmt: skip
    assert "leave out --quantize and --tflite" in capsys.readouterr().err
    half = tmp_path / "sm" / "h" / "1"
    stored = tf.train.load_checkpoint(str(half / "variables" / "variables"))
    dtypes = stored.get_variable_to_dtype_map()
    assert list(dtypes.values()).count(tf.bfloat16) > len(dtypes) // 2
    signature = tf.saved_model.load(str(half)).signatures["serving_default"]
    assert signature.structured_outputs["probabilities"].dtype == tf.float32
    answers = signature(texts=tf.constant(TEXTS))
    np.testing.assert_allclose(answers["probabilities"].numpy(), expected, atol=0.05)
    info = json.loads((half / "assets.extra" / "fmkeras.json").read_text(encoding="utf-8"))
    assert info["precision"] == "bfloat16"

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
    # `--tflite` is dynamic range (int8 weights), `--tflite float32` the float model.
    for name, mode, atol in (("f", "dynamic", 0.05), ("g", "float32", 1e-4)):
        extra = tmp_path / "sm" / name / "1" / "assets.extra"
        info = json.loads((extra / "fmkeras.json").read_text(encoding="utf-8"))
        assert info["tflite"] == mode
        runner = Interpreter(model_path=str(extra / "model.tflite")).get_signature_runner(
            "serve_token_ids")  # fmt: skip
        lite = runner(token_ids=token_ids, segment_ids=np.zeros_like(token_ids),
                      padding_mask=(token_ids > 0).astype("int32"))  # fmt: skip
        np.testing.assert_allclose(lite["probabilities"], expected, atol=atol)
    # `--tflite-batch-size 3`: inputs fixed to 3 rows of the run's length, the shape
    # arithmetic folded away (fewer ops), the float model's answers.
    extra = tmp_path / "sm" / "gf" / "1" / "assets.extra"
    length = load_run(classify_run).info["sequence_length"]
    assert json.loads((extra / "fmkeras.json").read_text())["tflite_input_shape"] == [3, length]
    fixed = Interpreter(model_path=str(extra / "model.tflite"))
    runner = fixed.get_signature_runner("serve_token_ids")
    assert list(runner.get_input_details()["token_ids"]["shape_signature"]) == [3, length]
    padded = np.pad(token_ids, [(0, 0), (0, length - token_ids.shape[1])])
    lite = runner(token_ids=padded, segment_ids=np.zeros_like(padded),
                  padding_mask=(padded > 0).astype("int32"))  # fmt: skip
    np.testing.assert_allclose(lite["probabilities"], expected, atol=1e-4)
    shaped = Interpreter(model_path=str(tmp_path / "sm" / "g" / "1" / "assets.extra" /
                                        "model.tflite"))  # fmt: skip
    assert len(fixed._get_ops_details()) < 0.75 * len(shaped._get_ops_details())
