"""SavedModel export of a classifier, loaded the ways TF Serving loads it, in
a process without tensorflow-text or fmkeras."""

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import REPO
from run_helpers import train_args

from fmkeras.export import main as export_main
from fmkeras.inference import load_run
from fmkeras.serve import create_server
from fmkeras.train import main as train_main

TEXTS = ["a gorgeous , witty , seductive movie .", "dull and tedious", "Héllo 東京 !"]

CHECK = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    path, texts = sys.argv[1], json.loads(sys.argv[2])
    loaded = tf.saved_model.load(path)
    eager = loaded.signatures["serving_default"](texts=tf.constant(texts))
    with tf.compat.v1.Session(graph=tf.Graph()) as session:  # TF Serving's C++ path
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        signature = meta.signature_def["serving_default"]
        fetches = {k: v.name for k, v in signature.outputs.items()}
        graph = session.run(fetches, {signature.inputs["texts"].name: texts})
    assert "tensorflow_text" not in sys.modules and "fmkeras" not in sys.modules
    print(json.dumps({
        "eager": eager["probabilities"].numpy().tolist(),
        "session": graph["probabilities"].tolist(),
        "labels": [label.decode() for label in graph["label"]],
    }))
""")


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
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(version), json.dumps(TEXTS)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    expected = load_run(classify_run).classify(TEXTS)
    for probabilities in (served["eager"], served["session"]):
        np.testing.assert_allclose(
            probabilities, [[p for p in scores.values()] for _, scores in expected], atol=1e-5
        )
    assert served["labels"] == [label for label, _ in expected]

    cli = shutil.which("saved_model_cli", path=str(REPO / ".venv" / "bin")) or "saved_model_cli"
    shown = subprocess.run([cli, "show", "--all", "--dir", str(version)], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "serving_default" in shown.stdout and "serve_token_ids" in shown.stdout


def test_versions_are_never_overwritten_silently(classify_run, tmp_path, capsys):
    out = str(tmp_path / "saved_models")
    assert export_main([str(classify_run), "--name", "m", "--out", out]) == 0
    assert export_main([str(classify_run), "--name", "m", "--out", out]) == 0
    assert sorted(p.name for p in (tmp_path / "saved_models" / "m").iterdir()) == ["1", "2"]
    assert export_main([str(classify_run), "--name", "m", "--out", out, "--version", "1"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert export_main([str(classify_run), "--name", "m", "--out", out, "--version", "1",
                        "--overwrite"]) == 0  # fmt: skip


TAG_CHECK = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    out = loaded.signatures["serving_default"](texts=tf.constant(json.loads(sys.argv[2])))
    assert "tensorflow_text" not in sys.modules and "fmkeras" not in sys.modules
    print(json.dumps([[t.decode() for t in row if t] for row in out["tags"].numpy()]))
""")


def test_tagger_export_tags_words_like_the_run(tmp_path):
    run = tmp_path / "ner"
    settings = {
        "model.size": "tiny",
        "model.init": "random",
        "model.max_sequence_length": 16,
        "data.sequence_length": 16,  # long sentences get cut: their last words are O
        "data.max_lines": 300,
        "data.vocab_size": 500,
        "train.batch_size": 16,
        "train.steps": 20,
        "train.learning_rate": 3e-3,
        "train.checkpoint_every": 20,
        "train.eval_every": 20,
        "train.jit_compile": "false",
    }
    assert train_main(train_args("tag", REPO / "trainers" / "conll2003.yaml", settings, run)) == 0
    assert export_main([str(run), "--name", "ner", "--out", str(tmp_path / "sm")]) == 0
    texts = [
        "EU rejects German call to boycott British lamb .",
        "Peter Blackburn of London said the U.S. team played well in the final game on Sunday",
        "Rome",
    ]
    result = subprocess.run(
        [sys.executable, "-c", TAG_CHECK, str(tmp_path / "sm" / "ner" / "1"), json.dumps(texts)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    expected = load_run(run).tag([text.split() for text in texts])
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served == [[tag for _, tag in sentence] for sentence in expected]


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
