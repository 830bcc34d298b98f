"""Federated fine-tuning on Flower: `python -m fmkeras.federated` (see
`fmkeras.federated.command`)."""


def main(argv=None):
    """`fmkeras federated ...` (the console script's dispatcher calls this)."""
    from fmkeras.federated.command import main as command_main

    return command_main(argv)
