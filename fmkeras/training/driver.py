"""The one driver that trains any registered task: strategy -> build ->
compile -> resume -> fit -> final evaluation -> save.

Precision and compilation are decided here, once, for every task.
"""

import contextlib
import shutil
import time

import keras

from fmkeras import distribute
from fmkeras.config import flat_config, profile_range
from fmkeras.errors import ConfigError
from fmkeras.layers.utils import count_weights
from fmkeras.tasks.registry import get_task
from fmkeras.tasks.spec import check_run
from fmkeras.training import trainer
from fmkeras.training.callbacks import Evaluator, Profiler, TrainingLogger
from fmkeras.training.checkpoints import BestKeeper, restore_backup, write_json
from fmkeras.training.optimizer import create_optimizer
from fmkeras.training.precision import resolve_precision
from fmkeras.training.run_dir import RunDir


@contextlib.contextmanager
def dtype_policy(name):
    """Keras's global dtype policy set to `name` while the block runs."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def gradual_pruning(model, optimizer, config, log):
    """`sparsity.target > 0`: the `GradualPruning` callback, its masks in the optimizer."""
    if not config.sparsity.target:
        return None
    from fmkeras.compress.sparsity import GradualPruning

    pruning = GradualPruning(model, optimizer, config.sparsity, config.train.steps, log)
    if not pruning.kernels:
        raise ConfigError(f"sparsity.target: the {config.task} model has no Transformer block "
                          "kernels to prune")  # fmt: skip
    log(pruning.describe())
    return pruning


def train(config, out, data_dir_option=None, log=print):
    """Trains `config.task` into the run directory `out`; returns `(RunDir, metrics)`."""
    files = check_run(config, data_dir_option, log)
    task_class = get_task(config.task)
    distribute.configure_cpu_devices(config.distribute.cpu_devices)  # before any TF op
    # The strategy (a TPU or cluster connection) comes before any data work, so an
    # unreachable device fails within seconds.
    strategy = distribute.create_strategy(config.distribute)
    index, is_chief = distribute.worker_role() if config.distribute.strategy == "multi_worker" \
        else (0, True)  # fmt: skip
    # Only the chief writes the run directory (TensorBoard, model, metrics); other
    # workers keep their own backups (to resume) and delete them when done.
    chief_run = RunDir(out)
    run = chief_run if is_chief else chief_run.worker(index)
    run.prepare(config)
    log(f"{config.task}: run directory {run.root}")
    precision, reason = resolve_precision(config.train.precision, strategy)
    log(f"precision {precision}: {reason}")
    task = task_class(config, run, files, log)
    with dtype_policy(precision):
        metrics = _train(task, strategy, log)
    metrics["precision"] = precision
    if not is_chief:
        shutil.rmtree(run.root)
        if not any(run.root.parent.iterdir()):
            run.root.parent.rmdir()
        log(f"worker {index}: finished; the chief wrote the run directory {out}")
        return chief_run, metrics
    write_json(run.metrics, metrics)
    return run, metrics


def _train(task, strategy, log):
    config, run, train = task.config, task.run, task.config.train
    task.read_data()
    keras.utils.set_random_seed(train.seed)  # initialisation (data order and masks use it too)
    with strategy.scope():
        model = task.build_model()
        optimizer = create_optimizer(train, task.learning_rate_factors(model))
        gradient_norm = keras.metrics.Mean(name="gradient_norm")  # read by the logger
        optimizer.measure_gradient_norm(gradient_norm)
        xla = trainer.compile_model(model, strategy, train, log, optimizer=optimizer,
                                    **task.compile_args(model))  # fmt: skip
        pruning = gradual_pruning(model, optimizer, config, log)
    write_extra, after_restore = task.backup_hooks(model)
    start_step = trainer.resume(model, run, train, log, after_restore=after_restore)
    logger = TrainingLogger(run.logs, train.log_every, train.steps, print_fn=log,
                            gradient_norm=gradient_norm, **task.logger_settings(model))  # fmt: skip
    logger.write_run_info(flat_config(config))
    trainable = count_weights(model.trainable_weights)
    log(f"model: {model.count_params():,} parameters ({trainable:,} trainable); "
        f"{strategy.num_replicas_in_sync} replica(s), XLA {'on' if xla else 'off'}; steps "
        f"{start_step}..{train.steps}")  # fmt: skip
    cadence = trainer.describe_cadence(train)
    if cadence:
        log(cadence)
    keeper = None
    if train.keep_best:
        # A pruned run keeps a model only once its sparsity has reached the target.
        from_step = pruning.end_step if pruning else 0
        keeper = BestKeeper(train.keep_best, run.best, write_extra, from_step)
        if from_step:
            log(f"keep_best: {train.keep_best} from step {from_step} on, where sparsity.target "
                "is reached")
    if train.ema:
        log(f"train.ema={train.ema:g}: validation, keep_best and the saved model use the "
            f"weights' moving average (about the last {1 / (1 - train.ema):.0f} steps)")
    evaluator = Evaluator(task.evaluate, logger, train.eval_every, train.steps,
                          on_validation=keeper.update if keeper else None,
                          weights=optimizer.averaged_weights if train.ema else None)  # fmt: skip
    callbacks = [logger, evaluator] + ([pruning] if pruning else [])
    if train.profile_steps:
        start, end = profile_range(train)
        callbacks.append(Profiler(run.logs / "profile", start, end))
        log(f"profiling steps {start}..{end} into {run.logs / 'profile'} (TensorBoard: Profile)")
    started = time.time()
    trainer.fit(model, task.train_dataset, train, run, start_step, callbacks,
                write_extra=write_extra)  # fmt: skip
    if train.ema:
        optimizer.use_averaged_weights()
    validation = task.evaluate(model)
    logger.write_validation(train.steps, validation)
    best = {}
    if keeper:
        keeper.update(model, train.steps, validation)
        if keeper.step != train.steps:  # an earlier validation was better: save that model
            restore_backup(model, run.best)
            if after_restore is not None:
                after_restore(run.best)
            validation = task.evaluate(model)
        log(f"keeping step {keeper.step}: best validation {keeper.metric} {keeper.value:.4f}")
        best = {"best_step": keeper.step, "best_metric": keeper.metric}
    task.save(model)
    if write_extra is not None:  # e.g. LoRA adapters beside model.keras, as in backups
        write_extra(run.root)
    extra = {"sparsity": pruning.measured()} if pruning else {}
    return {
        **task.final_metrics(model, validation),
        **extra,
        "task": config.task,
        "steps": train.steps,
        "resumed_from_step": start_step,
        "train_seconds_this_attempt": time.time() - started,
        "replicas": strategy.num_replicas_in_sync,
        "jit_compile": xla,
        **best,
        **logger.summary(),
    }
