"""What classification and tagging share: an encoder (fresh or from
`model.init`) with a task head, full or LoRA fine-tuning, labelled batches,
and loading a finished run for inference."""

import keras
import numpy as np

from fmkeras import config as config_lib
from fmkeras.errors import ConfigError
from fmkeras.models.starting_point import finished_head
from fmkeras.tasks.base import Predictor, Task, log_softmax
from fmkeras.text.labelled import batched, skipped_summary
from fmkeras.text.wordpiece import WordPieceTokenizer
from fmkeras.training import lora
from fmkeras.training.losses import label_loss
from fmkeras.workarounds import predict_on_batch


def collect(model, dataset):
    """`[(logits, label)]` per example of a finite dataset, in dataset order.

    Per-token tasks keep only the positions with weight 1 (first pieces of
    words), so each example's arrays line up with its words.
    """
    examples = []
    for features, label, weight in dataset:
        logits = np.asarray(predict_on_batch(model, features), np.float32)
        label, keep = np.asarray(label), np.asarray(weight) > 0
        if label.ndim == 1:
            examples += list(zip(logits, label, strict=True))
        else:
            examples += [(o[k], y[k]) for o, y, k in zip(logits, label, keep, strict=True)]
    return examples


def cross_entropy(logits, labels):
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


class EncoderTask(Task):
    """An encoder plus a head trained on labelled rows. Subclasses define
    `read_rows(path, labels)`, `label_names(rows)`, `encode(rows)` ->
    `(ids, labels)`, `build_head(encoder)`, `metrics(examples)` and `vocabulary_texts`."""

    def read_data(self):
        data = self.config.data
        self.train_rows = self.read_rows(self.files["train"])
        self.names = self.label_names(self.train_rows)
        self.valid_rows = self.read_rows(self.files["valid"], labels=set(self.names))
        for name, rows in ((data.train_file, self.train_rows), (data.valid_file, self.valid_rows)):
            if rows.skipped:
                self.log(skipped_summary(name, rows.skipped))
        self.log(f"data: {len(self.train_rows):,} train / {len(self.valid_rows):,} valid "
                 f"examples, labels {self.names}")  # fmt: skip
        self.valid_rows = self.valid_rows.head(self.validation_size(len(self.valid_rows)))

    def build_model(self):
        encoder, self.tokenizer, origin = self.starting_encoder(self.vocabulary_texts())
        self.encoder = encoder
        model = self.build_head(encoder)
        head = None if self.config.model.init == "random" else \
            finished_head(self.config.model.init, model, self.names)  # fmt: skip
        if head is not None:
            model.output_dense.set_weights(head)
        self.lora = self.enable_lora(model, encoder)
        kind = "its trained" if head is not None else "a new"
        self.log(f"model: {origin} + {kind} {model.name} head")
        self.train_ids, self.train_labels = self.encode(self.train_rows)
        valid_ids, valid_labels = self.encode(self.valid_rows)
        self.valid_data = self.batches(valid_ids, valid_labels)
        return model

    def learning_rate_factors(self, model):
        """`finetune.layer_decay` d < 1: block i of L at d^(L - i), the embeddings
        at d^(L + 1); the rest (final layer norm, pooler, head) at 1."""
        decay = self.config.finetune.layer_decay
        if decay == 1.0:
            return None
        encoder, top = self.encoder, self.encoder.num_layers + 1
        factors = {v.path: decay**top for v in encoder.embedding.weights}
        for index, block in enumerate(encoder.transformer_layers):
            factors.update({v.path: decay ** (top - 1 - index) for v in block.weights})
        self.log(f"finetune.layer_decay={decay:g}: learning rate x{decay**top:.3g} for the "
                 f"embeddings, x{decay ** (top - 1):.3g} (block 0) to x{decay:.3g} (block "
                 f"{top - 2}), x1 for the head")  # fmt: skip
        return factors

    def enable_lora(self, model, encoder):
        """LoRA adapters (`finetune.method=lora`, before compile); returns their details."""
        finetune = self.config.finetune
        if finetune.method != "lora":
            return None
        targets = config_lib.lora_targets(finetune)
        trainable, total = lora.enable_lora(
            model, encoder, finetune.lora_rank, finetune.lora_alpha, targets
        )
        self.log(f"LoRA rank {finetune.lora_rank} alpha {finetune.lora_alpha:g} on "
                 f"{', '.join(targets)}: {trainable:,} of {total:,} parameters trainable "
                 f"({trainable / total:.2%})")  # fmt: skip
        return {**lora.adapter_settings(finetune, targets), "trainable_parameters": trainable,
                "total_parameters": total, "trainable_share": trainable / total}  # fmt: skip

    def compile_args(self, model):
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        return {"loss": label_loss(self.config.train.label_smoothing),
                "weighted_metrics": [accuracy]}  # fmt: skip

    def backup_hooks(self, model):
        """Adapters in every backup (the saved kernels are merged) and back on resume."""
        if self.lora is None:
            return None, None
        targets = config_lib.lora_targets(self.config.finetune)
        settings = lora.adapter_settings(self.config.finetune, targets)
        return (
            lambda directory: lora.save_adapters(model, lora.adapter_file(directory), settings),
            lambda backup: lora.restore_adapters(model, self.encoder, targets,
                                                 lora.adapter_file(backup)),  # fmt: skip
        )

    def batches(self, ids, labels, **kwargs):
        data = self.config.data
        return batched(ids, labels, self.config.train.batch_size, data.sequence_length,
                       self.tokenizer.pad_id, **kwargs)  # fmt: skip

    def train_dataset(self, step):
        # A resumed run reshuffles from its step on (a new order, not a replay).
        return self.batches(self.train_ids, self.train_labels, shuffle=True,
                            seed=self.config.train.seed + step, repeat=True)  # fmt: skip

    def evaluate(self, model):
        return self.metrics(collect(model, self.valid_data))

    def info(self):
        return {**super().info(), "labels": self.names, "lowercase": self.tokenizer.lowercase,
                "init": self.config.model.init}  # fmt: skip

    def final_metrics(self, model, validation):
        skipped = {"train": len(self.train_rows.skipped), "valid": len(self.valid_rows.skipped)}
        extra = {"lora": self.lora} if self.lora else {}
        return {**validation, "skipped_rows": skipped, **extra}

    @classmethod
    def load(cls, run, info, precision=None, **options):
        for path in (run.model, run.vocab):
            if not path.is_file():
                raise ConfigError(f"{run.root} is not a finished run: {path.name} is missing")
        model = run.load_model(precision)
        tokenizer = WordPieceTokenizer(run.vocab, lowercase=info["lowercase"])
        return cls.predictor(model, info, tokenizer)


class EncoderPredictor(Predictor):
    """A finished classify or tag run: model, tokenizer and task.json."""

    evaluate_inputs = ("data", "bad_rows")

    def __init__(self, model, info, tokenizer):
        super().__init__(model, info)
        self.tokenizer = tokenizer

    @property
    def labels(self):
        return self.info["labels"]

    def batches(self, ids, labels, batch_size=32):
        return batched(ids, labels, batch_size, self.info["sequence_length"],
                       self.tokenizer.pad_id)  # fmt: skip
