"""Review findings on masking: an ``ignore_index`` outside the range of a narrow integer
target dtype (uint8, int16, int32) must drop nothing. PyTorch casts the scalar to the
target's dtype before ``!=``, so a uint8 target compared with the default -100 saw 156
and silently dropped class 156; float64 references below."""

from __future__ import annotations

import pytest
import torch

import xloss


def reference_cross_entropy(logits, target, keep):
    log_probs = logits.double().log_softmax(1)
    picked = -log_probs.gather(1, target.long().clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(keep, picked, 0.0).sum() / keep.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "target_dtype, ignore_index, dropped_class",
    [
        (torch.uint8, -100, 156),  # -100 wraps to 156 in uint8
        (torch.uint8, 256, 0),
        (torch.int16, 2**16 + 3, 3),
        (torch.int32, 2**32 + 1, 1),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_cross_entropy_ignore_index_outside_target_dtype_drops_nothing(
    dtype, target_dtype, ignore_index, dropped_class, masked
):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 200, generator=gen).to(dtype)
    target = torch.tensor([dropped_class, 5, dropped_class, 7, 1, 0], dtype=target_dtype)
    mask = torch.tensor([True, True, True, True, False, True]) if masked else None
    keep = torch.ones(6, dtype=torch.bool) if mask is None else mask
    got = xloss.cross_entropy(logits, target, ignore_index=ignore_index, mask=mask)
    expected = reference_cross_entropy(logits, target, keep)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target_dtype, ignore_index", [(torch.uint8, 256), (torch.int32, 2**32)])
@pytest.mark.parametrize(
    "loss", [xloss.binary_cross_entropy_with_logits, xloss.sigmoid_focal_loss]
)
def test_binary_ignore_index_outside_target_dtype_drops_nothing(
    dtype, target_dtype, ignore_index, loss
):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=gen).to(dtype)
    target = (torch.rand(4, 5, generator=gen) < 0.5).to(target_dtype)
    got = loss(logits, target, ignore_index=ignore_index)
    expected = loss(logits.double(), target.double())  # nothing dropped
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_index_range_check_out_of_range_ignore_index_on_the_torch_branch():
    # the torch branch (tracing, devices): 300 wraps to 44 in uint8, -100 to 156
    from xloss._core.validation import check_index_target_range

    target = torch.tensor([50, 156], dtype=torch.uint8)
    check_index_target_range(target.as_subclass(_Plain), 300, -100, None)
    with pytest.raises(ValueError, match="found 156"):
        check_index_target_range(target.as_subclass(_Plain), 100, -100, None)


class _Plain(torch.Tensor):
    """A tensor subclass: not a plain CPU tensor, so the checks take the torch branch."""


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_liger_token_accuracy_keeps_class_156_of_a_uint8_target(reduction):
    # The Liger adapter's own per-token ignore test was a plain `target != ignore_index`.
    from xloss.compat.liger import LigerCrossEntropyLoss

    torch.manual_seed(0)
    logits = torch.randn(6, 200)
    target = torch.tensor([156, 3, 156, 7, 156, 9], dtype=torch.uint8)
    logits[[0, 2], 156] = 50.0  # two of the three class-156 rows predicted right
    out = LigerCrossEntropyLoss(reduction=reduction, return_token_accuracy=True)(logits, target)
    hits = (logits.argmax(1) == target.long()).double()
    want_accuracy = hits.mean() if reduction == "mean" else hits
    torch.testing.assert_close(out.token_accuracy.double(), want_accuracy)
    want = torch.nn.functional.cross_entropy(logits.double(), target.long(), reduction=reduction)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
