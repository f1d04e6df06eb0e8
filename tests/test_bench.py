"""`xloss bench` plumbing, without timing anything: the registry, derived numbers, output."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from xloss import cli
from xloss.bench import add_derived, format_table, plot
from xloss.bench.registry import Table, load_tables
from xloss.bench.worker import _status_kib


def test_cross_entropy_table_has_the_required_cases_and_variants():
    table = load_tables()["cross_entropy"]
    shapes = {(case["n"], case["v"]) for case in table.cases}
    assert shapes == {(4096, 32000), (8192, 50257), (2048, 128256)}
    assert {case["eps"] for case in table.cases} == {0.0, 0.1}
    assert list(table.variants) == ["torch eager", "torch.compile", "xloss", "xloss in place"]
    assert len(table.quick_cases) < len(table.cases)


def test_derived_numbers_and_table_text(tmp_path):
    table = load_tables()["cross_entropy"]
    case = dict(n=4096, v=32000, eps=0.1)
    logits_bytes = 4 * 4096 * 32000
    eager = dict(
        variant="torch eager", case=case, seconds=0.6, all_seconds=[0.55, 0.6, 0.7],
        peak_extra_bytes=3 * logits_bytes, copy_seconds=0.03,
    )  # fmt: skip
    fused = dict(
        variant="xloss in place", case=case, seconds=0.06, peak_extra_bytes=0, copy_seconds=0.045
    )
    broken = dict(variant="torch.compile", case=case, seconds=None, error="boom")
    results = [add_derived(r, table, None, eager) for r in (eager, fused, broken)]
    assert results[1]["speedup_vs_first"] == pytest.approx(10.0)
    assert results[1]["copy_floor_share"] == pytest.approx(0.75)
    assert results[0]["peak_extra_x_input"] == pytest.approx(3.0)
    assert "bandwidth" not in results[1]
    text = format_table(table, results, None)
    assert "10.00x" in text and "failed: boom" in text and "75%" in text
    assert "550-700" in text and "GB/s" not in text and "triad" not in text
    assert f"{3 * logits_bytes / 2**20:.0f}" in text  # extra MiB
    plot(table, results, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000
    json.dumps(results)  # the report is plain JSON


def test_bandwidth_columns_for_tables_that_ask_for_them():
    table = Table(
        name="t", title="t", cases=[], quick_cases=[], variants={"a": None},
        bytes_moved=lambda case: 10**9, input_bytes=lambda case: 10**6,
    )  # fmt: skip
    result = add_derived(
        dict(variant="a", case={}, seconds=0.1, peak_extra_bytes=0), table, 20e9, None
    )
    assert result["bandwidth"] == pytest.approx(10e9)
    assert result["triad_share"] == pytest.approx(0.5)
    text = format_table(table, [result], 20e9)
    assert "STREAM triad 20.0 GB/s" in text and "50%" in text


def test_training_step_table_runs_a_step_per_variant():
    table = load_tables()["training_step"]
    assert [case["v"] for case in table.cases] == [256, 8192, 32000, 128256]
    assert list(table.variants) == ["torch", "xloss cross_entropy", "xloss linear"]
    for setup in table.variants.values():
        step = setup(dict(v=64))
        step()
        step()


def test_cli_has_bench_with_quick():
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "--help"])
    assert done.value.code == 0
    with pytest.raises(SystemExit):
        cli.main(["bench", "--no-such-option"])


def test_status_reader_finds_rss():
    assert _status_kib("VmRSS") > 0


def test_worker_warms_up_times_steady_steps_and_counts_memory_on_fresh_buffers(monkeypatch):
    """The worker measures the floors first, warms up for at least WARMUP_SECONDS (and
    `warmup` steps), times `repeats` steps, and only then drops the pooled buffers for one
    more steps that count the peak memory. Before, the timed steps came right after the
    triad and two warm-up steps on a dropped buffer, and the median caught the slow start
    (xloss BCE 4096 x 1000: 3.7, 3.0, 2.4, 2.0 ms, then 1.7-2.0)."""
    from xloss.bench import registry, worker
    from xloss.ops import kernel

    events, starts = [], []

    def setup(case):
        def step():
            events.append("step")
            starts.append(time.perf_counter())
            time.sleep(0.002)

        return step

    table = Table(
        name="probe", title="probe", cases=[], quick_cases=[], variants={"v": setup},
        bandwidth=False, copy_floor_bytes=lambda case: 1 << 20,
    )  # fmt: skip
    monkeypatch.setitem(registry.TABLES, "probe", table)
    monkeypatch.setattr(worker, "WARMUP_SECONDS", 0.1)
    real_release = kernel.release_buffers
    monkeypatch.setattr(kernel, "release_buffers", lambda: (events.append("release"),
                                                            real_release()))  # fmt: skip
    # recorded, not run: its heap setting would stay for the rest of this test process
    # (torch's BCE then ran at half speed here, every large block a fresh mapping)
    monkeypatch.setattr(worker, "_heap_follows_live_memory", lambda: events.append("heap"))
    result = worker.measure("probe", "v", {}, repeats=3, warmup=1)
    warm = events.index("release") - 3  # the steps before the timed ones
    assert warm >= 2 and starts[warm] - starts[0] >= 0.1  # the time, not just one step
    # memory: MEMORY_STEPS steps on dropped buffers, the heap following live memory
    assert events[warm + 3 :] == ["release", "heap"] + ["step"] * worker.MEMORY_STEPS
    assert len(result["all_seconds"]) == 3 and result["seconds"] >= 0.002
    assert all(seconds > 0 for seconds in result["copy_before_after"])
    assert result["peak_extra_bytes"] >= 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap, /proc")
def test_worker_heap_makes_a_reused_block_count_in_the_resident_set():
    """Regression: after the floors' copies freed large blocks, glibc served the step's
    blocks from heap memory it had kept, so their pages were already resident and the peak
    RSS did not grow (torch's BCE and xloss's gradient read 0.00x). After
    `_heap_follows_live_memory` a 16 MiB block counts in full (it read 0.0 MiB without).
    In a fresh interpreter: the setting lasts for the process."""
    code = textwrap.dedent(
        """
        import torch
        from xloss.bench.worker import _heap_follows_live_memory, _status_kib
        a = torch.ones(6 * 2**20); del a  # 24 MiB, mapped and freed: the threshold rises
        b = torch.ones(4 * 2**20); del b  # 16 MiB from the heap, kept when freed
        _heap_follows_live_memory()
        base = _status_kib("VmRSS")
        c = torch.ones(4 * 2**20)
        print("GROWN_MIB", (_status_kib("VmRSS") - base) / 1024)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    grown = float(done.stdout.split("GROWN_MIB")[1])
    assert grown >= 15.5, done.stdout


def test_worker_takes_one_memory_step_when_a_step_is_long(monkeypatch):
    """A step that outlasts MEMORY_SECONDS (linear CE's take seconds) is measured once."""
    from xloss.bench import registry, worker
    from xloss.ops import kernel

    events = []
    table = Table(
        name="probe", title="probe", cases=[], quick_cases=[],
        variants={"v": lambda case: lambda: events.append("step")}, bandwidth=False,
    )  # fmt: skip
    monkeypatch.setitem(registry.TABLES, "probe", table)
    monkeypatch.setattr(worker, "WARMUP_SECONDS", 0.0)
    monkeypatch.setattr(worker, "MEMORY_SECONDS", -1.0)  # every step counts as long
    monkeypatch.setattr(worker, "_heap_follows_live_memory", lambda: events.append("heap"))
    monkeypatch.setattr(kernel, "release_buffers", lambda: events.append("release"))
    worker.measure("probe", "v", {}, repeats=2, warmup=1)
    assert events == ["step"] * 3 + ["release", "heap", "step"]


def test_rounds_alternate_the_variants_and_pair_their_ratios(monkeypatch, tmp_path, capsys):
    """--rounds 3: each case runs round by round, every variant in turn (fresh processes
    side by side); a variant's time is the median of its round medians, its ratio the
    median of each round's ratio, a failed round is left out of both."""
    import xloss.bench as bench

    table = Table(
        name="probe", title="probe", cases=[dict(n=1), dict(n=2)], quick_cases=[],
        variants={"a": None, "b": None}, bandwidth=False, label=lambda case: f"n={case['n']}",
        input_bytes=lambda case: 2**20,
    )  # fmt: skip
    monkeypatch.setattr(bench, "load_tables", lambda: {"probe": table})
    # a's round medians 1.0, 1.2, 0.8 s; b's 0.5, 0.5, (failed) at n=1
    seconds = {("a", 1): [1.0, 1.2, 0.8], ("b", 1): [0.5, 0.5, None]}
    calls = []

    def fake_run_case(table_name, variant, case, repeats, warmup):
        calls.append((variant, case["n"]))
        series = seconds.get((variant, case["n"]), [0.1, 0.1, 0.1])
        value = series[sum(c == (variant, case["n"]) for c in calls) - 1]
        if value is None:
            return dict(variant=variant, case=case, seconds=None, error="boom")
        return dict(variant=variant, case=case, seconds=value, all_seconds=[value],
                    peak_extra_bytes=2**20)  # fmt: skip

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    args = ["--tables", "probe", "--rounds", "3", "--out-dir", str(tmp_path)]
    assert bench.run(args) == 0
    assert calls == [("a", 1), ("b", 1)] * 3 + [("a", 2), ("b", 2)] * 3
    report = json.loads((tmp_path / "bench.json").read_text())
    first, second = report["tables"]["probe"][:2]
    assert report["rounds"] == 3
    assert first["seconds"] == 1.0 and first["round_seconds"] == [1.0, 1.2, 0.8]
    assert second["seconds"] == 0.5 and second["failed_rounds"] == 1
    assert second["speedup_vs_first"] == pytest.approx(2.2)  # median of 2.0 and 2.4
    assert second["speedup_range"] == pytest.approx([2.0, 2.4])
    text = capsys.readouterr().out
    assert "2.20x (2.00-2.40)" in text and "800-1200" in text  # a's round medians
    assert "(1 of 3 rounds failed)" in text


def test_rounds_ratios_come_from_rounds_that_both_variants_finished():
    """A variant's ratio over rounds pairs each round's processes: with one such round its
    ratio alone, with none no ratio at all (not medians of processes minutes apart); a
    variant that failed every round keeps its count."""
    from xloss.bench import merge_rounds

    table = load_tables()["training_step"]
    case = dict(v=256)

    def run(variant, seconds):
        if seconds is None:
            return dict(variant=variant, case=case, seconds=None, error="boom")
        return dict(variant=variant, case=case, seconds=seconds, all_seconds=[seconds],
                    peak_extra_bytes=2**20)  # fmt: skip

    def derived(first_rounds, second_rounds):
        first = merge_rounds([run("torch", t) for t in first_rounds])
        second = merge_rounds([run("xloss", t) for t in second_rounds])
        return add_derived(second, table, None, add_derived(first, table, None, first))

    one_pair = derived([None, 1.0, 3.0], [0.5, 0.5, None])
    assert one_pair["speedup_vs_first"] == pytest.approx(2.0)  # round 2 only, not 3.0 / 0.5
    assert one_pair["speedup_range"] == pytest.approx([2.0, 2.0])
    no_pair = derived([None, None, 1.0], [0.5, 0.6, None])
    assert "speedup_vs_first" not in no_pair and no_pair["seconds"] == 0.5
    all_failed = merge_rounds([run("xloss", None)] * 3)
    assert all_failed["failed_rounds"] == 3 and all_failed["round_seconds"] == [None] * 3
    even = merge_rounds([run("xloss", 1.0), run("xloss", 2.0)])
    assert even["seconds"] == 1.0  # the lower middle round, every figure from one process
    text = format_table(table, [add_derived(all_failed, table, None, None)], None)
    assert "failed: boom  (3 of 3 rounds failed)" in text


def test_rounds_are_refused_on_cuda():
    with pytest.raises(SystemExit, match="CPU tables only"):
        cli.main(["bench", "--device", "cuda", "--rounds", "2"])
