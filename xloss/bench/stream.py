"""The machine's memory bandwidth: a STREAM triad a = b + s c over large arrays (numba)."""

from __future__ import annotations

import statistics
import time

import numpy as np


def _compiled_triad():
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def triad(a, b, c, scalar):
        for i in prange(a.shape[0]):
            a[i] = b[i] + scalar * c[i]

    return triad


def triad_bandwidth(num_elements: int = 1 << 25, repeats: int = 7) -> float:
    """Bytes per second of the triad, counted as STREAM does (2 reads + 1 write of float64)."""
    from xloss.ops.kernel import _set_threads

    triad = _compiled_triad()
    _set_threads()
    a = np.zeros(num_elements)
    b = np.ones(num_elements)
    c = np.full(num_elements, 2.0)
    triad(a, b, c, 3.0)  # compile and fault in the pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        triad(a, b, c, 3.0)
        times.append(time.perf_counter() - start)
    return 3 * a.nbytes / statistics.median(times)


def copy_seconds(num_bytes: int, repeats: int = 5) -> float:
    """Median time of ``dst.copy_(src)`` over fp32 tensors of ``num_bytes``, pages faulted in:
    one read and one write of that many bytes, the floor of a one-pass kernel over them."""
    import torch

    source = torch.randn(max(1, num_bytes // 4))
    dest = torch.empty_like(source)
    dest.copy_(source)  # fault in the pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dest.copy_(source)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
