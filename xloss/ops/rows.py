"""Portable per-row cross-entropy math in plain torch ops (any device, autograd).

Each function takes rows of logits ``(R, C)`` already in the compute dtype and returns
the per-row loss ``(R,)``. Masking and reduction happen in the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xloss._core.validation import autocast_off


def apply_softcap(logits: Tensor, softcap: float | None) -> Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2 logit soft-capping); identity for None."""
    if softcap is None:
        return logits
    return softcap * torch.tanh(logits / softcap)


def row_stats(logits: Tensor, softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-row ((R, 2) (lse, entropy), (R,) argmax) of rows of logits (R, C), detached.

    lse and the entropy ``lse - sum_c p_c x_c`` are of the soft-capped logits; the argmax
    is taken on the raw logits (soft-capping is monotonic), as the row kernels do.
    """
    raw = logits.detach()
    predicted = raw.argmax(-1)  # R
    x = apply_softcap(raw, softcap)
    lse = torch.logsumexp(x, -1)
    probs = torch.softmax(x, -1)
    # 0 * -inf terms count 0; a row of -inf only (0/0 softmax) keeps its NaN entropy
    entropy = lse - torch.where(probs == 0, 0.0, probs * x).sum(-1)
    return torch.stack((lse, entropy), -1), predicted


def cross_entropy_rows(
    logits: Tensor,
    target: Tensor,
    *,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """Per-row loss for class-index targets.

    loss = (1-eps) w[y] (lse - x[y]) + eps/C sum_c w[c] (lse - x[c]) + z lse^2,
    with ``target`` (R,) int64 in [0, C).
    """
    num_classes = logits.shape[-1]
    x = apply_softcap(logits, softcap)
    row_logsumexp = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    nll = row_logsumexp - target_logit
    if class_weight is not None:
        nll = class_weight[target] * nll
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing > 0.0:
        if class_weight is None:
            smooth = num_classes * row_logsumexp - x.sum(-1)
        else:
            with autocast_off(x.device.type):  # on autocast's float32 list, as the loss
                weighted_sum = x @ class_weight
            smooth = class_weight.sum() * row_logsumexp - weighted_sum
        loss = loss + (label_smoothing / num_classes) * smooth
    if z_loss > 0.0:
        loss = loss + z_loss * row_logsumexp.square()
    return loss


def soft_cross_entropy_rows(
    logits: Tensor,
    probs: Tensor,
    *,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """Per-row loss for probability targets ``probs`` (R, C).

    loss = sum_c w[c] t'[c] (lse - x[c]) + z lse^2, with t' = (1-eps) t + eps/C.
    """
    num_classes = logits.shape[-1]
    x = apply_softcap(logits, softcap)
    row_logsumexp = torch.logsumexp(x, dim=-1)
    smoothed = probs
    if label_smoothing > 0.0:
        smoothed = (1.0 - label_smoothing) * probs + label_smoothing / num_classes
    if class_weight is not None:
        smoothed = smoothed * class_weight
    loss = (smoothed * (row_logsumexp.unsqueeze(-1) - x)).sum(-1)
    if z_loss > 0.0:
        loss = loss + z_loss * row_logsumexp.square()
    return loss
