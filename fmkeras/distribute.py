"""Choosing a `tf.distribute` strategy from `distribute.*` settings.

    auto        TPU if one is attached, else Mirrored over all GPUs (or over
                `cpu_devices` logical CPUs), else the default one-device strategy
    one_device  the default strategy (first GPU, else CPU)
    mirrored    MirroredStrategy over GPUs, or over `cpu_devices` logical CPUs
    multi_worker MultiWorkerMirroredStrategy (needs TF_CONFIG)
    tpu         TPUStrategy via TPUClusterResolver(distribute.tpu)

Build and compile the model inside `strategy.scope()`. Batch sizes in
recipes are global: each replica gets `batch_size / num_replicas`.
"""

import json
import os
import threading

import tensorflow as tf

from fmkeras.errors import ConfigError
from fmkeras.workarounds import patch_multi_worker_fit

TPU_CONNECT_TIMEOUT_SECONDS = 60
_multi_worker = None


def configure_cpu_devices(count):
    """Splits the CPU into `count` logical devices; call before TensorFlow runs an op."""
    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * count
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as error:
        raise ConfigError(
            f"distribute.cpu_devices={count} must be set before TensorFlow starts "
            f"running ops ({error})"
        ) from None


def _connect_tpu(name):
    if not name:
        raise ConfigError("distribute.strategy=tpu needs distribute.tpu (a TPU name, or 'local')")
    outcome = {}

    def connect():
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            outcome["resolver"] = resolver
        except (ValueError, IndexError, tf.errors.OpError) as error:
            outcome["error"] = error

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(TPU_CONNECT_TIMEOUT_SECONDS)
    if "resolver" in outcome:
        return tf.distribute.TPUStrategy(outcome["resolver"])
    reason = outcome.get("error", f"no answer within {TPU_CONNECT_TIMEOUT_SECONDS} s")
    first_line = str(reason).strip().splitlines()[0]  # TensorFlow appends a kernel dump
    raise ConfigError(f"no TPU reachable as distribute.tpu={name!r}: {first_line}")


def create_strategy(distribute_config):
    """A `tf.distribute.Strategy` for a `DistributeConfig`. For `multi_worker`
    call it before TensorFlow runs any op (one instance per process)."""
    kind = distribute_config.strategy
    # Multi-worker collectives must be configured before anything lists devices.
    if kind == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ConfigError(
                "distribute.strategy=multi_worker needs the TF_CONFIG environment variable "
                "describing the cluster"
            )
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as error:
            raise ConfigError(f"TF_CONFIG is not valid JSON: {error}") from None
        patch_multi_worker_fit()  # keras#20585 and the scalar-reduction error
        global _multi_worker
        if _multi_worker is None:  # its collectives can be configured once per process
            _multi_worker = tf.distribute.MultiWorkerMirroredStrategy()
        return _multi_worker
    gpus = tf.config.list_logical_devices("GPU")
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if kind == "auto":
        if tf.config.list_logical_devices("TPU"):
            kind, distribute_config.tpu = "tpu", distribute_config.tpu or "local"
        elif len(gpus) > 1 or (not gpus and len(cpus) > 1):
            kind = "mirrored"
        else:
            kind = "one_device"
    if kind == "one_device":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy([d.name for d in gpus] or cpus)
    if kind == "tpu":
        return _connect_tpu(distribute_config.tpu)
    raise ConfigError(f"unknown distribute.strategy {kind!r}")


def worker_role():
    """`(index, is_chief)` of this process in `TF_CONFIG`'s cluster: the chief is
    the `chief` task, or worker 0 when the cluster has none; `(0, True)` without
    `TF_CONFIG`."""
    if "TF_CONFIG" not in os.environ:
        return 0, True
    try:
        tf_config = json.loads(os.environ["TF_CONFIG"])
        task_type, index = tf_config["task"]["type"], int(tf_config["task"]["index"])
        has_chief = bool(tf_config["cluster"].get("chief"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"TF_CONFIG does not describe this task: {error!r}") from None
    is_chief = task_type == "chief" or (task_type == "worker" and index == 0 and not has_chief)
    return index, is_chief


def is_multi_worker(strategy):
    """Whether `strategy` spans several worker processes."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def smallest_across_workers(strategy, value):
    """The smallest of every worker's int `value` (a collective: all workers call
    it); `value` itself for single-process strategies."""
    if not is_multi_worker(strategy):
        return value
    local = strategy.experimental_distribute_values_from_function(
        lambda _: tf.constant([value], tf.int64)
    )
    return int(tf.reduce_min(strategy.gather(local, axis=0)))


def accelerators_in_use(strategy):
    """How many devices of their own the replicas run on, for MFU: every GPU or
    TPU replica counts; CPU replicas of one process share one CPU (logical
    devices), so a CPU process counts once (and each multi-worker process once)."""
    if tf.config.list_logical_devices("TPU") or tf.config.list_logical_devices("GPU"):
        return strategy.num_replicas_in_sync
    if is_multi_worker(strategy):
        return strategy.num_replicas_in_sync // max(1, len(strategy.extended.worker_devices))
    return 1


def is_single_device(strategy):
    return strategy.num_replicas_in_sync == 1 and not isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy | tf.distribute.TPUStrategy
    )
