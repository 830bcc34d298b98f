"""The FLOP/s a device reaches on a large float32 matmul: the ceiling MFU is measured against."""

import statistics
import time

import tensorflow as tf


def measure_matmul_gflops(size=2048, repeats=6, device=None):
    """Median GFLOP/s of an XLA-compiled `size`x`size` float32 matmul on `device`."""
    with tf.device(device or "/cpu:0"):
        a = tf.random.normal((size, size))
        b = tf.random.normal((size, size))
        # Return the whole product: XLA would simplify a reduction of it away.
        matmul = tf.function(tf.matmul, jit_compile=True)
        matmul(a, b)[0, 0].numpy()  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b)[0, 0].numpy()
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9
