"""`python -m fmkeras.export RUN_DIR --name NAME`: a SavedModel for TF Serving.

Writes `saved_models/NAME/VERSION/` (TF Serving's layout; the next free
version unless `--version`; an existing version is kept unless
`--overwrite`), built in a temporary directory and renamed into place.
Any finished run exports: classify, tag, translate and pretrain (fill-mask);
`fmkeras.signatures` describes each task's signatures. The serving graph
uses core TensorFlow ops only, so stock TF Serving loads it.

Also written into the version directory:
- `assets.extra/tf_serving_warmup_requests`: `PredictionLog` records
  (tensorflow-serving-api protos) that TF Serving replays at load time, so
  the first user request does not pay for graph warm-up;
- `assets.extra/fmkeras.json`: the task, labels and source run;
- with `--tflite`: `assets.extra/model.tflite`, the token-id signature
  converted with dynamic-range quantization (int8 weights).

`--quantize int8` quantizes the Dense/EinsumDense kernels of the SavedModel
with Keras (`Model.quantize`); embeddings stay float32 (they are tied to
output heads).
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
import yaml

from fmkeras import signatures
from fmkeras.errors import ConfigError, FmkerasError
from fmkeras.inference import load_run
from fmkeras.tasks.finetune import TASK_FILE, read_task_info
from fmkeras.tasks.translate import load_translator
from fmkeras.text.wordpiece import WordPieceTokenizer
from fmkeras.training.run_dir import RunDir
from fmkeras.translate import decode_arguments, decode_config

WARMUP_TEXTS = {
    "classify": ["A gripping, beautifully acted film.", "dull"],
    "tag": ["Angela Merkel visited Paris on Monday .", "hello"],
    "translate": ["How are you today?", "Thank you."],
    "pretrain": ["The capital of France is [MASK].", "[MASK] [MASK] hello"],
}


def next_version(directory):
    versions = [int(p.name) for p in Path(directory).glob("*") if p.name.isdigit()]
    return max(versions, default=0) + 1


def run_task(run_dir):
    """The task of a finished run directory: task.json, or a finished pretraining run."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise ConfigError(f"run directory {run.root} does not exist")
    if (run.root / TASK_FILE).is_file():
        return read_task_info(run.root)["task"]
    if run.config.is_file() and run.model.is_file():
        config = yaml.safe_load(run.config.read_text(encoding="utf-8"))
        if config.get("task") == "pretrain":
            return "pretrain"
    raise ConfigError(f"{run.root} is not a finished run (no {TASK_FILE}, or no model.keras)")


def _quantize(model, mode):
    if mode is None:
        return
    if mode != "int8":
        raise ConfigError(f"--quantize supports int8, not {mode!r}")
    dense = (keras.layers.Dense, keras.layers.EinsumDense)
    model.quantize("int8", filters=lambda layer: isinstance(layer, dense))


def serving_functions(run_dir, task, decode=None, top_k=5, quantize=None):
    """`(ServingFunctions, info for fmkeras.json)` of a finished run."""
    if task in ("classify", "tag"):
        run = load_run(run_dir)
        _quantize(run.model, quantize)
        build = (
            signatures.classifier_functions if task == "classify" else signatures.tagger_functions
        )
        return build(run), run.info
    if task == "translate":
        translate, info = load_translator(run_dir, decode)
        _quantize(translate.model, quantize)
        return signatures.translator_functions(translate, decode.beam_width), {
            **info,
            "beam_width": decode.beam_width,
            "length_penalty": decode.length_penalty,
            "max_length": translate.max_length,
        }
    run = RunDir(run_dir)
    data = yaml.safe_load(run.config.read_text(encoding="utf-8"))["data"]
    model = keras.saving.load_model(run.model)
    _quantize(model, quantize)
    tokenizer = WordPieceTokenizer(run.vocab, lowercase=data["lowercase"])
    functions = signatures.fill_mask_functions(model, tokenizer, data["sequence_length"], top_k)
    info = {"task": "pretrain", "sequence_length": data["sequence_length"], "top_k": top_k}
    return functions, info


def write_warmup_requests(path, name, texts):
    """TF Serving's warm-up file: one `PredictionLog` per text batch."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in (texts, texts[:1]):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = name
            request.model_spec.signature_name = "serving_default"
            request.inputs["texts"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def write_tflite(functions, path):
    """Dynamic-range quantized TFLite of the token-id signature (converted from
    a SavedModel without the text signature's lookup tables)."""
    with tempfile.TemporaryDirectory() as directory:
        functions.archive(texts=False).write_out(directory, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        Path(path).write_bytes(converter.convert())


def export(run_dir, name, out="saved_models", version=None, overwrite=False, *,
           decode=None, top_k=5, quantize=None, tflite=False):  # fmt: skip
    """Exports a finished run; returns the version directory."""
    task = run_task(run_dir)
    base = Path(out) / name
    version = version or next_version(base)
    target = base / str(version)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite or another --version")
    if quantize and tflite:
        raise ConfigError("--tflite quantizes the float model itself; leave out --quantize")
    functions, info = serving_functions(run_dir, task, decode, top_k, quantize)
    base.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=base))
    try:
        model_dir = temporary / "model"
        functions.archive().write_out(str(model_dir), verbose=False)
        extra = model_dir / "assets.extra"
        extra.mkdir(exist_ok=True)
        info = {**info, "source": str(run_dir), "quantize": quantize}
        (extra / "fmkeras.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        write_warmup_requests(extra / "tf_serving_warmup_requests", name, WARMUP_TEXTS[task])
        if tflite:
            write_tflite(functions, extra / "model.tflite")
        if target.exists():
            shutil.rmtree(target)
        os.rename(model_dir, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fmkeras.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="a finished run directory (any task)")
    parser.add_argument("--name", required=True, help="model name (TF Serving's model_name)")
    parser.add_argument("--version", type=int, help="version number (default: next free)")
    parser.add_argument("--out", default="saved_models", help="base directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")
    parser.add_argument("--quantize", choices=["int8"], help="int8 weights (Keras quantize)")
    parser.add_argument("--tflite", action="store_true", help="also write a TFLite model")
    parser.add_argument("--top-k", type=int, default=5, help="fill-mask: pieces per mask")
    decode_arguments(parser)  # translate runs: decoding built into the graph
    args = parser.parse_args(argv)
    try:
        target = export(args.run_dir, args.name, args.out, args.version, args.overwrite,
                         decode=decode_config(args), top_k=args.top_k, quantize=args.quantize,
                         tflite=args.tflite)  # fmt: skip
    except FmkerasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {target} (signatures serving_default: texts; serve_token_ids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
