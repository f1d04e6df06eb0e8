"""Triton kernels of the vocab-parallel cross-entropy (``xloss.distributed``): the local
partial sums of step 2 and the local gradient of step 4. Neither communicates; each reads
a row of the slice once, fp16/bf16 natively, and accumulates in fp32.

Step 2, :func:`local_partials` (``xloss.distributed._rows.local_partials``): with M the
GLOBAL row max (after the MAX all-reduce), one program per row reads V_local b bytes and
writes 2-4 fp32 numbers: the target logit x_y (where this slice holds y, else 0), with
smoothing sum_c x_c, S_local = sum_c e^(x_c - M) and, for the entropy,
sum_c e^(x_c - M) (x_c - M) (0 where x_c = -inf). The portable path makes an fp32 copy of
a bf16 slice (2 V_local b more bytes written and read) and an R x V_local temporary for
the exponentials.

Step 4:

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


@triton.jit
def local_partials_kernel(
    logits_ptr,  # (R, V_local), row stride `logits_stride`
    logits_stride,
    row_max_ptr,  # (R,) fp32 global row max M
    local_target_ptr,  # (R,) int64 target column in this slice, negative: not here
    partials_ptr,  # (K, R) fp32 out: x_y, [sum x], sum e^(x - M), [sum e^(x - M) (x - M)]
    num_rows,
    local_classes,
    SUM_LOGITS: tl.constexpr,
    ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    row_max = tl.load(row_max_ptr + row)
    sum_logits = 0.0
    sum_exp = 0.0
    sum_et = 0.0
    for start in range(0, local_classes, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < local_classes
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        shifted = x - row_max
        e = tl.exp(shifted)  # 0 past the row
        sum_exp += tl.sum(e, 0)
        if SUM_LOGITS:
            sum_logits += tl.sum(tl.where(mask, x, 0.0), 0)
        if ENTROPY:
            sum_et += tl.sum(tl.where(e > 0.0, e * shifted, 0.0), 0)
    y = tl.load(local_target_ptr + row)
    here = y >= 0
    target_logit = tl.load(row_ptr + y, mask=here, other=0.0).to(tl.float32)
    out = partials_ptr + row
    tl.store(out, tl.where(here, target_logit, 0.0))
    if SUM_LOGITS:
        out += num_rows
        tl.store(out, sum_logits)
    out += num_rows
    tl.store(out, sum_exp)
    if ENTROPY:
        out += num_rows
        tl.store(out, sum_et)


def local_partials(
    logits: Tensor,
    row_max: Tensor,
    local_target: Tensor,
    in_slice: Tensor,
    *,
    sum_logits: bool,
    entropy: bool,
) -> tuple[Tensor, ...]:
    """Step 2's partial sums of the slice ``logits`` (R, V_local), one read of each row:
    the (R,) fp32 tensors of ``xloss.distributed._rows.local_partials``, in its order
    (see the module docstring). ``row_max`` (R,) is the global row max."""
    rows, local_classes = logits.shape
    count = 2 + sum_logits + entropy
    partials = torch.zeros(count, rows, dtype=torch.float32, device=logits.device)  # K x R
    if rows == 0:
        return partials.unbind(0)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = torch.where(in_slice, local_target.long(), -1).contiguous()
    constants = kernel_constants(local_classes)
    local_partials_kernel[(rows,)](
        logits, logits.stride(0),
        row_max.detach().to(dtype=torch.float32).contiguous(), target, partials,
        rows, local_classes, SUM_LOGITS=sum_logits, ENTROPY=entropy,
        **constants, **launch_options(constants["BLOCK"]),
    )  # fmt: skip
    return partials.unbind(0)


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
