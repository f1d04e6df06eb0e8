"""The `binary` table of `xloss bench`: its cases, and every variant runs one step (no timing)."""

import torch

from xloss.bench.registry import load_tables


def test_binary_table_has_the_issue_cases_and_variants():
    table = load_tables()["binary"]
    assert {(case["n"], case["c"]) for case in table.cases} == {
        (4096, 1000), (256, 20000), (65536, 80),
    }  # fmt: skip
    assert list(table.variants)[:2] == ["torch BCE", "torch focal"]
    assert {"xloss BCE in place", "xloss focal in place", "xloss ASL in place"} <= set(
        table.variants
    )
    case = dict(n=10, c=7)
    assert table.copy_floor_bytes(case) * 2 == table.bytes_moved(case) == 12 * 70


def test_every_variant_takes_a_step_and_the_focal_baseline_is_torchvisions_formula():
    table = load_tables()["binary"]
    case = dict(n=6, c=5)
    for setup in table.variants.values():
        setup(case)()  # forward + backward once
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    y = (torch.rand(6, 5) < 0.3).double()
    p = torch.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    expected = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)) * (1 - p_t) ** 2
    expected = ((0.25 * y + 0.75 * (1 - y)) * expected).mean()
    import xloss

    torch.testing.assert_close(xloss.sigmoid_focal_loss(x, y), expected)
