"""`python -m fmkeras.export RUN_DIR --name NAME`: a SavedModel for TF Serving.

Writes `saved_models/NAME/VERSION/` (TF Serving's layout; the next free
version unless `--version`; an existing version is kept unless
`--overwrite`), built in a temporary directory and renamed into place.

Signatures (classify runs):
- `serving_default`: `texts` (batch of raw UTF-8 strings) -> `label`
  (strings), `label_id`, `probabilities` `(batch, classes)`. Tokenization
  runs inside the graph with core TensorFlow ops only (no tensorflow-text),
  so stock TF Serving can load it.
- `serve_token_ids`: `token_ids`, `segment_ids`, `padding_mask` int32
  `(batch, seq)` -> the same outputs, for clients that tokenize themselves.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from fmkeras.errors import ConfigError, FmkerasError
from fmkeras.inference import load_run
from fmkeras.text.core_tokenizer import CoreBertTokenizer


def next_version(directory):
    versions = [int(p.name) for p in Path(directory).glob("*") if p.name.isdigit()]
    return max(versions, default=0) + 1


def classifier_archive(run):
    """An `ExportArchive` with the text and token-id signatures of a classify run."""
    model, labels, length = run.model, run.labels, run.info["sequence_length"]
    tokenizer = CoreBertTokenizer(run.tokenizer.vocabulary, lowercase=run.tokenizer.lowercase)
    cls_id, sep_id, pad_id = run.tokenizer.cls_id, run.tokenizer.sep_id, run.tokenizer.pad_id
    label_names = tf.constant(labels)

    def outputs(features):
        logits = model(features, training=False)
        label_id = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return {
            "label": tf.gather(label_names, label_id),
            "label_id": label_id,
            "probabilities": tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1),
        }

    def serve_texts(texts):
        pieces = tokenizer.tokenize(texts)[:, : length - 2]
        rows = pieces.nrows()
        ids = tf.concat([tf.fill([rows, 1], cls_id), pieces, tf.fill([rows, 1], sep_id)], axis=1)
        token_ids = ids.to_tensor(pad_id)
        padding_mask = tf.cast(tf.ones_like(ids).to_tensor(0), tf.int32)
        features = {
            "token_ids": token_ids,
            "segment_ids": tf.zeros_like(token_ids),
            "padding_mask": padding_mask,
        }
        return outputs(features)

    def serve_token_ids(token_ids, segment_ids, padding_mask):
        return outputs(
            {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": padding_mask}
        )

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(tokenizer._characters)  # lookup tables: tracked by hand
    archive.track(tokenizer._pieces)
    archive.add_endpoint(
        "serving_default",
        serve_texts,
        input_signature=[tf.TensorSpec([None], tf.string, name="texts")],
    )
    ids = [
        tf.TensorSpec([None, None], tf.int32, name=name)
        for name in ("token_ids", "segment_ids", "padding_mask")
    ]
    archive.add_endpoint("serve_token_ids", serve_token_ids, input_signature=ids)
    return archive


def export(run_dir, name, out="saved_models", version=None, overwrite=False):
    """Exports a classify run; returns the version directory."""
    run = load_run(run_dir)
    if run.info["task"] != "classify":
        raise ConfigError(f"export supports classify runs so far, not {run.info['task']!r}")
    base = Path(out) / name
    version = version or next_version(base)
    target = base / str(version)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite or another --version")
    base.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=base))
    try:
        classifier_archive(run).write_out(str(temporary / "model"), verbose=False)
        (temporary / "model" / "assets.extra").mkdir(exist_ok=True)
        (temporary / "model" / "assets.extra" / "fmkeras.json").write_text(
            json.dumps({**run.info, "source": str(run_dir)}, indent=2), encoding="utf-8"
        )
        if target.exists():
            shutil.rmtree(target)
        os.rename(temporary / "model", target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fmkeras.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="a finished classify run directory")
    parser.add_argument("--name", required=True, help="model name (TF Serving's model_name)")
    parser.add_argument("--version", type=int, help="version number (default: next free)")
    parser.add_argument("--out", default="saved_models", help="base directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")
    args = parser.parse_args(argv)
    try:
        target = export(args.run_dir, args.name, args.out, args.version, args.overwrite)
    except FmkerasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {target} (signatures serving_default: texts; serve_token_ids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
