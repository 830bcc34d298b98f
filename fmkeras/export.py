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

Tag runs: `serving_default` takes `texts`, splits them on whitespace into
words and returns `words` and `tags` `(batch, max_words)` (padded with
""; words beyond the sequence length are tagged O); `serve_token_ids`
returns per-token `tag_ids` and `probabilities`.
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
from fmkeras.text.labelled import add_cls_sep


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
        ids = add_cls_sep(tokenizer.tokenize(texts)[:, : length - 2], cls_id, sep_id)
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

    return _archive(model, tokenizer, serve_texts, serve_token_ids)


def _ragged_fill(lengths, value):
    """Ragged rows holding `value`, `lengths[i]` times in row `i`."""
    return tf.RaggedTensor.from_row_lengths(tf.fill([tf.reduce_sum(lengths)], value), lengths)


def tagger_archive(run):
    """An `ExportArchive` with the text and token-id signatures of a tag run."""
    model, length = run.model, run.info["sequence_length"]
    tokenizer = CoreBertTokenizer(run.tokenizer.vocabulary, lowercase=run.tokenizer.lowercase)
    cls_id, sep_id, pad_id = run.tokenizer.cls_id, run.tokenizer.sep_id, run.tokenizer.pad_id
    tag_names = tf.constant(run.labels)

    def serve_texts(texts):
        words = tf.strings.split(texts)  # (batch, words)
        pieces = tokenizer.tokenize(words.flat_values)  # (all words, pieces)
        empty = tf.cast(tf.equal(pieces.row_lengths(), 0), tf.int64)  # e.g. only control chars
        pieces = tf.concat([pieces, _ragged_fill(empty, run.tokenizer.unk_id)], axis=1)
        first = _ragged_fill(pieces.row_lengths(), False)
        first = tf.concat([tf.ones_like(first[:, :1]), first[:, 1:]], axis=1)
        # (batch, pieces), cut to the length, with a flag on each word's first piece.
        ids = words.with_flat_values(pieces).merge_dims(1, 2)[:, : length - 2]
        flags = words.with_flat_values(first).merge_dims(1, 2)[:, : length - 2]
        ids = add_cls_sep(ids, cls_id, sep_id)
        token_ids = ids.to_tensor(pad_id)
        features = {
            "token_ids": token_ids,
            "segment_ids": tf.zeros_like(token_ids),
            "padding_mask": tf.cast(tf.ones_like(ids).to_tensor(0), tf.int32),
        }
        flags = flags.to_tensor(False)  # (batch, pieces)
        logits = model(features, training=False)[:, 1 : 1 + tf.shape(flags)[1]]
        tag_ids = tf.ragged.boolean_mask(tf.argmax(logits, axis=-1, output_type=tf.int32), flags)
        tags = tf.ragged.map_flat_values(tf.gather, tag_names, tag_ids)
        missing = words.row_lengths() - tags.row_lengths()  # words cut off by the length
        tags = tf.concat([tags, _ragged_fill(missing, "O")], axis=1)
        return {"words": words.to_tensor(""), "tags": tags.to_tensor("")}

    def serve_token_ids(token_ids, segment_ids, padding_mask):
        features = {
            "token_ids": token_ids,
            "segment_ids": segment_ids,
            "padding_mask": padding_mask,
        }
        logits = model(features, training=False)
        return {
            "tag_ids": tf.argmax(logits, axis=-1, output_type=tf.int32),
            "probabilities": tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1),
        }

    return _archive(model, tokenizer, serve_texts, serve_token_ids)


def _archive(model, tokenizer, serve_texts, serve_token_ids):
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
    archives = {"classify": classifier_archive, "tag": tagger_archive}
    if run.info["task"] not in archives:
        raise ConfigError(f"export supports classify and tag runs so far, not {run.info['task']!r}")
    base = Path(out) / name
    version = version or next_version(base)
    target = base / str(version)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite or another --version")
    base.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=base))
    try:
        archives[run.info["task"]](run).write_out(str(temporary / "model"), verbose=False)
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
    parser.add_argument("run_dir", help="a finished classify or tag run directory")
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
