"""`python -m fmkeras.export RUN_DIR --name NAME`: a SavedModel for TF Serving.

Writes `saved_models/NAME/VERSION/` (TF Serving's layout; the next free
version unless `--version`; an existing version is kept unless
`--overwrite`), built in a hidden temporary directory (`.N-*`) and renamed
into place, so a server never sees a partial version: an export killed
midway leaves only the hidden directory, which the next export of that
name removes.
Any finished run exports: classify, tag, translate and mlm (fill-mask);
`fmkeras.signatures` describes each task's signatures. The serving graph
uses core TensorFlow ops only, so stock TF Serving loads it.

Also written into the version directory:
- `assets.extra/tf_serving_warmup_requests`: `PredictionLog` records
  (tensorflow-serving-api protos) that TF Serving replays at load time, so
  the first user request does not pay for graph warm-up;
- `assets.extra/fmkeras.json`: the task, labels and source run;
- with `--tflite`: `assets.extra/model.tflite`, the token-id signature
  converted with dynamic-range quantization (int8 weights); `--tflite
  float32` keeps float32 weights (XNNPACK runs it; the float model's answers);
  `--tflite-batch-size N` fixes its inputs to N rows of the run's sequence
  length (as Optimum's TFLite export does), which removes half its ops.

`--quantize int8` quantizes the Dense/EinsumDense kernels of the SavedModel
with Keras (`Model.quantize`); embeddings stay float32 (they are tied to
output heads). `--precision bfloat16` stores the weights and computes in
bfloat16 (softmax and layer-norm statistics in float32; inputs and outputs
keep their float32 dtypes): half the size, and faster where the CPU has a
bfloat16 matrix path.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fmkeras import cli
from fmkeras.errors import ConfigError

EXAMPLES = """examples:
  python -m fmkeras.export runs/sst2 --name sst2
  python -m fmkeras.export runs/sst2 --name sst2 --tflite
  python -m fmkeras.export runs/sst2 --name sst2 --tflite float32
  python -m fmkeras.export runs/sst2 --name sst2 --tflite --tflite-batch-size 1
  python -m fmkeras.export runs/sst2 --name sst2 --precision bfloat16
  python -m fmkeras.export runs/en_zh --name en_zh --beam 4"""


def next_version(directory):
    versions = [int(p.name) for p in Path(directory).glob("*") if p.name.isdigit()]
    return max(versions, default=0) + 1


def quantize_model(model, mode):
    """Keras int8 quantization of the Dense/EinsumDense kernels of `model`, in place."""
    import keras

    if mode != "int8":
        raise ConfigError(f"--quantize supports int8, not {mode!r}")
    dense = (keras.layers.Dense, keras.layers.EinsumDense)
    model.quantize("int8", filters=lambda layer: isinstance(layer, dense))


def write_warmup_requests(path, name, inputs):
    """TF Serving's warm-up file: one `PredictionLog` per batch of `inputs`
    (`{input name: [strings]}`, plus scalar settings such as a causal LM's
    `temperature`, given as numpy scalars): all rows, then the first row."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for rows in (None, 1):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = name
            request.model_spec.signature_name = "serving_default"
            for key, values in inputs.items():
                if isinstance(values, list):
                    proto = tf.make_tensor_proto(values[:rows], dtype=tf.string)
                else:  # a scalar setting, in the signature's dtype
                    proto = tf.make_tensor_proto(values)
                request.inputs[key].CopyFrom(proto)
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


TFLITE_MODES = ("dynamic", "float32", "int8")
EXPORT_TFLITE_MODES = ("dynamic", "float32")  # int8 (full-integer) loses ~25 points on SST-2
EXPORT_PRECISIONS = ("float32", "bfloat16")


def write_tflite(functions, path, mode="dynamic", calibration=None, input_shape=None):
    """TFLite of the token-id signature (converted from a SavedModel without
    the text signature's lookup tables). `mode`: `dynamic` (int8 weights,
    float activations), `float32`, or `int8` (full-integer: int8 weights and
    activations wherever TFLite has int8 kernels, float elsewhere, with
    activation ranges calibrated on `calibration`, a list of token-id feature
    dicts of one row each). `input_shape`: `(batch, tokens)` fixes the inputs'
    shape, so the converter folds the shape arithmetic (half the ops of a
    classifier; Optimum's TFLite export fixes shapes too); None: any shape."""
    import tensorflow as tf

    if mode not in TFLITE_MODES:
        raise ConfigError(f"TFLite mode {mode!r}: use one of {', '.join(TFLITE_MODES)}")
    with tempfile.TemporaryDirectory() as directory:
        functions.save(directory, texts=False, id_shape=input_shape)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory)
        if mode != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "int8":
            # (signature, inputs) pairs: the converted model has more than one signature
            converter.representative_dataset = lambda: (("serve_token_ids", features)
                                                        for features in calibration)  # fmt: skip
        Path(path).write_bytes(converter.convert())


def export(run_dir, name, out="saved_models", version=None, overwrite=False, *,
           decode=None, top_k=5, quantize=None, tflite=None, tflite_batch_size=None,
           precision="float32"):  # fmt: skip
    """Exports a finished run of any task; returns the version directory.
    `tflite`: also a TFLite model, `"dynamic"` (or True) or `"float32"`;
    `tflite_batch_size`: its inputs fixed to that many rows of the run's
    sequence length."""
    from fmkeras.tasks import load_run

    base = Path(out) / name
    tflite = "dynamic" if tflite is True else tflite
    if tflite and tflite not in EXPORT_TFLITE_MODES:
        raise ConfigError(f"--tflite {tflite!r}: use one of {', '.join(EXPORT_TFLITE_MODES)}")
    if tflite_batch_size is not None and not tflite:
        raise ConfigError("--tflite-batch-size shapes the TFLite model; add --tflite")
    if tflite_batch_size is not None and tflite_batch_size < 1:
        raise ConfigError(f"--tflite-batch-size must be positive, got {tflite_batch_size}")
    if quantize and tflite:
        raise ConfigError("--tflite quantizes the float model itself; leave out --quantize")
    if precision not in EXPORT_PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: use one of {', '.join(EXPORT_PRECISIONS)}")
    if precision != "float32" and (quantize or tflite):
        raise ConfigError(f"--precision {precision} exports the unquantized model; leave out "
                          "--quantize and --tflite")  # fmt: skip
    version = version or next_version(base)
    target = base / str(version)
    if target.exists() and not overwrite:  # said before the run is loaded
        raise ConfigError(f"{target} exists; pass --overwrite or another --version")
    predictor = load_run(run_dir, decode=decode, top_k=top_k, precision=precision)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the export directory {base}: {error.strerror}") from None
    if quantize:
        quantize_model(predictor.model, quantize)
    functions = predictor.serving_functions()
    for leftover in base.glob(".*-*"):  # from an export killed midway
        if leftover.is_dir() and leftover.name[1:].split("-")[0].isdigit():
            shutil.rmtree(leftover, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=base))
    try:
        model_dir = temporary / "model"
        functions.save(model_dir)
        extra = model_dir / "assets.extra"
        extra.mkdir(exist_ok=True)
        tflite_shape = [tflite_batch_size, predictor.info["sequence_length"]] \
            if tflite_batch_size else None  # fmt: skip
        info = {**predictor.export_info(), "source": str(run_dir), "quantize": quantize,
                "precision": precision, "tflite": tflite or None,
                "tflite_input_shape": tflite_shape,
                "serving_inputs": list(functions.text_names)}  # fmt: skip
        (extra / "fmkeras.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        write_warmup_requests(extra / "tf_serving_warmup_requests", name,
                              predictor.warmup_inputs())  # fmt: skip
        if tflite:
            write_tflite(functions, extra / "model.tflite", tflite, input_shape=tflite_shape)
        if target.exists():  # --overwrite: the old version leaves with the temporary directory
            os.rename(target, temporary / "replaced")
        os.rename(model_dir, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def build_parser():
    # --version is the model version here (TF Serving's); `fmkeras --version` tells fmkeras's.
    parser = cli.parser("export", __doc__, EXAMPLES, version_flag=False)
    parser.add_argument("run_dir", help="a finished run directory (any task)")
    parser.add_argument("--name", required=True, help="model name (TF Serving's model_name)")
    parser.add_argument("--version", dest="model_version", type=int,
                        help="version number (default: the next free one)")  # fmt: skip
    parser.add_argument("--out", default="saved_models", help="base directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")
    parser.add_argument("--quantize", choices=["int8"], help="int8 weights (Keras quantize)")
    parser.add_argument("--tflite", nargs="?", const="dynamic", choices=EXPORT_TFLITE_MODES,
                        help="also write a TFLite model: dynamic (int8 weights; the default) "
                             "or float32")  # fmt: skip
    parser.add_argument("--tflite-batch-size", type=int, metavar="N",
                        help="fix the TFLite model's inputs to N rows of the run's sequence "
                        "length: the converter folds the shape arithmetic away (half the ops); "
                        "default: any shape")  # fmt: skip
    parser.add_argument("--precision", choices=EXPORT_PRECISIONS, default="float32",
                        help="weights and compute (bfloat16: half the size)")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=5, help="mlm (fill-mask): pieces per mask")
    cli.decode_arguments(parser)  # translate runs: decoding built into the graph
    return parser


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    target = export(args.run_dir, args.name, args.out, args.model_version, args.overwrite,
                    decode=cli.decode_config(args), top_k=args.top_k, quantize=args.quantize,
                    tflite=args.tflite, tflite_batch_size=args.tflite_batch_size,
                    precision=args.precision)  # fmt: skip
    info = json.loads((target / "assets.extra" / "fmkeras.json").read_text(encoding="utf-8"))
    inputs = ", ".join(info["serving_inputs"])
    print(f"wrote {target} (signatures serving_default: {inputs}; serve_token_ids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
