"""Encoder constructor arguments from a `ModelConfig` (the named sizes live in
`fmkeras.config.SIZES`, which needs no TensorFlow)."""

from fmkeras.config import ARCHITECTURE_KEYS, SIZES, architecture

__all__ = ["ARCHITECTURE_KEYS", "SIZES", "encoder_kwargs"]


def encoder_kwargs(model_config, vocabulary_size):
    """`Encoder` constructor arguments for a `ModelConfig`.

    `model.size` picks a row of `SIZES` (or `custom`); any of `num_layers`,
    `hidden_dim`, `num_heads`, `intermediate_dim` set in the config overrides
    it. A `custom` size must set all four; heads must divide the width
    (`ConfigError` otherwise).
    """
    return dict(
        vocabulary_size=vocabulary_size,
        dropout=model_config.dropout,
        max_sequence_length=model_config.max_sequence_length,
        activation=model_config.activation,
        normalize_first=model_config.normalize_first,
        use_bias=model_config.use_bias,
        **architecture(model_config),
    )
