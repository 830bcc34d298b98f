"""One process's side of federated training: the recipe's classify or tag
task built once (vocabulary, labels, encoder + head, compiled), weights in
and out as named numpy arrays, local training on one client's partition,
and validation of the global model.

Clients and the server build the same `Learner` from the same recipe; the
server only evaluates and saves, clients only train. A process keeps one
Learner for all the clients and rounds it serves (a simulation actor trains
many clients in turn), so the model is built and traced once.
"""

import dataclasses
import functools
import hashlib

import keras
import numpy as np
import tensorflow as tf

from fmkeras import distribute
from fmkeras.errors import ConfigError
from fmkeras.federated.partition import describe, partition_indices
from fmkeras.tasks.registry import get_task
from fmkeras.tasks.spec import check_run
from fmkeras.text.labelled import IGNORE
from fmkeras.training import trainer
from fmkeras.training.driver import dtype_policy
from fmkeras.training.optimizer import create_optimizer
from fmkeras.training.precision import resolve_precision
from fmkeras.training.run_dir import RunDir


def payload_bytes(arrays):
    """Bytes of a `{name: ndarray}` payload (one direction of one client's exchange)."""
    return int(sum(array.nbytes for array in arrays.values()))


def partition_groups(labels):
    """The group each example is partitioned by: its class, or for tagging its
    most frequent tag other than `O` (id 0), `O` if it has none."""
    if not isinstance(labels, tf.RaggedTensor):
        return np.asarray(labels)
    groups = []
    for row in labels.to_list():
        tags = [tag for tag in row if tag not in (IGNORE, 0)]
        groups.append(max(set(tags), key=tags.count) if tags else 0)
    return np.asarray(groups)


def gather(ids, indices):
    """Rows `indices` of ragged token ids (or of each of a `(ids, segments)` pair)."""
    if isinstance(ids, tuple):
        return tuple(tf.gather(part, indices) for part in ids)
    return tf.gather(ids, indices)


class Learner:
    """The recipe's model in this process, with the training file split into
    `federated.clients` partitions.

    Args:
        config: a `RunConfig` of task `classify` or `tag` with a `federated` section.
        workdir: a run directory for the task's own files (vocabulary); the
            server's is the final run directory.
        data_dir: the data directory (else `data.dir`, then `$FMKERAS_DATA_DIR`).
        log: a print function.
    """

    def __init__(self, config, workdir, data_dir=None, log=print):
        self.config = config
        federated = config.federated
        files = check_run(config, data_dir, log)
        task_class = get_task(config.task)
        run = RunDir(workdir)
        run.prepare(config)
        strategy = distribute.create_strategy(config.distribute)
        self.precision, reason = resolve_precision(config.train.precision, strategy)
        log(f"precision {self.precision}: {reason}")
        self.task = task = task_class(config, run, files, log)
        task.read_data()
        keras.utils.set_random_seed(config.train.seed)  # the same initial model everywhere
        with dtype_policy(self.precision), strategy.scope():
            self.model = task.build_model()
            self.optimizer = create_optimizer(self.local_training(config.train),
                                              task.learning_rate_factors(self.model))  # fmt: skip
            trainer.compile_model(self.model, strategy, config.train, log,
                                  optimizer=self.optimizer,
                                  **task.compile_args(self.model))  # fmt: skip
        self.exchanged = self.exchanged_variables(federated.exchange)
        groups = partition_groups(task.train_labels)
        self.partitions = partition_indices(groups, federated.clients, federated.partition,
                                            federated.alpha, config.train.seed)  # fmt: skip
        self.partition_summary = describe(self.partitions, groups)
        self.optimizer.pull_towards(self.model.trainable_weights, 0.0)  # traced with FedProx's term

    @staticmethod
    def local_training(train):
        """The clients' optimizer settings: `train.learning_rate` held constant
        within a round (each round starts from fresh optimizer state)."""
        return dataclasses.replace(train, warmup_steps=0, decay="constant")

    def exchanged_variables(self, exchange):
        """`{path: variable}` of what travels: every weight, or (LoRA) the
        trainable ones, i.e. the adapters and the head."""
        if exchange == "lora":  # config validation made sure LoRA is on
            variables = self.model.trainable_weights
        else:
            variables = self.model.weights
        return {variable.path: variable for variable in variables}

    @functools.cached_property
    def fingerprint(self):
        """A digest of what every party must share besides the exchanged weights:
        labels, vocabulary and (LoRA exchange) the frozen weights."""
        digest = hashlib.sha256()
        digest.update(repr(self.task.names).encode())
        digest.update(self.task.run.vocab.read_bytes())
        for variable in self.model.weights:
            if variable.path not in self.exchanged:
                digest.update(variable.path.encode())
                digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
        return digest.hexdigest()[:16]

    def get_arrays(self):
        """`{path: ndarray}` of the exchanged weights."""
        return {path: variable.numpy()
                for path, variable in self.exchanged.items()}  # fmt: skip

    def set_arrays(self, arrays):
        """Loads `{path: ndarray}` into the exchanged weights; a payload from a
        different model is a one-line error."""
        if arrays.keys() != self.exchanged.keys():
            missing = sorted(self.exchanged.keys() - arrays.keys())[:3]
            extra = sorted(arrays.keys() - self.exchanged.keys())[:3]
            raise ConfigError(f"the received weights do not fit this model (missing {missing}, "
                              f"unexpected {extra}): server and clients must run the same "
                              "recipe")  # fmt: skip
        for path, variable in self.exchanged.items():
            if tuple(arrays[path].shape) != tuple(variable.shape):
                raise ConfigError(f"the received {path} has shape {arrays[path].shape}, this "
                                  f"model's {tuple(variable.shape)}: server and clients must run "
                                  "the same recipe")  # fmt: skip
            variable.assign(arrays[path])

    def local_steps(self, client):
        """Steps one round trains `client` for: `federated.local_steps`, or
        `federated.local_epochs` passes over its partition."""
        federated, batch = self.config.federated, self.config.train.batch_size
        if federated.local_epochs is None:
            return federated.local_steps
        return max(1, round(federated.local_epochs * len(self.partitions[client]) / batch))

    def train(self, client, server_round, proximal_mu=0.0):
        """Trains from the current weights on `client`'s partition for one round;
        returns `(mean training loss, examples seen)`.

        `proximal_mu` > 0 adds FedProx's term mu/2 |w - w_start|^2 to the loss
        (its gradient, through the optimizer), w_start being this round's
        global weights."""
        task, indices = self.task, self.partitions[client]
        steps = self.local_steps(client)
        for variable in self.optimizer.variables:  # fresh optimizer state each round
            variable.assign(tf.zeros_like(variable))
        self.optimizer.pull_towards(self.model.trainable_weights, proximal_mu)
        seed = self.config.train.seed + 1000 * server_round + client
        data = task.batches(gather(task.train_ids, indices), tf.gather(task.train_labels, indices),
                            shuffle=True, seed=seed, repeat=True)  # fmt: skip
        with dtype_policy(self.precision):
            history = self.model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0,
                                     shuffle=False)  # fmt: skip
        return float(history.history["loss"][-1]), steps * self.config.train.batch_size

    def evaluate(self):
        """The task's validation metrics of the current weights."""
        return self.task.evaluate(self.model)
