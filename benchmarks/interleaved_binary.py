"""The binary family against torch's BCE and the copy floor, interleaved in one process.

Per round and variant (the cases of ``xloss bench --tables binary``: fp32, 10% positives,
mean, BCE with pos_weight 2.0, focal alpha 0.25 gamma 2, ASL 1, 4, clip 0.05): the best of
three steps. The copy floor copies 6 N C bytes (so moves 12 N C: logits and target read,
gradient written). Prints the median and range of the per-round ratios.

    python benchmarks/interleaved_binary.py ROUNDS [NxC ...]
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

from xloss.bench import binary

SHAPES = [(4096, 1000), (256, 20000), (65536, 80)]


def copy_floor(case):
    source = torch.ones(6 * case["n"] * case["c"], dtype=torch.uint8)
    dest = torch.zeros_like(source)
    return lambda: dest.copy_(source)


def best_of_three(step) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def run_shape(n: int, c: int, rounds: int) -> list[str]:
    case = dict(n=n, c=c)
    variants = {
        "torch": binary.torch_bce(case),
        "bce": binary._xloss("bce", False)(case),
        "bce_ip": binary._xloss("bce", True)(case),
        "focal": binary._xloss("focal", False)(case),
        "asl": binary._xloss("asl", False)(case),
        "floor": copy_floor(case),
    }
    for step in variants.values():
        step()
        step()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            times[name].append(best_of_three(step))

    def ratio(a: str, b: str) -> str:
        values = sorted(x / y for x, y in zip(times[a], times[b], strict=True))
        return f"{statistics.median(values):.2f}x ({values[0]:.2f}-{values[-1]:.2f})"

    medians = " ".join(f"{k}={1e3 * statistics.median(v):.2f}" for k, v in times.items())
    return [
        f"{n}x{c}: ms {medians}",
        f"  vs torch BCE: BCE {ratio('torch', 'bce')}  BCE in place {ratio('torch', 'bce_ip')}"
        f"  focal {ratio('torch', 'focal')}  ASL {ratio('torch', 'asl')}",
        f"  copy-floor share: BCE {ratio('floor', 'bce')}  BCE in place {ratio('floor', 'bce_ip')}",
    ]


def main() -> None:
    warnings.simplefilter("ignore")
    rounds = int(sys.argv[1])
    shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[2:]] or SHAPES
    for n, c in shapes:
        print("\n".join(run_shape(n, c, rounds)), flush=True)


if __name__ == "__main__":
    main()
