"""GPT-style causal language modelling (`task: causal_lm`): a decoder-only
`CausalLM` trained to predict the next token of packed text, validated by
held-out perplexity, with sampled continuations in TensorBoard.
`TextGenerator` turns prompts into text for validation, `fmkeras.generate`,
`predict`, the server and the export alike."""

import keras
import numpy as np
import tensorflow as tf

from fmkeras.config import GenerateConfig
from fmkeras.decoding import NEG_INF, sample, sample_search
from fmkeras.errors import DataError
from fmkeras.flops import training_flops_per_token
from fmkeras.layers.utils import count_weights
from fmkeras.models import CausalLM
from fmkeras.models.sizes import encoder_kwargs
from fmkeras.signatures import generation_functions
from fmkeras.tasks.base import Predictor, log_softmax
from fmkeras.tasks.language_model import LanguageModelTask, packed, run_passages
from fmkeras.tasks.registry import register_task
from fmkeras.tasks.spec import CausalLMSpec
from fmkeras.text.detokenizer import Detokenizer
from fmkeras.text.mlm import causal_lm_dataset
from fmkeras.text.wordpiece import WordPieceTokenizer
from fmkeras.training import trainer
from fmkeras.training.callbacks import perplexity
from fmkeras.training.losses import SparseCategoricalCrossentropy


def batches(sequences, name, batch_size, seed, **kwargs):
    """`causal_lm_dataset` over one file's rows; too little data names the file."""
    try:
        return causal_lm_dataset(sequences, batch_size, seed=seed, **kwargs)
    except ValueError as error:
        raise DataError(f"{name}: {error}; use more text (data.max_lines) or a smaller "
                        f"train.batch_size={batch_size}") from None  # fmt: skip


class TextGenerator:
    """Prompts -> sampled continuations with a `CausalLM` and its key/value cache.

    Every prompt starts after `[SEP]`, the end-of-line token of the training
    text (GPT-2 starts with its end-of-text token the same way), so a
    continuation begins where a paragraph would; it ends at the next `[SEP]`
    or after `max_new_tokens`. A prompt longer than the model's positions
    keeps its end. `[PAD]`, `[CLS]` and `[MASK]` are never sampled.

    Args:
        model: a `CausalLM`.
        tokenizer: tokenizes prompts: a `WordPieceTokenizer`, or its
            TensorFlow-only twin `CoreBertTokenizer` in exports.
        special: the `WordPieceTokenizer` (vocabulary and special ids).
    """

    def __init__(self, model, tokenizer, special):
        self.model = model
        self.tokenizer = tokenizer
        self.start_id, self.padding_id = special.sep_id, special.pad_id
        self.detokenizer = Detokenizer(special.vocabulary, special.sep_id, special.pad_id)
        banned = np.zeros(special.vocabulary_size, bool)
        banned[[special.pad_id, special.cls_id, special.mask_id]] = True
        self.banned = tf.constant(banned)
        self._function = None

    def encode(self, texts):
        """`(batch,)` prompts -> `[SEP] prompt` ids `(batch, width)` right-padded,
        and their lengths `(batch,)`."""
        ids = tf.cast(self.tokenizer.tokenize(texts), tf.int32)
        ids = ids[:, -(self.model.max_sequence_length - 1) :]  # the end of a long prompt
        start = tf.fill([ids.nrows(), 1], self.start_id)
        ids = tf.concat([start, ids], axis=1)
        return ids.to_tensor(self.padding_id), tf.cast(ids.row_lengths(), tf.int32)

    def generate_ids(self, token_ids, lengths, max_new_tokens, temperature, top_k, top_p, seed):
        """Prompt ids `(batch, width)` and lengths -> `(tokens (batch, total),
        lengths (batch,))` of each prompt and its continuation."""
        model = self.model
        batch, width = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
        total = tf.minimum(width + max_new_tokens, model.max_sequence_length)
        tokens = tf.pad(token_ids, [[0, 0], [0, total - width]], constant_values=self.padding_id)
        # Prefill every prompt position at once; the loop starts after the shortest
        # prompt and rewrites the cache of every later position before it is read.
        cache = model.initial_cache(batch, total)
        logits, cache = model.call_with_cache(token_ids, 0, cache)  # (batch, width, vocabulary)
        start = tf.reduce_min(lengths)
        banned = self.banned

        def choose(logits, index):
            logits = tf.where(banned, NEG_INF, tf.cast(logits, tf.float32))
            return sample(logits, index, temperature, top_k, top_p, seed)

        return sample_search(model.decode_step, cache, logits[:, start - 1], tokens, lengths,
                             start, max_new_tokens, self.start_id, choose,
                             self.padding_id)  # fmt: skip

    def generate(self, texts, max_new_tokens, temperature, top_k, top_p, seed):
        """`{"text": prompt + continuation, "continuation": ..., "token_ids",
        "lengths"}` for `(batch,)` prompt strings (graph-friendly)."""
        token_ids, prompt_lengths = self.encode(texts)
        tokens, lengths = self.generate_ids(token_ids, prompt_lengths, max_new_tokens,
                                            temperature, top_k, top_p, seed)  # fmt: skip
        positions = tf.range(tf.shape(tokens)[1])[None, :]
        new = tf.logical_and(positions >= prompt_lengths[:, None], positions < lengths[:, None])
        continuation = tf.ragged.boolean_mask(tokens, new).to_tensor(self.padding_id)
        return {
            "text": self.detokenizer(tokens[:, 1:]),  # without the [SEP] it started from
            "continuation": self.detokenizer(continuation),
            "token_ids": tokens,
            "lengths": lengths,
        }

    def __call__(self, prompts, settings):
        """Generations of `prompts` (a list of strings) with a `GenerateConfig`,
        in graph mode: one `{"text", "continuation"}` dict per prompt."""
        if self._function is None:
            self._function = tf.function(self.generate, reduce_retracing=True)
        found = self._function(
            tf.constant(prompts, tf.string),
            tf.constant(settings.max_new_tokens),
            tf.constant(float(settings.temperature)),
            tf.constant(settings.top_k),
            tf.constant(float(settings.top_p)),
            tf.constant(settings.seed),
        )
        texts, continuations = found["text"].numpy(), found["continuation"].numpy()
        return [{"text": t.decode("utf-8"), "continuation": c.decode("utf-8")}
                for t, c in zip(texts, continuations, strict=True)]  # fmt: skip


def causal_lm_kwargs(model_config, vocabulary_size):
    """`CausalLM` arguments: the encoder's named sizes (`model.size`)."""
    kwargs = encoder_kwargs(model_config, vocabulary_size)
    kwargs["normalize_first"] = True  # GPT-2's pre-LN; post-LN decoders train poorly
    return kwargs


@register_task
class CausalLMTask(CausalLMSpec, LanguageModelTask):
    framed = False  # plain windows of the token stream
    row_extra = 1  # inputs and next-token labels come from one row

    def dataset(self, sequences, name, step, **kwargs):
        train = self.config.train
        return batches(sequences, name, train.batch_size, train.seed, start_step=step, **kwargs)

    def build_model(self):
        self.remember_strategy()
        model = CausalLM(**causal_lm_kwargs(self.config.model, self.tokenizer.vocabulary_size),
                         name="causal_lm")  # fmt: skip
        self.arch = model.get_config()
        self.generator = TextGenerator(model, self.tokenizer, self.tokenizer)
        return model

    def compile_args(self, model):
        loss = SparseCategoricalCrossentropy(from_logits=True)
        return {"loss": loss, "metrics": [keras.metrics.SparseCategoricalAccuracy("accuracy")]}

    def flops_per_token(self):
        length = self.config.data.sequence_length
        return training_flops_per_token(self.arch, length, length, head_transform=False)

    def non_embedding_parameters(self):
        return count_weights(weight for weight in self.generator.model.weights
                             if not weight.path.startswith(("embedding/", "lm_head/")))  # fmt: skip

    def evaluate(self, model):
        """Next-token `loss`, `accuracy` and `perplexity` on the validation rows, and
        `samples`: continuations of `generate.prompts` (TensorBoard text)."""
        loss, accuracy = trainer.evaluate(model, self.valid_data)
        settings = self.config.generate
        prompts = [p.strip() for p in (settings.prompts or "").split("|") if p.strip()]
        samples = ""
        if prompts:
            found = self.generator(prompts, settings)
            samples = "\n\n".join(f"**{p}** → {r['text']}" for p, r in zip(prompts, found,
                                                                          strict=True))  # fmt: skip
        return {"loss": float(loss), "accuracy": float(accuracy), "perplexity": perplexity(loss),
                "samples": samples}  # fmt: skip

    def info(self):
        return {**super().info(), "generate": vars(self.config.generate)}

    def final_metrics(self, model, validation):
        return {k: v for k, v in super().final_metrics(model, validation).items()
                if k != "samples"} | {"sample": validation["samples"]}  # fmt: skip

    @classmethod
    def load(cls, run, info, generate=None, precision=None, **options):
        model = run.load_model(precision)
        tokenizer = WordPieceTokenizer(run.vocab, lowercase=info["lowercase"])
        if generate is None:
            generate = GenerateConfig(**info.get("generate", {}))
        return CausalLMPredictor(model, info, tokenizer, generate)


class CausalLMPredictor(Predictor):
    """A finished causal_lm run: sampled continuations of prompts, and
    perplexity on text files."""

    warmup_texts = ("Once upon a time", "The")
    evaluate_inputs = ("data", "bad_rows")  # a TSV's bad rows, as for classify

    def __init__(self, model, info, tokenizer, settings):
        super().__init__(model, info)
        self.tokenizer = tokenizer
        self.settings = settings
        self.generator = TextGenerator(model, tokenizer, tokenizer)

    def predict(self, texts):
        found = self.generator(list(texts), self.settings)
        return [{"prompt": text, **result} for text, result in zip(texts, found, strict=True)]

    def evaluate(self, data, bad_rows="fail", batch_size=16):
        """Next-token loss, accuracy and perplexity on a text file (one passage
        per line, or a TSV's text column), packed as in training."""
        length = self.info["sequence_length"] + 1
        passages, skipped = run_passages(data, self.info, bad_rows)
        rows = packed(passages, self.tokenizer, length, data, framed=False)
        total = correct = count = 0.0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            inputs = {"token_ids": chunk[:, :-1], "padding_mask": np.ones_like(chunk[:, :-1])}
            logits = np.asarray(self.model.predict_on_batch(inputs), np.float32)
            labels = chunk[:, 1:]
            total -= float(np.take_along_axis(log_softmax(logits), labels[..., None], -1).sum())
            correct += float((logits.argmax(-1) == labels).sum())
            count += labels.size
        loss = total / count
        return {"loss": loss, "accuracy": correct / count, "perplexity": perplexity(loss),
                "tokens": int(count), "skipped_rows": {"data": len(skipped)},
                "file": str(data)}  # fmt: skip

    def serving_functions(self):
        return generation_functions(self.model, self.tokenizer)

    def export_info(self):
        return {**self.info, "generate": vars(self.settings)}

    def warmup_inputs(self):
        """Prompts and the run's sampling settings (a few new tokens)."""
        settings = self.settings
        return {"texts": list(self.warmup_texts), "max_new_tokens": np.int32(4),
                "temperature": np.float32(settings.temperature), "top_k": np.int32(settings.top_k),
                "top_p": np.float32(settings.top_p), "seed": np.int32(settings.seed)}  # fmt: skip
