"""xloss.compat.timm against float64 references of timm's formulas."""

import pytest
import torch

from xloss.compat.timm import (
    BinaryCrossEntropy,
    LabelSmoothingCrossEntropy,
    SoftTargetCrossEntropy,
)


def reference_label_smoothing(x, target, smoothing):
    """Mean over positions of -(1-s) log p_y - s mean_c log p_c, class axis last (float64)."""
    log_probs = torch.log_softmax(x.double(), dim=-1)
    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -log_probs.mean(-1)
    return ((1 - smoothing) * nll + smoothing * smooth).mean()


def reference_soft_target(x, target):
    return (-target.double() * torch.log_softmax(x.double(), dim=-1)).sum(-1).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 7), (2, 2, 3, 4)])
def test_label_smoothing_matches_reference(smoothing, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    loss = LabelSmoothingCrossEntropy(smoothing)(x, target)
    torch.testing.assert_close(loss, reference_label_smoothing(x, target, smoothing))


def test_label_smoothing_sequence_uses_last_axis():
    """Regression: upstream gathers with target.unsqueeze(1), the wrong axis for (B, T, C)."""
    x = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]]], dtype=torch.float64)  # B=1, T=2
    target = torch.tensor([[0, 2]])
    loss = LabelSmoothingCrossEntropy(0.0)(x, target)
    expected = torch.log(1 + 2 * torch.exp(torch.tensor(-4.0, dtype=torch.float64)))
    torch.testing.assert_close(loss, expected)


def test_label_smoothing_gradcheck():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0, 3, 1], [2, 2, 0]])
    loss_fn = LabelSmoothingCrossEntropy(0.2)
    assert torch.autograd.gradcheck(lambda v: loss_fn(v, target), (x,))


@pytest.mark.parametrize("shape", [(3, 4), (2, 5, 3)])
def test_soft_target_matches_reference(shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    target = torch.rand(shape, generator=gen, dtype=torch.float64)  # not normalised, as mixup
    loss = SoftTargetCrossEntropy()(x, target)
    torch.testing.assert_close(loss, reference_soft_target(x, target))


def test_soft_target_integer_one_hot_is_converted():
    x = torch.randn(3, 4, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(torch.tensor([1, 0, 3]), 4)
    torch.testing.assert_close(
        SoftTargetCrossEntropy()(x, onehot), reference_soft_target(x, onehot)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(5, 6, generator=gen) * 3).to(dtype)
    target = torch.randint(0, 6, (5,), generator=gen)
    loss = LabelSmoothingCrossEntropy(0.1)(x, target)
    assert loss.dtype == dtype
    expected = reference_label_smoothing(x, target, 0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)


def test_errors():
    with pytest.raises(ValueError, match="smoothing"):
        LabelSmoothingCrossEntropy(1.0)
    with pytest.raises(TypeError, match="smoothing"):
        LabelSmoothingCrossEntropy(True)
    with pytest.raises(ValueError, match="target"):
        LabelSmoothingCrossEntropy()(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="probability `target`"):
        SoftTargetCrossEntropy()(torch.zeros(2, 3), torch.zeros(2, 1))


def reference_bce(
    x,
    dense,
    smoothing,
    threshold=None,
    weight=None,
    pos_weight=None,
    reduction="mean",
    sum_classes=False,
    share=None,
):
    """BCE with y' = y (1-s) + s/share (then [y' > threshold]), class axis last; float64.

    share: C (the class count, the rule for class indices) by default; 2 for timm's
    ``smooth_dense`` rule on dense targets."""
    x = x.double()
    share = x.shape[-1] if share is None else share
    y = dense.double() * (1 - smoothing) + smoothing / share
    if threshold is not None:
        y = (y > threshold).double()
    p = 1.0 if pos_weight is None else torch.as_tensor(pos_weight).double()
    w = 1.0 if weight is None else weight.double()
    loss = -w * (p * y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(torch.sigmoid(-x)))
    if sum_classes:
        return loss.sum(-1).mean()
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bce_index_targets_match_reference(reduction, smoothing):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, 5, (6,), generator=gen)
    loss = BinaryCrossEntropy(smoothing, reduction=reduction)(x, target)
    onehot = torch.nn.functional.one_hot(target, 5)
    torch.testing.assert_close(loss, reference_bce(x, onehot, smoothing, reduction=reduction))


def test_bce_sequence_index_targets():
    """Regression: upstream builds a (B, C) one-hot and fails on (B, T, C) logits."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 3), generator=gen)
    loss = BinaryCrossEntropy(0.1)(x, target)
    onehot = torch.nn.functional.one_hot(target, 4)
    torch.testing.assert_close(loss, reference_bce(x, onehot, 0.1))


def test_bce_dense_targets_follow_timm_smooth_dense():
    """Regression: timm 1.0.x takes dense (mixup) targets as already soft unless
    ``smooth_dense=True``, which moves them toward 0.5: y (1 - a) + a / 2."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    dense = torch.softmax(torch.randn(4, 5, generator=gen, dtype=torch.float64), -1)
    loss = BinaryCrossEntropy(0.2)(x, dense)  # upstream's default: smooth_dense=False
    torch.testing.assert_close(loss, reference_bce(x, dense, 0.0))
    smoothed = BinaryCrossEntropy(0.2, smooth_dense=True)(x, dense)
    torch.testing.assert_close(smoothed, reference_bce(x, dense, 0.2, share=2))
    assert not torch.allclose(smoothed, loss)
    # class indices are smoothed with a / C whatever smooth_dense says
    index = torch.randint(0, 5, (4,), generator=gen)
    onehot = torch.nn.functional.one_hot(index, 5)
    for smooth_dense in (False, True):
        torch.testing.assert_close(
            BinaryCrossEntropy(0.2, smooth_dense=smooth_dense)(x, index),
            reference_bce(x, onehot, 0.2),
        )


def test_bce_smooth_dense_with_threshold_sum_classes_and_pos_weight():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    dense = torch.rand(3, 2, 4, generator=gen, dtype=torch.float64)
    pos_weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    loss = BinaryCrossEntropy(
        0.3, smooth_dense=True, sum_classes=True, pos_weight=pos_weight
    )(x, dense)
    expected = reference_bce(x, dense, 0.3, pos_weight=pos_weight, sum_classes=True, share=2)
    torch.testing.assert_close(loss, expected)
    loss = BinaryCrossEntropy(0.3, smooth_dense=True, target_threshold=0.6)(x, dense)
    torch.testing.assert_close(loss, reference_bce(x, dense, 0.3, threshold=0.6, share=2))


@pytest.mark.parametrize("dense", [False, True])
def test_bce_threshold_binarises_the_smoothed_target(dense):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 4, (5,), generator=gen)
    onehot = torch.nn.functional.one_hot(index, 4).double()
    target = onehot * 0.7 if dense else index  # dense 0.7 > 0.5 as given (no smooth_dense)
    loss = BinaryCrossEntropy(0.1, target_threshold=0.5)(x, target)
    torch.testing.assert_close(loss, reference_bce(x, onehot, 0.0))


def test_bce_sum_classes_weight_and_pos_weight():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 3), generator=gen)
    weight = torch.rand(4, generator=gen, dtype=torch.float64)
    loss_fn = BinaryCrossEntropy(0.1, weight=weight, sum_classes=True, pos_weight=2.0)
    expected = reference_bce(
        x,
        torch.nn.functional.one_hot(target, 4),
        0.1,
        weight=weight,
        pos_weight=2.0,
        sum_classes=True,
    )
    torch.testing.assert_close(loss_fn(x, target), expected)
    pos_weight = torch.tensor([1.0, 2.0, 3.0, 0.5])
    loss_fn = BinaryCrossEntropy(0.0, pos_weight=pos_weight, reduction="sum")
    expected = reference_bce(
        x, torch.nn.functional.one_hot(target, 4), 0.0, pos_weight=pos_weight, reduction="sum"
    )
    torch.testing.assert_close(loss_fn(x, target), expected)


def test_bce_gradcheck_and_low_precision():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1])
    loss_fn = BinaryCrossEntropy(0.1, pos_weight=1.5)
    assert torch.autograd.gradcheck(lambda v: loss_fn(v, target), (x,))
    for dtype in (torch.float16, torch.bfloat16):
        loss = loss_fn(x.detach().to(dtype), target)
        assert loss.dtype == dtype
        expected = reference_bce(
            x.detach().to(dtype), torch.nn.functional.one_hot(target, 4), 0.1, pos_weight=1.5
        )
        torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)


def test_bce_errors():
    with pytest.raises(ValueError, match="smoothing"):
        BinaryCrossEntropy(1.0)
    with pytest.raises(ValueError, match="reduction"):
        BinaryCrossEntropy(reduction="batchmean")
    with pytest.raises(TypeError, match="target_threshold"):
        BinaryCrossEntropy(target_threshold="0.5")
    with pytest.raises(TypeError, match="pos_weight"):
        BinaryCrossEntropy(pos_weight="2")
    with pytest.raises(TypeError, match="`smooth_dense` must be True or False, got 'yes'"):
        BinaryCrossEntropy(smooth_dense="yes")
    with pytest.raises(TypeError, match="weight"):
        BinaryCrossEntropy(weight=torch.ones(3, dtype=torch.long))
    loss_fn = BinaryCrossEntropy()
    with pytest.raises(ValueError, match="class indices of shape"):
        loss_fn(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class indices of shape"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        loss_fn(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="0-D"):
        loss_fn(torch.zeros(()), torch.zeros(()))


def test_matches_upstream_when_installed():
    timm_loss = pytest.importorskip("timm.loss")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen)
    target = torch.randint(0, 5, (6,), generator=gen)
    soft = torch.softmax(torch.randn(6, 5, generator=gen), -1)
    torch.testing.assert_close(
        LabelSmoothingCrossEntropy(0.1)(x, target),
        timm_loss.LabelSmoothingCrossEntropy(0.1)(x, target),
    )
    torch.testing.assert_close(
        SoftTargetCrossEntropy()(x, soft), timm_loss.SoftTargetCrossEntropy()(x, soft)
    )
    x3 = torch.randn(6, 5, generator=gen)
    index = torch.randint(0, 5, (6,), generator=gen)
    torch.testing.assert_close(
        BinaryCrossEntropy(0.1)(x3, index), timm_loss.BinaryCrossEntropy(0.1)(x3, index)
    )
    for smooth_dense in (False, True):  # timm >= 1.0 has the option
        torch.testing.assert_close(
            BinaryCrossEntropy(0.1, smooth_dense=smooth_dense)(x3, soft),
            timm_loss.BinaryCrossEntropy(0.1, smooth_dense=smooth_dense)(x3, soft),
        )
