"""The FLOP/s a device reaches on a large matmul in a given precision: the
ceiling model-FLOPs utilisation (MFU) is measured against.

`measure_matmul_gflops` times one `size`³ matmul; `peak_gflops` is what
training uses: the best of TensorFlow's graph mode and XLA (each reaches
different kernels: on CPUs, oneDNN's bfloat16 path runs in graph mode only),
calibrated once per machine, device and precision and cached, so a busy
moment at the start of one run does not deflate every later MFU (a
calibration made while other work loads the cores is used but not cached).
"""

import json
import os
import statistics
import time
from pathlib import Path

import tensorflow as tf

from fmkeras.training.precision import cpu_kind, cpuinfo_value

CACHE = Path(os.environ.get("FMKERAS_CACHE", Path.home() / ".cache" / "fmkeras")) / "peaks.json"


def measure_matmul_gflops(size=2048, repeats=6, device=None, dtype="float32", jit_compile=True):
    """Median GFLOP/s of a `size`x`size` matmul in `dtype` on `device`, XLA-compiled
    or in graph mode (`int8`: int8 operands, int32 products, as Keras's int8
    layers multiply on TensorFlow)."""
    with tf.device(device or "/cpu:0"):
        a = tf.cast(tf.random.normal((size, size)), dtype)
        b = tf.cast(tf.random.normal((size, size)), dtype)
        products = {"output_type": tf.int32} if dtype == "int8" else {}
        # Return the whole product: XLA would simplify a reduction of it away.
        matmul = tf.function(lambda a, b: tf.matmul(a, b, **products), jit_compile=jit_compile)
        matmul(a, b)[0, 0].numpy()  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b)[0, 0].numpy()
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def device_name(device="/cpu:0"):
    """A name for the hardware behind `device`: the GPU's name, or the CPU's model,
    widest matrix path (`precision.cpu_kind`) and core count."""
    if "GPU" in device.upper():
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return f"{cpuinfo_value('model name') or 'CPU'} ({cpu_kind()}) x{os.cpu_count()}"


BUSY_LOAD = 0.5  # load average per core (beyond this process) at which other work shares them


def load_average():
    """The one-minute load average (0 where the system does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def peak_gflops(dtype="float32", device="/cpu:0", cache=CACHE, rounds=3):
    """`(GFLOP/s, how it was obtained)`: the best matmul ceiling of `dtype` over
    graph mode and XLA and `rounds` measurements, cached per hardware."""
    key = f"{device_name(device)} | {device} | {dtype}"
    cache = Path(cache)
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]["gflops"], f"calibrated {known[key]['date']}, cached in {cache}"
    # Read before measuring: the probe's own threads would raise the load average.
    load = load_average()
    gflops = max(measure_matmul_gflops(device=device, dtype=dtype, jit_compile=xla)
                 for xla in (False, True) for _ in range(rounds))  # fmt: skip
    if load > BUSY_LOAD * (os.cpu_count() or 1) + 1:  # + 1: this process's own thread
        return gflops, (f"calibrated now, not cached: the load average was {load:.1f} on "
                        f"{os.cpu_count()} cores, which deflates a ceiling")  # fmt: skip
    known[key] = {"gflops": gflops, "date": time.strftime("%Y-%m-%d")}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known, indent=2), encoding="utf-8")
        os.replace(temporary, cache)
        where = f"calibrated now, cached in {cache}"
    except OSError:
        where = "calibrated now (cache not writable)"
    return gflops, where
