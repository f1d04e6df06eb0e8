"""A loss right after a torch parallel op, against the same loss on an idle machine.

In a training step the loss follows the model's last op (a GEMM on torch's OpenMP pool).
GNU OpenMP's idle workers spin for a while after each parallel region (unless
``OMP_WAIT_POLICY=PASSIVE`` was set before torch loaded), and on 2 cores a spinning
worker takes half a core from a second pool, such as numba's ``workqueue`` layer
(``NUMBA_THREADING_LAYER=workqueue``); on the ``omp`` layer that xloss picks where it
shares torch's runtime, the kernel runs on torch's own team. Per round and loss (cross-entropy on
(2048, 32000) fp32 logits, BCE on (4096, 1000) with 10% positives; forward without
gradient, so each call is one kernel pass): the loss timed right after a 512 x 512
matmul, after the same matmul and a 30 ms sleep, and right after itself. Prints per loss
the median time of each and the median and range of the per-round ratio of "after the
matmul" to "after the sleep" (above 1: the call paid for torch's spinning workers).

    python benchmarks/after_torch_op.py [ROUNDS]
    NUMBA_THREADING_LAYER=workqueue python benchmarks/after_torch_op.py [ROUNDS]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

import xloss


def losses():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2048, 32000, generator=generator)
    target = torch.randint(0, 32000, (2048,), generator=generator)
    multi = torch.randn(4096, 1000, generator=generator)
    labels = (torch.rand(4096, 1000, generator=generator) < 0.1).float()

    def cross_entropy():
        with torch.no_grad():
            xloss.cross_entropy(logits, target)

    def bce():
        with torch.no_grad():
            xloss.binary_cross_entropy_with_logits(multi, labels)

    return {"cross_entropy (2048, 32000)": cross_entropy, "bce (4096, 1000)": bce}


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 25
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    steps = losses()
    for step in steps.values():
        step()
        step()
    times = {name: {"after matmul": [], "after sleep": [], "back to back": []} for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            a @ b
            times[name]["after matmul"].append(timed(step))
            a @ b
            time.sleep(0.03)
            times[name]["after sleep"].append(timed(step))
            step()
            times[name]["back to back"].append(timed(step))
    import numba

    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(
        f"numba layer {numba.threading_layer()}, OMP_WAIT_POLICY={policy}, "
        f"torch threads {torch.get_num_threads()}, {rounds} rounds"
    )
    for name, series in times.items():
        ms = "  ".join(f"{k} {1e3 * statistics.median(v):.2f} ms" for k, v in series.items())
        pairs = zip(series["after matmul"], series["after sleep"], strict=True)
        ratios = sorted(x / y for x, y in pairs)
        print(f"{name}: {ms}")
        print(
            f"  after matmul / after sleep: {statistics.median(ratios):.2f}x "
            f"({ratios[0]:.2f}-{ratios[-1]:.2f})"
        )


if __name__ == "__main__":
    main()
