"""xloss.compat.timm against float64 references of timm's formulas."""

import pytest
import torch

from xloss.compat.timm import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


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
