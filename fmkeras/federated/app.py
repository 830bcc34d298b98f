"""The Flower apps: one `ClientApp` and one `ServerApp` (Flower's Message
API), run alike by Flower's simulation engine (`simulate`) and by its
deployment engine (`server` and `client` processes over the network).

What a run is made of travels as settings (`Settings`): the recipe, the
`--set` overrides, the server's run directory and data directory. The
simulation passes them in Python; the deployment engine passes them as the
run config of `flwr run` (the server's) and the node config of each
SuperNode (a client's partition, work directory and data directory).
"""

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fmkeras.errors import ConfigError
from fmkeras.federated.learner import Learner
from fmkeras.federated.server import WEIGHT_KEY, FederatedServer
from fmkeras.federated.settings import Settings


def to_record(arrays):
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record):
    return {name: array.numpy() for name, array in record.items()}


# One Learner per process (a simulation actor serves many clients in turn): the
# model is built and its train function traced once.
_learners = {}


def client_learner(settings, context):
    """This process's client `Learner` for `settings`, and the partition of the
    node running it (`partition-id` in the node config)."""
    node = context.node_config
    partition = int(node["partition-id"])
    workdir = node.get("workdir") or str(Path(settings.out) / "clients" / f"process-{os.getpid()}")
    data_dir = node.get("data-dir") or settings.data_dir
    key = (json.dumps(dataclasses.asdict(settings), sort_keys=True), workdir, data_dir)
    if key not in _learners:
        _learners.clear()
        _learners[key] = Learner(settings.config(), workdir, data_dir,
                                 log=lambda message: print(f"[fmkeras client {partition}] "
                                                           f"{message}", flush=True))  # fmt: skip
    learner = _learners[key]
    count = len(learner.partitions)
    if not 0 <= partition < count:
        raise ConfigError(f"partition {partition} does not exist: federated.clients={count} "
                          f"gives partitions 0..{count - 1}; start the client with --partition "
                          "in that range")  # fmt: skip
    return learner, partition


def make_client_app(settings=None):
    """The ClientApp: each train message sets the global weights, trains one
    round on the node's partition and replies with the new weights."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context):
        learner, partition = client_learner(
            settings or Settings.from_run_config(context.run_config), context
        )
        config = message.content["config"]
        if config["fingerprint"] != learner.fingerprint:
            raise ConfigError("this client's vocabulary, labels or frozen weights differ from "
                              "the server's: both must run the same recipe and model.init")
        arrays = from_record(message.content["arrays"])
        learner.set_arrays(arrays)
        started = time.time()
        loss, examples = learner.train(partition, int(config["server-round"]),
                                       float(config.get("proximal-mu", 0.0)))  # fmt: skip
        metrics = MetricRecord({
            "num-examples": len(learner.partitions[partition]),
            WEIGHT_KEY: 1,
            "train-loss": loss,
            "examples-seen": examples,
            "partition": partition,
            "seconds": time.time() - started,
        })  # fmt: skip
        content = RecordDict({"arrays": to_record(learner.get_arrays()), "metrics": metrics})
        return Message(content=content, reply_to=message)

    return app


def make_server_app(settings=None):
    """The ServerApp: builds the global model, runs the configured strategy
    for the remaining rounds (resuming from the run directory's federated
    checkpoint), evaluates and checkpoints after every round and saves the
    final model as a normal run directory."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context):
        FederatedServer(settings or Settings.from_run_config(context.run_config)).run(grid)

    return app


# What the deployment engine loads (`fmkeras/federated/flower_app/pyproject.toml`).
client_app = make_client_app()
server_app = make_server_app()
