"""What masked and causal language-model pretraining share: text packed into
rows (or streamed from shards), the vocabulary, token throughput and MFU in
the logs, and perplexity."""

from typing import ClassVar

import keras
import tensorflow as tf

from fmkeras.data import is_glob, read_lines
from fmkeras.distribute import accelerators_in_use
from fmkeras.errors import DataError
from fmkeras.flops import parameter_counts
from fmkeras.tasks.base import Task
from fmkeras.tasks.spec import LanguageModelSpec
from fmkeras.text.corpus import ShardedCorpus, expand_shards
from fmkeras.text.labelled import EVALUATE_SKIP_HINT, RECIPE_SKIP_HINT, read_tsv, skipped_summary
from fmkeras.text.mlm import pack_sequences
from fmkeras.training.throughput import peak_gflops

# Lines a vocabulary is learned from when the training text is a glob of shards.
VOCABULARY_SAMPLE_LINES = 100_000


def packed(lines, tokenizer, row_length, name, framed=True):
    try:
        return pack_sequences(lines, tokenizer, row_length, framed=framed)
    except ValueError as error:
        raise DataError(f"{name}: {error}") from None


def read_passages(path, max_lines=None, text_column="sentence", bad_rows="fail",
                  skip_hint=RECIPE_SKIP_HINT):  # fmt: skip
    """`(passages, skipped)`: the lines of a text file, or a TSV's `text_column`
    (`*.tsv`: a header line; no label is read), and the bad TSV rows skipped."""
    if not str(path).endswith(".tsv"):
        return read_lines(path, max_lines), []
    rows = read_tsv(path, text_column, None, bad_rows, max_rows=max_lines, skip_hint=skip_hint)
    return rows.inputs, rows.skipped


def run_passages(path, info, bad_rows):
    """`read_passages` of a file `python -m fmkeras.evaluate` scores, with a
    finished run's `data.text_column` (runs before it read text files only)."""
    return read_passages(path, None, info.get("text_column", "sentence"), bad_rows,
                         EVALUATE_SKIP_HINT)  # fmt: skip


def sample_lines(paths, count):
    """The first `count` lines of the shards `paths`, in order."""
    lines = []
    for path in paths:
        lines += read_lines(path, count - len(lines))
        if len(lines) >= count:
            break
    return lines


class LanguageModelTask(LanguageModelSpec, Task):
    """Base of `mlm` and `causal_lm`. `data.train_file` may be a glob of text
    shards, streamed rather than read into memory (`fmkeras.text.corpus`).

    Subclasses set `framed` and `row_extra` (rows are `[CLS] ... [SEP]`, or
    plain windows of `sequence_length + row_extra` ids), implement
    `flops_per_token` and `dataset(sequences, name, step, ...)`, and set
    `self.arch` (the model's size arguments) in `build_model`.
    """

    framed: ClassVar[bool] = True
    row_extra: ClassVar[int] = 0

    def passages(self, path):
        """The passages of a data file, read with the run's `data` keys."""
        data = self.config.data
        passages, skipped = read_passages(path, data.max_lines, data.text_column, data.bad_rows)
        if skipped:
            self.log(skipped_summary(path, skipped))
        return passages

    def read_data(self):
        data, files = self.config.data, self.files
        self.streamed = is_glob(files["train"])
        length = data.sequence_length + self.row_extra
        if self.streamed:
            shards = expand_shards(files["train"])
            vocabulary_lines = lambda: sample_lines(  # noqa: E731
                shards, min(data.max_lines or VOCABULARY_SAMPLE_LINES, VOCABULARY_SAMPLE_LINES))
        else:
            train_lines = self.passages(files["train"])
            vocabulary_lines = lambda: train_lines  # noqa: E731
        if self.config.model.init == "random":
            self.tokenizer = self.prepare_vocabulary(vocabulary_lines())
        else:  # continued pretraining keeps the checkpoint's vocabulary
            self.tokenizer = self.checkpoint_tokenizer()
        if self.streamed:
            self.train_sequences = ShardedCorpus(shards, self.tokenizer, length, self.framed,
                                                 data.max_lines, index_path=self.run.root
                                                 / "corpus_index.json", log=self.log)  # fmt: skip
            train = f"{len(shards)} shard(s) streamed"
        else:
            self.train_sequences = packed(train_lines, self.tokenizer, length, data.train_file,
                                          self.framed)  # fmt: skip
            train = f"{len(self.train_sequences):,} train"
        valid_lines = self.passages(files["valid"])
        self.valid_sequences = packed(valid_lines, self.tokenizer, length, data.valid_file,
                                      self.framed)  # fmt: skip
        self.log(f"data: {train} / {len(self.valid_sequences):,} valid sequences of "
                 f"{length} tokens, vocabulary {self.tokenizer.vocabulary_size:,}")  # fmt: skip
        train_config = self.config.train
        # Too little training data fails here, before the model exists; the stream
        # from step 0 is kept for the first fit (later phases start elsewhere).
        self.first_batches = self.dataset(self.train_sequences, data.train_file, 0)
        self.valid_data = self.dataset(self.valid_sequences, data.valid_file, 0, shuffle=False,
                                       repeat=False)  # fmt: skip
        if self.validation_size(len(self.valid_sequences)) < len(self.valid_sequences):
            self.valid_data = self.valid_data.take(train_config.eval_steps)  # batches

    def dataset(self, sequences, name, step, **kwargs):
        """The task's batches of `sequences` from `step` (`kwargs`: shuffle,
        repeat, shard_index, num_shards); too little data names the file."""
        raise NotImplementedError

    def flops_per_token(self):
        raise NotImplementedError

    def train_dataset(self, step):
        """The training stream from `step`. A streamed corpus under several
        replicas is read by each input pipeline from its own shards."""
        strategy = self.strategy
        if not self.streamed or strategy.num_replicas_in_sync == 1:
            if step == 0:
                return self.first_batches
            return self.dataset(self.train_sequences, self.config.data.train_file, step)
        batch_size = self.config.train.batch_size

        def pipeline(context):
            data = self.dataset(self.train_sequences, self.config.data.train_file, step,
                                shard_index=context.input_pipeline_id,
                                num_shards=context.num_input_pipelines)  # fmt: skip
            return data.rebatch(context.get_per_replica_batch_size(batch_size))

        return strategy.distribute_datasets_from_function(pipeline)

    def remember_strategy(self):
        """Call in `build_model` (inside the strategy scope)."""
        self.strategy = tf.distribute.get_strategy()

    def logger_settings(self, model):
        train = self.config.train
        tokens_per_step = train.batch_size * self.config.data.sequence_length
        dtype = keras.mixed_precision.global_policy().compute_dtype
        if train.peak_gflops:
            per_device, origin = train.peak_gflops, "train.peak_gflops"
        else:
            per_device, origin = peak_gflops(dtype)
        devices = accelerators_in_use(model.distribute_strategy)
        self.peak_gflops = per_device * devices
        self.log(f"{self.flops_per_token() / 1e6:.1f} MFLOP/token; MFU against {devices} x "
                 f"{per_device:.0f} GFLOP/s, the {dtype} matmul peak ({origin})")  # fmt: skip
        return {
            "tokens_per_step": tokens_per_step,
            "flops_per_step": tokens_per_step * self.flops_per_token(),
            "peak_flops": self.peak_gflops * 1e9,
        }

    def non_embedding_parameters(self):
        return parameter_counts(self.arch)["non_embedding"]

    def info(self):
        return {**super().info(), "lowercase": self.tokenizer.lowercase,
                "text_column": self.config.data.text_column}  # fmt: skip

    def final_metrics(self, model, validation):
        data, train = self.config.data, self.config.train
        return {
            **validation,  # loss, accuracy, perplexity: the names evaluate prints
            "peak_gflops": self.peak_gflops,
            "parameters": model.count_params(),
            "non_embedding_parameters": self.non_embedding_parameters(),
            "train_tokens": train.steps * train.batch_size * data.sequence_length,
            "train_flops_per_token": self.flops_per_token(),
        }
