"""Translation (`python -m fmkeras.train translate`): an encoder-decoder
Transformer trained with teacher forcing and label smoothing, validated with
greedy-decoded BLEU and chrF (sacreBLEU; `tokenize="zh"` for Chinese)."""

import time

import keras
import numpy as np
import sacrebleu
import tensorflow as tf

from fmkeras import distribute
from fmkeras.data import require_file
from fmkeras.decoding import beam_search, greedy_search
from fmkeras.errors import ConfigError
from fmkeras.models import Encoder, Translator, encoder_kwargs
from fmkeras.tasks import finetune
from fmkeras.tasks.pretrain import prepare_vocabulary
from fmkeras.text.detokenizer import Detokenizer
from fmkeras.text.labelled import bucket_boundaries
from fmkeras.text.parallel import encode_pairs, read_parallel, translation_batches
from fmkeras.text.wordpiece import (
    WordPieceTokenizer,
    learn_vocabulary,
    read_vocabulary,
    write_vocabulary,
)
from fmkeras.training import trainer
from fmkeras.training.callbacks import TrainingLogger
from fmkeras.training.checkpoints import save_model, write_json
from fmkeras.training.losses import SmoothedSparseCrossEntropy
from fmkeras.training.optimizer import create_optimizer
from fmkeras.training.run_dir import RunDir

TARGET_VOCAB = "target_vocab.txt"


def sacrebleu_tokenizer(language):
    return {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}.get(language, "13a")


def score(hypotheses, references, language):
    """Corpus BLEU and chrF (sacreBLEU) as plain floats."""
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=sacrebleu_tokenizer(language))
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    return {"bleu": float(bleu.score), "chrf": float(chrf.score)}


class Translate:
    """Batched, XLA-compiled decoding of raw source texts with a `Translator`."""

    def __init__(
        self, model, source_tokenizer, target_tokenizer, sequence_length, decode, jit_compile=True
    ):
        self.model = model
        self.source_tokenizer = source_tokenizer
        self.target_tokenizer = target_tokenizer
        self.sequence_length = sequence_length
        self.max_length = decode.max_length or sequence_length
        self.batch_size = decode.batch_size
        self.length_penalty = decode.length_penalty
        self.jit_compile = jit_compile
        self.detokenizer = Detokenizer(
            target_tokenizer.vocabulary, target_tokenizer.sep_id, target_tokenizer.pad_id
        )
        self._compiled = {}

    def decode_ids(self, source_ids, beam_width=1):
        """Target ids `(batch, max_length)` for `[CLS] source [SEP]` ids
        `(batch, source)` (padded with 0): greedy for width 1, else beam search."""
        model, start, end = self.model, self.target_tokenizer.cls_id, self.target_tokenizer.sep_id
        state = model.initial_state(source_ids, self.max_length)
        batch = tf.shape(source_ids)[0]
        if beam_width == 1:
            return greedy_search(model.decode_step, state, batch, self.max_length, start, end)
        ids, _ = beam_search(model.decode_step, state, batch, self.max_length, start, end,
                             beam_width, self.length_penalty)  # fmt: skip
        return ids

    def _function(self, beam_width):
        if beam_width not in self._compiled:
            self._compiled[beam_width] = tf.function(
                lambda source_ids: self.decode_ids(source_ids, beam_width),
                jit_compile=self.jit_compile,
                reduce_retracing=True,
            )
        return self._compiled[beam_width]

    def __call__(self, texts, beam_width=1):
        """Translations of `texts`, in order."""
        ids = self.source_tokenizer.tokenize(tf.constant(texts))[:, : self.sequence_length - 2]
        cls, sep = self.source_tokenizer.cls_id, self.source_tokenizer.sep_id
        rows = [[cls, *row, sep] for row in ids.to_list()]
        order = np.argsort([len(row) for row in rows], kind="stable")
        boundaries = bucket_boundaries(self.sequence_length)
        decode = self._function(beam_width)
        outputs = [None] * len(texts)
        for start in range(0, len(rows), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = next(b for b in boundaries if b >= max(len(rows[i]) for i in chunk))
            batch = np.zeros((len(chunk), width), np.int32)  # padding id 0
            for line, i in enumerate(chunk):
                batch[line, : len(rows[i])] = rows[i]
            translations = self.detokenizer(decode(tf.constant(batch))).numpy()
            for i, text in zip(chunk, translations, strict=True):
                outputs[i] = text.decode("utf-8")
        return outputs


def load_translator(directory, decode):
    """`(Translate, task info)` of a finished translate run directory."""
    run = RunDir(directory)
    info = finetune.read_task_info(run.root)
    if info["task"] != "translate":
        raise ConfigError(f"{run.root} is a {info['task']!r} run, not a translation run")
    model = keras.saving.load_model(run.model)
    source = WordPieceTokenizer(run.vocab, lowercase=info["source_lowercase"])
    target = WordPieceTokenizer(run.root / TARGET_VOCAB, lowercase=info["target_lowercase"])
    return Translate(model, source, target, info["sequence_length"], decode), info


def tokenizers(config, run, train, data_dir, origin, log):
    """`(source, target, encoder_or_None)`: the source side follows `model.init`;
    with `data.shared_vocabulary` the target uses the source vocabulary (learned
    from both sides when there is no starting point)."""
    data = config.data
    if data.shared_vocabulary and data.target_vocab_file:
        raise ConfigError("data.shared_vocabulary and data.target_vocab_file exclude each other")
    if config.model.init == "random":
        lines = train.sources + train.targets if data.shared_vocabulary else train.sources
        source = prepare_vocabulary(config, run, lines, data_dir, origin, log)
        encoder = None
    else:
        encoder, source, _ = finetune.starting_encoder(config, run, [], data_dir, origin, log)
    target_path = run.root / TARGET_VOCAB
    if not target_path.is_file():
        if data.shared_vocabulary:
            vocabulary = source.vocabulary
        elif data.target_vocab_file:
            vocabulary = read_vocabulary(require_file(data.target_vocab_file, data_dir, origin))
        else:
            log("target vocabulary:")
            vocabulary = learn_vocabulary(
                train.targets, data.vocab_size, lowercase=data.lowercase, log=log
            )
        write_vocabulary(vocabulary, target_path)
    lowercase = source.lowercase if data.shared_vocabulary else data.lowercase
    target = WordPieceTokenizer(target_path, lowercase=lowercase)
    return source, target, encoder


def build_translator(config, source, target, encoder):
    """The decoder mirrors the encoder's depth and widths (random or loaded)."""
    if encoder is None:
        try:
            kwargs = encoder_kwargs(config.model, source.vocabulary_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        encoder = Encoder(**kwargs, name="encoder")
    return Translator(
        encoder,
        target.vocabulary_size,
        num_layers=encoder.num_layers,
        num_heads=encoder.num_heads,
        intermediate_dim=encoder.intermediate_dim,
        dropout=config.model.dropout,
        max_sequence_length=config.data.sequence_length,
        padding_id=target.pad_id,
        name="translator",
    )


def run(config, run: RunDir, data_dir, origin, log=print):
    data, train_config, decode = config.data, config.train, config.decode
    files = {}
    for split, prefix in (("train", data.train_file), ("valid", data.valid_file)):
        files[split] = [
            require_file(f"{prefix}.{language}", data_dir, origin)
            for language in (data.source_language, data.target_language)
        ]
    train = read_parallel(*files["train"], max_lines=data.max_lines)
    valid = read_parallel(*files["valid"], max_lines=data.max_lines)

    strategy = distribute.create_strategy(config.distribute)
    keras.utils.set_random_seed(train_config.seed)
    with strategy.scope():
        source, target, encoder = tokenizers(config, run, train, data_dir, origin, log)
        if source.pad_id != 0 or target.pad_id != 0:
            raise ConfigError("translation vocabularies must have [PAD] as id 0")
        model = build_translator(config, source, target, encoder)
        trainer.compile_model(
            model,
            strategy,
            train_config,
            log,
            optimizer=create_optimizer(train_config),
            loss=SmoothedSparseCrossEntropy(train_config.label_smoothing),
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
    log(
        f"model: {model.count_params():,} parameters; vocabularies {source.vocabulary_size:,} "
        f"({data.source_language}) / {target.vocabulary_size:,} ({data.target_language})"
    )
    start_step = trainer.resume(model, run, train_config, log)

    length = data.sequence_length
    boundaries = bucket_boundaries(length)
    train_source, train_target, _ = encode_pairs(train, source, target, length)
    valid_source, valid_target, kept = encode_pairs(valid, source, target, length)
    for name, pairs in (("train", train), ("valid", valid)):
        log(f"{name}: {len(pairs.sources):,} pairs; dropped {pairs.dropped}")
    batch = train_config.batch_size
    train_data = translation_batches(train_source, train_target, batch, length, boundaries,
                                     shuffle=True, seed=train_config.seed + start_step,
                                     repeat=True)  # fmt: skip
    valid_data = translation_batches(valid_source, valid_target, batch, length, boundaries)
    translate = Translate(
        model, source, target, length, decode, jit_compile=train_config.jit_compile != "false"
    )
    valid_sources = [valid.sources[i] for i in kept]
    valid_references = [valid.targets[i] for i in kept]
    logger = TrainingLogger(run.logs, train_config.log_every, examples_per_step=batch, print_fn=log)

    def evaluate(model, beam_width=1):
        loss, accuracy = model.evaluate(valid_data, verbose=0)
        started = time.time()
        hypotheses = translate(valid_sources, beam_width=beam_width)
        seconds = time.time() - started
        with logger.valid_writer.as_default(step=int(model.optimizer.iterations)):
            shown = zip(valid_sources[:5], hypotheses[:5], valid_references[:5], strict=True)
            samples = [f"{s} → {h} (reference: {r})" for s, h, r in shown]
            tf.summary.text("samples", "\n\n".join(samples))
        return {
            "loss": float(loss),
            "accuracy": float(accuracy),
            **score(hypotheses, valid_references, data.target_language),
            "sentences_per_second": len(hypotheses) / seconds,
        }

    steps_per_epoch = trainer.epoch_length(train_config.steps, train_config.checkpoint_every)
    evaluator = finetune.Evaluator(evaluate, logger, train_config.eval_every, steps_per_epoch)
    started = time.time()
    trainer.fit(model, train_data, train_config, run, start_step, [logger, evaluator])
    greedy = evaluate(model)
    finetune.write_validation(logger, train_config.steps, greedy)
    beam = evaluate(model, beam_width=decode.beam_width)
    save_model(model, run.model)
    save_model(model.encoder, run.encoder)
    info = {
        "task": "translate",
        "source_language": data.source_language,
        "target_language": data.target_language,
        "source_lowercase": source.lowercase,
        "target_lowercase": target.lowercase,
        "sequence_length": length,
    }
    write_json(run.root / finetune.TASK_FILE, info)
    metrics = {
        "task": "translate",
        "steps": train_config.steps,
        "resumed_from_step": start_step,
        "valid_loss": greedy["loss"],
        "valid_accuracy": greedy["accuracy"],
        "greedy": greedy,
        f"beam{decode.beam_width}": beam,
        "bleu": beam["bleu"],
        "chrf": beam["chrf"],
        "dropped_pairs": {"train": train.dropped, "valid": valid.dropped},
        "examples_per_second": logger.median_throughput(),
        "train_seconds_this_attempt": time.time() - started,
    }
    write_json(run.metrics, metrics)
    return metrics
