"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, no spills.

Runs ``benchmarks/triton_resources.py --quick`` in a subprocess without TRITON_INTERPRET
(the interpreter replaces the compiler), so no GPU is needed: ptxas and cuobjdump come
with the triton wheel. ``--quick`` compiles every kernel at every dtype with all options
off and on at its largest and smallest blocks (64 specialisations per architecture, about
a seventh of the script's default list, which ``python benchmarks/triton_resources.py``
compiles in full); Triton caches them, and later runs take seconds.
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
        [sys.executable, str(ROOT / "benchmarks" / "triton_resources.py"), "--quick",
         "--json", str(report)],  # fmt: skip
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report.read_text())
    rows, expected = report["rows"], set(report["specialisations"])
    kernels = ("fp32 ", "fp16 ", "bf16 ", "vocab-parallel gradient", "vocab-parallel partials",
               "scale rows")  # fmt: skip
    assert all(any(name.startswith(k) for name in expected) for k in kernels)
    assert len(expected) >= 50  # dtypes x options x block shapes
    for arch in (80, 90):
        assert {row["kernel"] for row in rows if row["arch"] == arch} == expected
    spilling = [row for row in rows if row["local"] or row["stack"]]
    assert spilling == []
    assert all(0 < row["reg"] * 32 * row["num_warps"] <= 65536 for row in rows)
