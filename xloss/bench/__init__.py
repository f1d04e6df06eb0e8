"""``xloss bench``: time and memory of each registered table.

For every (case, variant) of a table (see :mod:`xloss.bench.registry`) a fresh
subprocess reports the median time of the timed steps after warm-up, their range, and the
peak RSS above the RSS after the inputs exist. Ratios are against the table's first
variant. ``--rounds R`` runs each case R times over, its variants taking turns (a fresh
process each), and reports the median of the round medians with their range, and the
median and range of each round's ratio: between processes minutes apart the machine's
speed drifts more than a small difference between variants. A table may add a floor
measured in the same worker right before and after its timed steps (the machine may be
shared, so bandwidth varies from minute to minute): the time of one copy of its main
input (``copy_floor_bytes``: cross-entropy reads and writes the logits once at best), or
the effective bandwidth against the STREAM triad (``bandwidth``).
Results are printed as a table and written as JSON and a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from xloss.bench.registry import load_tables
from xloss.cli import at_least


def run_case(table: str, variant: str, case: dict, repeats: int, warmup: int) -> dict:
    request = dict(table=table, variant=variant, case=case, repeats=repeats, warmup=warmup)
    done = subprocess.run(
        [sys.executable, "-m", "xloss.bench.worker", json.dumps(request)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return dict(request, seconds=None, peak_extra_bytes=None, error=tail[0])
    return json.loads(done.stdout.strip().splitlines()[-1])


def merge_rounds(rounds: list[dict]) -> dict:
    """One (case, variant)'s result over its rounds (fresh processes taking turns with
    the other variants): the median round (the lower middle one for an even count, so
    that every figure comes from one process) with its median as ``seconds``, the round
    medians as ``round_seconds`` (None for a failed round), every timed step in
    ``all_seconds``, the median peak memory, and ``failed_rounds``."""
    done = sorted((r for r in rounds if r.get("seconds") is not None), key=lambda r: r["seconds"])
    result = dict(done[(len(done) - 1) // 2] if done else rounds[-1])
    result["round_seconds"] = [r.get("seconds") for r in rounds]
    result["failed_rounds"] = len(rounds) - len(done)
    if done:
        result["all_seconds"] = [t for r in done for t in r.get("all_seconds") or [r["seconds"]]]
        result["peak_extra_bytes"] = statistics.median_low(r["peak_extra_bytes"] for r in done)
    return result


def add_derived(result: dict, table, triad: float | None, baseline: dict | None) -> dict:
    seconds = result["seconds"]
    if seconds is None:
        return result
    if table.bandwidth:
        result["bandwidth"] = table.bytes_moved(result["case"]) / seconds
        result["triad_share"] = result["bandwidth"] / (
            result.get("triad_bytes_per_second") or triad
        )
    if result.get("copy_seconds"):
        result["copy_floor_share"] = result["copy_seconds"] / seconds
    result["peak_extra_x_input"] = result["peak_extra_bytes"] / table.input_bytes(result["case"])
    rounds = (baseline or {}).get("round_seconds") or (), result.get("round_seconds") or ()
    if len(rounds[1]) > 1:  # each round's ratio, the variants' processes side by side
        ratios = [a / b for a, b in zip(*rounds, strict=True) if a and b]
        if ratios:  # else no round has both: no ratio across processes minutes apart
            result["speedup_vs_first"] = statistics.median(ratios)
            result["speedup_range"] = [min(ratios), max(ratios)]
    elif baseline is not None and baseline.get("seconds"):
        result["speedup_vs_first"] = baseline["seconds"] / seconds
    return result


def format_table(table, results: list[dict], triad: float | None) -> str:
    """Median time, the range of the timed steps, the ratio to the table's first variant,
    the bandwidth columns (tables with ``bandwidth``), the copy floor (tables with
    ``copy_floor_bytes``) and the peak extra memory."""
    first = next(iter(table.variants))
    ratio_width = 22 if any("speedup_range" in r for r in results) else 15
    columns = [
        ("time ms", 9, lambda r: f"{1e3 * r['seconds']:.1f}"),
        ("range ms", 15, lambda r: "{:.0f}-{:.0f}".format(*(1e3 * t for t in _span(r)))),
        ("vs " + first, max(ratio_width, len(first) + 4), _ratio_cell),
    ]
    if table.bandwidth:
        columns += [
            ("GB/s", 7, lambda r: f"{r['bandwidth'] / 1e9:.1f}"),
            ("triad GB/s", 10, lambda r: f"{(r.get('triad_bytes_per_second') or triad) / 1e9:.1f}"),
            ("triad %", 8, lambda r: f"{100 * r['triad_share']:.0f}%"),
        ]
    if table.copy_floor_bytes is not None:
        columns += [
            ("copy ms", 8, lambda r: f"{1e3 * r['copy_seconds']:.1f}"),
            ("of copy", 8, lambda r: f"{100 * r['copy_floor_share']:.0f}%"),
        ]
    columns += [
        ("extra mem", 10, lambda r: f"{r['peak_extra_x_input']:.2f}x"),
        ("extra MiB", 10, lambda r: f"{r['peak_extra_bytes'] / 2**20:.0f}"),
    ]
    width = max([28] + [len(table.label(r["case"])) for r in results])
    variant_width = max([15] + [len(r["variant"]) for r in results])
    header = f"{'case':<{width}} {'variant':<{variant_width}}" + "".join(
        f" {name:>{size}}" for name, size, _ in columns
    )
    title = table.title
    if table.bandwidth and triad:
        title += f"; STREAM triad {triad / 1e9:.1f} GB/s at the start"
    lines = [title, header, "-" * len(header)]
    for result in results:
        start = f"{table.label(result['case']):<{width}} {result['variant']:<{variant_width}}"
        failed, rounds = result.get("failed_rounds"), len(result.get("round_seconds") or ())
        note = f"  ({failed} of {rounds} rounds failed)" if failed and rounds > 1 else ""
        if result.get("seconds") is None:
            lines.append(f"{start} failed: {result.get('error')}{note}")
            continue
        cells = "".join(f" {cell(result):>{size}}" for _, size, cell in columns)
        lines.append(start + cells + note)
    return "\n".join(lines)


def _span(result: dict) -> tuple[float, float]:
    """The range of the round medians over several rounds, else of the timed steps."""
    rounds = [t for t in result.get("round_seconds") or () if t is not None]
    times = rounds if len(rounds) > 1 else result.get("all_seconds") or [result["seconds"]]
    return min(times), max(times)


def _ratio_cell(result: dict) -> str:
    text = _times(result.get("speedup_vs_first"))
    if "speedup_range" in result:
        text += " ({:.2f}-{:.2f})".format(*result["speedup_range"])
    return text


def _times(ratio: float | None) -> str:
    return "nan" if ratio is None else f"{ratio:.2f}x"


def plot(table, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(table.label(r["case"]) for r in results))
    variants = list(table.variants)
    figure, (times_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        rows = {table.label(r["case"]): r for r in results if r["variant"] == variant}
        xs = [i + k * width for i in range(len(labels))]
        seconds = [1e3 * (rows.get(label, {}).get("seconds") or 0) for label in labels]
        memory = [rows.get(label, {}).get("peak_extra_x_input") or 0 for label in labels]
        times_axis.bar(xs, seconds, width, label=variant)
        memory_axis.bar(xs, memory, width, label=variant)
    for axis, title in (
        (times_axis, "forward + backward, ms (log scale)"),
        (memory_axis, "peak extra memory, x input"),
    ):
        axis.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=20, fontsize=7
        )
        axis.set_title(title)
    times_axis.set_yscale("log")
    times_axis.legend(fontsize=8)
    figure.suptitle(table.title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xloss bench", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small case set (about a minute)")
    parser.add_argument("--out-dir", default="build/bench", help="where JSON and PNG go")
    parser.add_argument("--tables", nargs="*", help="table names (default: all)")
    parser.add_argument(
        "--repeats", type=at_least(1), default=None, help="timed steps per case (at least 1)"
    )
    parser.add_argument(
        "--warmup", type=at_least(0), default=2,
        help="untimed steps per case first (and at least 0.3 s of them)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=at_least(1), default=1,
        help="processes per (case, variant), the variants taking turns; then the median of "
        "the round medians, their range, and the median (range) of each round's ratio",
    )  # fmt: skip
    parser.add_argument("--match", default="", help="only cases whose label contains this")
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="cuda: xloss.bench.cuda's tables"
    )


def check_table_names(names: list[str] | None, known) -> None:
    """Exit with a usage message naming the unknown tables and the known ones."""
    unknown = [name for name in names or () if name not in known]
    if unknown:
        raise SystemExit(
            f"xloss bench: unknown table(s) {', '.join(unknown)}; the tables: {', '.join(known)}"
        )


def run_from_args(args: argparse.Namespace) -> int:
    if getattr(args, "device", "cpu") == "cuda":
        from xloss.bench.cuda import run_cuda

        if args.rounds > 1:
            raise SystemExit("xloss bench: --rounds applies to the CPU tables only")

        return run_cuda(args)
    from tqdm import tqdm

    from xloss.bench.stream import triad_bandwidth

    tables = load_tables()
    check_table_names(args.tables, list(tables))
    names = args.tables or list(tables)
    repeats = args.repeats or (3 if args.quick else 5)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    needs_triad = any(tables[name].bandwidth for name in names)
    triad = triad_bandwidth(1 << 24 if args.quick else 1 << 25) if needs_triad else None
    jobs = [
        (tables[name], case)
        for name in names
        for case in (tables[name].quick_cases if args.quick else tables[name].cases)
        if args.match in tables[name].label(case)
    ]
    rounds = args.rounds
    results: dict[str, list[dict]] = {name: [] for name in names}
    total = rounds * sum(len(table.variants) for table, _ in jobs)
    with tqdm(total=total, desc="xloss bench", unit="run") as progress:
        for table, case in jobs:
            runs: dict[str, list[dict]] = {variant: [] for variant in table.variants}
            for _ in range(rounds):
                for variant, done in runs.items():
                    done.append(run_case(table.name, variant, case, repeats, args.warmup))
                    progress.update()
            merged = [merge_rounds(done) for done in runs.values()]
            results[table.name] += [add_derived(r, table, triad, merged[0]) for r in merged]
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "repeats": repeats,
        "rounds": rounds,
        "stream_triad_bytes_per_second": triad,
        "tables": results,
    }
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    for name in names:
        print()
        print(format_table(tables[name], results[name], triad))
        plot(tables[name], results[name], out_dir / f"{name}.png")
    print(f"\nwrote {out_dir / 'bench.json'} and the charts in {out_dir}")
    return 0
