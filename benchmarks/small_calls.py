"""Small losses, where a call's fixed cost decides: torch against xloss, alternated.

Per round and case: torch's loss and xloss's, each timed as the median of 25 forward +
backward calls, in turn (which goes first alternates between rounds). A case is a loss,
a shape and a dtype: cross-entropy (fp32, bf16, fp16 logits; int64 targets) and BCE with
``pos_weight`` 2.0 (fp32, 10% positives), mean. Prints per case the median time of each
and the median and range of the per-round speed-up (torch's time over xloss's: below 1
means xloss is slower).

    python benchmarks/small_calls.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import xloss

CASES = [
    ("cross_entropy", (64, 256), torch.float32),
    ("cross_entropy", (1024, 256), torch.float32),
    ("cross_entropy", (64, 256), torch.bfloat16),
    ("cross_entropy", (1024, 256), torch.bfloat16),
    ("cross_entropy", (64, 256), torch.float16),
    ("bce", (32, 80), torch.float32),
    ("bce", (256, 80), torch.float32),
    ("bce", (256, 1000), torch.float32),
]


def steps(loss: str, shape: tuple[int, int], dtype: torch.dtype):
    """(torch step, xloss step) on the same inputs."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    if loss == "cross_entropy":
        target = torch.randint(0, shape[1], (shape[0],), generator=generator)
        pair = (F.cross_entropy, xloss.cross_entropy)
        extra = {}
    else:
        target = (torch.rand(shape, generator=generator) < 0.1).to(dtype)
        pair = (F.binary_cross_entropy_with_logits, xloss.binary_cross_entropy_with_logits)
        extra = {"pos_weight": torch.full((shape[1],), 2.0, dtype=dtype)}

    def make(fn):
        def step():
            fn(logits, target, **extra).backward()
            logits.grad = None

        return step

    return make(pair[0]), make(pair[1])


def median_time(step, calls: int = 25) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(loss: str, shape: tuple[int, int], dtype: torch.dtype, rounds: int) -> str:
    torch_step, xloss_step = steps(loss, shape, dtype)
    for step in (torch_step, xloss_step):  # warm-up (and any compile)
        for _ in range(5):
            step()
    times = {"torch": [], "xloss": []}
    for r in range(rounds):
        order = [("torch", torch_step), ("xloss", xloss_step)]
        for name, step in order if r % 2 == 0 else order[::-1]:
            times[name].append(median_time(step))
    ratios = sorted(a / b for a, b in zip(times["torch"], times["xloss"], strict=True))
    name = f"{loss} {shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}"
    return (
        f"{name:32s} torch {1e6 * statistics.median(times['torch']):7.0f} us  "
        f"xloss {1e6 * statistics.median(times['xloss']):7.0f} us  "
        f"speed-up {statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"
    )


def main() -> None:
    warnings.simplefilter("ignore")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    for loss, shape, dtype in CASES:
        print(run_case(loss, shape, dtype, rounds), flush=True)


if __name__ == "__main__":
    main()
