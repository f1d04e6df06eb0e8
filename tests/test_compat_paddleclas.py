"""xloss.compat.paddleclas against float64 references of PaddleClas's formulas."""

import pytest
import torch

from xloss.compat.paddleclas import MultiLabelAsymmetricLoss, MultiLabelLoss


def reference_multilabel(x, labels, epsilon=None, size_sum=False, ratio=None):
    """BCE with y' = y(1-e) + e/C, weights exp(1-r)/exp(r), -1 dropped; float64."""
    x = x.double()
    labels = labels.double()
    num_classes = x.shape[-1]
    keep = labels != -1
    y = torch.where(keep, labels, 0.0)
    if epsilon:
        y = y * (1 - epsilon) + epsilon / num_classes
    loss = -(y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(torch.sigmoid(-x)))
    if ratio is not None:
        hard = (torch.where(keep, labels, 0.0) > 0.5).double()
        r = ratio.double()
        loss = loss * torch.exp(hard * (1 - r) + (1 - hard) * r)
    loss = torch.where(keep, loss, 0.0)
    if size_sum:
        return loss.sum(1).mean()
    return loss.sum() / keep.sum()


def reference_asl(
    x, labels, gamma_pos=1.0, gamma_neg=4.0, clip=0.05, reduction="sum", detach_focus=True
):
    """-[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)], p_m = max(p - clip, 0); float64."""
    x = x.double()
    y = labels.double()
    keep = y != -1
    y = torch.where(keep, y, 0.0)
    p = torch.sigmoid(x)
    p_m = (p - clip).clamp(min=0)
    focus_pos = (1 - p) ** gamma_pos
    focus_neg = p_m**gamma_neg
    if detach_focus:
        focus_pos, focus_neg = focus_pos.detach(), focus_neg.detach()
    loss = -(y * focus_pos * torch.log(p) + (1 - y) * focus_neg * torch.log1p(-p_m))
    loss = torch.where(keep, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()


def multilabel_batch(batch=4, classes=5, seed=0, unknown=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 2, (batch, classes), generator=gen).double()
    if unknown:
        labels[0, 1] = -1
    return x, labels


# --------------------------------------------------------------------------- MultiLabelLoss


@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("size_sum", [False, True])
def test_multilabel_matches_reference(epsilon, size_sum):
    x, labels = multilabel_batch()
    out = MultiLabelLoss(epsilon=epsilon, size_sum=size_sum)(x, labels)
    assert list(out) == ["MultiLabelLoss"]
    expected = reference_multilabel(x, labels, epsilon, size_sum)
    torch.testing.assert_close(out["MultiLabelLoss"], expected)


@pytest.mark.parametrize("epsilon", [None, 0.2])
@pytest.mark.parametrize("size_sum", [False, True])
def test_multilabel_weight_ratio_matches_reference(epsilon, size_sum):
    x, labels = multilabel_batch(seed=1)
    rate = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.0], dtype=torch.float64)
    target = torch.stack([labels, rate.expand(4, 5)], dim=1)  # (B, 2, C)
    loss_fn = MultiLabelLoss(epsilon=epsilon, size_sum=size_sum, weight_ratio=True)
    loss = loss_fn({"logits": x}, target)["MultiLabelLoss"]
    torch.testing.assert_close(loss, reference_multilabel(x, labels, epsilon, size_sum, rate))


def test_multilabel_accepts_two_dim_and_singleton_targets():
    """Regression: upstream indexes target[:, 0, :] and fails on (B, C) targets."""
    x, labels = multilabel_batch(seed=2)
    loss_fn = MultiLabelLoss(epsilon=0.1)
    two_dim = loss_fn(x, labels)["MultiLabelLoss"]
    singleton = loss_fn(x, labels.unsqueeze(1))["MultiLabelLoss"]
    torch.testing.assert_close(two_dim, singleton)
    torch.testing.assert_close(two_dim, reference_multilabel(x, labels, 0.1))


def test_multilabel_index_targets_become_one_hot():
    x, _ = multilabel_batch(seed=3)
    index = torch.tensor([0, 4, 2, 2])
    loss = MultiLabelLoss(epsilon=0.1)(x, index)["MultiLabelLoss"]
    onehot = torch.nn.functional.one_hot(index, 5).double()
    torch.testing.assert_close(loss, reference_multilabel(x, onehot, 0.1))


def test_multilabel_gradcheck():
    x, labels = multilabel_batch(batch=2, classes=3, seed=4)
    x.requires_grad_(True)
    rate = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64).expand(2, 3)
    target = torch.stack([labels, rate], dim=1)
    loss_fn = MultiLabelLoss(epsilon=0.1, weight_ratio=True)
    assert torch.autograd.gradcheck(lambda v: loss_fn(v, target)["MultiLabelLoss"], (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_multilabel_low_precision(dtype):
    x, labels = multilabel_batch(seed=5)
    loss = MultiLabelLoss(epsilon=0.1)(x.to(dtype), labels)["MultiLabelLoss"]
    assert loss.dtype == dtype
    expected = reference_multilabel(x.to(dtype), labels, 0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)


def test_multilabel_errors():
    x, labels = multilabel_batch(seed=6)
    with pytest.raises(ValueError, match=r"\(B, 2, C\)"):
        MultiLabelLoss(weight_ratio=True)(x, labels)
    ratios = torch.rand(4, 5, dtype=torch.float64)  # differs between rows
    with pytest.raises(ValueError, match="same on every row"):
        MultiLabelLoss(weight_ratio=True)(x, torch.stack([labels, ratios], dim=1))
    with pytest.raises(ValueError, match="epsilon"):
        MultiLabelLoss(epsilon=1.5)
    with pytest.raises(TypeError, match="epsilon"):
        MultiLabelLoss(epsilon="0.1")
    with pytest.raises(ValueError, match="must have shape"):
        MultiLabelLoss()(x, labels[:, :3])
    with pytest.raises(ValueError, match="'logits'"):
        MultiLabelLoss()({"output": x}, labels)
    with pytest.raises(ValueError, match=r"\(B, C\) logits"):
        MultiLabelLoss()(x.unsqueeze(0), labels.unsqueeze(0))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        MultiLabelLoss()(x, labels * 3)


# --------------------------------------------------------------------------- ASL


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("gammas", [(1.0, 4.0, 0.05), (0.0, 2.0, 0.0), (2.0, 3.0, 0.2)])
def test_asl_matches_reference(reduction, gammas):
    gamma_pos, gamma_neg, clip = gammas
    x, labels = multilabel_batch(seed=7)
    loss_fn = MultiLabelAsymmetricLoss(gamma_pos, gamma_neg, clip, reduction=reduction)
    out = loss_fn(x, labels)
    assert list(out) == ["MultiLabelAsymmetricLoss"]
    expected = reference_asl(x, labels, gamma_pos, gamma_neg, clip, reduction)
    torch.testing.assert_close(out["MultiLabelAsymmetricLoss"], expected)


@pytest.mark.parametrize("disable_focal_loss_grad", [True, False])
def test_asl_gradient_follows_disable_focal_loss_grad(disable_focal_loss_grad):
    x, labels = multilabel_batch(seed=8)
    x.requires_grad_(True)
    loss_fn = MultiLabelAsymmetricLoss(disable_focal_loss_grad=disable_focal_loss_grad)
    (grad,) = torch.autograd.grad(loss_fn(x, labels)["MultiLabelAsymmetricLoss"], x)
    ref_x = x.detach().clone().requires_grad_(True)
    expected = reference_asl(ref_x, labels, detach_focus=disable_focal_loss_grad)
    (expected_grad,) = torch.autograd.grad(expected, ref_x)
    torch.testing.assert_close(grad, expected_grad)
    other = reference_asl(ref_x, labels, detach_focus=not disable_focal_loss_grad)
    (other_grad,) = torch.autograd.grad(other, ref_x)
    assert not torch.allclose(grad, other_grad)  # the option changes the gradient


def test_asl_gradcheck_without_detached_focus():
    x, labels = multilabel_batch(batch=2, classes=3, seed=9, unknown=False)
    x.requires_grad_(True)
    loss_fn = MultiLabelAsymmetricLoss(disable_focal_loss_grad=False, clip=0.1)
    assert torch.autograd.gradcheck(lambda v: loss_fn(v, labels)["MultiLabelAsymmetricLoss"], (x,))


def test_asl_extreme_logits_stay_finite():
    x = torch.tensor([[-40.0, 40.0, 0.0], [40.0, -40.0, 10.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss = MultiLabelAsymmetricLoss()(x, labels)["MultiLabelAsymmetricLoss"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), reference_asl(x.detach(), labels))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_asl_low_precision(dtype):
    x, labels = multilabel_batch(seed=10)
    loss = MultiLabelAsymmetricLoss(reduction="mean")(x.to(dtype), labels)
    loss = loss["MultiLabelAsymmetricLoss"]
    assert loss.dtype == dtype
    expected = reference_asl(x.to(dtype), labels, reduction="mean")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)


def test_asl_errors():
    with pytest.raises(ValueError, match="reduction"):
        MultiLabelAsymmetricLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="gamma_neg"):
        MultiLabelAsymmetricLoss(gamma_neg=-1)
    with pytest.raises(ValueError, match="clip"):
        MultiLabelAsymmetricLoss(clip=-0.1)
    with pytest.raises(ValueError, match="epsilon"):
        MultiLabelAsymmetricLoss(epsilon=-1.0)
    x, labels = multilabel_batch(seed=11)
    with pytest.raises(ValueError, match="must have shape"):
        MultiLabelAsymmetricLoss()(x, labels.T)
    assert MultiLabelAsymmetricLoss(clip=None).clip == 0.0


def reference_upstream_asl(
    x, labels, gamma_pos=1.0, gamma_neg=4.0, clip=0.05, epsilon=1e-8, reduction="sum",
    detach_focus=True,
):  # fmt: skip
    """PaddleClas's formula for any t in [0, 1] (-1 dropped), in float64:
    p_t = min(1 - s + clip, 1)(1 - t) + s t,
    loss = -log(max(p_t, eps)) (1 - p_t)^(g+ t + g- (1 - t))."""
    x = x.double()
    t = labels.double()
    keep = t != -1
    t = torch.where(keep, t, 0.0)
    s = torch.sigmoid(x)
    negative = (1 - s + clip).clamp(max=1) if clip else 1 - s
    p_t = negative * (1 - t) + s * t
    weight = (1 - p_t) ** (gamma_pos * t + gamma_neg * (1 - t))
    if detach_focus:
        weight = weight.detach()
    loss = torch.where(keep, -torch.log(p_t.clamp(min=epsilon)) * weight, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / keep.sum()


def test_asl_soft_target_matches_upstream_formula():
    """Regression: x = 0, t = 0.3 gave 0.1211; upstream mixes the probabilities: 0.0583."""
    x, t = torch.zeros(1, 1), torch.full((1, 1), 0.3)
    loss = MultiLabelAsymmetricLoss()(x, t)["MultiLabelAsymmetricLoss"]
    torch.testing.assert_close(loss, torch.tensor(0.0583), atol=5e-5, rtol=0)
    torch.testing.assert_close(loss.double(), reference_upstream_asl(x, t))


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("clip", [0.05, 0.0, None])
@pytest.mark.parametrize("disable_focal_loss_grad", [True, False])
def test_asl_mixed_soft_and_hard_targets_match_upstream(reduction, clip, disable_focal_loss_grad):
    gen = torch.Generator().manual_seed(21)
    x = (torch.randn(5, 6, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    labels = torch.rand(5, 6, generator=gen, dtype=torch.float64)
    labels[0] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 1.0])  # hard entries in a soft batch
    labels[1, 2] = -1  # unknown
    labels[2, :2] = torch.tensor([1e-4, 1 - 1e-4])
    loss_fn = MultiLabelAsymmetricLoss(
        gamma_pos=1.5, gamma_neg=3, clip=clip, reduction=reduction,
        disable_focal_loss_grad=disable_focal_loss_grad,
    )  # fmt: skip
    loss = loss_fn(x, labels)["MultiLabelAsymmetricLoss"]
    ref_x = x.detach().clone().requires_grad_(True)
    expected = reference_upstream_asl(
        ref_x, labels, gamma_pos=1.5, gamma_neg=3, clip=clip or 0.0, reduction=reduction,
        detach_focus=disable_focal_loss_grad,
    )  # fmt: skip
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), ref_x)
    torch.testing.assert_close(grad, expected_grad)


def test_asl_soft_targets_sweep_t_and_low_precision():
    x = torch.linspace(-6, 6, 13, dtype=torch.float64).repeat(11, 1)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)[:, None].expand(11, 13).contiguous()
    loss = MultiLabelAsymmetricLoss(reduction="none")(x, t)["MultiLabelAsymmetricLoss"]
    torch.testing.assert_close(loss, reference_upstream_asl(x, t, reduction="none"))
    for dtype in (torch.float16, torch.bfloat16):
        low = MultiLabelAsymmetricLoss()(x.to(dtype), t)["MultiLabelAsymmetricLoss"]
        assert low.dtype == dtype
        torch.testing.assert_close(low.double(), reference_upstream_asl(x, t), rtol=2e-2, atol=0)
