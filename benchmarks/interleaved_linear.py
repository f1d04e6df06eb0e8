"""Linear + cross-entropy against the three bare GEMMs over the kept rows, interleaved.

The inputs and the GEMM floor are those of ``xloss bench --tables linear_cross_entropy``
(10% of the targets ignored; xloss drops those rows before its GEMMs, so the floor is the
GEMMs over the kept rows). Prints the median and range of the times and of the per-round
ratio xloss / GEMMs.

    python benchmarks/interleaved_linear.py N H V ROUNDS [bf16]
"""

from __future__ import annotations

import statistics
import sys
import time

import xloss
from xloss.bench.linear_cross_entropy import _inputs, bare_gemms


def main() -> None:
    n, h, v, rounds = map(int, sys.argv[1:5])
    case = dict(n=n, h=h, v=v, **({"dtype": sys.argv[5]} if len(sys.argv) > 5 else {}))
    x, w, y = _inputs(case)

    def fused():
        xloss.linear_cross_entropy(x, w, y).backward()
        x.grad = w.grad = None

    steps = {"gemms": bare_gemms(case), "xloss": fused}
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        ratios = [a / b for a, b in zip(values, times["gemms"], strict=True)]
        print(
            f"{case} {name}: {statistics.median(values):.2f} s ({min(values):.2f}-"
            f"{max(values):.2f}); / GEMMs (kept rows) {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
