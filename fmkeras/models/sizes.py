"""Named encoder sizes (BERT miniatures, Turc et al. 2019, plus BERT-Base)."""

SIZES = {
    #         layers       width           heads         feed-forward
    "tiny": dict(num_layers=2, hidden_dim=128, num_heads=2, intermediate_dim=512),
    "mini": dict(num_layers=4, hidden_dim=256, num_heads=4, intermediate_dim=1024),
    "small": dict(num_layers=4, hidden_dim=512, num_heads=8, intermediate_dim=2048),
    "medium": dict(num_layers=8, hidden_dim=512, num_heads=8, intermediate_dim=2048),
    "base": dict(num_layers=12, hidden_dim=768, num_heads=12, intermediate_dim=3072),
}

ARCHITECTURE_KEYS = ("num_layers", "hidden_dim", "num_heads", "intermediate_dim")


def encoder_kwargs(model_config, vocabulary_size):
    """`Encoder` constructor arguments for a `ModelConfig`.

    `model.size` picks a row of `SIZES` (or `custom`); any of `num_layers`,
    `hidden_dim`, `num_heads`, `intermediate_dim` set in the config overrides
    it. A `custom` size must set all four.
    """
    if model_config.size == "custom":
        base = {}
    elif model_config.size in SIZES:
        base = dict(SIZES[model_config.size])
    else:
        raise ValueError(
            f"model.size={model_config.size!r} is not a known size; "
            f"choose one of {[*SIZES, 'custom']}."
        )
    for key in ARCHITECTURE_KEYS:
        value = getattr(model_config, key)
        if value is not None:
            base[key] = value
    missing = [k for k in ARCHITECTURE_KEYS if k not in base]
    if missing:
        raise ValueError(
            "model.size=custom needs " + ", ".join(f"model.{k}" for k in missing) + " to be set."
        )
    if base["hidden_dim"] % base["num_heads"]:
        raise ValueError(
            f"model.hidden_dim={base['hidden_dim']} must be divisible by "
            f"model.num_heads={base['num_heads']}."
        )
    return dict(
        vocabulary_size=vocabulary_size,
        dropout=model_config.dropout,
        max_sequence_length=model_config.max_sequence_length,
        activation=model_config.activation,
        normalize_first=model_config.normalize_first,
        **base,
    )
