"""Compression of finished runs and during training.

`structured`: structured pruning (attention heads by gradient importance,
feed-forward units by magnitude) into a smaller dense model; `sparsity`:
gradual magnitude pruning with masks (`sparsity.*` keys); `command`: the
command line, `python -m fmkeras.compress prune RUN --heads F --ffn F --out DIR`.
"""


def main(argv=None):
    """`fmkeras compress ...` (the console script's dispatcher calls this)."""
    from fmkeras.compress.command import main as command_main

    return command_main(argv)
