"""Start-up cost of xloss: the first loss call in a fresh process.

Each run is a fresh Python process that imports torch (not counted), then times
``import xloss`` plus the first forward + backward of ``xloss.cross_entropy`` (or, with
``--loss bce``, ``xloss.binary_cross_entropy_with_logits``) on a small fp32 batch (numba's
import and the loading of the cached kernels happen there), and a second call for
comparison. ``--cold`` first runs once with an empty numba cache folder
(``NUMBA_CACHE_DIR``), which is the compile a fresh install pays once.

Run: ``python benchmarks/startup.py [--runs 5] [--cold] [--loss bce]``; prints the median
and range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, time
import torch
start = time.perf_counter()
import xloss
logits = torch.randn(64, 1000, requires_grad=True)
if LOSS == "bce":
    target = (torch.rand(64, 1000) < 0.1).float()
    loss = xloss.binary_cross_entropy_with_logits
else:
    target = torch.randint(0, 1000, (64,))
    loss = xloss.cross_entropy
loss(logits, target).backward()
first = time.perf_counter() - start
start = time.perf_counter()
loss(logits, target).backward()
print(json.dumps(dict(first=first, second=time.perf_counter() - start)))
"""


def one_run(env: dict | None = None, loss: str = "cross_entropy") -> dict:
    done = subprocess.run(
        [sys.executable, "-c", f"LOSS = {loss!r}\n" + CHILD],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return (
        f"median {1e3 * statistics.median(values):.0f} ms "
        f"(range {1e3 * min(values):.0f}-{1e3 * max(values):.0f}, {len(values)} runs)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes with a warm cache")
    parser.add_argument("--cold", action="store_true", help="also one run with an empty cache")
    parser.add_argument("--loss", choices=["cross_entropy", "bce"], default="cross_entropy")
    args = parser.parse_args(argv)
    if args.cold:
        with tempfile.TemporaryDirectory() as cache:
            cold = one_run(dict(NUMBA_CACHE_DIR=cache), args.loss)
        print(f"cold first call (empty numba cache, compiles): {cold['first']:.1f} s")
    one_run(loss=args.loss)  # make sure the default cache is warm
    runs = [one_run(loss=args.loss) for _ in range(args.runs)]
    print("warm first call (import xloss + first loss):", summary([r["first"] for r in runs]))
    print("second call:", summary([r["second"] for r in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
