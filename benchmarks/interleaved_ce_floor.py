"""Cross-entropy against the copy floor, interleaved in one process.

Each round times, in turn: one ``copy_`` of the fp32 logits (a read and a write, the least
a one-pass kernel moves), xloss out of place, xloss in place (on a fresh non-leaf view,
made untimed) and, at the first shape, torch eager. Per-round ratios cancel the machine's
drift; the script prints the median and range of each over the rounds.

    python benchmarks/interleaved_ce_floor.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import xloss

SHAPES = [(4096, 32000), (8192, 50257), (2048, 128256)]
EPS = 0.1


def _ms(values: list[float]) -> str:
    low, high = 1e3 * min(values), 1e3 * max(values)
    return f"{1e3 * statistics.median(values):.1f} ms ({low:.1f}-{high:.1f})"


def _ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def _median_range(values: list[float], scale: float, unit: str) -> str:
    v = [scale * x for x in values]
    return f"{statistics.median(v):.{0 if unit == '%' else 1}f}{unit} ({min(v):.1f}-{max(v):.1f})"


def run_shape(n: int, v: int, rounds: int) -> str:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, v, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    dest = base.clone()
    leaf = base.clone().requires_grad_()

    def copy():
        dest.copy_(base)

    def out_of_place():
        xloss.cross_entropy(leaf, target, label_smoothing=EPS).backward()
        leaf.grad = None

    def eager():
        F.cross_entropy(leaf, target, label_smoothing=EPS).backward()
        leaf.grad = None

    def in_place():
        view = base.clone().requires_grad_() + 0  # untimed: fresh non-leaf logits
        start = time.perf_counter()
        xloss.cross_entropy(view, target, label_smoothing=EPS, inplace_backward=True).backward()
        return time.perf_counter() - start

    def timed(step):
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    with_eager = (n, v) == SHAPES[0]
    out_of_place()
    if with_eager:
        eager()
    times = {"copy": [], "out": [], "in place": [], "eager": []}
    for _ in range(rounds):
        times["copy"].append(timed(copy))
        times["out"].append(timed(out_of_place))
        times["in place"].append(in_place())
        if with_eager:
            times["eager"].append(timed(eager))
    line = f"N={n} V={v} eps={EPS}: copy {_ms(times['copy'])}"
    for name in ("out", "in place"):
        share = _median_range(_ratios(times["copy"], times[name]), 100, "%")
        line += f" | {name} {_ms(times[name])}, of copy {share}"
    if with_eager:
        line += f" | torch eager {_ms(times['eager'])}"
        for name in ("out", "in place"):
            speedup = _median_range(_ratios(times["eager"], times[name]), 1, "x")
            line += f"; {name} {speedup} faster"
    return line


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for n, v in SHAPES:
        print(run_shape(n, v, rounds), flush=True)


if __name__ == "__main__":
    main()
