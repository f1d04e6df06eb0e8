"""The linear cross-entropy table of `xloss bench`: its cases, and that each step runs."""

import torch

from xloss.bench.linear_cross_entropy import VARIANTS, _inputs, bare_gemms, xloss_chunked
from xloss.bench.registry import load_tables


def test_table_has_the_required_shapes_and_variants():
    table = load_tables()["linear_cross_entropy"]
    shapes = {(case["n"], case["h"], case["v"]) for case in table.cases}
    assert shapes == {
        (4096, 512, 32000), (8192, 512, 32000), (4096, 2048, 32000), (2048, 1024, 128256)
    }  # fmt: skip
    assert {case.get("dtype", "fp32") for case in table.cases} == {"fp32", "bf16"}
    assert list(table.variants) == ["3 bare GEMMs", "torch", "torch chunked", "xloss"]
    assert table.input_bytes(dict(n=2, h=3, v=5)) == 4 * 2 * 5
    assert table.label(dict(n=2, h=3, v=5)) == "N=2 H=3 V=5 fp32"
    assert not table.bandwidth  # GB/s means nothing for a GEMM-bound step


def test_every_step_runs_on_a_tiny_case():
    for dtype in ("fp32", "bf16"):
        case = dict(n=21, h=4, v=9, dtype=dtype)
        for setup in VARIANTS.values():
            step = setup(case)
            step()
            step()


def test_bare_gemms_cover_the_kept_rows_only():
    x, _, y = _inputs(dict(n=20, h=3, v=7))
    assert int((y == -100).sum()) == 2 and x.shape == (20, 3)
    step = bare_gemms(dict(n=20, h=3, v=7))
    cells = [c.cell_contents for c in step.__closure__]
    kept = [t for t in cells if isinstance(t, torch.Tensor) and t.dim() == 2]
    assert {tuple(t.shape) for t in kept} >= {(18, 3), (18, 7)}


def test_xloss_step_leaves_no_gradients_behind():
    step = xloss_chunked(dict(n=5, h=3, v=7))
    leaves = [cell.cell_contents for cell in step.__closure__ or ()]
    step()
    tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    assert len(tensors) == 2 and all(t.grad is None for t in tensors)
