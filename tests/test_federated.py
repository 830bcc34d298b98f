"""Federated fine-tuning on Flower: partitions, the client's local training
and weight exchange, FedAvg's aggregation, the simulation engine end to end,
and (slow) real server and client processes that survive kills."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from run_helpers import run_tool, scalars

from fmkeras.config import build_config
from fmkeras.errors import ConfigError
from fmkeras.federated.partition import partition_indices

TINY = ("model.init=random", "model.size=tiny", "model.dropout=0", "data.max_lines=300",
        "train.batch_size=8", "train.learning_rate=1e-3", "train.jit_compile=false",
        "train.precision=float32",
        "federated.clients=3", "federated.local_steps=3")  # fmt: skip


def tiny_settings(vocab, out, *extra):
    from fmkeras.federated.app import Settings

    return Settings("sst2_federated", (*TINY, f"data.vocab_file={vocab}", *extra), str(out))


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=8, max_size=300),
       clients=st.integers(1, 8), scheme=st.sampled_from(["iid", "dirichlet", "quantity"]),
       alpha=st.floats(0.05, 100), seed=st.integers(0, 5))  # fmt: skip
def test_partitions_are_disjoint_cover_the_data_and_leave_no_client_empty(labels, clients, scheme,
                                                                          alpha, seed):  # fmt: skip
    parts = partition_indices(labels, clients, scheme, alpha, seed)
    assert len(parts) == clients
    assert all(len(part) for part in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    again = partition_indices(labels, clients, scheme, alpha, seed)  # every process agrees
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_partitions_skew_labels_and_quantity_partitions_skew_sizes():
    labels = np.repeat([0, 1], 500)

    def label_shares(parts):
        return np.array([labels[part].mean() for part in parts])

    iid = partition_indices(labels, 10, "iid", seed=1)
    skewed = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=1)
    assert label_shares(iid).std() < 0.05 < 0.25 < label_shares(skewed).std()
    sizes = [len(part) for part in partition_indices(labels, 10, "quantity", alpha=0.5, seed=1)]
    assert max(sizes) > 3 * min(sizes)
    assert {len(part) for part in iid} == {100}
    with pytest.raises(ConfigError, match="federated.clients=5 exceeds the 3 training examples"):
        partition_indices([0, 1, 0], 5)


def test_tagging_examples_are_partitioned_by_their_most_frequent_entity_tag():
    import tensorflow as tf

    from fmkeras.federated.learner import partition_groups
    from fmkeras.text.labelled import IGNORE

    tags = tf.ragged.constant([[IGNORE, 0, 3, 3, 1, IGNORE], [IGNORE, 0, 0, IGNORE], [2, IGNORE]])
    assert partition_groups(tags).tolist() == [3, 0, 2]  # O (0) only when nothing else
    assert partition_groups(np.array([1, 0, 1])).tolist() == [1, 0, 1]


@pytest.mark.parametrize("setting, message", [
    (["federated.fraction=0"], "federated.fraction=0.0 must be in"),
    (["federated.clients=2", "federated.min_clients=3"], "min_clients=3 exceeds"),
    (["federated.exchange=lora"], "needs finetune.method=lora and a pretrained model.init"),
    (["federated.exchange=lora", "finetune.method=lora"], "pretrained model.init"),
    (["federated.strategy=fedsgd"], "federated.strategy='fedsgd' is not one of"),
    (["federated.dp_delta=1"], "federated.dp_delta=1.0 must be in"),
    (["federated.partitions=iid"], "Did you mean 'federated.partition'"),
])  # fmt: skip
def test_federated_keys_are_checked_before_anything_runs(setting, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, ["task=classify", *setting])


def test_federated_keys_belong_to_classify_and_tag():
    from fmkeras.config import keys_for

    for task, expected in (("classify", True), ("tag", True), ("mlm", False)):
        keys = dict(keys_for(task))
        assert ("federated.exchange" in keys) is expected, task


def test_settings_travel_as_a_flower_run_config_and_the_app_names_the_apps(tmp_path):
    import tomllib

    from fmkeras.federated import app
    from fmkeras.federated.command import APP_DIR

    settings = app.Settings("sst2_federated", ("federated.rounds=2", "x=a b"), "/o", "/d")
    assert app.Settings.from_run_config(settings.run_config()) == settings
    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fmkeras.federated.app:server_app",
                          "clientapp": "fmkeras.federated.app:client_app"}  # fmt: skip
    assert set(project["tool"]["flwr"]["app"]["config"]) == set(settings.run_config())
    with pytest.raises(ConfigError, match="federated training runs classify and tag recipes"):
        app.Settings("pretrain_gutenberg").config()


@pytest.mark.parametrize("args, message", [
    (["client", "--partition", "-1"], "--partition must be 0 or more, got -1"),
    (["client", "--partition", "0", "--server", "localhost"], "expects HOST:PORT, got 'localhost'"),
    (["server", "--recipe", "sst2_federated", "--address", "h:x"], "expects HOST:PORT"),
    (["simulate", "--recipe", "nope"], "recipe 'nope' not found"),
    (["simulate", "--recipe", "en_zh"], "runs classify and tag recipes, not 'translate'"),
    (["simulate", "--recipe", "sst2_federated", "--set", "federated.rounds=0"],
     "federated.rounds must be positive"),
    (["simulate", "--recipe", "sst2_federated", "--set", "train.ema=0.99"],
     "train.ema averages one run's weights over its steps"),
    (["simulate", "--recipe", "sst2_federated", "--data-dir", "/no/data"],
     "expected the file sst2/train.tsv in data directory /no/data"),
    (["server", "--recipe", "sst2_federated", "--set", "model.init=/no/dir"],
     "model.init='/no/dir': /no/dir is not a directory"),
])  # fmt: skip
def test_command_line_mistakes_are_one_line_errors(args, message, capsys):
    from fmkeras.federated.command import main

    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_missing_data_file_fails_before_flower_or_tensorflow_loads():
    code = ("import sys\nfrom fmkeras.federated.command import main\n"
            "code = main(['simulate', '--recipe', 'sst2_federated', '--data-dir', '/no/data'])\n"
            "print(code, *(name in sys.modules for name in ('flwr', 'ray', 'tensorflow')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.stdout.split() == ["2", "False", "False", "False"], result.stderr


def test_a_resumed_server_refuses_a_changed_configuration_but_not_more_rounds(tmp_path):
    from fmkeras.federated.server import FederatedServer, state_path
    from fmkeras.training.run_dir import RunDir

    def read_state(*overrides):
        server = FederatedServer.__new__(FederatedServer)  # without building the model
        server.root, server.state_file = tmp_path, state_path(tmp_path)
        server.config = build_config(None, ["task=classify", *overrides])
        return server.read_state()

    RunDir(tmp_path).prepare(build_config(None, ["task=classify"]))
    state_path(tmp_path).parent.mkdir()
    state_path(tmp_path).write_text('{"round": 3, "history": []}')
    assert read_state("federated.rounds=20", "federated.min_clients=3")["round"] == 3
    with pytest.raises(ConfigError, match=r"different configuration \(train.learning_rate: "):
        read_state("train.learning_rate=0.1")


@pytest.fixture(scope="module")
def learner(small_vocab, data_dir, tmp_path_factory):
    from fmkeras.federated.learner import Learner

    settings = tiny_settings(small_vocab, tmp_path_factory.mktemp("learner"))
    return Learner(settings.config(), settings.out, log=lambda _: None)


def test_fedavg_of_client_updates_is_their_example_weighted_mean(learner):
    """One round by hand: both clients start from the same global weights;
    Flower's FedAvg aggregation equals the example-weighted mean of their
    weights, and identical clients average to exactly their shared update
    (what one centralised run of the same steps computes)."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fmkeras.federated.app import from_record, to_record

    start = learner.get_arrays()
    updates, sizes = [], []
    for client in (0, 1, 0):
        learner.set_arrays(start)
        loss, examples = learner.train(client, server_round=1)
        assert np.isfinite(loss) and examples == 3 * 8
        updates.append(learner.get_arrays())
        sizes.append(len(learner.partitions[client]))

    def replies(indices):
        return [RecordDict({"arrays": to_record(updates[i]),
                            "metrics": MetricRecord({"num-examples": sizes[i]})})
                for i in indices]  # fmt: skip

    averaged = from_record(aggregate_arrayrecords(replies([0, 1]), "num-examples"))
    changed = 0
    for name, value in averaged.items():
        expected = (sizes[0] * updates[0][name] + sizes[1] * updates[1][name]) / sum(sizes[:2])
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)
        changed += not np.array_equal(updates[0][name], start[name])
    assert changed > 10  # local training moved the weights
    identical = from_record(aggregate_arrayrecords(replies([0, 2]), "num-examples"))
    for name, value in identical.items():  # the same client twice: the same update
        np.testing.assert_array_equal(updates[0][name], updates[2][name])
        np.testing.assert_allclose(value, updates[0][name], rtol=1e-6, atol=1e-7)
    learner.set_arrays(start)


def test_fedprox_pulls_weights_towards_the_round_start(learner):
    """FedProx's term through the optimizer: with mu > 0 every step moves the
    weights less far from where the round started than without it."""
    start = learner.get_arrays()

    def distance(mu):
        learner.set_arrays(start)
        learner.train(0, server_round=1, proximal_mu=mu)
        moved = learner.get_arrays()
        return sum(float(np.sum((moved[k] - start[k]) ** 2)) for k in start)

    free, pulled = distance(0.0), distance(50.0)
    assert pulled < 0.9 * free
    assert distance(0.0) == pytest.approx(free, rel=1e-5)  # the term is off again
    learner.set_arrays(start)


def test_strategies_are_flowers_own_with_dp_and_its_accountant():
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideFixedClipping,
        FedAdam,
        FedAvg,
        FedProx,
    )

    from fmkeras.federated.server import make_strategy

    def strategy(*settings):
        return make_strategy(build_config(None, ["task=classify", *settings]).federated, None)

    assert type(strategy()) is FedAvg
    assert strategy("federated.strategy=fedprox").proximal_mu == 0.01
    assert strategy("federated.strategy=fedadam").eta == 0.01
    private = strategy("federated.dp_noise=1", "federated.dp_clip=0.5", "federated.fraction=0.5")
    assert isinstance(private, DifferentialPrivacyServerSideFixedClipping)
    assert (private.noise_multiplier, private.clipping_norm, private.num_sampled_clients) == \
        (1.0, 0.5, 5)  # fmt: skip
    assert private.strategy.min_train_nodes == 5  # accounting needs the same count every round
    assert private.privacy_spent().epsilon == 0
    with pytest.raises(ConfigError, match="dp_noise > 0 needs federated.strategy fedavg or"):
        strategy("federated.dp_noise=1", "federated.strategy=fedadam")
    assert isinstance(strategy("federated.strategy=fedadam"), FedAdam)
    assert isinstance(strategy("federated.strategy=fedprox"), FedProx)


def test_received_weights_that_do_not_fit_are_one_line_errors(learner):
    arrays = learner.get_arrays()
    name = next(iter(arrays))
    with pytest.raises(ConfigError, match="do not fit this model.*same recipe"):
        learner.set_arrays({k: v for k, v in arrays.items() if k != name})
    wrong = {**arrays, name: np.zeros((3, 3), np.float32)}
    with pytest.raises(ConfigError, match=f"received {name} has shape"):
        learner.set_arrays(wrong)


def test_local_epochs_set_the_steps_from_the_partition_size(learner):
    federated = learner.config.federated
    assert learner.local_steps(0) == federated.local_steps
    federated.local_epochs = 2.0
    try:
        assert learner.local_steps(1) == round(2 * len(learner.partitions[1]) / 8)
    finally:
        federated.local_epochs = None


def test_lora_exchange_sends_only_adapters_and_head(mlm_run, data_dir, tmp_path):
    """A LoRA client exchanges its adapters and the head: ≥ 20× fewer bytes
    than the whole model, and the fingerprint covers the frozen weights."""
    from fmkeras.federated.learner import Learner, payload_bytes

    config = build_config(REPO / "trainers" / "sst2_federated.yaml",
                          (*TINY, f"model.init={mlm_run}", "finetune.method=lora",
                           "federated.exchange=lora"))  # fmt: skip
    lora = Learner(config, tmp_path / "lora", log=lambda _: None)
    assert all("lora" in name or name.startswith(("logits", "pooler")) for name in lora.exchanged)
    whole = {v.path: v.numpy() for v in lora.model.weights}  # what exchange=full sends
    assert payload_bytes(whole) >= 20 * payload_bytes(lora.get_arrays())
    frozen = next(v for v in lora.model.weights if v.path not in lora.exchanged)
    before = lora.fingerprint
    frozen.assign(frozen + 1.0)
    del lora.__dict__["fingerprint"]  # recomputed: another checkpoint, another fingerprint
    assert lora.fingerprint != before


@pytest.mark.slow  # ~35 s (Ray and a TensorFlow actor): the default suite is at its budget
def test_simulation_trains_logs_checkpoints_and_leaves_a_normal_run(small_vocab, data_dir,
                                                                    classify_run, tmp_path,
                                                                    capsys):  # fmt: skip
    """`simulate` end to end on Flower's simulation engine (3 clients, 2
    rounds, Dirichlet partition, FedProx, DP): per-round TensorBoard and
    metrics.json, epsilon from the accountant, a run directory that
    `evaluate` scores, and a row of `tools/compare_federated.py`'s table."""
    out = tmp_path / "fed"
    extra = ["federated.rounds=2", "federated.fraction=1", "federated.partition=dirichlet",
             "federated.strategy=fedprox", "federated.dp_noise=0.1", "federated.dp_clip=5"]
    settings = tiny_settings(small_vocab, out, *extra)
    args = ["simulate", "--recipe", "sst2_federated", "--out", str(out)]
    for override in settings.overrides:
        args += ["--set", override]
    from fmkeras.federated.command import main

    assert main(args) == 0  # in this process: Ray's actors are processes of their own
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [entry["round"] for entry in history] == [1, 2]
    assert all(len(entry["clients"]) == 3 for entry in history)
    assert 0 < history[0]["epsilon"] < history[1]["epsilon"] == metrics["federated"]["epsilon"]
    per_client = metrics["federated"]["bytes_per_client_each_way"]
    assert history[0]["bytes"] == 2 * 3 * per_client
    assert [step for step, _ in scalars(out / "logs" / "validation", "accuracy")] == [1, 2]
    assert len(scalars(out / "logs" / "train", "bytes_per_round")) == 2
    assert not (out / "clients").exists()
    dev = tmp_path / "dev.tsv"  # the rows the server validated on (data.max_lines=300)
    dev.write_text("".join((data_dir / "sst2" / "dev.tsv").read_text().splitlines(True)[:301]))
    from fmkeras.evaluate import main as evaluate

    assert evaluate([str(out), "--data", str(dev)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-4)

    # Against a centralised run validated at step 6: round 2 at 3 steps per round.
    table = run_tool("compare_federated", out, classify_run, "--steps-per-round", 3)
    assert table.returncode == 0, table.stderr
    header, _, federated, centralised = table.stdout.splitlines()
    assert header == "| run | round 1 | round 2 | final | MiB per round | ε |"
    rounds = " | ".join(f"{entry['validation']['accuracy']:.1%}" for entry in history)
    mib = metrics["federated"]["bytes_total"] / metrics["federated"]["rounds"] / 2**20
    assert federated == (f"| fed | {rounds} | **{metrics['accuracy']:.1%}** | {mib:,.1f} | "
                         f"{metrics['federated']['epsilon']:,.1f} |")  # fmt: skip
    [(step, accuracy)] = scalars(classify_run / "logs" / "validation", "accuracy")
    final = json.loads((classify_run / "metrics.json").read_text())["accuracy"]
    assert step == 6 and centralised == f"| sst2 |  | {accuracy:.1%} | **{final:.1%}** | 0.0 | — |"


def start(args, log, cwd):
    return subprocess.Popen([sys.executable, "-m", "fmkeras.federated", *args], cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process, sig=signal.SIGKILL):
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


def wait_for_round(state, number, seconds=600):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["round"] >= number:
            return
        time.sleep(1)
    raise AssertionError(f"round {number} did not finish within {seconds} s")


@pytest.mark.slow
def test_real_processes_survive_a_killed_client_and_a_killed_server(small_vocab, data_dir,
                                                                    tmp_path):  # fmt: skip
    """Server and three client processes over loopback (Flower's deployment
    engine): a client killed mid-round leaves the round to the other two; a
    server killed after a round resumes from its checkpoint (here allowed to
    go on with two clients: federated.min_clients may change on resume)."""
    out, port = tmp_path / "fed", 8700 + os.getpid() % 200
    settings = tiny_settings(small_vocab, out, "federated.rounds=4", "federated.fraction=1",
                             "federated.min_clients=3")  # fmt: skip
    recipe = ["--recipe", "sst2_federated", "--out", str(out)]
    for override in settings.overrides:
        recipe += ["--set", override]
    server_args = ["server", *recipe, "--address", f"127.0.0.1:{port}"]
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in  # noqa: SIM115
            ("server", "server2", "client0", "client1", "client2")}  # fmt: skip
    server = start(server_args, logs["server"], tmp_path)
    clients = [start(["client", "--partition", str(i), "--server", f"127.0.0.1:{port}",
                      "--workdir", str(tmp_path / f"client{i}"), "--port", str(port + 10 + i)],
                     logs[f"client{i}"], tmp_path) for i in range(3)]  # fmt: skip
    state = out / "federated" / "state.json"
    try:
        wait_for_round(state, 1)
        kill_group(clients[2])  # round 2 was just sent to all three: one reply will not come
        wait_for_round(state, 2)
        kill_group(server)  # round 3 waits for three clients; the server dies
        server = start([*server_args, "--set", "federated.min_clients=2"], logs["server2"],
                       tmp_path)  # fmt: skip
        assert server.wait(timeout=900) == 0, (tmp_path / "server2.log").read_text()[-3000:]
    finally:
        for process in (server, *clients):
            kill_group(process, signal.SIGTERM)
    assert "resuming after round 2 of 4" in (tmp_path / "server2.log").read_text()
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [entry["round"] for entry in history] == [1, 2, 3, 4]
    assert [len(entry["clients"]) for entry in history] == [3, 2, 2, 2]
    assert {c["partition"] for entry in history[1:] for c in entry["clients"]} == {0, 1}
