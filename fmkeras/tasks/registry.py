"""The task registry: task names (and their old spellings) -> `Task` classes.

Built-in tasks are imported on first use, so looking up or validating a
name, and checking a configuration against its task's spec (`get_spec`,
`fmkeras.tasks.spec`), needs no TensorFlow. A new task registers itself with
`@register_task` (see README, "Adding a task"); recipes then name it with
`task: NAME`, and `train`, `evaluate`, `predict` and `export` find it here.
The command lines import the modules named in `$FMKERAS_TASK_MODULES`
(comma-separated) before they look a task up, so tasks outside fmkeras
work from the command line too.
"""

import importlib
import os

from fmkeras.errors import ConfigError
from fmkeras.tasks.spec import BUILT_IN_SPECS

BUILT_IN = {  # name -> "module:class" of the Task, imported on first use
    "mlm": "fmkeras.tasks.mlm:MaskedLMTask",
    "classify": "fmkeras.tasks.classify:ClassifyTask",
    "tag": "fmkeras.tasks.tag:TagTask",
    "translate": "fmkeras.tasks.translation:TranslateTask",
    "causal_lm": "fmkeras.tasks.causal_lm:CausalLMTask",
    "distill": "fmkeras.tasks.distill:DistillTask",
}
# Old spellings that recipes and run directories still use.
ALIASES = {alias: spec.name for spec in BUILT_IN_SPECS.values() for alias in spec.aliases}
_registered = {}  # tasks registered at run time: name -> class
MODULES_ENV = "FMKERAS_TASK_MODULES"


def import_task_modules():
    """Imports the modules in `$FMKERAS_TASK_MODULES` (they register their tasks)."""
    for name in filter(None, (part.strip() for part in os.environ.get(MODULES_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"${MODULES_ENV}: cannot import {name!r} ({error})") from None


def register_task(task_class):
    """Class decorator: makes `task_class` (a `Task` with a `name`) trainable,
    evaluable and exportable by name. Returns the class."""
    name = task_class.name
    if not name or name in ALIASES:
        raise ValueError(f"a task needs a name that is not an alias, got {name!r}")
    _registered[name] = task_class
    for alias in task_class.aliases:
        ALIASES[alias] = name
    return task_class


def task_names():
    """Every task name, built-in first, then the registered ones."""
    import_task_modules()
    return [*BUILT_IN, *(name for name in _registered if name not in BUILT_IN)]


def canonical_task(name):
    """The registered name for `name` or one of its aliases; ConfigError otherwise."""
    import_task_modules()
    name = ALIASES.get(name, name)
    if name not in BUILT_IN and name not in _registered:
        choices = ", ".join(task_names())
        raise ConfigError(f"task={name!r} is not one of {choices} (pretrain = mlm)")
    return name


def get_task(name):
    """The `Task` class registered as `name` (or an alias of it)."""
    name = canonical_task(name)
    if name not in _registered:
        module, _, attribute = BUILT_IN[name].partition(":")
        _registered[name] = getattr(importlib.import_module(module), attribute)
    return _registered[name]


def get_spec(name):
    """The `TaskSpec` of task `name` (or an alias): its checks, without importing
    a built-in task's module (so without TensorFlow)."""
    name = canonical_task(name)
    return _registered.get(name) or BUILT_IN_SPECS[name]


def declared_sections(task=None):
    """Config sections that registered tasks (or only `task`) declare: name -> dataclass."""
    import_task_modules()
    sections = {}
    for name, task_class in _registered.items():
        if task is None or name == ALIASES.get(task, task):
            sections.update(task_class.sections)
    return sections
