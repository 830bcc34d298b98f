"""Translation (`task: translate`): an encoder-decoder Transformer trained
with teacher forcing and label smoothing, validated with greedy-decoded BLEU
and chrF (sacreBLEU; `tokenize="zh"` for Chinese). `TextTranslator` decodes
raw texts for validation, the CLIs and the export."""

import time

import keras
import numpy as np
import sacrebleu
import tensorflow as tf

from fmkeras.config import DecodeConfig
from fmkeras.decoding import beam_search, greedy_search
from fmkeras.errors import ConfigError
from fmkeras.explain.explainers import TranslateExplainer
from fmkeras.models import Encoder, Translator, encoder_kwargs
from fmkeras.signatures import translator_functions
from fmkeras.tasks.base import Predictor, Task
from fmkeras.tasks.registry import register_task
from fmkeras.tasks.spec import TranslateSpec
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
from fmkeras.training.losses import SmoothedSparseCrossEntropy


def sacrebleu_tokenizer(language):
    return {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}.get(language, "13a")


def score(hypotheses, references, language):
    """Corpus BLEU and chrF (sacreBLEU) as plain floats."""
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=sacrebleu_tokenizer(language))
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    return {"bleu": float(bleu.score), "chrf": float(chrf.score)}


class TextTranslator:
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


def build_translator(config, source, target, encoder):
    """The decoder mirrors the encoder's depth and widths (random or loaded)."""
    if encoder is None:
        encoder = Encoder(**encoder_kwargs(config.model, source.vocabulary_size), name="encoder")
    if not isinstance(encoder.num_heads, int) or not isinstance(encoder.intermediate_dim, int):
        raise ConfigError(f"model.init={config.model.init} is a pruned encoder (per-layer heads "
                          "or widths); a translation decoder mirrors a uniform one")  # fmt: skip
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


@register_task
class TranslateTask(TranslateSpec, Task):
    def read_data(self):
        files, data = self.files, self.config.data
        self.train_pairs = read_parallel(files["train_source"], files["train_target"],
                                         max_lines=data.max_lines)  # fmt: skip
        self.valid_pairs = read_parallel(files["valid_source"], files["valid_target"],
                                         max_lines=data.max_lines)  # fmt: skip
        for name, pairs in (("train", self.train_pairs), ("valid", self.valid_pairs)):
            self.log(f"{name}: {len(pairs.sources):,} pairs; dropped {pairs.dropped}")

    def tokenizers(self):
        """`(source, target, encoder_or_None)`: the source side follows `model.init`;
        with `data.shared_vocabulary` the target uses the source vocabulary (learned
        from both sides when there is no starting point)."""
        data, run, train = self.config.data, self.run, self.train_pairs
        if self.config.model.init == "random":
            lines = train.sources + train.targets if data.shared_vocabulary else train.sources
            source, encoder = self.prepare_vocabulary(lines), None
        else:
            encoder, source, _ = self.starting_encoder([])
        if not run.target_vocab.is_file():
            if data.shared_vocabulary:
                vocabulary = source.vocabulary
            elif "target_vocab" in self.files:
                vocabulary = read_vocabulary(self.files["target_vocab"])
            else:
                self.log("target vocabulary:")
                vocabulary = learn_vocabulary(train.targets, data.vocab_size,
                                              lowercase=data.lowercase, log=self.log)  # fmt: skip
            write_vocabulary(vocabulary, run.target_vocab)
        lowercase = source.lowercase if data.shared_vocabulary else data.lowercase
        target = WordPieceTokenizer(run.target_vocab, lowercase=lowercase)
        if source.pad_id != 0 or target.pad_id != 0:
            raise ConfigError("translation vocabularies must have [PAD] as id 0")
        return source, target, encoder

    def build_model(self):
        data, train = self.config.data, self.config.train
        source, target, encoder = self.tokenizers()
        model = build_translator(self.config, source, target, encoder)
        self.log(f"vocabularies {source.vocabulary_size:,} ({data.source_language}) / "
                 f"{target.vocabulary_size:,} ({data.target_language})")  # fmt: skip
        length = data.sequence_length
        self.train_ids = encode_pairs(self.train_pairs, source, target, length)[:2]
        valid_source, valid_target, kept = encode_pairs(self.valid_pairs, source, target, length)
        size = self.validation_size(len(kept))
        valid_source, valid_target, kept = valid_source[:size], valid_target[:size], kept[:size]
        self.valid_data = translation_batches(valid_source, valid_target, train.batch_size,
                                              length, bucket_boundaries(length))  # fmt: skip
        self.valid_sources = [self.valid_pairs.sources[i] for i in kept]
        self.valid_references = [self.valid_pairs.targets[i] for i in kept]
        self.translate = TextTranslator(model, source, target, length, self.config.decode,
                                        jit_compile=train.jit_compile != "false")  # fmt: skip
        return model

    def compile_args(self, model):
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        return {"loss": SmoothedSparseCrossEntropy(self.config.train.label_smoothing),
                "weighted_metrics": [accuracy]}  # fmt: skip

    def train_dataset(self, step):
        train, length = self.config.train, self.config.data.sequence_length
        return translation_batches(*self.train_ids, train.batch_size, length,
                                   bucket_boundaries(length), shuffle=True,
                                   seed=train.seed + step, repeat=True)  # fmt: skip

    def evaluate(self, model, beam_width=1):
        """Teacher-forced loss/accuracy, decoded BLEU/chrF, and a few samples
        (TensorBoard text)."""
        loss, accuracy = trainer.evaluate(model, self.valid_data)
        started = time.time()
        hypotheses = self.translate(self.valid_sources, beam_width=beam_width)
        seconds = time.time() - started
        shown = zip(self.valid_sources[:5], hypotheses[:5], self.valid_references[:5],
                    strict=True)  # fmt: skip
        return {
            "loss": float(loss),
            "accuracy": float(accuracy),
            **score(hypotheses, self.valid_references, self.config.data.target_language),
            "sentences_per_second": len(hypotheses) / seconds,
            "samples": "\n\n".join(f"{s} → {h} (reference: {r})" for s, h, r in shown),
        }

    def info(self):
        data, translate = self.config.data, self.translate
        return {**super().info(), "source_language": data.source_language,
                "target_language": data.target_language,
                "source_lowercase": translate.source_tokenizer.lowercase,
                "target_lowercase": translate.target_tokenizer.lowercase}  # fmt: skip

    def final_metrics(self, model, validation):
        beam_width = self.config.decode.beam_width
        greedy = {k: v for k, v in validation.items() if k != "samples"}
        beam = {k: v for k, v in self.evaluate(model, beam_width).items() if k != "samples"}
        return {
            "loss": greedy["loss"],  # teacher-forced, as every task's `loss`
            "accuracy": greedy["accuracy"],
            "valid_loss": greedy["loss"],  # the names before every task reported `loss`
            "valid_accuracy": greedy["accuracy"],
            "greedy": greedy,
            f"beam{beam_width}": beam,
            "bleu": beam["bleu"],
            "chrf": beam["chrf"],
            "dropped_pairs": {"train": self.train_pairs.dropped,
                              "valid": self.valid_pairs.dropped},  # fmt: skip
        }

    @classmethod
    def load(cls, run, info, decode=None, precision=None, **options):
        decode = decode or DecodeConfig()
        model = run.load_model(precision)
        source = WordPieceTokenizer(run.vocab, lowercase=info["source_lowercase"])
        target = WordPieceTokenizer(run.target_vocab, lowercase=info["target_lowercase"])
        translate = TextTranslator(model, source, target, info["sequence_length"], decode)
        return TranslationPredictor(model, info, translate, decode.beam_width)


class TranslationPredictor(Predictor):
    """A finished translate run: beam search (or greedy) on raw texts."""

    warmup_texts = ("How are you today?", "Thank you.")
    explainer = TranslateExplainer
    evaluate_inputs = ("src", "ref", "hypotheses")

    def __init__(self, model, info, translate, beam_width):
        super().__init__(model, info)
        self.translate = translate
        self.beam_width = beam_width

    def translations(self, texts):
        return self.translate(texts, beam_width=self.beam_width)

    def predict(self, texts):
        results = zip(texts, self.translations(texts), strict=True)
        return [{"text": text, "translation": translation} for text, translation in results]

    def evaluate(self, src, ref, hypotheses=None):
        """BLEU and chrF of the translations of `src` against `ref` (aligned
        line files); `hypotheses`, if given, receives the translations."""
        pairs = read_parallel(src, ref)
        translations = self.translations(pairs.sources)
        if hypotheses:
            with open(hypotheses, "w", encoding="utf-8") as handle:
                handle.writelines(f"{line}\n" for line in translations)
        metrics = score(translations, pairs.targets, self.info["target_language"])
        return {**metrics, "sentences": len(translations), "beam_width": self.beam_width,
                "dropped_pairs": pairs.dropped}  # fmt: skip

    def serving_functions(self):
        return translator_functions(self.translate, self.beam_width)

    def export_info(self):
        return {**self.info, "beam_width": self.beam_width,
                "length_penalty": self.translate.length_penalty,
                "max_length": self.translate.max_length}  # fmt: skip
