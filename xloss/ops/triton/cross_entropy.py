"""Triton row kernel of cross-entropy: loss, lse and gradient per row (shared row contract).

One program per row of logits x (C classes), in fp32 whatever the input dtype (fp16 and
bf16 are read natively and widened in registers; no fp32 copy of the logits). With
b the bytes of one logit:

1. statistics pass, over blocks of ``BLOCK`` classes: the online max m and sum
   S = sum exp(x - m) (rescaled when m grows), and with label smoothing the sum
   T = sum_c w_c x_c; then lse = m + log S and the row's loss

       loss = (1-eps) w_y (lse - x_y) + eps/C (W lse - T) + z lse^2;

   with ``stats`` also E = sum exp(x - m) (x - m) (rescaled with S: E' = e^(m - m')
   (E + (m - m') S)), so entropy = log S - E / S, and the argmax of the raw row (the
   first block's first maximum); these add 12 bytes written per row, nothing read;

   reads C b bytes (plus x_y and, with class weights, 4 C bytes of w that every row
   shares from L2);
2. gradient pass: x again, p = exp(x - lse) and

       g = s [(1-eps) w_y + eps/C W + 2 z lse] p - s eps/C w - s (1-eps) w_y onehot_y,

   times 1 - tanh(x / cap)^2 with a softcap, written in the input dtype into the
   gradient buffer (which may be the logits themselves): reads C b, writes C b bytes.

A row that fits in one block (C <= ``SINGLE_BLOCK_MAX``) is read once and kept in
registers: C b read + C b written. A longer row costs 2 C b read + C b written, as
Liger-Kernel's cross-entropy. Rows with a negative target (ignored or masked) are
skipped: loss 0 and, when a gradient is written, a row of zeros (C b written). A target
>= C (only possible with ``validate_args=False``) gives a NaN loss and gradient row, never
an out-of-bounds read.

Softcap x <- cap tanh(x / cap) uses a tanh built from ``tl.exp`` (libdevice's tanh is
None under Triton's interpreter, which runs these kernels on CPU tensors in the tests).
Options that change the code are ``tl.constexpr``: one compiled specialisation each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from xloss.backends import KERNEL_DTYPES
from xloss.ops.row_grad import check_rows, check_stats

# A row of up to this many classes is read once and kept in registers.
SINGLE_BLOCK_MAX = 8192
# Classes per block of the two-pass path (longer rows).
LOOP_BLOCK = 4096
REGISTERS_PER_SM = 65536  # sm_80 and sm_90


@triton.jit
def _tanh(u):
    """tanh from exp: a series for |u| < 1/4 (no cancellation), (1-e)/(1+e) above."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    u2 = u * u
    series = a * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0
                                                                     + u2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, series, t)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _load_block(row_ptr, offs, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """A block of a row in fp32 (-inf past the row), soft-capped; also tanh(x / cap) and
    the raw block (before the softcap)."""
    raw = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    x = raw
    tanh = raw
    if HAS_SOFTCAP:
        tanh = _tanh(raw / softcap)
        x = tl.where(mask, softcap * tanh, float("-inf"))
    return x, tanh, raw


@triton.jit
def _entropy_terms(x, shift):
    """sum_c e_c (x_c - shift) with e = exp(x - shift); 0 where e underflows (x = -inf)."""
    t = x - shift
    e = tl.exp(t)
    return tl.sum(tl.where(e > 0.0, e * t, 0.0), 0)


@triton.jit
def _grad_block(x, tanh, offs, mask, y, lse, prob_coef, target_coef, smooth_coef, weight_ptr,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr):  # fmt: skip
    """The gradient of one block: prob_coef p - smooth_coef w - target_coef [c = y]."""
    g = prob_coef * tl.exp(x - lse)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            g -= smooth_coef * tl.load(weight_ptr + offs, mask=mask, other=0.0)
        else:
            g -= smooth_coef
    g = tl.where(offs == y, g - target_coef, g)
    if HAS_SOFTCAP:
        g *= 1.0 - tanh * tanh
    return g


@triton.jit
def cross_entropy_rows_kernel(
    logits_ptr,  # (R, C) rows, row stride `logits_stride`
    logits_stride,
    grad_ptr,  # (R, C) gradient, the logits' dtype (may be logits_ptr itself)
    grad_stride,
    target_ptr,  # (R,) int64 class index, negative: dropped row
    scale_ptr,  # (1,) or (R,) fp32 gradient scale s
    weight_ptr,  # (C,) fp32 class weights w (HAS_WEIGHT)
    weight_sum_ptr,  # (1,) fp32 W = sum w (HAS_WEIGHT)
    loss_ptr,  # (R,) fp32 loss, not scaled by s
    values_ptr,  # (R, 2) fp32 (lse, entropy) per row (STORE_STATS)
    predicted_ptr,  # (R,) int64 argmax of the raw row (STORE_STATS)
    num_classes,
    class_count,  # float(C): W without class weights
    label_smoothing,
    smooth,  # eps / C
    z_loss,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ROW_SCALE: tl.constexpr,  # a scale per row, else one for all
    WRITE_GRAD: tl.constexpr,
    STORE_STATS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # num_classes <= BLOCK: one read of the row
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: R x C passes 2^31 at 16k x 128k
    row_ptr = logits_ptr + row * logits_stride
    out_ptr = grad_ptr + row * grad_stride
    y = tl.load(target_ptr + row)
    offs0 = tl.arange(0, BLOCK)
    if y < 0:
        # A dropped row: loss 0 and a zero gradient, its logits never read.
        tl.store(loss_ptr + row, 0.0)
        if STORE_STATS:
            tl.store(values_ptr + 2 * row, 0.0)
            tl.store(values_ptr + 2 * row + 1, 0.0)
            tl.store(predicted_ptr + row, -1)
        if WRITE_GRAD:
            for start in range(0, num_classes, BLOCK):
                offs = start + offs0
                zero = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
                tl.store(out_ptr + offs, zero, mask=offs < num_classes)
    else:
        # 1. statistics: online max m and S = sum exp(x - m); T = sum w x for smoothing;
        #    with STORE_STATS also E = sum exp(x - m) (x - m) and the raw argmax.
        sum_et = 0.0
        best_arg = 0
        if SINGLE_BLOCK:
            mask0 = offs0 < num_classes
            x0, tanh0, raw0 = _load_block(row_ptr, offs0, mask0, softcap, HAS_SOFTCAP)
            row_max = tl.max(x0, 0)
            shift = tl.where(row_max == float("-inf"), 0.0, row_max)  # all -inf: no nan
            sum_exp = tl.sum(tl.exp(x0 - shift), 0)
            if STORE_STATS:
                sum_et = _entropy_terms(x0, shift)
                best_arg = tl.argmax(raw0, 0, tie_break_left=True)
                # a NaN is the argmax, as for torch.argmax (tl.argmax may pass over it)
                first_nan = tl.min(tl.where((raw0 != raw0) & mask0, offs0, num_classes), 0)
                best_arg = tl.where(first_nan < num_classes, first_nan, best_arg)
            logit_sum = 0.0
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w0 = tl.load(weight_ptr + offs0, mask=mask0, other=0.0)
                    logit_sum = tl.sum(tl.where(mask0, x0, 0.0) * w0, 0)
                else:
                    logit_sum = tl.sum(tl.where(mask0, x0, 0.0), 0)
        else:
            row_max = float("-inf")
            shift = 0.0
            sum_exp = 0.0
            logit_sum = 0.0
            best_raw = float("-inf")
            first_nan = num_classes  # with STORE_STATS: the first NaN, or num_classes
            for start in range(0, num_classes, BLOCK):
                offs = start + offs0
                mask = offs < num_classes
                x, _, raw = _load_block(row_ptr, offs, mask, softcap, HAS_SOFTCAP)
                new_max = tl.maximum(row_max, tl.max(x, 0))
                new_shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                rescale = tl.exp(row_max - new_shift)  # 0 while the row is all -inf
                if STORE_STATS:
                    # E' = e^(m - m') (E + (m - m') S) + the block's terms (shifts finite)
                    sum_et = rescale * (sum_et + (shift - new_shift) * sum_exp)
                    sum_et += _entropy_terms(x, new_shift)
                    block_raw = tl.max(raw, 0)
                    block_arg = start + tl.argmax(raw, 0, tie_break_left=True)
                    best_arg = tl.where(block_raw > best_raw, block_arg, best_arg)  # first
                    best_raw = tl.maximum(best_raw, block_raw)
                    block_nan = tl.min(tl.where((raw != raw) & mask, offs, num_classes), 0)
                    first_nan = tl.minimum(first_nan, block_nan)
                sum_exp = sum_exp * rescale + tl.sum(tl.exp(x - new_shift), 0)
                row_max = new_max
                shift = new_shift
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
                        logit_sum += tl.sum(tl.where(mask, x, 0.0) * w, 0)
                    else:
                        logit_sum += tl.sum(tl.where(mask, x, 0.0), 0)
            if STORE_STATS:  # a NaN is the argmax, as for torch.argmax
                best_arg = tl.where(first_nan < num_classes, first_nan, best_arg)
        # A target past the row (possible with validate_args=False) is never read: its
        # row's loss and gradient become NaN instead of an out-of-bounds access.
        in_range = y < num_classes
        lse = tl.where(in_range, shift + tl.log(sum_exp), float("nan"))
        x_y = tl.load(row_ptr + y, mask=in_range, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x_y = softcap * _tanh(x_y / softcap)
        w_y = 1.0
        weight_sum = class_count
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y, mask=in_range, other=0.0)
            weight_sum = tl.load(weight_sum_ptr)
        target_weight = (1.0 - label_smoothing) * w_y
        loss = target_weight * (lse - x_y)
        if HAS_SMOOTHING:
            loss += smooth * (weight_sum * lse - logit_sum)
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
        tl.store(loss_ptr + row, loss)
        if STORE_STATS:
            # as the numba kernel: a row whose target is out of range gets (0, 0), -1
            entropy = tl.log(sum_exp) - sum_et / sum_exp
            tl.store(values_ptr + 2 * row, tl.where(in_range, lse, 0.0))
            tl.store(values_ptr + 2 * row + 1, tl.where(in_range, entropy, 0.0))
            tl.store(predicted_ptr + row, tl.where(in_range, best_arg.to(tl.int64), -1))

        # 2. gradient: s [a p - eps/C w - (1-eps) w_y onehot], a = (1-eps) w_y + eps/C W
        #    + 2 z lse; with a softcap times 1 - tanh^2.
        if WRITE_GRAD:
            if ROW_SCALE:
                scale = tl.load(scale_ptr + row)
            else:
                scale = tl.load(scale_ptr)
            prob_coef = target_weight + smooth * weight_sum
            if HAS_Z_LOSS:
                prob_coef += 2.0 * z_loss * lse
            prob_coef *= scale
            target_coef = scale * target_weight
            smooth_coef = scale * smooth
            out_ty = grad_ptr.dtype.element_ty
            if SINGLE_BLOCK:
                g = _grad_block(x0, tanh0, offs0, mask0, y, lse, prob_coef, target_coef,
                                smooth_coef, weight_ptr, HAS_WEIGHT, HAS_SMOOTHING,
                                HAS_SOFTCAP)  # fmt: skip
                tl.store(out_ptr + offs0, g.to(out_ty), mask=mask0)
            else:
                for start in range(0, num_classes, BLOCK):
                    offs = start + offs0
                    mask = offs < num_classes
                    x, tanh, _ = _load_block(row_ptr, offs, mask, softcap, HAS_SOFTCAP)
                    g = _grad_block(x, tanh, offs, mask, y, lse, prob_coef, target_coef,
                                    smooth_coef, weight_ptr, HAS_WEIGHT, HAS_SMOOTHING,
                                    HAS_SOFTCAP)  # fmt: skip
                    tl.store(out_ptr + offs, g.to(out_ty), mask=mask)


@triton.jit
def scale_rows_kernel(
    grad_ptr,  # (R, C) contiguous, scaled in place
    factor_ptr,  # (1,) or (R,) fp32 grad_output
    num_classes,
    ROW_FACTOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad[r] *= factor (factor[r] with ROW_FACTOR); a row whose factor is exactly 1 is
    neither read nor written. The test runs on the device: no host synchronisation."""
    row = tl.program_id(0).to(tl.int64)
    if ROW_FACTOR:
        factor = tl.load(factor_ptr + row)
    else:
        factor = tl.load(factor_ptr)
    if factor != 1.0:
        row_ptr = grad_ptr + row * num_classes
        for start in range(0, num_classes, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < num_classes
            g = tl.load(row_ptr + offs, mask=mask, other=0.0)
            tl.store(row_ptr + offs, (g.to(tl.float32) * factor).to(g.dtype), mask=mask)


def scale_rows_(grad: Tensor, factor: Tensor) -> Tensor:
    """``grad`` (R, C) contiguous times ``factor`` (one value, or (R,) per row), in place
    and rounded once; rows whose factor is exactly 1 cost nothing (tested on the device).

    The write bypasses the version counter, like the row kernel's own: only for a tensor
    that the in-place op has already marked as mutated.
    """
    num_rows, num_classes = grad.shape
    if num_rows == 0 or num_classes == 0:
        return grad
    factor = factor.detach().to(device=grad.device, dtype=torch.float32).reshape(-1)
    block = min(LOOP_BLOCK, triton.next_power_of_2(num_classes))
    scale_rows_kernel[(num_rows,)](
        grad, factor.contiguous(), num_classes,
        ROW_FACTOR=factor.numel() > 1, BLOCK=block, **launch_options(block),
    )  # fmt: skip
    return grad


def kernel_constants(
    num_classes: int,
    *,
    has_weight: bool,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    row_scale: bool,
    write_grad: bool,
    store_stats: bool,
) -> tuple[dict, dict]:
    """The ``tl.constexpr`` arguments and the launch options (warps, register cap) of a
    launch: one compiled specialisation per distinct result
    (``benchmarks/triton_resources.py`` compiles each for sm_80 and sm_90).

    A row of up to ``SINGLE_BLOCK_MAX`` classes is one block of the next power of two,
    else blocks of ``LOOP_BLOCK``; warps are chosen so that each thread holds at most 8
    values of a block, and the register cap is what one SM gives a block of that size
    (``maxnreg``, CUDA only): left to itself ptxas kept some specialisations at 40-64
    registers and spilled 8 bytes (sm_80 and sm_90, ``benchmarks/triton_resources.py``).
    """
    if num_classes <= SINGLE_BLOCK_MAX:
        block, single = triton.next_power_of_2(max(num_classes, 1)), True
    else:
        block, single = LOOP_BLOCK, False
    constants = dict(
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_Z_LOSS=z_loss > 0.0,
        HAS_SOFTCAP=bool(softcap),
        ROW_SCALE=row_scale,
        WRITE_GRAD=write_grad,
        STORE_STATS=store_stats,
        SINGLE_BLOCK=single,
        BLOCK=block,
    )
    return constants, launch_options(block)


def launch_options(block: int) -> dict:
    """Warps for at most 8 values of a ``block`` per thread, and (CUDA) the register cap
    one SM gives a block of that many threads."""
    num_warps = max(1, min(32, block // 256))
    options = dict(num_warps=num_warps)
    if torch.version.hip is None:
        options["maxnreg"] = min(255, REGISTERS_PER_SM // (32 * num_warps))
    return options


def launch(
    logits: Tensor,
    target: Tensor,
    dest: Tensor | None,
    *,
    grad_scale: float | Tensor = 1.0,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Run the kernel over the rows of ``logits`` (R, C); returns the (R,) fp32 loss.

    ``dest`` None computes the loss only; else the gradient goes there (``logits``
    itself for in place). ``stats``: None, or ((R, 2) float32, (R,) int64) contiguous
    tensors on the logits' device that receive per row (lse, entropy) of the softmax
    (after the softcap) and the argmax of the raw logits (first index on ties), in the
    same pass: (0, 0) and -1 at dropped rows and rows whose target is out of range, as
    ``xloss.ops.kernel``.
    """
    _check_rows(logits, target, dest)
    num_rows, num_classes = logits.shape
    if stats is not None:
        check_stats(stats, num_rows, logits.device)
    device = logits.device
    loss = torch.empty(num_rows, dtype=torch.float32, device=device)  # R
    if num_rows == 0:
        return loss
    if isinstance(grad_scale, Tensor):
        scale = grad_scale.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if scale.numel() not in (1, num_rows):
            raise ValueError(
                f"`grad_scale` must be a float or a tensor of 1 or {num_rows} elements, "
                f"got shape {tuple(grad_scale.shape)}"
            )
        scale = scale.contiguous()
    else:
        scale = torch.full((1,), float(grad_scale), dtype=torch.float32, device=device)
    if class_weight is not None:
        weight = class_weight.detach().to(device=device, dtype=torch.float32).contiguous()
        weight_sum = weight.sum().reshape(1)
    else:
        weight = weight_sum = scale  # never read
    write = dest is not None
    constants, options = kernel_constants(
        num_classes,
        has_weight=class_weight is not None,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        row_scale=scale.numel() == num_rows and num_rows > 1,
        write_grad=write,
        store_stats=stats is not None,
    )
    cross_entropy_rows_kernel[(num_rows,)](
        logits, logits.stride(0),
        dest if write else logits, dest.stride(0) if write else 0,
        target, scale, weight, weight_sum, loss,
        *(stats if stats is not None else (loss, target)),
        num_classes, float(num_classes), float(label_smoothing),
        float(label_smoothing) / num_classes, float(z_loss),
        float(softcap) if softcap else 1.0,
        **constants,
        **options,
    )  # fmt: skip
    return loss


def _check_rows(logits: Tensor, target: Tensor, dest: Tensor | None) -> None:
    check_rows(logits, target, KERNEL_DTYPES)
    if logits.stride(1) != 1:
        raise ValueError("`logits` must have a contiguous class axis (stride 1)")
    if target.device != logits.device:
        raise ValueError(f"`target` must be on {logits.device}, got {target.device}")
    if dest is not None and (
        dest.shape != logits.shape or dest.dtype != logits.dtype or dest.stride(1) != 1
    ):
        raise ValueError("the gradient buffer must have the logits' shape and dtype, stride 1")


def row_loss_and_grad_(logits: Tensor, target: Tensor, **options) -> Tensor:
    """Per-row loss; ``logits`` is OVERWRITTEN with the scaled gradient (shared contract,
    see ``xloss.ops.row_grad.row_loss_and_grad_``). Returns the (R,) fp32 loss."""
    return launch(logits, target, logits, **options)


def row_loss_and_grad(logits: Tensor, target: Tensor, **options) -> tuple[Tensor, Tensor]:
    """Out-of-place twin of :func:`row_loss_and_grad_`: returns (loss, gradient)."""
    grad = torch.empty_like(logits)  # R x C
    return launch(logits, target, grad, **options), grad


def row_loss(logits: Tensor, target: Tensor, **options) -> Tensor:
    """Per-row loss only (no gradient is written)."""
    return launch(logits, target, None, **options)
