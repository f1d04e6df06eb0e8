"""Portable in-place row gradient of cross-entropy (torch ops, any device).

This is the torch twin of the numba kernel in ``xloss/ops/kernel.py``; both follow one
contract. ``row_loss_and_grad_`` overwrites a block of logits with the gradient of
``sum_i s_i * loss_i`` and returns the per-row loss, where (x after soft-capping)

    loss_i = (1-eps) w[y] (lse - x[y]) + eps/C sum_c w[c] (lse - x[c]) + z lse^2
    grad_i = s_i [(1-eps) w[y] (p - onehot_y) + eps/C (W p - w) + 2 z lse p]
             * (1 - tanh(x_raw / cap)^2)          (only with softcap)

with p = softmax(x) and W = sum_c w[c]. A negative target marks a dropped row: loss 0,
gradient row 0. Rows are processed in sub-chunks of about ``SUB_CHUNK_ELEMENTS`` values
so the temporaries (softcap's tanh, fp32 copies of fp16/bf16 rows) stay small and
in cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xloss._core.validation import autocast_off

# CPU: ~4 MiB of fp32 per sub-chunk, large enough to amortise op overhead, small enough
# for cache. Accelerators: kernel launches dominate small blocks, so take ~64 MiB at once.
SUB_CHUNK_ELEMENTS = 1 << 20
ACCELERATOR_SUB_CHUNK_ELEMENTS = 1 << 24


def row_loss_and_grad_(
    logits: Tensor,
    target: Tensor,
    *,
    grad_scale: float | Tensor,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Write d(sum_i s_i loss_i)/d logits into ``logits`` and return the loss per row.

    Args:
        logits: (R, C) contiguous floating tensor, overwritten with the gradient with
            respect to the raw (pre-softcap) logits, in its own dtype. fp16/bf16 rows
            are computed in fp32.
        target: (R,) int64 class indices; a negative entry drops its row.
        grad_scale: s_i, a Python float or an (R,) float tensor.
        class_weight: (C,) class weights w, or None for 1.
        label_smoothing: eps in [0, 1].
        z_loss: coefficient z of lse^2.
        softcap: cap of ``cap * tanh(x / cap)``, or None.
        stats: None, or ((R, 2), (R,) int64) tensors that receive, per row, (lse,
            entropy) of the softmax of the (soft-capped) logits and the argmax of the raw
            logits; zeros and -1 at dropped rows.

    Returns:
        (R,) unscaled per-row loss in ``promote_types(logits.dtype, float32)`` (float32
        for fp16, bf16 and fp32 logits), 0 for dropped rows.
    """
    rows, num_classes = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    loss = torch.empty(rows, dtype=dtype, device=logits.device)  # R
    weight = None if class_weight is None else class_weight.to(device=logits.device, dtype=dtype)
    weight_sum = float(num_classes) if weight is None else weight.sum()
    elements = SUB_CHUNK_ELEMENTS if logits.device.type == "cpu" else ACCELERATOR_SUB_CHUNK_ELEMENTS
    step = max(1, elements // max(num_classes, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        scale = grad_scale
        if isinstance(grad_scale, Tensor):
            scale = grad_scale[start:stop].to(device=logits.device, dtype=dtype)
        loss[start:stop] = _rows_inplace(
            logits[start:stop],
            target[start:stop],
            scale,
            weight,
            weight_sum,
            label_smoothing,
            z_loss,
            softcap,
            dtype,
            None if stats is None else (stats[0][start:stop], stats[1][start:stop]),
        )
    return loss


def _rows_inplace(
    block: Tensor,
    target: Tensor,
    scale: float | Tensor,
    weight: Tensor | None,
    weight_sum: float | Tensor,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    dtype: torch.dtype,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """One sub-chunk of ``row_loss_and_grad_``: ``block`` (r, C) is overwritten."""
    num_classes = block.shape[1]
    x = block if block.dtype == dtype else block.to(dtype)  # r x C, a copy for fp16/bf16
    kept = target >= 0  # r
    if stats is not None:
        stats[1].copy_(torch.where(kept, x.argmax(1), -1))  # raw logits: before softcap
    index = target.clamp(min=0).unsqueeze(1)  # r x 1, any class for dropped rows

    # 1. Soft-capping in place; keep tanh for the chain factor 1 - tanh^2.
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(x / softcap)  # r x C
        torch.mul(tanh, softcap, out=x)

    # 2. The loss from lse, the target logit and (with smoothing) the weighted logit sum,
    # read before x is overwritten; lse from the row max and the sum of exp.
    target_logit = x.gather(1, index).squeeze(1)  # r
    logit_sum = None
    if label_smoothing > 0.0:
        with autocast_off(x.device.type):  # cross-entropy is on autocast's float32 list
            logit_sum = x.sum(1) if weight is None else x @ weight  # r
    row_max = x.amax(1)  # r
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # all -inf rows stay nan-free
    x.sub_(row_max.unsqueeze(1)).exp_()  # exp(x - max)
    sum_exp = x.sum(1)  # r
    lse = row_max + sum_exp.log()
    target_weight = torch.full_like(lse, 1.0 - label_smoothing)  # (1-eps) w[y]
    if weight is not None:
        target_weight = target_weight * weight[index.squeeze(1)]
    loss = target_weight * (lse - target_logit)
    if logit_sum is not None:
        loss = loss + (label_smoothing / num_classes) * (weight_sum * lse - logit_sum)
    if z_loss > 0.0:
        loss = loss + z_loss * lse.square()
    loss = torch.where(kept, loss, 0.0)
    if stats is not None:
        # entropy = log S - sum e t / S with e = exp(t), t = x - max; xlogy(e, e) = e t
        entropy = sum_exp.log() - torch.special.xlogy(x, x).sum(1) / sum_exp
        stats[0].copy_(torch.stack((lse, entropy), 1).masked_fill_(~kept.unsqueeze(1), 0.0))

    # 3. Gradient: s [a p - (1-eps) w[y] onehot - eps/C w], a = (1-eps) w[y] + eps/C W + 2 z lse,
    # with p = exp(x - max) / sum_exp.
    row_scale = torch.where(kept, torch.as_tensor(scale, dtype=dtype, device=x.device), 0.0)
    prob_coef = target_weight + (label_smoothing / num_classes) * weight_sum
    if z_loss > 0.0:
        prob_coef = prob_coef + 2.0 * z_loss * lse
    x.mul_((row_scale * prob_coef / sum_exp).unsqueeze(1))
    x.scatter_add_(1, index, (-row_scale * target_weight).unsqueeze(1))
    if label_smoothing > 0.0:
        if weight is None:
            x.sub_((label_smoothing / num_classes) * row_scale.unsqueeze(1))
        else:
            x.addr_(row_scale, weight, alpha=-label_smoothing / num_classes)
    # Dropped rows must be exactly 0 even when their logits overflow (0 * nan).
    if x.device.type != "cpu" or not bool(kept.all()):
        x.masked_fill_(~kept.unsqueeze(1), 0.0)
    if tanh is not None:
        x.mul_(tanh.square_().neg_().add_(1.0))

    if x is not block:
        block.copy_(x)
    return loss


def check_rows(logits: Tensor, target: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """The row contract's arguments: (R, C) ``logits`` of one of ``dtypes``, (R,) int64
    ``target`` (kernels call this before launching)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(
            f"`logits` must be a 2-D (R, C) tensor, got {type(logits).__name__} "
            f"of shape {tuple(getattr(logits, 'shape', ()))}"
        )
    if logits.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"`logits` must be one of {names}, got {logits.dtype}")
    if target.shape != (logits.shape[0],) or target.dtype != torch.int64:
        raise ValueError(
            f"`target` must be an int64 tensor of shape ({logits.shape[0]},), "
            f"got {target.dtype} of shape {tuple(target.shape)}"
        )


def check_stats(stats, num_rows: int, device: torch.device) -> None:
    """The row contract's ``stats`` buffers: contiguous ((R, 2) float32, (R,) int64) on
    ``device`` (kernels call this before launching)."""
    values, predicted = stats
    if (
        values.shape != (num_rows, 2)
        or values.dtype != torch.float32
        or predicted.shape != (num_rows,)
        or predicted.dtype != torch.int64
        or not (values.is_contiguous() and predicted.is_contiguous())
        or values.device != device
        or predicted.device != device
    ):
        raise ValueError(
            f"`stats` must be contiguous ((R, 2) float32, (R,) int64) tensors on {device} "
            f"with R = {num_rows}, got {values.dtype} {tuple(values.shape)} on "
            f"{values.device} and {predicted.dtype} {tuple(predicted.shape)} on "
            f"{predicted.device}"
        )
