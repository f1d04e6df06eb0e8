"""Benchmark: chunked linear + cross-entropy against torch and the three bare GEMMs.

Methods, all fp32:

- ``xloss``: ``xloss.linear_cross_entropy(x, W, y)`` then ``backward()``.
- ``torch``: ``F.cross_entropy(x @ W.T, y)`` then ``backward()`` (materialised logits).
- ``gemms``: the three GEMMs alone over the kept rows, into preallocated outputs:
  logits = x W^T, grad_x = G W, grad_W = G^T x. This is the floor of a linear
  cross-entropy that drops ignored rows first.

Every 10th target is ignored (``ignore_index=-100``), as in ``xloss bench``'s linear table,
whose setups these are (torch 2.13's chunked op is there too).

Memory: each method runs in a fresh subprocess; after one warm-up step (JIT, thread
pools, GEMM workspaces) and dropping its gradients, the peak extra memory is the RSS
high-water mark of one more step minus the RSS just before it. It includes the
gradients (N x H + V x H) every method must return; the "minus grads" column takes
them out.

Time: one more subprocess per shape runs all methods, interleaved step by step for
``--rounds`` rounds, so load from other processes hits them alike. The table shows the
best time per method and the median over rounds of the per-round ratio to the GEMMs.

Run: ``python benchmarks/linear_ce.py`` (``--quick`` for small shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

QUICK_CASES = [(1024, 256, 8000), (2048, 256, 8000)]
SWEEP_ROWS = [2048, 8192, 32768]  # xloss memory as N grows, at H = 512, V = 32000
METHODS = ("xloss", "torch", "gemms")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _make_step(method: str, rows: int, hidden: int, vocab: int):
    """The step of one method: the setups of ``xloss bench``'s linear table."""
    from xloss.bench.linear_cross_entropy import bare_gemms, torch_matmul, xloss_chunked

    setup = {"xloss": xloss_chunked, "torch": torch_matmul, "gemms": bare_gemms}[method]
    return setup(dict(n=rows, h=hidden, v=vocab))


def memory_worker(method: str, rows: int, hidden: int, vocab: int) -> dict:
    """Peak extra RSS of one step of one method, in this (fresh) process."""
    import gc

    from xloss.ops import kernel

    step = _make_step(method, rows, hidden, vocab)
    step()  # JIT compilation, thread pools, GEMM workspaces: not part of a step's cost
    kernel.release_buffers()  # as xloss bench: the measured step counts its own buffers
    gc.collect()
    before = _rss_bytes("VmRSS")
    exact = _reset_peak_rss()
    step()
    return {"peak_extra": _rss_bytes("VmHWM") - before, "peak_exact": exact}


def time_worker(rows: int, hidden: int, vocab: int, rounds: int) -> dict:
    """Time every method in this process, interleaved round by round, so that noise from
    other processes on the machine hits all of them alike."""
    steps = {method: _make_step(method, rows, hidden, vocab) for method in METHODS}
    for step in steps.values():
        step()  # warm-up
    times = {method: [] for method in METHODS}
    for _ in range(rounds):
        for method, step in steps.items():
            start = time.perf_counter()
            step()
            times[method].append(time.perf_counter() - start)
    return times


def _run_worker(*args) -> dict:
    command = [sys.executable, __file__, "--worker", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(rows: int, hidden: int, vocab: int, rounds: int) -> dict:
    """Memory of each method in its own fresh process, then interleaved timings."""
    result = {
        "shape": (rows, hidden, vocab),
        "logits_bytes": rows * vocab * 4,
        "grad_bytes": (rows + vocab) * hidden * 4,
    }
    for method in METHODS:
        result[method] = _run_worker("memory", method, rows, hidden, vocab)
    times = _run_worker("time", rounds, rows, hidden, vocab)
    for method in METHODS:
        result[method]["times"] = times[method]
        result[method]["time"] = min(times[method])
    # per-round ratios: the two steps of a round ran seconds apart, under similar load
    for method in ("xloss", "torch"):
        ratios = sorted(a / b for a, b in zip(times[method], times["gemms"], strict=True))
        result[method]["ratio_median"] = ratios[len(ratios) // 2]
    return result


def memory_sweep(rows_list: list[int], hidden: int = 512, vocab: int = 32000) -> str:
    """xloss peak extra memory as N grows: flat once the gradients are taken out."""
    mib = 2**20
    lines = [
        f"xloss peak extra memory as N grows (H={hidden}, V={vocab})",
        "| N | peak extra | minus grads | N x V fp32 logits |",
        "|---|---|---|---|",
    ]
    for rows in rows_list:
        peak = _run_worker("memory", "xloss", rows, hidden, vocab)["peak_extra"]
        net = peak - (rows + vocab) * hidden * 4
        logits = rows * vocab * 4
        lines.append(
            f"| {rows} | {peak / mib:.0f} MiB ({peak / logits:.3f}x) "
            f"| {net / mib:.0f} MiB | {logits / mib:.0f} MiB |"
        )
    return "\n".join(lines)


def format_table(cases: list[dict]) -> str:
    """A markdown table: times, ratios to the bare GEMMs, peak extra memory."""
    mib = 2**20
    lines = [
        "| N, H, V | xloss fwd+bwd | torch fwd+bwd | 3 bare GEMMs | xloss / GEMMs (median) "
        "| torch / GEMMs (median) | xloss peak extra | (minus grads) | torch peak extra "
        "| N x V fp32 logits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        gemm = case["gemms"]["time"]
        logits = case["logits_bytes"]
        ours, theirs = case["xloss"]["peak_extra"], case["torch"]["peak_extra"]
        ours_net = ours - case["grad_bytes"]
        lines.append(
            f"| {', '.join(map(str, case['shape']))} "
            f"| {case['xloss']['time']:.2f} s | {case['torch']['time']:.2f} s | {gemm:.2f} s "
            f"| {case['xloss']['ratio_median']:.2f}x | {case['torch']['ratio_median']:.2f}x "
            f"| {ours / mib:.0f} MiB ({ours / logits:.2f}x) "
            f"| {ours_net / mib:.0f} MiB ({ours_net / logits:.2f}x) "
            f"| {theirs / mib:.0f} MiB ({theirs / logits:.2f}x) | {logits / mib:.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=5, metavar=("KIND", "ARG", "N", "H", "V"))
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per method")
    parser.add_argument(
        "--shape",
        nargs=3,
        type=int,
        action="append",
        metavar=("N", "H", "V"),
        help="run this shape instead of the default cases (repeatable)",
    )
    parser.add_argument("--sweep", action="store_true", help="also the memory sweep over N")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.worker:
        kind, arg, *dims = args.worker
        dims = [int(d) for d in dims]
        if kind == "memory":
            print(json.dumps(memory_worker(arg, *dims)))
        else:
            print(json.dumps(time_worker(*dims, rounds=int(arg))))
        return 0
    from xloss.bench.linear_cross_entropy import SHAPES

    cases = args.shape or (QUICK_CASES if args.quick else SHAPES)
    results = []
    for rows, hidden, vocab in cases:
        results.append(run_case(rows, hidden, vocab, args.rounds))
        print(f"done {rows, hidden, vocab}", file=sys.stderr, flush=True)
    print(f"linear cross-entropy, fp32, {os.cpu_count()} CPU(s)")
    print(format_table(results))
    if args.sweep:
        print(memory_sweep(SWEEP_ROWS))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
