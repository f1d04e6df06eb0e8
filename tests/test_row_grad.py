"""The portable in-place row gradient against a float64 reference of the shared contract."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xloss.ops import row_grad
from xloss.ops.row_grad import row_loss_and_grad_


def reference_rows(logits, target, scale, class_weight, eps, z, cap):
    """float64 loss per row and d(sum s_i loss_i)/d logits via autograd of the formula."""
    x_raw = logits.detach().double().requires_grad_()
    num_classes = x_raw.shape[1]
    x = x_raw if cap is None else cap * torch.tanh(x_raw / cap)
    w = torch.ones(num_classes, dtype=torch.float64) if class_weight is None else class_weight
    w = w.double()
    kept = target >= 0
    y = target.clamp(min=0)
    lse = torch.logsumexp(x, 1)
    per_class = lse.unsqueeze(1) - x  # -log p
    loss = (1 - eps) * w[y] * per_class.gather(1, y.unsqueeze(1)).squeeze(1)
    loss = loss + eps / num_classes * (per_class * w).sum(1) + z * lse**2
    loss = torch.where(kept, loss, torch.zeros_like(loss))
    s = torch.as_tensor(scale, dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss * s).sum(), x_raw)
    return loss.detach(), grad


OPTIONS = [
    dict(),
    dict(class_weight=True),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(softcap=2.5),
    dict(class_weight=True, label_smoothing=0.3, z_loss=1e-3, softcap=4.0),
]


def make_case(rows, classes, options, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, classes, generator=gen)).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[1::4] = -1  # dropped rows
    weight = torch.rand(classes, generator=gen) + 0.5 if options.get("class_weight") else None
    return logits, target, weight


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_loss_and_gradient_match_float64_reference(options, scale_kind, monkeypatch):
    monkeypatch.setattr(row_grad, "SUB_CHUNK_ELEMENTS", 40)  # several sub-chunks, odd split
    logits, target, weight = make_case(9, 13, options)
    scale = (
        0.7 if scale_kind == "float" else torch.rand(9, generator=torch.Generator().manual_seed(3))
    )
    eps = options.get("label_smoothing", 0.0)
    z = options.get("z_loss", 0.0)
    cap = options.get("softcap")
    want_loss, want_grad = reference_rows(logits, target, scale, weight, eps, z, cap)
    grad = logits.clone()
    loss = row_loss_and_grad_(
        grad,
        target,
        grad_scale=scale,
        class_weight=weight,
        label_smoothing=eps,
        z_loss=z,
        softcap=cap,
    )
    assert loss.dtype == torch.float32 and loss.shape == (9,)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[1::4] == 0) and torch.all(loss[1::4] == 0)


def test_float64_logits_are_exact():
    logits, target, weight = make_case(6, 7, {"class_weight": True}, dtype=torch.float64)
    want_loss, want_grad = reference_rows(logits, target, 1.5, weight, 0.2, 1e-2, 3.0)
    grad = logits.clone()
    loss = row_loss_and_grad_(
        grad,
        target,
        grad_scale=1.5,
        class_weight=weight,
        label_smoothing=0.2,
        z_loss=1e-2,
        softcap=3.0,
    )
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_are_widened_and_written_back(dtype):
    logits, target, weight = make_case(8, 11, {"class_weight": True}, dtype=dtype)
    want_loss, want_grad = reference_rows(logits, target, 1.0, weight, 0.1, 0.0, None)
    grad = logits.clone()
    loss = row_loss_and_grad_(
        grad, target, grad_scale=1.0, class_weight=weight, label_smoothing=0.1
    )
    assert grad.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol)


def test_extreme_logits_stay_finite_and_dropped_rows_are_zero():
    logits = torch.tensor(
        [[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, -1e4, 1e4], [float("inf"), 0.0, 1.0, 2.0]]
    )
    target = torch.tensor([1, 3, -5])
    want_loss, want_grad = reference_rows(logits[:2], target[:2], 1.0, None, 0.1, 0.0, None)
    grad = logits.clone()
    loss = row_loss_and_grad_(grad, target, grad_scale=1.0, label_smoothing=0.1)
    torch.testing.assert_close(loss[:2].double(), want_loss)
    torch.testing.assert_close(grad[:2].double(), want_grad)
    assert loss[2] == 0 and torch.all(grad[2] == 0)


def test_gradient_rows_sum_to_zero_without_z_loss():
    logits, target, _ = make_case(5, 17, {})
    target[:] = torch.arange(5)
    row_loss_and_grad_(logits, target, grad_scale=2.0, label_smoothing=0.4, softcap=None)
    torch.testing.assert_close(logits.sum(1), torch.zeros(5), atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    classes=st.integers(1, 9),
    eps=st.sampled_from([0.0, 0.05, 1.0]),
    z=st.sampled_from([0.0, 0.1]),
    cap=st.sampled_from([None, 1.0, 30.0]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(rows, classes, eps, z, cap, weighted, seed):
    logits, target, weight = make_case(rows, classes, {"class_weight": weighted}, seed=seed)
    scale = torch.rand(rows, generator=torch.Generator().manual_seed(seed)) * 2
    want_loss, want_grad = reference_rows(logits, target, scale, weight, eps, z, cap)
    grad = logits.clone()
    loss = row_loss_and_grad_(
        grad,
        target,
        grad_scale=scale,
        class_weight=weight,
        label_smoothing=eps,
        z_loss=z,
        softcap=cap,
    )
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5)


def test_expanded_scale_tensor_equals_float_scale():
    logits, target, weight = make_case(7, 5, {"class_weight": True})
    by_float, by_tensor = logits.clone(), logits.clone()
    options = dict(class_weight=weight, label_smoothing=0.1, z_loss=1e-3)
    loss_f = row_loss_and_grad_(by_float, target, grad_scale=0.5, **options)
    loss_t = row_loss_and_grad_(
        by_tensor, target, grad_scale=torch.tensor(0.5).expand(7), **options
    )
    torch.testing.assert_close(loss_f, loss_t)
    torch.testing.assert_close(by_float, by_tensor)
