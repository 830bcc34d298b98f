"""fmkeras models: functional Keras models built from `fmkeras.layers`."""

from fmkeras.models.causal_lm import CausalLM
from fmkeras.models.classifier import Classifier
from fmkeras.models.distiller import Distiller
from fmkeras.models.encoder import Encoder
from fmkeras.models.masked_lm import MaskedLM
from fmkeras.models.sizes import SIZES, encoder_kwargs
from fmkeras.models.tagger import Tagger
from fmkeras.models.translator import Translator

# Registers the training losses, AdamW and WarmupDecay that a saved model's
# compile config names, so load_model reads every fmkeras model.keras.
from fmkeras.training import losses, optimizer  # noqa: F401

__all__ = ["SIZES", "CausalLM", "Classifier", "Distiller", "Encoder", "MaskedLM", "Tagger",
           "Translator", "encoder_kwargs"]  # fmt: skip
