"""A hostile review of the eager host fast paths (binary family and cross-entropy).

Each test is a call that once gave a wrong number (or a bad error) on those paths or on
the kernels behind them, checked against a float64 reference written here.
"""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

import xloss

LOGITS = torch.tensor([[0.5, -1.0, 2.0], [-3.0, 0.25, 1.5], [4.0, -0.5, 0.0], [1.0, 2.0, -2.0]])
LABELS = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [0.2, 0.0, 1.0], [1.0, 1.0, 0.0]])
CLASSES = torch.tensor([0, 2, 1, 1])
TANGENT = torch.tensor([[0.3, -0.7, 1.1], [0.9, 0.2, -0.4], [-1.2, 0.6, 0.5], [0.1, -0.3, 0.8]])


def bce64(x, y):
    """Element-wise BCE from logits in float64, mean over all elements."""
    x, y = x.double(), y.double()
    return -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean()


def ce64(x, y):
    """Cross-entropy in float64: mean of -log_softmax at the target class."""
    return -torch.log_softmax(x.double(), dim=-1).gather(1, y[:, None]).mean()


def tangent64(loss64, *arguments):
    """d loss / d x . v in float64, by autograd on the reference."""
    x = LOGITS.double().requires_grad_()
    (grad,) = torch.autograd.grad(loss64(x, *arguments), x)
    return (grad * TANGENT.double()).sum()


# name -> (xloss call on logits x, float64 reference, its extra argument)
FORWARD_CASES = {
    "bce": (lambda x: xloss.binary_cross_entropy_with_logits(x, LABELS), bce64, LABELS),
    "bce_bf16": (
        lambda x: xloss.binary_cross_entropy_with_logits(x.bfloat16(), LABELS).float(),
        bce64,
        LABELS,
    ),
    "cross_entropy": (lambda x: xloss.cross_entropy(x, CLASSES), ce64, CLASSES),
    "cross_entropy_fp16": (
        lambda x: xloss.cross_entropy(x.half(), CLASSES).float(),
        ce64,
        CLASSES,
    ),
}


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_torch_func_jvp_gives_the_tangent_not_zero(name):
    # The kernels compute no tangent; their custom ops handed back a zero one silently.
    loss, reference, argument = FORWARD_CASES[name]
    _, tangent = torch.func.jvp(loss, (LOGITS,), (TANGENT,))
    tol = 1e-5 if name in ("bce", "cross_entropy") else 2e-2
    assert float(tangent.detach()) == pytest.approx(float(tangent64(reference, argument)), abs=tol)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_a_dual_level_gives_the_tangent(name, requires_grad):
    # Plain eager calls on dual tensors took the host fast path and dropped the tangent
    # (None); with requires_grad they raised "must implement the jvp function".
    loss, reference, argument = FORWARD_CASES[name]
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(LOGITS.clone().requires_grad_(requires_grad), TANGENT)
        tangent = forward_ad.unpack_dual(loss(dual)).tangent
    assert tangent is not None
    tol = 1e-5 if name in ("bce", "cross_entropy") else 2e-2
    assert float(tangent.detach()) == pytest.approx(float(tangent64(reference, argument)), abs=tol)


def test_jacfwd_and_hessian_of_bce_match_float64():
    x = LOGITS[0]
    y = LABELS[0]
    hessian = torch.func.hessian(lambda z: xloss.binary_cross_entropy_with_logits(z, y))(x)
    p = torch.sigmoid(x.double())
    expected = torch.diag(p * (1 - p) / x.numel())
    torch.testing.assert_close(hessian.double(), expected, rtol=1e-5, atol=1e-7)
    jacobian = torch.func.jacfwd(lambda z: xloss.binary_cross_entropy_with_logits(z, y))(x)
    torch.testing.assert_close(
        jacobian.double(), (p - y.double()) / x.numel(), rtol=1e-5, atol=1e-7
    )


# name -> (xloss loss under autocast, float64 reference of its mean)
AUTOCAST_CASES = {
    "bce": (xloss.binary_cross_entropy_with_logits, bce64),
    "bce_weighted": (  # the general path (an element weight), not the host fast path
        lambda x, y: xloss.binary_cross_entropy_with_logits(x, y, weight=torch.ones(3)),
        bce64,
    ),
    "focal_gamma_0": (  # alpha -1, gamma 0: plain BCE
        lambda x, y: xloss.sigmoid_focal_loss(x, y, alpha=-1.0, gamma=0.0),
        bce64,
    ),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(AUTOCAST_CASES))
def test_binary_loss_under_autocast_is_float32_like_torch(name, dtype):
    # Was rounded to the input's half dtype (bf16: 3 significant digits), where
    # F.binary_cross_entropy_with_logits and xloss.cross_entropy return float32.
    loss, reference = AUTOCAST_CASES[name]
    x = LOGITS.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        ours = loss(x, LABELS)
        theirs = F.binary_cross_entropy_with_logits(x, LABELS)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference(x.detach(), LABELS), rtol=1e-6, atol=1e-7)
    ours.backward()
    assert x.grad.dtype == dtype
    assert loss(x, LABELS).dtype == dtype  # outside autocast: the input's


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_place", [False, True])
def test_elementwise_losses_under_autocast_keep_float32_precision(dtype, in_place):
    # reduction="none" came back float32 but with each loss rounded to the half dtype in
    # the kernel (bf16: about 4e-3 relative); torch's BCE under autocast runs in float32.
    x = LOGITS.to(dtype).requires_grad_()
    source = x * 1 if in_place else x  # in place needs a non-leaf
    with torch.autocast("cpu", dtype=dtype):
        ours = xloss.binary_cross_entropy_with_logits(
            source, LABELS, reduction="none", inplace_backward=in_place
        )
    assert ours.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    y64 = LABELS.double()
    reference = -(y64 * F.logsigmoid(x64) + (1 - y64) * F.logsigmoid(-x64))
    torch.testing.assert_close(ours.double(), reference.detach(), rtol=1e-6, atol=1e-7)
    upstream = torch.linspace(-1, 2, 12).reshape(4, 3)
    ours.backward(upstream)
    (want,) = torch.autograd.grad(reference, x64, upstream.double())
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-2, atol=1e-3)


def test_in_place_on_a_half_leaf_under_autocast_still_raises():
    x = LOGITS.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="leaf"):
        xloss.binary_cross_entropy_with_logits(x, LABELS, reduction="none", inplace_backward=True)
