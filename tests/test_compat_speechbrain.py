"""xloss.compat.speechbrain against float64 references of the intended (fixed) formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xloss.compat.speechbrain import bce_loss, nll_loss

REDUCTIONS = ["mean", "batch", "batchmean", "sum", "none"]


def kept_positions(shape, length, ignore=None):
    """SpeechBrain's rule: position t of sample n is kept when t < length[n] * T - 1e-6."""
    keep = torch.ones(shape, dtype=torch.bool)
    if length is not None:
        steps = shape[1]
        for n in range(shape[0]):
            limit = float(length[n]) * steps - 1e-6
            for t in range(steps):
                if not t < limit:
                    keep[n, t] = False
    if ignore is not None:
        keep &= ~ignore
    return keep


def reduce_reference(loss, keep, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "batchmean":
        return loss.sum() / loss.shape[0]
    if reduction == "mean":
        return loss.sum() / keep.sum()
    per_sample = loss.reshape(loss.shape[0], -1).sum(1)
    return per_sample / keep.reshape(loss.shape[0], -1).sum(1)


def reference_nll(
    log_probs, targets, length=None, label_smoothing=0.0, weight=None, reduction="mean"
):
    """-(1-a) w_y l_y - a/C sum_c w_c l_c per kept position, SpeechBrain reductions (float64)."""
    l = log_probs.double()
    num_classes = l.shape[-1]
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    ignored = targets == -100
    safe = torch.where(ignored, 0, targets)
    picked = l.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = -(1 - label_smoothing) * w[safe] * picked
    loss = loss - label_smoothing / num_classes * (l * w).sum(-1)
    keep = kept_positions(targets.shape, length, ignored)
    loss = torch.where(keep, loss, 0.0)
    return reduce_reference(loss, keep, reduction)


def log_probs_batch(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    return torch.log_softmax(scores, -1), targets


# --------------------------------------------------------------------------- nll_loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_frame_level_matches_reference(reduction, label_smoothing, weighted):
    log_probs, targets = log_probs_batch((3, 6, 5))
    targets[0, 1] = -100
    length = torch.tensor([1.0, 0.5, 2 / 6])
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.25], dtype=torch.float64) if weighted else None
    loss = nll_loss(log_probs, targets, length, label_smoothing, weight=weight, reduction=reduction)
    expected = reference_nll(log_probs, targets, length, label_smoothing, weight, reduction)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_utterance_level_matches_reference(reduction):
    log_probs, targets = log_probs_batch((7, 4), seed=1)
    loss = nll_loss(log_probs, targets, label_smoothing=0.2, reduction=reduction)
    torch.testing.assert_close(
        loss, reference_nll(log_probs, targets, label_smoothing=0.2, reduction=reduction)
    )


def test_nll_sum_really_sums():
    """Regression: upstream's reduction='sum' returns the unreduced tensor."""
    log_probs, targets = log_probs_batch((2, 3, 4), seed=2)
    loss = nll_loss(log_probs, targets, reduction="sum")
    assert loss.dim() == 0
    torch.testing.assert_close(loss, -log_probs.gather(-1, targets.unsqueeze(-1)).sum())


def test_nll_matches_upstream_formula_on_unweighted_paths():
    """Upstream: (1-a) * reduce(nll) - a * reduce(mean_c l_c), with its length mask."""
    log_probs, targets = log_probs_batch((2, 5, 3), seed=3)
    length = torch.tensor([0.6, 1.0])
    a = 0.1
    mask = kept_positions(targets.shape, length).double()
    nll = F.nll_loss(log_probs.transpose(1, -1), targets, reduction="none") * mask
    reg = log_probs.mean(-1) * mask
    for reduction, reduce in [
        ("mean", lambda v: v.sum() / mask.sum()),
        ("batchmean", lambda v: v.sum() / 2),
        ("batch", lambda v: v.sum(1) / mask.sum(1)),
    ]:
        expected = (1 - a) * reduce(nll) - a * reduce(reg)
        loss = nll_loss(log_probs, targets, length, label_smoothing=a, reduction=reduction)
        torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "length, steps, kept",
    [(0.5, 5, 3), (0.6, 5, 3), (0.4, 5, 2), (1.0, 7, 7), (0.0, 4, 0), (1 / 3, 3, 1)],
)
def test_relative_length_rule(length, steps, kept):
    log_probs, targets = log_probs_batch((1, steps, 3), seed=4)
    loss = nll_loss(log_probs, targets, torch.tensor([length]), reduction="none")
    assert int((loss != 0).sum()) == kept


def test_nll_gradient_to_scores_equals_pytorch_nll():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (2, 4), generator=gen)
    (grad,) = torch.autograd.grad(nll_loss(torch.log_softmax(scores, -1), targets), scores)
    expected = F.nll_loss(torch.log_softmax(scores, -1).transpose(1, 2), targets)
    (expected_grad,) = torch.autograd.grad(expected, scores)
    torch.testing.assert_close(grad, expected_grad)


def test_nll_gradcheck():
    scores = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 3, 1], [2, 2, 0]])
    length = torch.tensor([1.0, 2 / 3])

    def fn(s):
        return nll_loss(torch.log_softmax(s, -1), targets, length, label_smoothing=0.1)

    assert torch.autograd.gradcheck(fn, (scores,))


def test_nll_truncation_within_allowed_len_diff():
    log_probs, targets = log_probs_batch((2, 6, 3), seed=6)
    longer = torch.cat([targets, targets[:, :2]], dim=1)  # targets 2 steps longer
    torch.testing.assert_close(nll_loss(log_probs, longer), nll_loss(log_probs, targets))
    torch.testing.assert_close(
        nll_loss(log_probs, targets[:, :4], reduction="none"),
        reference_nll(log_probs[:, :4], targets[:, :4], reduction="none"),
    )
    with pytest.raises(ValueError, match="allowed_len_diff=1"):
        nll_loss(log_probs, targets[:, :4], allowed_len_diff=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nll_low_precision(dtype):
    log_probs, targets = log_probs_batch((3, 5, 7), seed=7)
    loss = nll_loss(log_probs.to(dtype), targets, torch.tensor([1.0, 0.4, 0.8]))
    assert loss.dtype == dtype
    expected = reference_nll(log_probs.to(dtype), targets, torch.tensor([1.0, 0.4, 0.8]))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)


def test_nll_empty_mean_is_zero():
    log_probs, targets = log_probs_batch((2, 3, 4), seed=8)
    loss = nll_loss(log_probs, targets, torch.tensor([0.0, 0.0]))
    assert loss.item() == 0.0 and not math.isnan(loss.item())


def test_nll_errors():
    log_probs, targets = log_probs_batch((2, 3, 4), seed=9)
    with pytest.raises(ValueError, match="reduction"):
        nll_loss(log_probs, targets, reduction="avg")
    with pytest.raises(ValueError, match="allowed_len_diff"):
        nll_loss(log_probs, targets, allowed_len_diff=-1)
    with pytest.raises(TypeError, match="allowed_len_diff"):
        nll_loss(log_probs, targets, allowed_len_diff=1.5)
    with pytest.raises(ValueError, match="time axis"):
        nll_loss(log_probs, targets[:, 0])
    with pytest.raises(ValueError, match=r"frame-level inputs \(N, T, C\)"):
        nll_loss(log_probs[:, 0], targets[:, 0], length=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="`length` must be 1-D"):
        nll_loss(log_probs, targets, length=torch.ones(2, 1))
    with pytest.raises(TypeError, match="`length`"):
        nll_loss(log_probs, targets, length=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\]"):
        nll_loss(log_probs, torch.full((2, 3), 4))
    with pytest.raises(TypeError, match="weight"):
        nll_loss(log_probs, targets, weight=torch.ones(4, dtype=torch.long))


def test_nll_matches_upstream_when_installed():
    losses = pytest.importorskip("speechbrain.nnet.losses")
    log_probs, targets = log_probs_batch((3, 5, 4), seed=10)
    length = torch.tensor([1.0, 0.6, 0.2])
    for reduction in ["mean", "batch", "batchmean"]:
        torch.testing.assert_close(
            nll_loss(log_probs, targets, length, 0.1, reduction=reduction),
            losses.nll_loss(log_probs, targets, length, 0.1, reduction=reduction),
        )


# --------------------------------------------------------------------------- bce_loss


def reference_bce(
    inputs,
    targets,
    length=None,
    weight=None,
    pos_weight=None,
    label_smoothing=0.0,
    reduction="mean",
):
    """-w [p y' log s(x) + (1 - y') log(1 - s(x))], y' = y (1-a) + a/2, float64."""
    x = inputs.double()
    y = targets.double() * (1 - label_smoothing) + label_smoothing / 2
    p = 1.0 if pos_weight is None else pos_weight.double()
    w = 1.0 if weight is None else weight.double()
    log_s = torch.log(torch.sigmoid(x))
    log_not_s = torch.log(torch.sigmoid(-x))
    loss = -w * (p * y * log_s + (1 - y) * log_not_s)
    keep = kept_positions(loss.shape, length)
    if length is not None and loss.dim() > 2:
        keep = kept_positions(loss.shape[:2], length).unsqueeze(-1).expand(loss.shape)
    loss = torch.where(keep, loss, 0.0)
    return reduce_reference(loss, keep, reduction)


def bce_batch(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, 2, shape, generator=gen).double()
    return inputs, targets


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_bce_frame_level_matches_reference(reduction, label_smoothing):
    inputs, targets = bce_batch((3, 5))
    length = torch.tensor([1.0, 0.6, 0.2])
    loss = bce_loss(
        inputs.unsqueeze(-1), targets, length, reduction=reduction, label_smoothing=label_smoothing
    )
    expected = reference_bce(
        inputs, targets, length, label_smoothing=label_smoothing, reduction=reduction
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_multilabel_frames_with_weights(reduction):
    inputs, targets = bce_batch((2, 4, 3), seed=1)
    length = torch.tensor([0.5, 1.0])
    pos_weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    weight = torch.tensor([0.5, 2.0], dtype=torch.float64)  # one weight per sample
    loss = bce_loss(
        inputs,
        targets,
        length,
        weight=weight,
        pos_weight=pos_weight,
        reduction=reduction,
        label_smoothing=0.1,
    )
    expected = reference_bce(
        inputs, targets, length, weight.reshape(2, 1, 1), pos_weight, 0.1, reduction
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_1d_with_label_smoothing(reduction):
    """Regression: upstream crashes on 1-D input with smoothing, then broadcast [N] x [N, 1]."""
    inputs, targets = bce_batch((5,), seed=2)
    loss = bce_loss(inputs, targets, label_smoothing=0.1, reduction=reduction)
    expected = reference_bce(
        inputs.unsqueeze(-1), targets.unsqueeze(-1), label_smoothing=0.1, reduction=reduction
    )
    if reduction == "none":
        expected = expected.squeeze(-1)
    assert loss.shape == expected.shape
    assert loss.shape in [(), (5,)]  # never (5, 5)
    torch.testing.assert_close(loss, expected)


def test_bce_1d_with_trailing_singleton_and_sample_weight():
    inputs, targets = bce_batch((4,), seed=3)
    weight = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    loss = bce_loss(inputs.unsqueeze(-1), targets, weight=weight, label_smoothing=0.05)
    expected = reference_bce(inputs, targets, weight=weight, label_smoothing=0.05)
    torch.testing.assert_close(loss, expected)


def test_bce_smoothing_is_bounded_below():
    """Regression: upstream subtracts a * mean(logits), unbounded below as logits grow."""
    inputs = torch.tensor([[50.0, 80.0, 120.0], [60.0, 90.0, 200.0]], dtype=torch.float64)
    targets = torch.ones(2, 3, dtype=torch.float64)
    loss = bce_loss(inputs, targets, label_smoothing=0.1)
    assert loss.item() >= 0.0
    torch.testing.assert_close(loss, reference_bce(inputs, targets, label_smoothing=0.1))
    upstream_style = -0.1 * inputs.mean(1).mean()  # what upstream adds: -0.1 * mean(logits)
    assert upstream_style.item() < -5


def test_bce_sum_really_sums():
    inputs, targets = bce_batch((3, 4), seed=4)
    loss = bce_loss(inputs, targets, reduction="sum")
    assert loss.dim() == 0
    torch.testing.assert_close(
        loss, F.binary_cross_entropy_with_logits(inputs, targets, reduction="sum")
    )


def test_bce_truncation_and_pytorch_parity():
    inputs, targets = bce_batch((2, 6), seed=5)
    loss = bce_loss(inputs, targets[:, :4])
    torch.testing.assert_close(
        loss, F.binary_cross_entropy_with_logits(inputs[:, :4], targets[:, :4])
    )
    with pytest.raises(ValueError, match="allowed_len_diff=3"):
        bce_loss(inputs, targets[:, :2])


def test_bce_gradcheck():
    inputs, targets = bce_batch((2, 3), seed=6)
    inputs.requires_grad_(True)
    length = torch.tensor([1.0, 2 / 3])

    def fn(x):
        return bce_loss(x, targets, length, label_smoothing=0.1, reduction="batch").sum()

    assert torch.autograd.gradcheck(fn, (inputs,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bce_low_precision(dtype):
    inputs, targets = bce_batch((3, 7), seed=7)
    loss = bce_loss(inputs.to(dtype), targets, torch.tensor([1.0, 0.5, 0.3]), label_smoothing=0.1)
    assert loss.dtype == dtype
    expected = reference_bce(
        inputs.to(dtype), targets, torch.tensor([1.0, 0.5, 0.3]), label_smoothing=0.1
    )
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)


def test_bce_errors():
    inputs, targets = bce_batch((3, 4), seed=8)
    with pytest.raises(ValueError, match="time axis"):
        bce_loss(inputs[:, 0], targets[:, 0], length=torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        bce_loss(inputs, targets, reduction="avg")
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        bce_loss(inputs, targets * 2)
    with pytest.raises(ValueError, match="label_smoothing"):
        bce_loss(inputs, targets, label_smoothing=2.0)
    with pytest.raises(TypeError, match="floating-point"):
        bce_loss(targets.long(), targets)
    with pytest.raises(ValueError, match="weight"):
        bce_loss(inputs, targets, weight=torch.ones(5, dtype=torch.float64))


def test_bce_matches_upstream_when_installed():
    losses = pytest.importorskip("speechbrain.nnet.losses")
    inputs, targets = bce_batch((3, 5), seed=9)
    length = torch.tensor([1.0, 0.6, 0.2])
    for reduction in ["mean", "batch", "batchmean"]:
        torch.testing.assert_close(
            bce_loss(inputs, targets, length, reduction=reduction),
            losses.bce_loss(inputs, targets, length, reduction=reduction),
        )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 6),
    smoothing=st.floats(0.0, 1.0),
    relative=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    scale=st.floats(0.1, 30.0),
)
def test_bce_property_bounded_and_matches_reference(batch, steps, smoothing, relative, scale):
    gen = torch.Generator().manual_seed(batch * 100 + steps)
    inputs = torch.randn(batch, steps, generator=gen, dtype=torch.float64) * scale
    targets = torch.randint(0, 2, (batch, steps), generator=gen).double()
    length = torch.tensor(relative[:batch], dtype=torch.float64)
    loss = bce_loss(inputs, targets, length, label_smoothing=smoothing)
    expected = reference_bce(inputs, targets, length, label_smoothing=smoothing)
    if not bool(kept_positions(targets.shape, length).any()):
        expected = torch.zeros((), dtype=torch.float64)
    assert loss.item() >= 0.0
    torch.testing.assert_close(loss, expected)
