"""The local multi-worker launcher: TF_CONFIG per worker, prefixed logs, and
one failing worker stops the others (SIGKILL when SIGTERM is ignored)."""

import io
import json
import sys
import textwrap
import time

from fmkeras.launch import launch, worker_command

# Worker 1 fails only once worker 0 has printed and ignores SIGTERM (the file
# argv[1] says so), so a loaded machine cannot kill worker 0 mid-print.
WORKER = textwrap.dedent("""
    import json, os, pathlib, signal, sys, time
    config = json.loads(os.environ["TF_CONFIG"])
    index = config["task"]["index"]
    ready = pathlib.Path(sys.argv[1])
    if index == 1:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as TensorFlow does in multi-worker mode
    print("workers", len(config["cluster"]["worker"]), "index", index, flush=True)
    if index == 1:
        sys.exit(3)
    ready.touch()
    time.sleep(600)
""")


def test_a_failing_worker_stops_the_others(tmp_path):
    output = io.StringIO()
    started = time.time()
    worker = [sys.executable, "-c", WORKER, str(tmp_path / "ready")]
    code = launch(worker, workers=2, output=output, grace=1)
    assert code == 3
    assert time.time() - started < 60  # the SIGTERM-deaf worker was killed, not waited for
    text = output.getvalue()
    assert "[worker 0] workers 2 index 0" in text and "[worker 1] workers 2 index 1" in text
    assert "worker 1 exited with code 3; stopping the others" in text
    configs = [json.loads(line.split("TF_CONFIG ", 1)[1]) for line in text.splitlines()
               if line.startswith("[launch] worker") and "TF_CONFIG" in line]  # fmt: skip
    assert [c["task"]["index"] for c in configs] == [0, 1]
    assert configs[0]["cluster"] == configs[1]["cluster"]


def test_train_commands_get_the_multi_worker_strategy():
    command = worker_command(["python", "-m", "fmkeras.train", "pretrain"], 2)
    assert command[-4:] == ["--set", "distribute.strategy=multi_worker",
                            "--set", "distribute.cpu_devices=2"]  # fmt: skip
    assert worker_command(["python", "x.py"], None) == ["python", "x.py"]
