"""Review findings on linear_cross_entropy, return_stats and the compat adapters."""

import pytest
import torch

import xloss
from xloss import backends
from xloss.ops import kernel

needs_kernel = pytest.mark.skipif(not kernel.kernel_available(), reason="numba kernel absent")


def nan_row(sign: float) -> torch.Tensor:
    """Logits [1, NaN, 2, 0] with a positive or a negative NaN (x86's inf - inf is -NaN)."""
    row = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    row[0, 1] = torch.tensor(float("nan")) * sign
    return row


@needs_kernel
@pytest.mark.xfail(
    strict=True,
    reason="numba row kernel: argmax ignores a NaN (order-key max) and a positive NaN "
    "gives lse -inf; torch.argmax (the portable path) returns the NaN's index",
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_of_a_nan_row_match_the_portable_path(sign, dtype):
    logits, target = nan_row(sign).to(dtype), torch.tensor([2])
    with backends.use("numba"):
        got = xloss.cross_entropy(logits, target, return_stats=True)
    with backends.use("torch"):
        want = xloss.cross_entropy(logits, target, return_stats=True)
    assert want.predicted.tolist() == [1] and want.accuracy.item() == 0.0
    assert got.predicted.tolist() == [1]  # numba: 0 or 2 (then counted as a hit)
    assert got.accuracy.item() == 0.0
    assert torch.isnan(got.lse).all()  # numba: -inf for a positive NaN


def test_fullgraph_error_does_not_advise_the_torch_backend():
    # The graph-break reason advised xloss.backends.use("torch") as an alternative to
    # fullgraph=False, but the call is a graph break under it too: fullgraph=True raised.
    hidden, weight = torch.randn(6, 4), torch.randn(5, 4)
    target = torch.randint(0, 5, (6,))
    compiled = torch.compile(xloss.linear_cross_entropy, fullgraph=True, backend="eager")
    with backends.use("torch"), pytest.raises(Exception, match="fullgraph=False") as error:
        compiled(hidden, weight, target)
    assert "backends.use(\"torch\") (plain" not in str(error.value)
