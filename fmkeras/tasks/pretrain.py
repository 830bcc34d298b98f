"""Masked-LM pretraining of an `Encoder` with `model.fit`."""

import math
import shutil
import time

import keras

from fmkeras import distribute
from fmkeras.data import read_lines, require_file
from fmkeras.errors import ConfigError, DataError
from fmkeras.flops import parameter_counts, training_flops_per_token
from fmkeras.models import Encoder, MaskedLM, encoder_kwargs
from fmkeras.text.mlm import mlm_dataset, pack_sequences
from fmkeras.text.wordpiece import WordPieceTokenizer, learn_vocabulary, write_vocabulary
from fmkeras.training import trainer
from fmkeras.training.callbacks import TrainingLogger
from fmkeras.training.checkpoints import save_model, write_json
from fmkeras.training.optimizer import create_optimizer
from fmkeras.training.run_dir import RunDir
from fmkeras.training.throughput import measure_matmul_gflops


def prepare_vocabulary(config, run: RunDir, train_lines, data_dir, origin, log):
    """The run's `vocab.txt`: kept from an earlier attempt, copied, or learned."""
    if run.vocab.is_file():
        return WordPieceTokenizer(run.vocab, lowercase=config.data.lowercase)
    if config.data.vocab_file:
        source = require_file(config.data.vocab_file, data_dir, origin)
        tokenizer = WordPieceTokenizer(source, lowercase=config.data.lowercase)
        shutil.copyfile(source, run.vocab)
        return tokenizer
    vocabulary = learn_vocabulary(
        train_lines, config.data.vocab_size, lowercase=config.data.lowercase, log=log
    )
    write_vocabulary(vocabulary, run.vocab)
    return WordPieceTokenizer(vocabulary, lowercase=config.data.lowercase)


def packed(lines, tokenizer, sequence_length, name):
    try:
        return pack_sequences(lines, tokenizer, sequence_length)
    except ValueError as error:
        raise DataError(f"{name}: {error}") from None


def batches(sequences, name, tokenizer, train, predictions, **kwargs):
    """`mlm_dataset` over one file's sequences; too little data names the file."""
    try:
        return mlm_dataset(
            sequences, tokenizer, train.batch_size, predictions, seed=train.seed, **kwargs
        )
    except ValueError as error:
        raise DataError(
            f"{name}: {error}; use more text (data.max_lines) or a smaller "
            f"train.batch_size={train.batch_size}"
        ) from None


def build_masked_lm(config, vocabulary_size):
    if config.model.init != "random":
        raise ConfigError(
            f"model.init={config.model.init!r}: pretraining starts from 'random' "
            "(continued pretraining of a checkpoint is not supported yet)"
        )
    try:
        return MaskedLM(Encoder(**encoder_kwargs(config.model, vocabulary_size)), name="masked_lm")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def run(config, run: RunDir, data_dir, origin, log=print):
    """Trains, evaluates and saves; returns the metrics dict."""
    data, train = config.data, config.train
    train_lines = read_lines(require_file(data.train_file, data_dir, origin), data.max_lines)
    valid_lines = read_lines(require_file(data.valid_file, data_dir, origin), data.max_lines)
    tokenizer = prepare_vocabulary(config, run, train_lines, data_dir, origin, log)
    train_sequences = packed(train_lines, tokenizer, data.sequence_length, data.train_file)
    valid_sequences = packed(valid_lines, tokenizer, data.sequence_length, data.valid_file)
    predictions = data.max_predictions or max(1, round(data.mask_rate * data.sequence_length))
    log(
        f"data: {len(train_sequences):,} train / {len(valid_sequences):,} valid sequences of "
        f"{data.sequence_length} tokens, vocabulary {tokenizer.vocabulary_size:,}, "
        f"{predictions} masked per sequence"
    )

    strategy = distribute.create_strategy(config.distribute)
    keras.utils.set_random_seed(train.seed)  # initialisation (data order and masks use it too)
    with strategy.scope():
        model = build_masked_lm(config, tokenizer.vocabulary_size)
        jit_compile = trainer.compile_model(
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

    start_step = trainer.resume(model, run, train, log)
    train_data = batches(
        train_sequences, data.train_file, tokenizer, train, predictions, start_step=start_step
    )
    valid_data = batches(
        valid_sequences, data.valid_file, tokenizer, train, predictions, shuffle=False, repeat=False
    )
    if train.eval_steps:
        valid_data = valid_data.take(train.eval_steps)

    tokens_per_step = train.batch_size * data.sequence_length
    arch = encoder_kwargs(config.model, tokenizer.vocabulary_size)
    flops_per_step = tokens_per_step * training_flops_per_token(
        arch, data.sequence_length, predictions
    )
    peak_gflops = train.peak_gflops or measure_matmul_gflops()
    logger = TrainingLogger(
        run.logs, train.log_every, tokens_per_step, flops_per_step, peak_gflops * 1e9, print_fn=log
    )
    log(
        f"model: {model.count_params():,} parameters, {flops_per_step / tokens_per_step / 1e6:.1f} "
        f"MFLOP/token; {strategy.num_replicas_in_sync} replica(s), "
        f"XLA {'on' if jit_compile else 'off'}, "
        f"peak {peak_gflops:.0f} GFLOP/s; training steps {start_step}..{train.steps}"
    )

    started = time.time()
    trainer.fit(model, train_data, train, run, start_step, [logger], validation_data=valid_data)

    val_loss, val_accuracy = model.evaluate(valid_data, verbose=0)
    logger.write_validation(train.steps, val_loss, val_accuracy)
    save_model(model, run.model)
    save_model(model.encoder, run.encoder)
    tokens_per_second = logger.median_throughput()
    metrics = {
        "task": "pretrain",
        "steps": train.steps,
        "resumed_from_step": start_step,
        "valid_loss": val_loss,
        "valid_masked_accuracy": val_accuracy,
        "valid_perplexity": math.exp(min(val_loss, 50.0)),
        "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * flops_per_step / tokens_per_step / (peak_gflops * 1e9)
        if tokens_per_second
        else None,
        "peak_gflops": peak_gflops,
        "parameters": model.count_params(),
        "non_embedding_parameters": parameter_counts(arch)["non_embedding"],
        "train_tokens": train.steps * tokens_per_step,
        "train_flops_per_token": flops_per_step / tokens_per_step,
        "train_seconds_this_attempt": time.time() - started,
        "replicas": strategy.num_replicas_in_sync,
        "jit_compile": jit_compile,
    }
    write_json(run.metrics, metrics)
    return metrics
