"""fmkeras models: functional Keras models built from `fmkeras.layers`."""

from fmkeras.models.causal_lm import CausalLM
from fmkeras.models.classifier import Classifier
from fmkeras.models.distiller import Distiller
from fmkeras.models.encoder import Encoder
from fmkeras.models.masked_lm import MaskedLM
from fmkeras.models.sizes import SIZES, encoder_kwargs
from fmkeras.models.tagger import Tagger
from fmkeras.models.translator import Translator
from fmkeras.training import optimizer  # noqa: F401  (registers WarmupDecay for load_model)

__all__ = ["SIZES", "CausalLM", "Classifier", "Distiller", "Encoder", "MaskedLM", "Tagger",
           "Translator", "encoder_kwargs"]  # fmt: skip
