"""Ahead-of-time compilation of every Triton kernel specialisation for sm_80 and sm_90.

Runs ``benchmarks/triton_resources.py`` in a subprocess without TRITON_INTERPRET (the
interpreter replaces the compiler), so no GPU is needed: ptxas and cuobjdump come with the
triton wheel. The first run compiles a few hundred kernels (minutes on 2 cores); Triton
caches them, and later runs take seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_launched_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    report = tmp_path / "resources.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton_resources.py"), "--json", str(report)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report.read_text())
    rows, expected = report["rows"], set(report["specialisations"])
    assert len(expected) > 200  # dtypes x options x block shapes
    for arch in (80, 90):
        assert {row["kernel"] for row in rows if row["arch"] == arch} == expected
    spilling = [row for row in rows if row["local"] or row["stack"]]
    assert spilling == []
    assert all(0 < row["reg"] * 32 * row["num_warps"] <= 65536 for row in rows)
