"""Masked-language-model pretraining of an `Encoder` (`task: mlm`; `pretrain`
is its old name and still works)."""


import keras
import numpy as np
import tensorflow as tf

from fmkeras.errors import DataError
from fmkeras.flops import training_flops_per_token
from fmkeras.models import Encoder, MaskedLM, encoder_kwargs
from fmkeras.models.masked_lm import masked_lm_logits
from fmkeras.models.starting_point import load_mlm_head
from fmkeras.signatures import fill_mask_functions
from fmkeras.tasks.base import Predictor, log_softmax
from fmkeras.tasks.language_model import LanguageModelTask, packed, run_passages
from fmkeras.tasks.registry import register_task
from fmkeras.tasks.spec import MaskedLMSpec
from fmkeras.text.mlm import mlm_dataset
from fmkeras.text.wordpiece import WordPieceTokenizer
from fmkeras.training import trainer
from fmkeras.training.callbacks import perplexity
from fmkeras.training.losses import SparseCategoricalCrossentropy


def batches(sequences, name, tokenizer, batch_size, predictions, seed, **kwargs):
    """`mlm_dataset` over one file's sequences; too little data names the file."""
    try:
        return mlm_dataset(sequences, tokenizer, batch_size, predictions, seed=seed, **kwargs)
    except ValueError as error:
        raise DataError(
            f"{name}: {error}; use more text (data.max_lines) or a smaller "
            f"train.batch_size={batch_size}"
        ) from None


def masked_lm_loss():
    return SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")


@register_task
class MaskedLMTask(MaskedLMSpec, LanguageModelTask):
    @property
    def predictions(self):
        data = self.config.data
        return data.max_predictions or max(1, round(data.mask_rate * data.sequence_length))

    def read_data(self):
        super().read_data()
        self.log(f"{self.predictions} masked per sequence")

    def dataset(self, sequences, name, step, **kwargs):
        train = self.config.train
        return batches(sequences, name, self.tokenizer, train.batch_size, self.predictions,
                       train.seed, start_step=step, next_sentence=self.next_sentence,
                       **kwargs)  # fmt: skip

    def build_model(self):
        """A fresh encoder, or (continued pretraining) `model.init`'s encoder
        with its masked-LM head where the checkpoint has one."""
        self.remember_strategy()
        model = self.config.model
        if model.init == "random":
            encoder = Encoder(**encoder_kwargs(model, self.tokenizer.vocabulary_size))
            masked_lm = MaskedLM(encoder, self.next_sentence, name="masked_lm")
        else:
            start = self.checkpoint_start()
            masked_lm = MaskedLM(start.encoder, self.next_sentence, name="masked_lm")
            self.log(f"model: {start.description} + {load_mlm_head(masked_lm, model.init)}")
        self.arch = masked_lm.encoder.get_config()  # the sizes FLOPs and parameters count
        return masked_lm

    @property
    def next_sentence(self):
        return self.config.data.objective == "mlm_nsp"

    def compile_args(self, model):
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        if not self.next_sentence:
            return {"loss": masked_lm_loss(), "weighted_metrics": [accuracy]}
        # Keras names them mlm_loss, nsp_loss, mlm_accuracy, nsp_accuracy; loss is their sum.
        nsp = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return {"loss": {"mlm": masked_lm_loss(), "nsp": nsp},
                "weighted_metrics": {"mlm": [accuracy],
                                     "nsp": [keras.metrics.SparseCategoricalAccuracy(
                                         name="accuracy")]}}  # fmt: skip

    def flops_per_token(self):
        data = self.config.data
        return training_flops_per_token(self.arch, data.sequence_length, self.predictions)

    def evaluate(self, model):
        """Masked-LM `loss`, `accuracy` and `perplexity`; with NSP also `nsp_loss`
        and `nsp_accuracy`."""
        if not self.next_sentence:
            loss, accuracy = trainer.evaluate(model, self.valid_data)
            return {"loss": float(loss), "accuracy": float(accuracy),
                    "perplexity": perplexity(loss)}  # fmt: skip
        found = trainer.evaluate(model, self.valid_data, return_dict=True)
        return {"loss": float(found["mlm_loss"]), "accuracy": float(found["mlm_accuracy"]),
                "perplexity": perplexity(found["mlm_loss"]),
                "nsp_loss": float(found["nsp_loss"]),
                "nsp_accuracy": float(found["nsp_accuracy"])}  # fmt: skip

    def info(self):
        return {**super().info(), "predictions": self.predictions,
                "objective": self.config.data.objective}  # fmt: skip

    def final_metrics(self, model, validation):
        metrics = super().final_metrics(model, validation)
        return {
            **metrics,
            # The names metrics.json used before every task reported `loss`; kept for scripts.
            "valid_loss": validation["loss"],
            "valid_masked_accuracy": validation["accuracy"],
            "valid_perplexity": metrics["perplexity"],
        }

    @classmethod
    def load(cls, run, info, top_k=5, precision=None, **options):
        model = run.load_model(precision)
        tokenizer = WordPieceTokenizer(run.vocab, lowercase=info["lowercase"])
        return MaskedLMPredictor(model, info, tokenizer, top_k)


class MaskedLMPredictor(Predictor):
    """Fill-mask with a pretrained masked LM: the `top_k` pieces for each `[MASK]`."""

    warmup_texts = ("The capital of France is [MASK].", "[MASK] [MASK] hello")
    evaluate_inputs = ("data", "bad_rows")  # a TSV's bad rows, as for classify

    def __init__(self, model, info, tokenizer, top_k=5):
        super().__init__(model, info)
        self.tokenizer = tokenizer
        self.top_k = top_k

    def serving_functions(self):
        return fill_mask_functions(self.model, self.tokenizer, self.info["sequence_length"],
                                   self.top_k)  # fmt: skip

    def predict(self, texts):
        outputs = self.serving_functions().serve_texts(tf.constant(texts))
        results = []
        for i, text in enumerate(texts):
            masks = [
                {"position": int(position),
                 "tokens": [t.decode("utf-8") for t in outputs["tokens"][i, m].numpy()],
                 "probabilities": [round(float(p), 6) for p in outputs["probabilities"][i, m]]}
                for m, position in enumerate(outputs["mask_positions"][i].numpy())
                if position >= 0
            ]  # fmt: skip
            results.append({"text": text, "masks": masks})
        return results

    def evaluate(self, data, bad_rows="fail", batch_size=32, seed=0):
        """Masked-LM loss, accuracy and perplexity on a text file (one passage
        per line, or a TSV's text column), with the run's masking rate and a fixed seed."""
        sequence_length = self.info["sequence_length"]
        passages, skipped = run_passages(data, self.info, bad_rows)
        sequences = packed(passages, self.tokenizer, sequence_length, data)
        dataset = batches(sequences, data, self.tokenizer, batch_size,
                          self.info["predictions"], seed, shuffle=False, repeat=False)  # fmt: skip
        total = correct = weight = 0.0
        for inputs, labels, weights in dataset:
            logits = np.asarray(masked_lm_logits(self.model.predict_on_batch(inputs)), np.float32)
            labels, weights = np.asarray(labels), np.asarray(weights, np.float32)
            chosen = np.take_along_axis(log_softmax(logits), labels[..., None], -1)[..., 0]
            total -= float((chosen * weights).sum())
            correct += float(((logits.argmax(-1) == labels) * weights).sum())
            weight += float(weights.sum())
        loss = total / weight
        return {"loss": loss, "accuracy": correct / weight,
                "perplexity": perplexity(loss), "sequences": len(sequences),
                "skipped_rows": {"data": len(skipped)}, "file": str(data)}  # fmt: skip
