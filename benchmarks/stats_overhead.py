"""Cost of ``return_stats=True`` on the CPU kernel path: ``python benchmarks/stats_overhead.py``.

Forward + backward of ``xloss.cross_entropy`` on (N, C) fp32 logits, three variants
interleaved in one process (A, B, C, A, B, C, ... per round):

- ``plain``: ``return_stats=False``;
- ``stats``: ``return_stats=True`` (lse, entropy and argmax in the loss pass);
- ``two_pass``: a separate read-only stats launch of the row kernel, then the plain loss
  (how ``return_stats=True`` worked before the stats joined the loss pass).

Prints the median and range of the per-round ratios stats/plain, two_pass/plain and
stats/two_pass. ``--inplace``: the same with ``inplace_backward=True`` on a non-leaf view
of the logits (no copy, as a model's output).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import xloss
from xloss.bench.registry import model_output
from xloss.ops import kernel


def _two_pass_stats(logits, target):
    rows = logits.detach().reshape(-1, logits.shape[-1])
    values = torch.empty(rows.shape[0], 2)
    predicted = torch.empty(rows.shape[0], dtype=torch.int64)
    kernel._launch(rows, target.reshape(-1), None, stats=(values, predicted))
    return values, predicted


def variants(inplace: bool):
    def plain(x, t):
        xloss.cross_entropy(x, t, inplace_backward=inplace).backward()

    def stats(x, t):
        xloss.cross_entropy(x, t, inplace_backward=inplace, return_stats=True).loss.backward()

    def two_pass(x, t):
        _two_pass_stats(x, t)
        xloss.cross_entropy(x, t, inplace_backward=inplace).backward()

    return {"plain": plain, "stats": stats, "two_pass": two_pass}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inplace", action="store_true")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(args.rows, args.classes, generator=gen)
    target = torch.randint(0, args.classes, (args.rows,), generator=gen)
    funcs = variants(args.inplace)
    times = {name: [] for name in funcs}

    def run(fn):
        leaf = source.clone().requires_grad_(True)
        logits = model_output(leaf) if args.inplace else leaf  # in place needs a non-leaf
        start = time.perf_counter()  # the clone is outside the timing
        fn(logits, target)
        return time.perf_counter() - start

    for fn in funcs.values():  # warm-up (compile, pooled buffer)
        run(fn)
    for _ in range(args.rounds):
        for name, fn in funcs.items():
            times[name].append(run(fn))
    mode = "in place" if args.inplace else "out of place"
    print(f"cross_entropy fwd+bwd ({args.rows}, {args.classes}) fp32, {mode}, "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    for name, values in times.items():
        print(f"  {name:9s} median {statistics.median(values) * 1e3:7.1f} ms")
    for name, base in [("stats", "plain"), ("two_pass", "plain"), ("stats", "two_pass")]:
        ratios = [a / b for a, b in zip(times[name], times[base], strict=True)]
        print(
            f"  {name} / {base}: median {statistics.median(ratios):.3f}x "
            f"({min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
