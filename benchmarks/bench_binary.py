"""Time the binary family against PyTorch: ``python benchmarks/bench_binary.py``.

Forward + backward of BCE, focal and ASL on a (N, C) fp32 batch, next to
``F.binary_cross_entropy_with_logits``; and the per-call cost of ``F.logsigmoid`` against
``softplus`` on a tiny tensor (why xloss computes log s(x) as -softplus(-x)).
Median of several repeats; the machine's other load makes single timings noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import xloss


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(loss_fn, logits, target):
    def step():
        logits.grad = None
        loss_fn(logits, target).backward()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.classes, requires_grad=True)
    target = (torch.rand(args.rows, args.classes) < 0.1).float()
    candidates = {
        "torch F.binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
        "xloss.binary_cross_entropy_with_logits": xloss.binary_cross_entropy_with_logits,
        "xloss BCE, label_smoothing=0.1, validate_args=False": lambda x, y: (
            xloss.binary_cross_entropy_with_logits(x, y, label_smoothing=0.1, validate_args=False)
        ),
        "xloss.sigmoid_focal_loss": xloss.sigmoid_focal_loss,
        "xloss.asymmetric_loss": xloss.asymmetric_loss,
    }
    threads = torch.get_num_threads()
    print(f"forward+backward, ({args.rows}, {args.classes}) fp32, {threads} threads")
    for name, loss_fn in candidates.items():
        seconds = median_seconds(forward_backward(loss_fn, logits, target), args.repeats)
        print(f"  {name:55s} {seconds * 1e3:8.2f} ms")

    tiny = torch.randn(36)
    calls = 200
    for name, fn in {
        "F.logsigmoid(x)": lambda: F.logsigmoid(tiny),
        "-F.softplus(-x)": lambda: -F.softplus(-tiny),
    }.items():
        seconds = median_seconds(lambda fn=fn: [fn() for _ in range(calls)], args.repeats)
        print(f"  tiny (36,) tensor, {name:20s} {seconds / calls * 1e6:10.1f} us per call")


if __name__ == "__main__":
    main()
