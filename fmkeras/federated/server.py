"""The server side of a federated run: Flower's strategy (FedAvg, FedProx or
FedAdam, optionally wrapped in Flower's central differential privacy with an
RDP accountant), the global model evaluated after every round, TensorBoard,
a checkpoint per round that a restarted server resumes from, and the final
model saved as a normal run directory (`evaluate`, `predict` and `export`
work on it)."""

import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
)

from fmkeras.errors import ConfigError
from fmkeras.federated.learner import Learner, payload_bytes
from fmkeras.training.checkpoints import atomic_path, write_json
from fmkeras.training.run_dir import RunDir

WEIGHT_KEY = "uniform-weight"  # every client's update weighs the same (Flower's DP accounting)
FEDOPT_STATE = ("current_arrays", "m_t", "v_t")  # FedAdam's server-optimizer state
# Keys a resumed federated run may change (besides the trainer's resumable ones).
RESUMABLE_FEDERATED = ("federated.rounds", "federated.round_timeout", "federated.min_clients")


def state_path(root):
    """Where a federated run directory records its newest finished round."""
    return Path(root) / "federated" / "state.json"


def log(message):
    print(f"[fmkeras server {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sampled_clients(federated):
    """How many clients a round trains when all are connected (Flower samples
    `fraction` of the connected ones, at least `min_clients`)."""
    return min(federated.clients, max(int(federated.clients * federated.fraction),
                                      federated.min_clients))  # fmt: skip


def make_strategy(federated, evaluate_train_metrics):
    """Flower's strategy for `federated.strategy`, wrapped in server-side
    fixed-clipping DP with an RDP accountant when `federated.dp_noise` > 0."""
    common = dict(
        fraction_train=federated.fraction,
        fraction_evaluate=0.0,  # the server evaluates the global model itself
        # DP accounting needs the same number of clients every round; otherwise a
        # round goes on with the clients still connected (at least min_clients)
        min_train_nodes=sampled_clients(federated) if federated.dp_noise > 0
        else federated.min_clients,
        min_available_nodes=federated.min_clients,
        weighted_by_key=WEIGHT_KEY if federated.dp_noise > 0 else "num-examples",
        train_metrics_aggr_fn=evaluate_train_metrics,
    )
    if federated.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=federated.proximal_mu)
    elif federated.strategy == "fedadam":
        strategy = FedAdam(**common, eta=federated.server_learning_rate)
    else:
        strategy = FedAvg(**common)
    if federated.dp_noise <= 0:
        return strategy
    if federated.strategy == "fedadam":
        raise ConfigError("federated.dp_noise > 0 needs federated.strategy fedavg or fedprox "
                          "(Flower accounts privacy for FedAvg's aggregation only)")  # fmt: skip
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    accountant = RdpAccountant(PrivacyConfig(
        target_delta=federated.dp_delta,
        population_size=federated.clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    ))  # fmt: skip
    return DifferentialPrivacyServerSideFixedClipping(
        strategy, federated.dp_noise, federated.dp_clip, sampled_clients(federated),
        accountant=accountant,
    )  # fmt: skip


class FederatedServer:
    """One federated run's server: `run(grid)` trains the remaining rounds.

    Files in the run directory `settings.out` besides a normal classify/tag
    run's: `federated/global.npz` and `federated/state.json` (the newest
    round's global weights, strategy state and history: what a restarted
    server resumes from).
    """

    def __init__(self, settings):
        self.settings = settings
        self.config = settings.config()
        self.root = Path(settings.out)
        self.state_file = state_path(self.root)
        self.weights_file = self.root / "federated" / "global.npz"
        self.state = self.read_state()
        self.learner = Learner(self.config, self.root, settings.data_dir, log=log)
        for line in self.learner.partition_summary:
            log(line)
        self.writers = {name: tf.summary.create_file_writer(str(self.root / "logs" / name))
                        for name in ("train", "validation")}  # fmt: skip
        self.round_clients = []  # the current round's client metrics

    def read_state(self):
        """The checkpoint's state (round and history), after `RunDir.prepare` has
        refused a configuration that differs from the checkpoint's."""
        RunDir(self.root).prepare(self.config, resumable=RESUMABLE_FEDERATED,
                                  resuming=self.state_file.is_file())  # fmt: skip
        if not self.state_file.is_file():
            return {"round": 0, "history": []}
        return json.loads(self.state_file.read_text(encoding="utf-8"))

    def run(self, grid):
        from fmkeras.federated.app import to_record

        federated = self.config.federated
        done = self.state["round"]
        self.offset = done
        self.strategy = make_strategy(federated, self.train_metrics)
        self.payload = payload_bytes(self.learner.get_arrays())
        if done:
            saved = dict(np.load(self.weights_file))
            self.learner.set_arrays({k[len("global/"):]: v for k, v in saved.items()
                                     if k.startswith("global/")})  # fmt: skip
            self.restore_strategy(saved)
            log(f"resuming after round {done} of {federated.rounds} from {self.weights_file}")
        remaining = federated.rounds - done
        log(f"{federated.strategy} on {federated.clients} clients ({federated.partition} "
            f"partition), {sampled_clients(federated)} per round, exchange {federated.exchange}: "
            f"{self.payload / 2**20:.2f} MiB each way per client; rounds {done + 1}.."
            f"{federated.rounds}")  # fmt: skip
        if remaining > 0:  # after_round leaves the newest global weights in the learner
            self.strategy.start(
                grid=grid,
                initial_arrays=to_record(self.learner.get_arrays()),
                num_rounds=remaining,
                timeout=federated.round_timeout,
                train_config=ConfigRecord({"fingerprint": self.learner.fingerprint}),
                evaluate_fn=self.after_round,
            )
        self.finish()

    def train_metrics(self, records, weighting_key):
        """Flower's train-metrics aggregation: keeps each client's metrics for
        the round's logs and returns their example-weighted means."""
        self.round_clients = [dict(next(iter(r.metric_records.values()))) for r in records]
        weights = np.array([c[weighting_key] for c in self.round_clients], np.float64)
        mean = {key: float(np.average([c[key] for c in self.round_clients], weights=weights))
                for key in ("train-loss", "seconds")}  # fmt: skip
        return MetricRecord({**mean, "clients": len(self.round_clients)})

    def after_round(self, server_round, record):
        """Flower's `evaluate_fn`: validation of the global model, logs, checkpoint."""
        from fmkeras.federated.app import from_record

        number = self.offset + server_round
        arrays = from_record(record)
        self.learner.set_arrays(arrays)
        validation = self.learner.evaluate()
        scalars = {k: float(v) for k, v in validation.items() if isinstance(v, int | float)}
        if server_round == 0:  # the starting point (or the checkpoint resumed from)
            log(f"round {number}: validation {headline(scalars)}")
            return MetricRecord(scalars)
        clients = self.round_clients
        entry = {
            "round": number,
            "validation": scalars,
            "clients": [{"partition": int(c["partition"]), "loss": c["train-loss"],
                         "examples": int(c["examples-seen"])} for c in clients],  # fmt: skip
            # each client received the global weights and sent back the same shapes
            "bytes": 2 * self.payload * len(clients),
        }
        spent = getattr(self.strategy, "privacy_spent", lambda: None)()
        if spent is not None:
            entry["epsilon"] = spent.epsilon
        self.state["history"].append(entry)
        self.state["round"] = number
        self.write_logs(entry)
        self.save_checkpoint(arrays)
        if not clients:
            log(f"round {number}: no client update arrived (see the errors above); the global "
                "model is unchanged")  # fmt: skip
        else:
            log(f"round {number}: {len(clients)} clients, mean loss "
                f"{np.mean([c['loss'] for c in entry['clients']]):.4f}, "
                f"{entry['bytes'] / 2**20:.2f} MiB; validation {headline(scalars)}"
                + (f"; epsilon {entry['epsilon']:.2f}" if "epsilon" in entry else ""))  # fmt: skip
        self.round_clients = []
        return MetricRecord(scalars)

    def write_logs(self, entry):
        step = entry["round"]
        with self.writers["validation"].as_default():
            for name, value in entry["validation"].items():
                tf.summary.scalar(name, value, step=step)
        with self.writers["train"].as_default():
            for client in entry["clients"]:
                tf.summary.scalar(f"client_loss/{client['partition']}", client["loss"], step=step)
            if entry["clients"]:
                tf.summary.scalar("loss", np.mean([c["loss"] for c in entry["clients"]]), step=step)
            tf.summary.scalar("bytes_per_round", entry["bytes"], step=step)
            tf.summary.scalar("bytes_total", sum(e["bytes"] for e in self.state["history"]),
                              step=step)  # fmt: skip
            if "epsilon" in entry:
                tf.summary.scalar("epsilon", entry["epsilon"], step=step)
        for writer in self.writers.values():
            writer.flush()

    def save_checkpoint(self, arrays):
        """The round's global weights and strategy state, then state.json (which
        names the round): a kill between the two resumes from the round before."""
        saved = {f"global/{k}": v for k, v in arrays.items()}
        inner = getattr(self.strategy, "strategy", self.strategy)  # under the DP wrapper
        for name in FEDOPT_STATE:
            for key, value in (getattr(inner, name, None) or {}).items():
                saved[f"{name}/{key}"] = value
        self.weights_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.weights_file) as temporary:  # a .npz path: savez adds no suffix
            np.savez(temporary, **saved)
        write_json(self.state_file, self.state)

    def restore_strategy(self, saved):
        inner = getattr(self.strategy, "strategy", self.strategy)
        for name in FEDOPT_STATE:
            values = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + "/")}
            if values and hasattr(inner, name):
                setattr(inner, name, values)

    def finish(self):
        """The final global model as a normal run directory, and metrics.json."""
        learner, history = self.learner, self.state["history"]
        task = learner.task
        validation = learner.evaluate()
        task.save(learner.model)
        write_extra, _ = task.backup_hooks(learner.model)
        if write_extra is not None:  # LoRA adapters beside model.keras, as in other runs
            write_extra(self.root)
        federated = self.config.federated
        metrics = {
            **task.final_metrics(learner.model, validation),
            "task": self.config.task,
            "federated": {
                "rounds": self.state["round"],
                "clients": federated.clients,
                "strategy": federated.strategy,
                "partition": federated.partition,
                "exchange": federated.exchange,
                "bytes_per_client_each_way": self.payload,
                "bytes_total": sum(entry["bytes"] for entry in history),
                "examples_seen": sum(c["examples"] for e in history for c in e["clients"]),
                **({"epsilon": history[-1]["epsilon"], "delta": federated.dp_delta}
                   if history and "epsilon" in history[-1] else {}),  # fmt: skip
            },
            "history": history,
            "precision": learner.precision,
        }
        write_json(self.root / "metrics.json", metrics)
        log(f"done: validation {headline(validation)}; run directory {self.root} "
            f"(evaluate, predict and export work on it); TensorBoard: tensorboard --logdir "
            f"{self.root / 'logs'}")  # fmt: skip


def headline(metrics):
    """The main validation numbers in one short phrase."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                     if isinstance(v, float) and k in ("loss", "accuracy", "f1", "macro_f1"))
