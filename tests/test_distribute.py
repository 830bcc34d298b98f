"""tf.distribute end to end: mirrored == one device (and resumes), workers
split every global batch, and a killed worker stops the cluster whose
relaunch resumes."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from run_helpers import REPO, run_cli, run_workers, scalars, tiny_args, wait_for
from shard_data import examples, pipeline

from fmkeras.train import main

pytestmark = pytest.mark.usefixtures("data_dir")  # every test here reads the datasets


def kill_after_first_backup(args, run):
    """Starts `python -m fmkeras.train ARGS`, SIGKILLs it once its step-20 backup exists."""
    process = subprocess.Popen([sys.executable, "-m", "fmkeras.train", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(run / "backup" / "step-00000020", process)
    process.kill()
    process.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it was killed"


# Same global batch and seed, no dropout, no XLA on either side (XLA rounds differently).
# Lazy embedding updates: the replicas' sparse position and segment gradients arrive
# concatenated, with every row repeated, and must update as one device's do.
EXACT = {"model.dropout": 0, "train.jit_compile": "false", "train.log_every": 5,
         "train.lazy_embeddings": "true"}  # fmt: skip
MIRRORED = {
    **EXACT,
    "distribute.strategy": "mirrored",
    "distribute.cpu_devices": 2,
    "train.steps_per_execution": 5,  # runs one step per execution (keras#19246)
}


def assert_follows(run, reference, steps=None):
    """`run`'s logged losses and final validation loss match `reference`'s within
    0.5 % (float32 sums in another order); returns the compared steps."""
    metrics = json.loads((run / "metrics.json").read_text())
    expected_metrics = json.loads((reference / "metrics.json").read_text())
    losses = dict(scalars(run / "logs" / "train", "loss"))  # the last attempt's
    expected = dict(scalars(reference / "logs" / "train", "loss"))
    steps = steps or sorted(set(losses) & set(expected))
    np.testing.assert_allclose([losses[s] for s in steps], [expected[s] for s in steps], rtol=5e-3)
    assert metrics["valid_loss"] == pytest.approx(expected_metrics["valid_loss"], rel=5e-3)
    return steps


@pytest.mark.long_running
def test_mirrored_follows_the_one_device_trajectory_and_resumes(tmp_path, small_vocab):
    # The final validation is of the weights' moving average, restored from the backup too.
    averaged = {"train.ema": 0.9}
    one = tiny_args(small_vocab, steps=30, **EXACT, **averaged) + ["--out", str(tmp_path / "one")]
    assert main(one) == 0

    run = tmp_path / "mirrored"
    args = tiny_args(small_vocab, steps=30, **MIRRORED, **averaged) + ["--out", str(run)]
    kill_after_first_backup(args, run)
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["resumed_from_step"] == 20
    steps = assert_follows(run, tmp_path / "one")
    assert len(steps) >= 5 and steps[-1] > 20  # logged before and after the resume


@pytest.mark.slow  # two more training processes (~40 s); test_workarounds covers the fix
def test_mirrored_compiles_each_replica_step_with_xla(tmp_path, small_vocab):
    """XLA under the strategy (each replica's step compiled, fmkeras/workarounds.py)."""
    one = run_cli(tiny_args(small_vocab, **EXACT) + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    xla = run_cli(tiny_args(small_vocab, **{**MIRRORED, "train.jit_compile": "true"})
                  + ["--out", str(tmp_path / "xla")])  # fmt: skip
    assert xla.returncode == 0, xla.stderr
    metrics = json.loads((tmp_path / "xla" / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["jit_compile"] is True
    assert_follows(tmp_path / "xla", tmp_path / "one")


SHARDS = textwrap.dedent("""
    import json, sys
    from fmkeras.config import DistributeConfig
    from fmkeras.distribute import create_strategy
    strategy = create_strategy(DistributeConfig(strategy="multi_worker"))
    from shard_data import pipeline
    seen = {}
    for kind in ("mlm", "labelled"):  # one pair of worker processes checks both pipelines
        batches = iter(strategy.experimental_distribute_dataset(pipeline(kind, sys.argv[1])))
        seen[kind] = [[strategy.experimental_local_results(t)[0].numpy().tolist()
                       for t in next(batches)] for _ in range(8)]  # as `fit` reads them
    print(json.dumps(seen))
""")


def test_two_workers_split_every_global_batch(tmp_path, small_vocab):
    """Pretraining and fine-tuning pipelines: each step, worker 0 gets the first half of
    the single-process global batch and worker 1 the second; one pass covers the data once."""
    results = run_workers(SHARDS, small_vocab, cwd=REPO / "tests")
    for code, _, err in results:
        assert code == 0, err[-3000:]
    workers = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    for kind in ("mlm", "labelled"):
        single = [[t.numpy() for t in batch] for batch in pipeline(kind, small_vocab).take(8)]
        joined_batches = []
        for step, batch in enumerate(single):
            joined = [np.concatenate([np.array(w[kind][step][part]) for w in workers])
                      for part in range(len(batch))]  # fmt: skip
            for part, whole in zip(joined, batch, strict=True):
                np.testing.assert_array_equal(part, whole)
            joined_batches.append(joined)
        seen = examples(kind, small_vocab, joined_batches)
        for one_pass in (seen[:64], seen[64:]):  # 2 passes of 4 batches
            assert sorted(one_pass) == list(range(64)), kind


# Two 2-worker training runs (~65 s). The default run keeps the parts: test_launch's failing
# worker stops the others, test_pretrain's faults resume, and two workers split each batch above.
@pytest.mark.slow
def test_a_killed_worker_stops_the_cluster_and_the_relaunch_resumes(tmp_path, small_vocab):
    run, log = tmp_path / "run", tmp_path / "launch.log"
    settings = {"data.sequence_length": 32, "train.eval_every": 100, "train.jit_compile": "false"}
    train = tiny_args(small_vocab, steps=100, **settings) + ["--out", str(run)]
    command = [sys.executable, "-m", "fmkeras.launch", "--workers", "2", "--grace", "3", "--",
               sys.executable, "-m", "fmkeras.train", *train]  # fmt: skip
    with open(log, "w") as output:
        launcher = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        for backups in (run / "backup", run / "workers" / "worker-1" / "backup"):
            wait_for(backups / "step-00000020", launcher)  # both workers can resume from 20
        text = log.read_text()
        pid = int(text.split("[launch] worker 1: pid ")[1].split(",")[0])
        os.kill(pid, signal.SIGKILL)
        code = launcher.wait(timeout=120)  # the chief is stuck in a collective: stopped
    text = log.read_text()
    assert code == 128 + signal.SIGKILL, text[-3000:]
    assert "worker 1 exited with code -9; stopping the others" in text
    assert not (run / "metrics.json").exists()

    relaunched = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert relaunched.returncode == 0, relaunched.stdout[-3000:]
    assert "[worker 1]" in relaunched.stdout and "resuming from" in relaunched.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 100 and 20 <= metrics["resumed_from_step"] < 100
    assert not (run / "workers").exists()  # worker 1's backups were cleaned up
