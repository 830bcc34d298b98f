"""fmkeras models: functional Keras models built from `fmkeras.layers`."""

from fmkeras.models.encoder import Encoder
from fmkeras.models.masked_lm import MaskedLM
from fmkeras.models.sizes import SIZES, encoder_kwargs

__all__ = ["SIZES", "Encoder", "MaskedLM", "encoder_kwargs"]
