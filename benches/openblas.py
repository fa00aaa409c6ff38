#!/usr/bin/env python3
"""Measures numpy's f32 GEMM and GEMV (OpenBLAS) at the shapes of the Rust kernel benches.

Prints the OpenBLAS kernel in use and GFLOP/s per shape (best of several timed repeats), so that
the `gemm`-based CPU backend can be compared against it on the same machine:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 benches/openblas.py

With `--cpu-time` it reports process CPU time per call instead of wall time; run it with
OPENBLAS_NUM_THREADS=1 to compare one core against `cargo bench --bench cpu_time`, a comparison that
holds on a loaded machine (time spent descheduled is not counted).

Some machines set OPENBLAS_CORETYPE to work around old OpenBLAS builds. It makes a current numpy
pick a slower kernel, so unset it (as above) for this measurement only.
"""

import os
import sys
import time

import numpy as np

try:
    from threadpoolctl import threadpool_info
except ImportError:  # threadpoolctl only reports the kernel in use, so the timings run without it.
    threadpool_info = None

# (label, m, k, n): y[m, n] = x[m, k] · w[n, k]ᵀ, the layout of the Rust `matmul`.
SHAPES = [
    ("gemm 1024x1024x1024", 1024, 1024, 1024),
    ("prefill 64x896->4864", 64, 896, 4864),
    ("decode 1x896->4864", 1, 896, 4864),
    ("decode 1x896->151936", 1, 896, 151936),
]

# Seconds of repeated calls per timing, and timings per shape (the best one is reported).
SECONDS_PER_TIMING = 0.5
TIMINGS = 5


def cpu_seconds():
    """Returns user plus system CPU seconds of this process."""
    times = os.times()
    return times.user + times.system


def cpu_time_call(call):
    """Returns CPU seconds per call of `call` over 1.5 CPU seconds."""
    call()
    start = cpu_seconds()
    calls = 0
    while cpu_seconds() - start < 1.5:
        call()
        calls += 1
    return (cpu_seconds() - start) / calls


def time_call(call):
    """Returns the best wall-clock seconds per call of `call` over TIMINGS timings."""
    call()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < 0.1:
        call()
        calls += 1
    per_timing = max(1, int(calls * SECONDS_PER_TIMING / 0.1))

    best = float("inf")
    for _ in range(TIMINGS):
        start = time.perf_counter()
        for _ in range(per_timing):
            call()
        best = min(best, (time.perf_counter() - start) / per_timing)
    return best


def main():
    measure = cpu_time_call if "--cpu-time" in sys.argv[1:] else time_call
    print(f"# {'process CPU' if measure is cpu_time_call else 'wall-clock'} time per call")
    if threadpool_info is not None:
        for pool in threadpool_info():
            if pool.get("internal_api") == "openblas":
                print(
                    f"# {pool['internal_api']} {pool['version']}, kernel {pool['architecture']}, "
                    f"{pool['num_threads']} threads"
                )
    print(f"# numpy {np.__version__}")

    rng = np.random.default_rng(0)
    for label, m, k, n in SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        out = np.empty((m, n), dtype=np.float32)
        if m == 1:
            # GEMV: w · x, which numpy runs as one sgemv.
            vector = x[0]
            row = out[0]
            seconds = measure(lambda: np.matmul(w, vector, out=row))
        else:
            seconds = measure(lambda: np.matmul(x, w.T, out=out))
        flops = 2.0 * m * k * n
        weight_bytes = 4.0 * n * k
        print(
            f"{label:24s} {seconds * 1e6:10.1f} us  {flops / seconds / 1e9:7.2f} GFLOP/s  "
            f"{weight_bytes / seconds / 1e9:6.2f} GB/s of weights"
        )


if __name__ == "__main__":
    main()
