"""The configuration half of a task: what a run needs, checked before it starts.

Every `Task` is a `TaskSpec`. The built-in tasks' specs live here, in a module
that imports neither Keras nor TensorFlow, so `train`, `sweep`, `evaluate`,
`compress` and `federated` reject a missing `model.init` or teacher, a missing
data file or a `train.keep_best` that validation never reports in a fraction
of a second, not after the seconds TensorFlow takes to import. A task
registered with `register_task` is its own spec (its module is imported
already).
"""

from pathlib import Path
from typing import ClassVar

from fmkeras.config import resolve_init
from fmkeras.data import is_glob, require_file, resolve_data_dir
from fmkeras.errors import ConfigError
from fmkeras.training.run_dir import RunDir


class TaskSpec:
    """What a task reads and checks before anything runs.

    Subclasses set `name` (and `aliases`, `sections`, `glob_roles`) and may
    override the classmethods.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple] = ()  # old names that recipes and run directories may use
    sections: ClassVar[dict] = {}  # config sections this task declares: name -> dataclass
    glob_roles: ClassVar[tuple] = ()  # data_files roles that may be globs of shards

    @classmethod
    def data_files(cls, config):
        """`{role: path relative to the data directory}` of every file the run reads."""
        data = config.data
        files = {"train": data.train_file, "valid": data.valid_file}
        if data.vocab_file:
            files["vocab"] = data.vocab_file
        return files

    @classmethod
    def check_config(cls, config):
        """Raises `ConfigError` for settings this task cannot run (before anything
        runs); by default, a `model.init` that names no directory."""
        if config.model.init != "random":
            resolve_init(config.model.init)

    @classmethod
    def validation_metrics(cls, config):
        """The numeric metrics `evaluate` may report; `train.keep_best` and
        `sweep --metric` are checked against them before anything trains.
        Empty (the default): not declared, checked at the first validation."""
        return ()

    @classmethod
    def check_metric(cls, config, metric, option):
        """ConfigError naming `option` if validation never reports `metric`."""
        known = cls.validation_metrics(config)
        if known and metric not in known:
            raise ConfigError(f"{option}={metric!r}: task={cls.name} validation reports "
                              f"{', '.join(known)}")  # fmt: skip


class ClassifySpec(TaskSpec):
    name = "classify"

    @classmethod
    def validation_metrics(cls, config):
        return ("loss", "accuracy", "macro_f1", "f1")  # f1: with two labels


class TagSpec(TaskSpec):
    name = "tag"

    @classmethod
    def validation_metrics(cls, config):
        return ("loss", "accuracy", "precision", "recall", "f1")


LAYER_WEIGHTS = "distill.hidden_weight/attention_weight/value_weight"  # intermediate transfer
TEACHER_TASKS = ("classify", "distill")


def teacher_runs(distill):
    """The run directories `distill.teacher` names ("RUN" or "RUN1,RUN2,...")."""
    return [run.strip() for run in str(distill.teacher).split(",") if run.strip()]


def intermediate(distill):
    """Whether `distill` transfers intermediate layers (the teacher runs on the fly)."""
    return bool(distill.hidden_weight or distill.attention_weight or distill.value_weight)


class DistillSpec(ClassifySpec):
    name = "distill"

    @classmethod
    def check_config(cls, config):
        if not config.distill.teacher:
            raise ConfigError("task=distill needs distill.teacher=RUN_DIR, a finished classify run")
        teachers = teacher_runs(config.distill)
        for teacher in teachers:
            if not (Path(teacher) / "task.json").is_file():
                raise ConfigError(f"distill.teacher: {teacher} is not a finished run (no "
                                  f"task.json)")  # fmt: skip
            try:  # e.g. a task.json without its model.keras
                task = RunDir(teacher).read_info()["task"]
            except ConfigError as error:
                raise ConfigError(f"distill.teacher: {error}") from None
            if task not in TEACHER_TASKS:
                raise ConfigError(f"distill.teacher: {teacher} holds a {task!r} run; the "
                                  f"teacher must be a classify run")  # fmt: skip
        if intermediate(config.distill) and len(teachers) > 1:
            raise ConfigError(f"{LAYER_WEIGHTS} pair the student's blocks with one teacher's, "
                              f"but distill.teacher names {len(teachers)} runs: name one, or "
                              f"set the weights to 0")  # fmt: skip
        if intermediate(config.distill) and config.sparsity.target:
            raise ConfigError(f"sparsity.target cannot be combined with {LAYER_WEIGHTS} (the "
                              f"teacher's kernels would be pruned too)")  # fmt: skip
        if intermediate(config.distill) and config.distill.augment:
            raise ConfigError(f"distill.augment labels its copies with cached teacher logits, "
                              f"which intermediate transfer does not use: set distill.augment=0 "
                              f"or {LAYER_WEIGHTS} to 0")  # fmt: skip
        super().check_config(config)


class LanguageModelSpec(TaskSpec):
    """Language models read plain text or a TSV's text column; the training
    file may be a glob of text shards."""

    glob_roles = ("train",)

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        train_file = config.data.train_file
        if is_glob(train_file) and train_file.endswith(".tsv"):
            raise ConfigError(f"data.train_file: {train_file} is a glob of TSVs, but shards "
                              "are streamed as plain text (labels included); name one "
                              "TSV (its data.text_column is read) or text shards")  # fmt: skip


class MaskedLMSpec(LanguageModelSpec):
    name = "mlm"
    aliases = ("pretrain",)

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config.data.objective == "mlm_nsp" and is_glob(config.data.train_file):
            raise ConfigError(f"data.objective=mlm_nsp draws second segments from anywhere in "
                              f"the corpus and needs one train_file, not the glob "
                              f"{config.data.train_file}; use data.objective=mlm")  # fmt: skip

    @classmethod
    def validation_metrics(cls, config):
        nsp = ("nsp_loss", "nsp_accuracy") if config.data.objective == "mlm_nsp" else ()
        return ("loss", "accuracy", "perplexity", *nsp)


class CausalLMSpec(LanguageModelSpec):
    name = "causal_lm"

    @classmethod
    def check_config(cls, config):
        if config.model.init != "random":
            raise ConfigError(f"task=causal_lm trains from model.init=random (got "
                              f"{config.model.init!r}); a killed run resumes by itself")
        super().check_config(config)

    @classmethod
    def validation_metrics(cls, config):
        return ("loss", "accuracy", "perplexity")


class TranslateSpec(TaskSpec):
    name = "translate"

    @classmethod
    def validation_metrics(cls, config):
        return ("loss", "accuracy", "bleu", "chrf", "sentences_per_second")

    @classmethod
    def data_files(cls, config):
        data = config.data
        files = {
            f"{split}_{side}": f"{prefix}.{language}"
            for split, prefix in (("train", data.train_file), ("valid", data.valid_file))
            for side, language in (("source", data.source_language),
                                   ("target", data.target_language))
        }  # fmt: skip
        if data.vocab_file:
            files["vocab"] = data.vocab_file
        if data.target_vocab_file:
            files["target_vocab"] = data.target_vocab_file
        return files


BUILT_IN_SPECS = {spec.name: spec for spec in (MaskedLMSpec, ClassifySpec, TagSpec, TranslateSpec,
                                               CausalLMSpec, DistillSpec)}  # fmt: skip


def resolve_files(spec, config, data_dir_option, log):
    """`{role: Path}` of the task's data files; a missing one fails here, before
    any file is read or written."""
    data_dir, origin = resolve_data_dir(data_dir_option, config.data.dir)
    files = {role: require_file(relative, data_dir, origin, role in spec.glob_roles)
             for role, relative in spec.data_files(config).items()}  # fmt: skip
    if data_dir is not None:
        log(f"data directory {data_dir} (from {origin})")
    return files


def check_run(config, data_dir_option=None, log=print):
    """What fails before anything runs -> `{role: Path}` of the data files: the
    task's own checks, `train.keep_best`, and those files. Imports no
    TensorFlow for the built-in tasks."""
    from fmkeras.tasks.registry import get_spec

    spec = get_spec(config.task)
    spec.check_config(config)
    if config.train.keep_best:
        spec.check_metric(config, config.train.keep_best, "train.keep_best")
    return resolve_files(spec, config, data_dir_option, log)
