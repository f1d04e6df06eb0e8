"""Hostile-user regressions (issue 11): each case ends in the right number or a clear error."""

from __future__ import annotations

import pytest
import torch

import xloss
from xloss._core.validation import check_inplace_allowed

# ---------------------------------------------------------------------------------------
# inplace_backward on a leaf that requires grad, or a view of one: raise like PyTorch


_VIEWS = {
    "parameter": lambda param: param,
    "view": lambda param: param.view(3, 2, 5).reshape(6, 5),
    "slice": lambda param: param[1:],
}


@pytest.mark.parametrize("case", list(_VIEWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inplace_backward_on_a_leaf_raises_and_leaves_it_untouched(case, dtype):
    param = torch.nn.Parameter(torch.randn(6, 5, dtype=dtype))
    before = param.detach().clone()
    logits = _VIEWS[case](param)
    target = torch.randint(0, 5, logits.shape[:1])
    what = "a leaf tensor" if case == "parameter" else "a view of a leaf tensor"
    with pytest.raises(
        RuntimeError, match=f"`input` is {what} that requires grad.*inplace_backward=False"
    ):
        xloss.cross_entropy(logits, target, inplace_backward=True)
    assert torch.equal(param.detach(), before)
    assert param.grad is None


def test_inplace_backward_on_a_leaf_raises_under_torch_compile():
    param = torch.nn.Parameter(torch.randn(6, 5))
    before = param.detach().clone()
    target = torch.randint(0, 5, (6,))

    def loss_fn(logits, target):
        return xloss.cross_entropy(logits, target, inplace_backward=True, validate_args=False)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        compiled(param, target)
    with pytest.raises(RuntimeError, match="view of a leaf tensor"):
        compiled(param[1:], target[1:])
    assert torch.equal(param.detach(), before)


def test_inplace_backward_still_writes_into_non_leaf_logits():
    param = torch.nn.Parameter(torch.randn(6, 5))
    target = torch.randint(0, 5, (6,))
    logits = param * 1.0  # a non-leaf: overwriting it is the point of the option
    reference = torch.nn.functional.cross_entropy(param.double(), target)
    (expected,) = torch.autograd.grad(reference, param)  # float32, like param
    loss = xloss.cross_entropy(logits, target, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6)
    # a view of a non-leaf is allowed too, as in PyTorch
    xloss.cross_entropy((param * 1.0).view(2, 3, 5), target.view(2, 3), class_dim=-1,
                        inplace_backward=True).backward()


def test_inplace_allowed_without_grad_mode_or_grad():
    param = torch.nn.Parameter(torch.randn(6, 5))
    with torch.no_grad():
        check_inplace_allowed(param)
        xloss.cross_entropy(param, torch.randint(0, 5, (6,)), inplace_backward=True)
    check_inplace_allowed(torch.randn(3, 4))
    check_inplace_allowed(torch.randn(3, 4)[1:])
    with pytest.raises(RuntimeError, match="`scores` is a leaf.*`in_place=False`"):
        check_inplace_allowed(param, name="scores", option="in_place")
