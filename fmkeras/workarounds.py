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
"""

import tensorflow as tf
from keras import tree

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
