"""What every command line shares, and the `fmkeras` console script.

`fmkeras train|sweep|evaluate|predict|translate|generate|export|serve|convert|launch|
flops|explain|federated|compress ...` runs the same `main` as `python -m
fmkeras.<command> ...`. Every `main` is wrapped by `command`: an
`FmkerasError` prints one line and exits
2 (`Stopped`, a run stopped by SIGTERM after its backup: 0), Ctrl-C exits
130, and TensorFlow's C++ log level is set before TensorFlow is imported
(command modules import it inside `main`, so `--help` answers at once).
"""

import argparse
import functools
import importlib
import os
import sys

from fmkeras import __version__
from fmkeras.errors import FmkerasError, Stopped

COMMANDS = {
    "train": "train a model from a recipe (default: the quickstart)",
    "evaluate": "score a finished run on a labelled file",
    "predict": "labels, tags, translations, masked words or continuations from a finished run",
    "translate": "translate sentences with a finished translate run",
    "generate": "continue prompts with a finished causal_lm run (sampling with a cache)",
    "export": "write a SavedModel for TF Serving",
    "serve": "serve exported SavedModels over TF Serving's REST API",
    "convert": "import a Hugging Face BERT checkpoint",
    "launch": "run a command as several local multi-worker processes",
    "flops": "parameters, FLOPs and memory of the named sizes",
    "explain": "why a finished run predicted what it did (attributions, attention, faithfulness)",
    "federated": "federated fine-tuning on Flower: simulate, or server and client processes",
    "compress": "structured pruning of a finished classify run (heads, feed-forward units)",
    "sweep": "a grid of runs over recipe keys (learning rates, steps, seeds), ranked",
}
# TensorFlow's C++ logs are off in the command lines: at start-up even its
# error level reports CUDA probing and oneDNN notices on CPU-only machines, and
# fmkeras reports failures itself. TF_CPP_MIN_LOG_LEVEL=0 (or 2) shows them.
TF_LOG_LEVEL = "3"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default (where it has one) and keeps the description's
    and epilog's line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += f" (default: {action.default})"
        return text


def parser(prog, doc, epilog=None, version_flag=True):
    """An `ArgumentParser` for `python -m fmkeras.PROG` with `--version` (unless
    the command uses that flag itself), shown defaults, the module docstring as
    description and `epilog` as examples."""
    result = argparse.ArgumentParser(prog=f"python -m fmkeras.{prog}", description=doc,
                                     epilog=epilog, formatter_class=HelpFormatter)  # fmt: skip
    if version_flag:
        result.add_argument("--version", action="version", version=f"fmkeras {__version__}")
    return result


def rounded(value, digits=4):
    """`value` (nested dicts and lists) with floats rounded, for output people
    read; files written for programs keep full precision."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    return value


def decode_arguments(parser):
    """Decoding flags of translate runs (`translate`, `evaluate`, `predict`, `export`)."""
    group = parser.add_argument_group("translate runs")
    group.add_argument("--beam", type=int, default=4, help="beam width (1: greedy)")
    group.add_argument("--length-penalty", type=float, default=0.6,
                       help="GNMT length penalty of beam search")  # fmt: skip
    group.add_argument("--max-length", type=int,
                       help="target tokens (default: the training sequence length)")  # fmt: skip


def decode_config(args):
    from fmkeras.config import DecodeConfig

    return DecodeConfig(beam_width=args.beam, length_penalty=args.length_penalty,
                        max_length=args.max_length)  # fmt: skip


def command(main):
    """Wraps a command's `main(argv)`: one-line errors with exit 2, exit 130 on Ctrl-C."""

    @functools.wraps(main)
    def wrapper(argv=None):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
        try:
            return main(sys.argv[1:] if argv is None else list(argv)) or 0
        except Stopped as error:  # e.g. preemption: a backup was written, nothing is wrong
            print(error, file=sys.stderr)
            return 0
        except FmkerasError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # e.g. `| head`: the reader has what it wanted
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python's documented idiom
            return 0

    return wrapper


def main(argv=None):
    """`fmkeras COMMAND ...`: dispatches to `fmkeras.COMMAND.main`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    listing = "\n".join(f"  {name:10} {text}" for name, text in COMMANDS.items())
    usage = f"usage: fmkeras COMMAND [ARGS ...]  (fmkeras COMMAND --help)\n\ncommands:\n{listing}"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"fmkeras {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"fmkeras.{argv[0]}")
    sys.argv[0] = f"fmkeras {argv[0]}"
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
