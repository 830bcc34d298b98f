"""fmkeras: Transformer foundation models with Keras 3 and TensorFlow."""

import os

# Keep TensorFlow's C++ start-up chatter (CUDA probing on CPU-only machines,
# oneDNN notices) out of users' terminals; set TF_CPP_MIN_LOG_LEVEL to see it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from fmkeras import layers, models  # noqa: E402
from fmkeras.training import optimizer  # noqa: E402,F401  (registers WarmupDecay for load_model)

__version__ = "0.1.0"
__all__ = ["layers", "models"]
