"""`xloss bench` plumbing, without timing anything: the registry, derived numbers, output."""

import json

import pytest

from xloss import cli
from xloss.bench import add_derived, format_table, plot
from xloss.bench.registry import load_tables
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
    eager = dict(variant="torch eager", case=case, seconds=0.6, peak_extra_bytes=3 * logits_bytes)
    fused = dict(variant="xloss in place", case=case, seconds=0.06, peak_extra_bytes=0)
    broken = dict(variant="torch.compile", case=case, seconds=None, error="boom")
    triad = 20e9
    results = [add_derived(r, table, triad, eager) for r in (eager, fused, broken)]
    assert results[1]["speedup_vs_first"] == pytest.approx(10.0)
    assert results[1]["bandwidth"] == pytest.approx(2 * logits_bytes / 0.06)
    assert results[1]["triad_share"] == pytest.approx(2 * logits_bytes / 0.06 / triad)
    assert results[0]["peak_extra_x_input"] == pytest.approx(3.0)
    text = format_table(table, results, triad)
    assert (
        "10.00x" in text
        and "failed: boom" in text
        and "STREAM triad 20.0 GB/s at the start" in text
    )
    plot(table, results, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000
    json.dumps(results)  # the report is plain JSON


def test_cli_has_bench_with_quick():
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "--help"])
    assert done.value.code == 0
    with pytest.raises(SystemExit):
        cli.main(["bench", "--no-such-option"])


def test_status_reader_finds_rss():
    assert _status_kib("VmRSS") > 0
