"""The one reduction every loss goes through.

``loss`` holds one value per position (zero where the mask drops it). ``denominator``
holds what each kept position counts for in a mean: 1 for plain losses, the class
weight of the target for weighted cross-entropy. An empty batch gives 0 with a zero
gradient instead of 0/0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def safe_divide(total: Tensor, count: Tensor) -> Tensor:
    """``total / count``, and 0 (with zero gradient) where ``count`` is 0."""
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    empty = count == 0
    return torch.where(empty, 0.0, total / torch.where(empty, 1.0, count))


def reduce_loss(
    loss: Tensor,
    reduction: str,
    *,
    keep: Tensor | None = None,
    denominator: Tensor | None = None,
    normalizer=None,
    batched: bool = True,
) -> Tensor:
    """Reduce per-position losses.

    Args:
        loss: per-position loss, zero at dropped positions; axis 0 is the sample axis.
        reduction: "none", "mean", "sum" or "sample".
        keep: bool mask of kept positions (None: all kept).
        denominator: per-position weight of the mean (None: 1 per kept position).
        normalizer: if given, the result is ``loss.sum() / normalizer``.
        batched: False for an unbatched sample ("sample" then raises).
    """
    if normalizer is not None:
        return safe_divide(loss.sum(), normalizer)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if denominator is None:
        counts = torch.ones_like(loss) if keep is None else keep.to(loss.dtype)
    else:
        counts = denominator if keep is None else torch.where(keep, denominator, 0)
    if reduction == "mean":
        return safe_divide(loss.sum(), counts.sum())
    # reduction == "sample"
    if not batched or loss.dim() == 0:
        raise ValueError("reduction='sample' needs a batch axis, but `input` is unbatched")
    # flatten(1), not reshape(N, -1): an empty batch (N = 0) gives an empty (0,) result
    per_sample = (loss.flatten(1) if loss.dim() > 1 else loss.unsqueeze(1)).sum(1)
    counts = counts.flatten(1) if counts.dim() > 1 else counts.unsqueeze(1)
    return safe_divide(per_sample, counts.sum(1))
