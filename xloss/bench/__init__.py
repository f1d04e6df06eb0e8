"""``xloss bench``: time and memory of each registered table.

For every (case, variant) of a table (see :mod:`xloss.bench.registry`) a fresh
subprocess reports the median time of the timed steps after warm-up, their range, and the
peak RSS above the RSS after the inputs exist. Ratios are against the table's first
variant. A table may add a floor measured in the same worker right before and after its
timed steps (the machine may be shared, so bandwidth varies from minute to minute): the
time of one copy of its main input (``copy_floor_bytes``: cross-entropy reads and writes
the logits once at best), or the effective bandwidth against the STREAM triad
(``bandwidth``).
Results are printed as a table and written as JSON and a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    if baseline is not None and baseline.get("seconds"):
        result["speedup_vs_first"] = baseline["seconds"] / seconds
    return result


def format_table(table, results: list[dict], triad: float | None) -> str:
    """Median time, the range of the timed steps, the ratio to the table's first variant,
    the bandwidth columns (tables with ``bandwidth``), the copy floor (tables with
    ``copy_floor_bytes``) and the peak extra memory."""
    first = next(iter(table.variants))
    columns = [
        ("time ms", 9, lambda r: f"{1e3 * r['seconds']:.1f}"),
        ("range ms", 15, lambda r: "{:.0f}-{:.0f}".format(*(1e3 * t for t in _span(r)))),
        ("vs " + first, max(15, len(first) + 4), lambda r: _times(r.get("speedup_vs_first"))),
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
        if result.get("seconds") is None:
            lines.append(f"{start} failed: {result.get('error')}")
            continue
        lines.append(start + "".join(f" {cell(result):>{size}}" for _, size, cell in columns))
    return "\n".join(lines)


def _span(result: dict) -> tuple[float, float]:
    times = result.get("all_seconds") or [result["seconds"]]
    return min(times), max(times)


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
    jobs = []
    for name in names:
        table = tables[name]
        for case in table.quick_cases if args.quick else table.cases:
            if args.match not in table.label(case):
                continue
            jobs.extend((table, case, variant) for variant in table.variants)
    results: dict[str, list[dict]] = {name: [] for name in names}
    baselines: dict[tuple, dict] = {}
    for table, case, variant in tqdm(jobs, desc="xloss bench", unit="run"):
        result = run_case(table.name, variant, case, repeats, warmup=args.warmup)
        key = (table.name, json.dumps(case, sort_keys=True))
        baseline = baselines.setdefault(key, result)
        results[table.name].append(add_derived(result, table, triad, baseline))
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "repeats": repeats,
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
