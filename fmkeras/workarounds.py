"""Small, isolated fixes for upstream Keras 3 + tf.distribute bugs.

`patch_multi_worker_fit()` makes `model.fit` work under
`MultiWorkerMirroredStrategy` with Keras 3.15 (the range setup.cfg pins):

1. keras-team/keras#20585 (also tensorflow/tensorflow#72388): the symbolic
   build before `fit` tries to `reduce` a batch of per-replica *inputs*
   across workers ("Attempt to convert a value (PerReplica...) with an
   unsupported type"). Building only needs the shapes, so the patch builds
   from the first local replica's batch.
2. Right after it, Keras reduces scalar logs with `axis=0`
   ("Invalid reduction dimension 0 for input with 0 dimensions") under
   multi-worker collectives; the patch reduces rank-0 values with
   `axis=None`.

Both replace private functions of `keras.src.backend.tensorflow.trainer`;
`tests/test_workarounds.py` fails loudly if those change (so a Keras
upgrade is noticed) and checks that two local workers train in lockstep.

`compile_replica_steps_with_xla(model)` makes XLA work under tf.distribute.
Keras turns XLA off under a strategy, and forcing `jit_compile=True` makes
XLA compile Keras's whole `strategy.run`, which cannot reach the other
replicas' variables ("Trying to access resource ... located in device CPU:1
from device CPU:0"; keras#18110, keras-hub#949). The replacement train step
compiles each replica's forward and backward pass and leaves the
cross-replica sum and the optimizer update outside XLA, as TensorFlow
recommends for `jit_compile` with `strategy.run`. The embedding's gradient
stays `IndexedSlices` (its values and row ids are ordinary XLA outputs), so
the optimizer updates exactly as Keras's own step does (Keras's Adam updates
only the embedding rows a batch touched; a dense gradient would change that).

`predict_on_batch(model, features)`: Keras 3.15's `Model.predict_on_batch`
under a multi-replica `MirroredStrategy` runs the whole batch on every
replica and concatenates the outputs (two replicas: every row twice), so
validation under `distribute.strategy=mirrored` compared twice the
predictions with the labels. The replacement calls the model directly
(one copy) when the model's strategy has several replicas;
`tests/test_workarounds.py` notices when stock Keras returns one copy.

`TrailingEinsumDense`: Keras 3.15's TensorFlow `einsum` rewrites the attention
projections' equations (`btd,dnh->btnh`, `btnh,nhd->btd`) into `tf.matmul` of a
rank-3 input with a reshaped kernel, a broadcasting `BatchMatMulV2` whose kernel
gradient is one matmul per example followed by a `Sum` over the batch: the
problem keras-team/keras#22823 reported for `Dense` and #22832 fixed there (with
`tensordot`), still present in `EinsumDense`. The subclass computes those
equations with `ops.tensordot` (one 2-D matmul over all tokens, forward and
backward); weights, names, LoRA and quantized calls are `EinsumDense`'s (its
`quantize` skips subclasses with a warning unless told not to check the type,
which this one does, so int8 exports quantize the attention projections too).
On the 2-core AVX512-BF16 CPU an attention layer's forward + backward (batch
32, sequence 128, width 512, 8 heads) drops from 99.7 to 85.7 ms in bfloat16
and from 178 to 155 ms in float32 (with the matmul attention of
`fmkeras.layers.MultiHeadAttention`). `tests/test_workarounds.py` notices when
stock `EinsumDense` stops producing `BatchMatMulV2`.

`save_signatures(path, signatures, resources)`: Keras's `ExportArchive` keeps
its endpoints as `tf.function` attributes of the saved object, and
`tf.saved_model.save` traces each of them a second time, because the save
context is part of a trace's cache key (tensorflow/tensorflow#56370, closed
without a fix); writing an SST-2 run's SavedModel took 1.75x as long that
way (best of three interleaved rounds on the 2-core AMD host). Saving the
traced concrete functions as signatures only, on a module that tracks the
variables they capture (as `ExportArchive` does, each once) and the lookup
tables, writes the same signatures from one trace.
`tests/test_workarounds.py` notices when `ExportArchive` traces once.

`save_without_training_state(model, path)`: Keras 3 writes a compiled model's
optimizer into every `.keras` file and ignores `include_optimizer=False`
(tensorflow/tensorflow#84268, closed without a fix), so a run's final
`model.keras` held AdamW's two moments beside the weights (three times the
size: 75 MB instead of 25 for a BERT-Mini classifier), loading rebuilt and filled
an optimizer nobody used, and a merged LoRA model warned that its optimizer
had other variables than the saved one. Backups keep the optimizer state that
resuming needs; the final model is saved with the optimizer and the compile
configuration set aside for the call (as keras-hub presets and Hugging Face
checkpoints ship weights only), then put back.
`tests/test_workarounds.py` notices when `include_optimizer=False` works.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import tree
from keras.utils import unpack_x_y_sample_weight

_PATCHED = False


def patch_multi_worker_fit():
    """Applies both fixes once (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    import keras.src.backend.tensorflow.trainer as trainer

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):  # keras#20585
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tree.map_structure(
                    lambda value: (
                        self.distribute_strategy.experimental_local_results(value)[0]
                        if isinstance(value, tf.distribute.DistributedValues)
                        else value
                    ),
                    batch,
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    original_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):  # scalar logs: axis=None
        if reduction == "auto" and not isinstance(strategy, tf.distribute.TPUStrategy):
            reduction = "mean"
        if reduction == "mean" and trainer._collective_all_reduce_multi_worker(strategy):

            def reduce(value):
                local = (
                    value.values[0] if isinstance(value, tf.distribute.DistributedValues) else value
                )
                return strategy.reduce("MEAN", value, axis=0 if local.shape.rank else None)

            return tree.map_structure(reduce, values)
        return original_reduce(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    _PATCHED = True


def compile_replica_steps_with_xla(model):
    """Replaces the compiled `model`'s train step with one whose per-replica
    forward and backward pass is XLA-compiled (compile the model itself with
    `jit_compile=False`)."""

    loss_tracker = model.metrics[0]  # compiled models list their "loss" mean first
    if loss_tracker.name != "loss":
        raise RuntimeError(
            f"expected Keras's loss tracker first in model.metrics, got {loss_tracker.name!r}"
        )

    @tf.function(jit_compile=True)
    def loss_and_gradients(x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
            scaled = model.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, model.trainable_variables)
        return loss, y_pred, gradients

    def train_step(data):  # Keras's TensorFlow train step, with the XLA part split out
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        loss, y_pred, gradients = loss_and_gradients(x, y, sample_weight)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync  # loss is divided by it
        batch = tf.shape(tree.flatten(x)[0])[0]
        loss_tracker.update_state(loss * replicas, sample_weight=batch)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    model.train_step = train_step


def predict_on_batch(model, features):
    """`model.predict_on_batch(features)` as numpy, one row per input row under
    multi-replica strategies too (see the module docstring)."""
    if model.distribute_strategy.num_replicas_in_sync > 1:
        return tree.map_structure(np.asarray, model(features, training=False))
    return model.predict_on_batch(features)


@keras.saving.register_keras_serializable(package="fmkeras")
class TrailingEinsumDense(keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` whose equation contracts the input's trailing
    axes with the kernel's leading ones, computed with `ops.tensordot` (see the
    module docstring); any other equation runs as `EinsumDense` does."""

    def __init__(self, equation, *args, **kwargs):
        super().__init__(equation, *args, **kwargs)
        self.tensordot_axes = trailing_contraction(equation)

    def quantize(self, mode=None, type_check=True, config=None):
        # `EinsumDense.quantize` refuses subclasses (its type check), and
        # `Model.quantize` only warns, so int8 exports kept the attention
        # projections in float32. A quantized layer runs `EinsumDense`'s
        # `quantized_call`, never the `call` below, so it is safe to allow.
        super().quantize(mode, type_check=False, config=config)

    def call(self, inputs, training=None):
        if self.tensordot_axes is None:
            return super().call(inputs, training=training)
        x = keras.ops.tensordot(inputs, self.kernel, axes=self.tensordot_axes)
        if self.bias is not None:
            x = keras.ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


def trailing_contraction(equation):
    """`tensordot` axes of an einsum `equation` that is an outer product of
    the input's leading axes with the kernel's trailing ones (the trailing
    input axes summed with the leading kernel axes, in order), else None.

    >>> trailing_contraction("btd,dnh->btnh"), trailing_contraction("btnh,nhd->btd")
    (1, 2)
    >>> trailing_contraction("abc,cd->abd"), trailing_contraction("abc,dc->abd") is None
    (1, True)
    """
    inputs, output = equation.replace(" ", "").split("->")
    source, kernel = inputs.split(",")
    for count in range(1, min(len(source), len(kernel)) + 1):
        if source[-count:] == kernel[:count] and source[:-count] + kernel[count:] == output:
            return count
    return None


def save_signatures(path, signatures, resources=()):
    """`tf.saved_model.save` of `signatures` (`{name: ConcreteFunction}`) with
    nothing traced again (see the module docstring). `resources`: trackable
    resources the functions use that are not variables (lookup tables)."""
    captured = {}  # each captured variable once, in the order the functions use them
    for function in signatures.values():
        captured.update((id(variable), variable) for variable in function.variables)
    module = tf.Module()
    module.captured_variables = list(captured.values())
    module.resources = list(resources)
    tf.saved_model.save(module, str(path), signatures=signatures)


def save_without_training_state(model, path):
    """`model.save(path)` without the optimizer state and the compile
    configuration (see the module docstring); `model` keeps both."""
    if not getattr(model, "compiled", False):  # an encoder that was never compiled
        model.save(path)
        return
    optimizer, compiled = model.optimizer, model.compiled
    model.optimizer, model.compiled = None, False
    try:
        model.save(path)
    finally:
        model.optimizer, model.compiled = optimizer, compiled
