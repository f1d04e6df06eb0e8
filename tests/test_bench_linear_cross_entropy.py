"""The linear cross-entropy table of `xloss bench`: its cases, and that each step runs."""

import torch

from xloss.bench.linear_cross_entropy import VARIANTS, xloss_chunked
from xloss.bench.registry import load_tables


def test_table_has_the_required_shapes_and_variants():
    table = load_tables()["linear_cross_entropy"]
    shapes = {(case["n"], case["h"], case["v"]) for case in table.cases}
    assert shapes == {(8192, 512, 32000), (4096, 2048, 32000), (2048, 1024, 128256)}
    assert list(table.variants) == ["3 bare GEMMs", "torch", "xloss"]
    assert table.input_bytes(dict(n=2, h=3, v=5)) == 4 * 2 * 5
    assert table.label(dict(n=2, h=3, v=5)) == "N=2 H=3 V=5"


def test_every_step_runs_on_a_tiny_case():
    case = dict(n=6, h=4, v=9)
    for setup in VARIANTS.values():
        step = setup(case)
        step()
        step()


def test_xloss_step_leaves_no_gradients_behind():
    step = xloss_chunked(dict(n=5, h=3, v=7))
    leaves = [cell.cell_contents for cell in step.__closure__ or ()]
    step()
    tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    assert len(tensors) == 2 and all(t.grad is None for t in tensors)
