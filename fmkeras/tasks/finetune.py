"""What classification and tagging share: the starting encoder and its
vocabulary, LoRA, compile, the periodic evaluator and the final save."""

import dataclasses
import json
import time

import keras
import numpy as np

from fmkeras import config as config_lib
from fmkeras import distribute
from fmkeras.errors import ConfigError
from fmkeras.models import Encoder, encoder_kwargs
from fmkeras.models.starting_point import load_starting_point
from fmkeras.tasks.pretrain import prepare_vocabulary
from fmkeras.text.wordpiece import WordPieceTokenizer, write_vocabulary
from fmkeras.training import lora, trainer
from fmkeras.training.callbacks import TrainingLogger
from fmkeras.training.checkpoints import save_model, write_json
from fmkeras.training.optimizer import create_optimizer
from fmkeras.training.run_dir import RunDir

TASK_FILE = "task.json"  # what inference needs besides model.keras and vocab.txt


def starting_encoder(config, run: RunDir, train_texts, data_dir, origin, log):
    """`(encoder, tokenizer, description)` for `model.init`; call inside the strategy scope."""
    model = config.model
    if model.init == "random":
        tokenizer = prepare_vocabulary(config, run, train_texts, data_dir, origin, log)
        try:
            encoder = Encoder(**encoder_kwargs(model, tokenizer.vocabulary_size), name="encoder")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return encoder, tokenizer, f"random {model.size} encoder"
    start = load_starting_point(model.init, model.dropout)
    if not run.vocab.is_file():
        write_vocabulary(start.vocabulary, run.vocab)
    tokenizer = WordPieceTokenizer(start.vocabulary, lowercase=start.lowercase)
    return start.encoder, tokenizer, start.description


def report_rows(config, train_rows, valid_rows, names, log):
    data = config.data
    for name, rows in ((data.train_file, train_rows), (data.valid_file, valid_rows)):
        if rows.skipped:
            log(f"{name}: skipped {len(rows.skipped)} bad rows, first: {rows.skipped[0]}")
    log(f"data: {len(train_rows):,} train / {len(valid_rows):,} valid examples, labels {names}")


@dataclasses.dataclass
class Prepared:
    model: keras.Model
    encoder: keras.Model
    tokenizer: WordPieceTokenizer
    start_step: int
    extra_metrics: dict


def prepare(config, run, vocabulary_texts, build_head, data_dir, origin, log, skipped):
    """Starting encoder + `build_head(encoder)`, LoRA, compile (all in the strategy
    scope) and resume from the newest backup."""
    strategy = distribute.create_strategy(config.distribute)
    keras.utils.set_random_seed(config.train.seed)
    with strategy.scope():
        encoder, tokenizer, origin_text = starting_encoder(
            config, run, vocabulary_texts, data_dir, origin, log
        )
        model = build_head(encoder)
        lora_details = compile_task(model, encoder, config, strategy, log)
    log(f"model: {origin_text} + {model.name} head, {model.count_params():,} parameters")
    _, after_restore = lora_backup_hooks(model, encoder, config)
    start_step = trainer.resume(model, run, config.train, log, after_restore=after_restore)
    extra = {"skipped_rows": skipped}
    if lora_details:
        extra["lora"] = lora_details
    return Prepared(model, encoder, tokenizer, start_step, extra)


def compile_task(model, encoder, config, strategy, log):
    """LoRA (if `finetune.method=lora`) and `compile`; returns LoRA details or None."""
    train, finetune = config.train, config.finetune
    details = None
    if finetune.method == "lora":
        targets = config_lib.lora_targets(finetune)
        trainable, total = lora.enable_lora(
            model, encoder, finetune.lora_rank, finetune.lora_alpha, targets
        )
        details = {
            **lora.adapter_settings(finetune, targets),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_share": trainable / total,
        }
        log(
            f"LoRA rank {finetune.lora_rank} alpha {finetune.lora_alpha:g} on "
            f"{', '.join(targets)}: "
            f"{trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})"
        )
    trainer.compile_model(
        model,
        strategy,
        train,
        log,
        optimizer=create_optimizer(train),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return details


def lora_backup_hooks(model, encoder, config):
    """`(write_extra, after_restore)` that keep adapters across backups (None without LoRA)."""
    if config.finetune.method != "lora":
        return None, None
    targets = config_lib.lora_targets(config.finetune)
    settings = lora.adapter_settings(config.finetune, targets)
    return (
        lambda directory: lora.save_adapters(model, lora.adapter_file(directory), settings),
        lambda backup: lora.restore_adapters(model, encoder, targets, lora.adapter_file(backup)),
    )


def collect(model, dataset):
    """`[(logits, label)]` per example of a finite dataset, in dataset order.

    Per-token tasks keep only the positions with weight 1 (first pieces of
    words), so each example's arrays line up with its words.
    """
    examples = []
    for features, label, weight in dataset:
        logits = np.asarray(model.predict_on_batch(features))
        label, keep = np.asarray(label), np.asarray(weight) > 0
        if label.ndim == 1:
            examples += list(zip(logits, label, strict=True))
        else:
            examples += [(o[k], y[k]) for o, y, k in zip(logits, label, keep, strict=True)]
    return examples


def cross_entropy(logits, labels):
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


class Evaluator(keras.callbacks.Callback):
    """Every `eval_every` steps: `evaluate(model)` -> dict with `loss`,
    `accuracy` and task scalars; written to TensorBoard via `logger`."""

    def __init__(self, evaluate, logger, eval_every, steps_per_epoch):
        super().__init__()
        self.evaluate = evaluate
        self.logger = logger
        self.eval_every = eval_every
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        step = (epoch + 1) * self.steps_per_epoch
        if step % self.eval_every < self.steps_per_epoch:
            write_validation(self.logger, step, self.evaluate(self.model))


def write_validation(logger, step, metrics):
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    loss, accuracy = scalars.pop("loss"), scalars.pop("accuracy")
    logger.write_validation(step, loss, accuracy, **scalars)


def train_and_save(ready: Prepared, train_data, evaluate, config, run, info, log):
    """Fits with backups and periodic evaluation, then writes `model.keras`
    (merged if LoRA), `encoder.keras`, adapters, `task.json` and
    `metrics.json`; returns the metrics."""
    train, model, encoder, start_step = config.train, ready.model, ready.encoder, ready.start_step
    logger = TrainingLogger(
        run.logs, train.log_every, examples_per_step=train.batch_size, print_fn=log
    )
    steps_per_epoch = trainer.epoch_length(train.steps, train.checkpoint_every)
    evaluator = Evaluator(evaluate, logger, train.eval_every, steps_per_epoch)
    write_extra, _ = lora_backup_hooks(model, encoder, config)
    started = time.time()
    trainer.fit(
        model, train_data, train, run, start_step, [logger, evaluator], write_extra=write_extra
    )
    metrics = evaluate(model)
    write_validation(logger, train.steps, metrics)
    if write_extra is not None:  # LoRA: the adapters beside model.keras, as in backups
        write_extra(run.root)
    save_model(model, run.model)  # LoRA kernels are merged on save
    save_model(encoder, run.encoder)
    write_json(run.root / TASK_FILE, info)
    metrics.update(
        task=config.task,
        steps=train.steps,
        resumed_from_step=start_step,
        examples_per_second=logger.median_throughput(),
        train_seconds_this_attempt=time.time() - started,
        replicas=model.distribute_strategy.num_replicas_in_sync,
        **ready.extra_metrics,
    )
    write_json(run.metrics, metrics)
    return metrics


def read_task_info(run_root):
    path = run_root / TASK_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_root} is not a finished classify/tag/translate run (no {TASK_FILE}); train "
            "it with python -m fmkeras.train, or run the same command again to finish it"
        )
    return json.loads(path.read_text(encoding="utf-8"))
