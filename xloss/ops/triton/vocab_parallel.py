"""Triton kernel of the vocab-parallel local gradient (step 4 of
``xloss.distributed.vocab_parallel``): no communication, one read and one write per row.

Each rank holds a slice (R, V_local) of the logits x; with the GLOBAL lse of each row
(after the all-reduces), the global vocabulary size C, the upstream gradient g of the
row's loss, eps and z, the gradient of the slice is

    d loss / d x_c = g [(1 + 2 z lse) exp(x_c - lse) - (1-eps) [c = y] - eps/C]

where the one-hot term only exists on the rank whose slice holds the target y. One
program per row reads V_local b bytes (fp16/bf16 natively, fp32 arithmetic) and writes
V_local b bytes of gradient in the logits' dtype: the portable path instead makes an
fp32 copy of the slice and a second temporary for the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from xloss.ops.triton.cross_entropy import launch_options

BLOCK = 4096  # classes per block


@triton.jit
def local_gradient_kernel(
    logits_ptr,  # (R, V_local), row stride `logits_stride`
    logits_stride,
    grad_ptr,  # (R, V_local) contiguous, the logits' dtype
    lse_ptr,  # (R,) fp32 global lse
    grad_loss_ptr,  # (R,) fp32 upstream gradient g
    local_target_ptr,  # (R,) int64 target column in this slice, negative: not here
    num_classes_ptr,  # () global C, fp32
    local_classes,
    label_smoothing,
    z_loss,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_loss_ptr + row)
    y = tl.load(local_target_ptr + row)
    prob_coef = g * (1.0 + 2.0 * z_loss * lse)
    offset = g * label_smoothing / tl.load(num_classes_ptr)
    target_coef = g * (1.0 - label_smoothing)
    for start in range(0, local_classes, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < local_classes
        x = tl.load(logits_ptr + row * logits_stride + offs, mask=mask, other=0.0)
        grad = prob_coef * tl.exp(x.to(tl.float32) - lse) - offset
        grad = tl.where(offs == y, grad - target_coef, grad)
        tl.store(grad_ptr + row * local_classes + offs, grad.to(x.dtype), mask=mask)


def kernel_constants(local_classes: int) -> dict:
    """The constexpr arguments for a slice of ``local_classes`` classes."""
    return dict(BLOCK=min(BLOCK, triton.next_power_of_2(max(local_classes, 1))))


def local_gradient(
    logits: Tensor,
    row_logsumexp: Tensor,
    grad_loss: Tensor,
    local_target: Tensor,
    in_slice: Tensor,
    num_classes: Tensor,
    *,
    label_smoothing: float,
    z_loss: float,
) -> Tensor:
    """The slice's gradient (R, V_local) in the logits' dtype; see the module docstring.

    ``row_logsumexp``, ``grad_loss``: (R,); ``local_target`` (R,) with ``in_slice`` (R,)
    bool marking the rows whose target this slice holds; ``num_classes`` the global C as
    a 0-dim tensor (read on the device, no sync).
    """
    rows, local_classes = logits.shape
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # R x V_local
    if rows == 0 or local_classes == 0:
        return grad
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    fp32 = dict(dtype=torch.float32, device=logits.device)
    target = torch.where(in_slice, local_target.long(), -1).contiguous()
    local_gradient_kernel[(rows,)](
        logits, logits.stride(0), grad,
        row_logsumexp.detach().to(**fp32).contiguous(),
        grad_loss.detach().to(**fp32).contiguous(),
        target, num_classes.detach().to(**fp32).reshape(1),
        local_classes, float(label_smoothing), float(z_loss),
        **kernel_constants(local_classes),
        **launch_options(kernel_constants(local_classes)["BLOCK"]),
    )  # fmt: skip
    return grad
