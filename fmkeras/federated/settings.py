"""What every party of a federated run is built from (`Settings`), in a module
without Flower or TensorFlow, so the commands check a recipe at once."""

import dataclasses
import json

from fmkeras.config import build_config
from fmkeras.errors import ConfigError


@dataclasses.dataclass
class Settings:
    """What every party of a federated run needs to build the same model.

    `recipe` is a recipe path or bundled name (None: defaults only),
    `overrides` the `--set` strings, `out` the server's run directory,
    `data_dir` the data directory (None: `data.dir`, then `$FMKERAS_DATA_DIR`).
    """

    recipe: str | None = None
    overrides: tuple = ()
    out: str = "runs/federated"
    data_dir: str | None = None

    def config(self):
        from fmkeras.train import find_recipe

        recipe = find_recipe(self.recipe) if self.recipe else None
        config = build_config(recipe, self.overrides)
        if config.task not in ("classify", "tag"):
            raise ConfigError(f"federated training runs classify and tag recipes, not "
                              f"{config.task!r}")
        if config.train.ema:
            raise ConfigError("train.ema averages one run's weights over its steps; federated "
                              "clients restart from the server's weights every round: set it to 0")
        return config

    def run_config(self):
        """The `flwr run --run-config` values (TOML strings) for these settings."""
        return {"recipe": self.recipe or "", "overrides": json.dumps(list(self.overrides)),
                "out": self.out, "data-dir": self.data_dir or ""}  # fmt: skip

    @classmethod
    def from_run_config(cls, values):
        return cls(recipe=values.get("recipe") or None,
                   overrides=tuple(json.loads(values.get("overrides") or "[]")),
                   out=values.get("out") or cls.out,
                   data_dir=values.get("data-dir") or None)  # fmt: skip
