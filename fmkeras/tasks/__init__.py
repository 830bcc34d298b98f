"""Tasks: what a run trains, and how its finished run is used.

`registry` maps task names to `Task` classes (`base`) and to their specs
(`spec`: what a run checks before it starts, without TensorFlow); each task
is one module: `mlm` (masked-LM pretraining) and `causal_lm` (GPT-style, both
on `language_model.LanguageModelTask`), `classify`, `tag` (both on
`finetune.EncoderTask`), `distill` and `translation`.
"""


def load_run(run_dir, tasks=None, **options):
    """A `Predictor` for the finished run directory `run_dir`, of any task (or
    one of `tasks`); `options` go to the task's `load` (e.g. `decode`, `top_k`)."""
    from fmkeras.errors import ConfigError
    from fmkeras.tasks.registry import get_task
    from fmkeras.training.run_dir import RunDir

    run = RunDir(run_dir)
    info = run.read_info()
    if tasks and info["task"] not in tasks:
        raise ConfigError(f"{run.root} holds a {info['task']!r} run; this command needs a "
                          f"{' or '.join(map(repr, tasks))} run")  # fmt: skip
    return get_task(info["task"]).load(run, info, **options)
