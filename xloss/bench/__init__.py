"""``xloss bench``: time and memory of each registered table, against the STREAM triad.

For every (case, variant) of a table (see :mod:`xloss.bench.registry`) a fresh
subprocess reports the median forward + backward time after warm-up and the peak RSS
above the RSS after the inputs exist. The effective bandwidth of a variant is the
table's minimal traffic (for cross-entropy one read and one write of the logits) over
its time, also shown as a share of the triad bandwidth, which each worker measures right
before and after its timed steps (the machine may be shared, so the bandwidth varies; the
run's first triad is reported too).
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


def add_derived(result: dict, table, triad: float, baseline: dict | None) -> dict:
    seconds = result["seconds"]
    if seconds is None:
        return result
    result["bandwidth"] = table.bytes_moved(result["case"]) / seconds
    result["triad_share"] = result["bandwidth"] / result.get("triad_bytes_per_second", triad)
    result["peak_extra_x_input"] = result["peak_extra_bytes"] / table.input_bytes(result["case"])
    if baseline is not None and baseline.get("seconds"):
        result["speedup_vs_first"] = baseline["seconds"] / seconds
    return result


def format_table(table, results: list[dict], triad: float) -> str:
    first = next(iter(table.variants))
    header = (
        f"{'case':<28} {'variant':<15} {'time ms':>9} {'vs ' + first:>15} "
        f"{'GB/s':>7} {'triad GB/s':>10} {'triad %':>8} {'extra mem':>10}"
    )
    title = f"{table.title}; STREAM triad {triad / 1e9:.1f} GB/s at the start"
    lines = [title, header, "-" * len(header)]
    for result in results:
        label = table.label(result["case"])
        if result.get("seconds") is None:
            lines.append(f"{label:<28} {result['variant']:<15} failed: {result.get('error')}")
            continue
        speedup = result.get("speedup_vs_first", float("nan"))
        lines.append(
            f"{label:<28} {result['variant']:<15} {1e3 * result['seconds']:>9.1f} "
            f"{speedup:>14.2f}x {result['bandwidth'] / 1e9:>7.1f} "
            f"{result.get('triad_bytes_per_second', triad) / 1e9:>10.1f} "
            f"{100 * result['triad_share']:>7.0f}% {result['peak_extra_x_input']:>9.2f}x"
        )
    return "\n".join(lines)


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
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case")
    parser.add_argument("--match", default="", help="only cases whose label contains this")


def run_from_args(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from xloss.bench.stream import triad_bandwidth

    tables = load_tables()
    names = args.tables or list(tables)
    repeats = args.repeats or (3 if args.quick else 5)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    triad = triad_bandwidth(1 << 24 if args.quick else 1 << 25)
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
        result = run_case(table.name, variant, case, repeats, warmup=2)
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
