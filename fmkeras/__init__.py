"""fmkeras: Transformer foundation models with Keras 3 and TensorFlow.

Importing `fmkeras` is cheap: TensorFlow loads when `fmkeras.layers`,
`fmkeras.models` (or anything that needs them) is first used, so command
lines answer `--help` at once. Use `fmkeras.load_model(path)`, or import
`fmkeras.models` before `keras.saving.load_model`, to reload saved fmkeras
models (that import registers the serializable classes).
"""

import importlib

__version__ = "0.2.0"
__all__ = ["layers", "load_model", "models"]


def load_model(path, **kwargs):
    """`keras.saving.load_model` with fmkeras's layers and models registered."""
    import keras

    importlib.import_module("fmkeras.models")
    return keras.saving.load_model(path, **kwargs)


def __getattr__(name):
    if name in ("layers", "models"):
        return importlib.import_module(f"fmkeras.{name}")
    raise AttributeError(f"module 'fmkeras' has no attribute {name!r}")
