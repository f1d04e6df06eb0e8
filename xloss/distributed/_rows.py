"""Row math of the vocab-parallel losses: global statistics from local slices, local gradient.

Notation: x a row of logits over the whole vocabulary of C classes, of which this rank
holds the slice ``[start, start + V_local)``; m the row max, S = sum exp(x - m), so
lse = m + log S; eps the label smoothing and z the z-loss coefficient.

    loss = (1-eps) (lse - x_y) + eps/C sum_c (lse - x_c) + z lse^2
         = (1-eps) (lse - x_y) + eps lse - eps/C sum_c x_c + z lse^2
    d loss / d x_c = (1 + 2 z lse) p_c - (1-eps) [c = y] - eps/C,   p = softmax(x)

The gradient of the local slice needs only the local logits, lse and C: no communication.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from xloss.distributed._comm import all_reduce_max_and_sizes, all_reduce_sum, check_slices_tile


class RowStats(NamedTuple):
    row_logsumexp: Tensor  # (R,) global lse
    sum_exp: Tensor  # (R,) global S = sum exp(x - m)
    loss: Tensor  # (R,) per-row loss; meaningless (finite) on dropped rows
    num_classes: Tensor  # 0-dim global vocabulary size C
    local_target: Tensor  # (R,) target column in this slice (0 where not in the slice)
    in_slice: Tensor  # (R,) bool: the target is a class of this slice


def global_row_stats(
    logits: Tensor,
    target: Tensor,
    *,
    vocab_start: int | None,
    label_smoothing: float,
    z_loss: float,
    group,
    exp_in_place: bool = False,
    check_slices: bool = False,
) -> RowStats:
    """Steps 1-3 on a block of local logits (R, V_local) in the compute dtype.

    ``target`` (R,) holds global class indices, negative for dropped rows. With
    ``exp_in_place`` the block is overwritten with exp(x - m) (for a fused gradient). With
    ``check_slices`` and a given ``vocab_start``, the slices must tile [0, C) (synchronises).
    """
    local_size = logits.shape[-1]
    # 1. All-reduce the row max (MAX), packed with the slice sizes and given starts -> C
    #    and the slice start.
    global_max = all_reduce_max_and_sizes(
        logits.detach().amax(-1), local_size, group, vocab_start
    )
    if check_slices and vocab_start is not None:
        check_slices_tile(global_max)
    row_max = global_max.row_max
    start = global_max.slice_start if vocab_start is None else vocab_start
    local_target = target - start
    in_slice = (target >= 0) & (local_target >= 0) & (local_target < local_size)
    local_target = torch.where(in_slice, local_target, 0)
    # 2. Local partial sums: exp, the target logit (only the rank that holds the target
    #    contributes it) and the sum of logits for smoothing; ONE packed all-reduce (SUM).
    target_logit = torch.where(in_slice, logits.gather(-1, local_target.unsqueeze(-1))[:, 0], 0.0)
    partials = [target_logit]
    if label_smoothing > 0.0:
        partials.append(logits.sum(-1))
    if exp_in_place:
        shifted_exp = logits.sub_(row_max.unsqueeze(-1)).exp_()  # R x V_local, in place
    else:
        shifted_exp = (logits - row_max.unsqueeze(-1)).exp_()  # R x V_local
    partials.append(shifted_exp.sum(-1))
    summed = all_reduce_sum(*partials, group=group)
    target_logit, sum_exp = summed[0], summed[-1]
    # 3. lse = m + log S; C is the GLOBAL vocabulary size (not this rank's slice).
    num_classes = global_max.num_classes
    row_logsumexp = row_max + torch.log(sum_exp)
    loss = (1.0 - label_smoothing) * (row_logsumexp - target_logit)
    if label_smoothing > 0.0:
        loss = loss + label_smoothing * (row_logsumexp - summed[1] / num_classes)
    if z_loss > 0.0:
        loss = loss + z_loss * row_logsumexp.square()
    return RowStats(row_logsumexp, sum_exp, loss, num_classes, local_target, in_slice)


def local_gradient_(
    probs: Tensor,
    row_factor: Tensor,
    grad_scale: Tensor,
    stats: RowStats,
    *,
    label_smoothing: float,
) -> Tensor:
    """Turn ``probs`` (R, V_local) into the local gradient in place and return it.

    ``probs * row_factor`` must equal ``grad_scale * (1 + 2 z lse) * softmax``: callers
    pass either the softmax or exp(x - m) with the 1/S folded into ``row_factor``.
    The result is grad_scale * [(1 + 2 z lse) p - (1-eps) onehot_y - eps/C] on this slice.
    """
    grad = probs.mul_(row_factor.unsqueeze(-1))
    if label_smoothing > 0.0:
        grad.sub_((grad_scale * (label_smoothing / stats.num_classes)).unsqueeze(-1))
    onehot_value = torch.where(stats.in_slice, grad_scale * (label_smoothing - 1.0), 0.0)
    grad.scatter_add_(-1, stats.local_target.unsqueeze(-1), onehot_value.unsqueeze(-1))
    return grad
