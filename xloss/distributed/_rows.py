"""Row math of the vocab-parallel losses: global statistics from local slices, local gradient.

Notation: x a row of logits over the whole vocabulary of C classes, of which this rank
holds the slice ``[start, start + V_local)``; m the row max, S = sum exp(x - m), so
lse = m + log S; eps the label smoothing and z the z-loss coefficient.

    loss = (1-eps) (lse - x_y) + eps/C sum_c (lse - x_c) + z lse^2
         = (1-eps) (lse - x_y) + eps lse - eps/C sum_c x_c + z lse^2
    d loss / d x_c = (1 + 2 z lse) p_c - (1-eps) [c = y] - eps/C,   p = softmax(x)

The gradient of the local slice needs only the local logits, lse and C: no communication.

Side outputs (``with_stats``): the softmax entropy
H = lse - sum_c p_c x_c = log S - sum_c e^(x_c - m) (x_c - m) / S, its numerator one more
partial in the same SUM; the argmax, the smallest global index among the ranks whose
local max equals the global max (one MIN all-reduce; the first index on ties, as
``torch.argmax``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from xloss import backends
from xloss.distributed._comm import (
    all_reduce_argmax,
    all_reduce_max_and_sizes,
    all_reduce_sum,
    check_slices_tile,
)


class RowStats(NamedTuple):
    row_logsumexp: Tensor  # (R,) global lse
    sum_exp: Tensor  # (R,) global S = sum exp(x - m)
    loss: Tensor  # (R,) per-row loss; meaningless (finite) on dropped rows
    num_classes: Tensor  # 0-dim global vocabulary size C
    local_target: Tensor  # (R,) target column in this slice (0 where not in the slice)
    in_slice: Tensor  # (R,) bool: the target is a class of this slice
    entropy: Tensor | None = None  # (R,) softmax entropy (with_stats)
    predicted: Tensor | None = None  # (R,) int64 global argmax (with_stats)


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
    with_stats: bool = False,
) -> RowStats:
    """Steps 1-3 on a block of local logits (R, V_local) in the compute dtype (or, when
    the Triton backend serves them, in their own fp16/bf16: its kernel widens each block).

    ``target`` (R,) holds global class indices, negative for dropped rows. With
    ``exp_in_place`` the block is overwritten with exp(x - m) (for a fused gradient). With
    ``check_slices`` and a given ``vocab_start``, the slices must tile [0, C) (synchronises).
    ``with_stats`` also gives the entropy and the argmax (one more all-reduce, MIN).
    """
    local_size = logits.shape[-1]
    # 1. All-reduce the row max (MAX), packed with the slice sizes and given starts -> C
    #    and the slice start.
    if with_stats:
        local_max, local_argmax = logits.detach().max(-1)  # first index on ties
    else:
        local_max = logits.detach().amax(-1)
    local_max = local_max.to(torch.promote_types(logits.dtype, torch.float32))
    global_max = all_reduce_max_and_sizes(local_max, local_size, group, vocab_start)
    if check_slices and vocab_start is not None:
        check_slices_tile(global_max)
    row_max = global_max.row_max
    start = global_max.slice_start if vocab_start is None else vocab_start
    local_target = target - start
    in_slice = (target >= 0) & (local_target >= 0) & (local_target < local_size)
    local_target = torch.where(in_slice, local_target, 0)
    # 2. Local partial sums: the target logit (only the rank that holds the target
    #    contributes it), exp, with smoothing the sum of logits and with stats the
    #    entropy's numerator; ONE packed all-reduce (SUM).
    sum_logits = label_smoothing > 0.0
    if exp_in_place:  # the fused linear gradient starts from e^(x - M): keep it in the block
        head = _logit_partials(logits, local_target, in_slice, sum_logits=sum_logits)
        shifted_exp = logits.sub_(row_max.unsqueeze(-1)).exp_()  # R x V_local, in place
        partials = head + _exp_partials(shifted_exp, entropy=with_stats)
    else:
        partials = local_partials(
            logits, row_max, local_target, in_slice, sum_logits=sum_logits, entropy=with_stats
        )
    summed = all_reduce_sum(*partials, group=group)
    sum_exp_at = 2 if sum_logits else 1
    target_logit, sum_exp = summed[0], summed[sum_exp_at]
    # 3. lse = m + log S; C is the GLOBAL vocabulary size (not this rank's slice).
    num_classes = global_max.num_classes
    row_logsumexp = row_max + torch.log(sum_exp)
    # A kept target >= C (validate_args=False skips the check) lies in no rank's slice:
    # its lse is NaN, so its loss and gradient are NaN on every rank, as they are on the
    # Triton kernels, not a finite number missing the target's logit. No communication:
    # every rank holds the same targets and C.
    row_logsumexp = torch.where(target >= num_classes, torch.nan, row_logsumexp)
    loss = (1.0 - label_smoothing) * (row_logsumexp - target_logit)
    if label_smoothing > 0.0:
        loss = loss + label_smoothing * (row_logsumexp - summed[1] / num_classes)
    if z_loss > 0.0:
        loss = loss + z_loss * row_logsumexp.square()
    if not with_stats:
        return RowStats(row_logsumexp, sum_exp, loss, num_classes, local_target, in_slice)
    # Side outputs: H = log S - sum e (x - m) / S; the argmax (collective 3, MIN).
    entropy = torch.log(sum_exp) - summed[sum_exp_at + 1] / sum_exp
    predicted = all_reduce_argmax(local_max, local_argmax + start, row_max, group)
    return RowStats(row_logsumexp, sum_exp, loss, num_classes, local_target, in_slice,
                    entropy, predicted)  # fmt: skip


def local_partials(
    logits: Tensor,
    row_max: Tensor,
    local_target: Tensor,
    in_slice: Tensor,
    *,
    sum_logits: bool,
    entropy: bool,
) -> tuple[Tensor, ...]:
    """Step 2's local partial sums over a block of local logits (R, V_local); reads only.

    ``row_max`` (R,) is the GLOBAL row max M (after collective 1); ``local_target`` (R,)
    the target's column in this slice and ``in_slice`` (R,) whether this slice holds it.
    Returns (R,) tensors in the logits' dtype, in this order:

    - the target logit x_y where ``in_slice``, else 0;
    - if ``sum_logits``: sum_c x_c;
    - sum_c e^(x_c - M);
    - if ``entropy``: sum_c e^(x_c - M) (x_c - M), 0 for x_c = -inf (so that the
      softmax entropy is log S - this / S after the SUM; shifted by M, so no
      cancellation for large logits).

    Each sum is over this slice only; the SUM all-reduce of step 2 makes them global.
    On the Triton backend one kernel reads each row once, fp16/bf16 natively, and
    returns fp32 (``xloss.ops.triton.vocab_parallel``).
    """
    if backends.select(logits.device.type, logits.dtype) == "triton":
        from xloss.ops.triton import vocab_parallel as triton_vp

        return triton_vp.local_partials(logits, row_max, local_target, in_slice,
                                        sum_logits=sum_logits, entropy=entropy)  # fmt: skip
    shifted_exp = (logits - row_max.unsqueeze(-1)).exp_()  # R x V_local
    head = _logit_partials(logits, local_target, in_slice, sum_logits=sum_logits)
    return head + _exp_partials(shifted_exp, entropy=entropy)


def _logit_partials(logits, local_target, in_slice, *, sum_logits: bool) -> tuple[Tensor, ...]:
    """The target logit (0 where not ``in_slice``) and, if ``sum_logits``, sum_c x_c."""
    target_logit = logits.gather(-1, local_target.unsqueeze(-1))[:, 0]
    target_logit = torch.where(in_slice, target_logit, 0.0)
    return (target_logit, logits.sum(-1)) if sum_logits else (target_logit,)


def _exp_partials(shifted_exp: Tensor, *, entropy: bool) -> tuple[Tensor, ...]:
    """sum_c e_c and, if ``entropy``, sum_c e_c log e_c = sum_c e_c (x_c - M) of e = e^(x - M)."""
    sum_exp = shifted_exp.sum(-1)
    if not entropy:
        return (sum_exp,)
    # xlogy gives 0 where e underflows to 0 (x = -inf included), not 0 * -inf.
    return sum_exp, torch.xlogy(shifted_exp, shifted_exp).sum(-1)


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
