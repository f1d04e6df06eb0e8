"""BCE, sigmoid focal and asymmetric loss through one fused CPU pass (numba), as custom ops.

The kernels (:mod:`xloss.ops._numba_binary`, imported on first use and cached on disk) see
the input as (R, L) rows: with the class axis last (or 0-D/1-D input) a row is one
position's C classes and the positive weight varies along the row; with the class axis
at ``dim`` < ndim - 1 a row holds the L = prod(shape[dim+1:]) elements of one class at
one outer position, and row r has class r % C. Every row is a contiguous piece of the
input, so rows never straddle samples (axis 0).

Two ops in the ``xloss`` namespace, each with a fake implementation, so
``torch.compile(fullgraph=True)`` traces through them:

- ``xloss::fused_binary`` returns ``(output, grad)``, ``grad`` a new buffer (pooled, see
  :func:`xloss.ops.kernel.gradient_buffer`); :class:`FusedBinary` carries its autograd
  formula.
- ``xloss::fused_binary_`` writes the gradient into the logits themselves
  (``inplace_backward=True``); :class:`InplaceFusedBinary` carries its autograd formula.
  The declared mutation bumps the logits' version counter, so autograd raises instead
  of using a tensor that another op saved.

Both autograd formulas are ``autograd.Function`` s with ``setup_context``, so
``torch.func.grad`` works as well as ``torch.compile``. In eager mode with plain CPU
tensors they run the ops' bodies directly (:func:`fused_op`, :func:`fused_inplace_op`):
the custom op's Python dispatch costs a tenth of a millisecond, more with the caches cold
after a pass over tens of MB, a few percent of the whole call at 4096 x 1000. An eager
out-of-place call with a gradient takes :class:`HostFusedBinary` (``forward(ctx)`` form,
no argument binding, the mean's factor as a float). Every Python step here costs about
3x as much after the kernel's pass as with warm caches (measured: 0.26 -> 0.9 ms of
forward outside the kernel at 4 x 10 with a 64 MB copy before each call), which is why
the host path counts torch ops.

Forward, step by step:

1. the kernel reads each element once (logit, target, and the weight, mask and positive
   weight when given), and writes the gradient already multiplied by ``grad_scale``
   (1/count of a mean, 1/normalizer, or 1); it also counts the kept targets outside
   [0, 1], and with ``validate`` the op raises when there is one. In place, that check
   is a read-only sweep over the targets at the start of the same kernel launch, before
   anything is written, so the logits are untouched when the op raises (the one extra
   read of the targets costs about what the out-of-place buffer's first read costs);
   ``validate_args=False`` skips it. Problems of at most ``kernel.SERIAL_ELEMENTS``
   elements, and every problem when torch runs one thread, take the serial kernels in
   the calling thread (no pool, no launch lock, the GIL released);
2. ``output`` is ``grad_scale * sum(loss)`` (a scalar), the (R,) row sums (for
   ``"sample"``) or the (R, L) element losses (for ``"none"``);
3. without a gradient to compute (grad mode off, or logits not requiring grad) the
   kernel writes none.

Backward multiplies the stored gradient by ``grad_output`` (per row, or per element for
``"none"``), and skips the multiply when every factor is exactly 1. Second-order
gradients are not available here: with ``create_graph=True`` the first-order gradient
is returned, and differentiating it raises (``xloss.ops.second_order``); ``vmap``
raises too, naming the portable path.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from xloss import backends
from xloss._core.reduction import reduce_loss, safe_divide
from xloss._core.validation import eager_host, eager_mode, plain_float32_vector
from xloss.ops import kernel
from xloss.ops.second_order import KernelFunction, all_ones, first_order_only

# Loss kinds, as numbered in xloss.ops._numba_binary.
BCE, FOCAL, ASL_CLIP, ASL_NO_CLIP = 0, 1, 2, 3
# What the op returns: the scaled sum, the (R,) row sums, or the (R, L) element losses.
SCALAR, ROWS, ELEMENTS = 0, 1, 2

WHAT = "xloss's binary losses (BCE, sigmoid focal, ASL)"  # named in the second-order error

_loaded: dict = {}


def _binary_kernels():
    """The compiled-kernel module, or None when numba is unusable (warned once)."""
    if not kernel.kernel_available():  # no numba, or forked after OpenMP ran (warned there)
        return None
    if "binary" not in _loaded:
        try:
            _loaded["binary"] = kernel._import_kernels("xloss.ops._numba_binary")
        except Exception as error:  # a broken numba/llvmlite install
            warnings.warn(
                f"xloss: the numba binary kernel is unavailable ({type(error).__name__}: "
                f"{error}); BCE, focal and ASL on CPU use the slower portable torch path",
                RuntimeWarning,
                stacklevel=3,
            )
            _loaded["binary"] = None
    return _loaded["binary"]


def binary_kernel_available() -> bool:
    """True when the numba binary kernel can run."""
    return _binary_kernels() is not None


# torch.compile takes the result as a constant (see kernel.kernel_available)
binary_kernel_available._dynamo_marked_constant = True


def fused_binary_applies(input: Tensor, *differentiable: Tensor | None) -> bool:
    """The numba kernel serves the call: ``xloss.backends`` picks numba (CPU input in fp32,
    fp16 or bf16, not forced to torch), the input is not empty, and no other tensor
    (target, weight, pos_weight, normalizer) requires a gradient: the portable path
    computes those gradients."""
    return (
        input.numel() > 0
        and not any(isinstance(t, Tensor) and t.requires_grad for t in differentiable)
        and backends.select(input.device.type, input.dtype) == "numba"
        and binary_kernel_available()
    )


def host_binary_applies(input, target, pos_weight, class_dim) -> bool:
    """A call that :func:`fused_binary_loss` can take straight from the functional's
    settings check (the caller also has no weight, mask, lengths, ignore_index or
    normalizer, and is not in place): plain contiguous float32, float16 or bfloat16 CPU
    input of at least one axis with the class axis last, a target of its shape in its
    dtype or float32 that no gradient is asked for, ``pos_weight`` None or a plain
    contiguous (C,) float32 CPU tensor, in eager mode on the numba kernel. Only attribute reads, as
    :func:`xloss.ops.fused_cross_entropy.host_call_applies`: a call that fails any test
    takes the general path, which validates it."""
    return (
        type(input) is Tensor
        and type(target) is Tensor
        and input.dtype in kernel.KERNEL_DTYPES
        and target.dtype in (input.dtype, torch.float32)
        and input.is_cpu
        and target.is_cpu
        and input.dim() > 0
        and type(class_dim) is int
        and class_dim in (-1, input.dim() - 1)
        and target.shape == input.shape
        and input.numel() > 0
        and input.is_contiguous()
        and target.is_contiguous()
        and not target.requires_grad
        and (pos_weight is None or plain_float32_vector(pos_weight, input.shape[-1]))
        and eager_mode()
        and backends.select("cpu", input.dtype) == "numba"
        and binary_kernel_available()
    )


def _array(tensor: Tensor):
    """A flat numpy view of a contiguous CPU tensor (:func:`xloss.ops.kernel._as_array`);
    fp16 and bf16 as uint16 bits. The reshape is numpy's: a fraction of a torch op's
    dispatch."""
    return kernel._as_array(tensor).reshape(-1)


def _repeated(values: np.ndarray, count: int) -> np.ndarray:
    """``values`` (flat) repeated ``count`` times, flat: one broadcast copy (``np.tile``
    took several times as long, a tenth of a small call's Python)."""
    out = np.empty((count, values.shape[0]), dtype=values.dtype)
    out[...] = values
    return out.reshape(-1)


def _raise_bad_target(target: Tensor, keep: Tensor | None, ignore_index: int | None):
    """The error of a kept target outside [0, 1], after the kernel flagged one (the failure
    path only). The kernel's flag is a bit-pattern test that -0.0 raises too: this exact
    test decides, and returns when it finds none."""
    values = target.float()
    bad = ~((values >= 0) & (values <= 1))
    if keep is not None:
        bad &= keep.expand_as(bad)
    if not bool(bad.any()):
        return  # a false alarm (-0.0 targets)
    value = float(values[bad].flatten()[0])
    hint = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
    raise ValueError(f"`target` must lie in [0, 1]{hint}, found {value}")


_filled: dict = {}  # (dtype, fill, length) -> a numpy array, reused across calls
# the kernels' "absent" arrays (length 0), by the logits' dtype; never written
_EMPTY = {
    torch.float32: np.empty(0, dtype=np.float32),
    torch.float16: np.empty(0, dtype=np.uint16),
    torch.bfloat16: np.empty(0, dtype=np.uint16),
}


def _filled_array(fill, length: int):
    """A numpy array of ``length`` copies of ``fill`` (float32) or Trues (bool), cached
    (the kernels only read it; a read-only flag would make numba compile another
    specialisation)."""
    dtype = np.bool_ if fill is True else np.float32
    key = (dtype, float(fill), length)  # with the dtype: True == 1.0 as a dict key
    array = _filled.get(key)
    if array is None:
        if len(_filled) > 16:
            _filled.clear()
        array = np.full(length, fill, dtype=dtype)
        _filled[key] = array
    return array


def _run(logits, target, weight, keep, pos_col, pos_row, grad_scale, kind, params, out_mode,
         validate, ignore_index, dest, in_place):  # fmt: skip
    """Launch the kernel over (R, L); returns the op's output. ``dest`` None: no gradient."""
    kernels = _binary_kernels()
    if kernels is None:
        raise RuntimeError("the numba binary kernel is unavailable; check kernel_available()")
    num_rows, width = target.shape
    is_bf16 = logits.dtype == torch.bfloat16
    # Work items (see _numba_binary._items): blocks of whole short rows when no per-row
    # result or per-row positive weight needs them apart, else tiles of one row.
    rows_per_item = 1
    if out_mode != ROWS and pos_row.numel() == 1 and width < kernels.TILE:
        rows_per_item = min(kernels.TILE // width, num_rows)
    tiles_per_row = -(-width // kernels.TILE) if rows_per_item == 1 else 1
    num_items = -(-num_rows // rows_per_item) * tiles_per_row
    item_loss = np.empty(num_items, dtype=np.float32)
    item_bad = np.empty(num_items, dtype=np.int32)

    def pattern(values: Tensor | None, fill):
        """(R, L) values as they are, or one row repeated for the rows of a block."""
        if values is None:
            return _filled_array(fill, rows_per_item * width)
        if values.shape[0] == num_rows and num_rows > 1:
            return _array(values)
        return _repeated(_array(values), rows_per_item)

    def scaled_weight():
        """The element weight times grad_scale (the kernel writes weight * dl/dx and sums
        weight * loss): no multiply by the scale per element. fp32 like the kernel."""
        scale = np.float32(grad_scale)
        if weight is None:  # the same few (scale, length) pairs at every step
            return _filled_array(scale, rows_per_item * width)
        return pattern(weight, 1.0) * scale if scale != 1 else pattern(weight, 1.0)

    empty = _EMPTY[logits.dtype]
    # the arguments after `check_first`, the same for every launch; without an element
    # weight and a mask, the scale alone and None (the kernels' plain specialisation)
    plain = weight is None and keep is None
    shared = (
        np.float32(grad_scale) if plain else scaled_weight(),
        None if plain else pattern(keep, True),
        _filled_array(1.0, rows_per_item * width) if pos_col is None else (
            _array(pos_col) if rows_per_item == 1 else _repeated(_array(pos_col), rows_per_item)
        ),  # fmt: skip
        _array(pos_row),
        width,
        rows_per_item,
        tiles_per_row,
        is_bf16,
        *(np.float32(value) for value in params),
        item_loss,
        item_bad,
    )
    source = _array(logits)
    target_array = _array(target)

    serial = kernel._serial(num_rows * width)  # the same bound as the row kernel's

    def launch(dest, element_loss, overwrite: bool, check_first: bool) -> float:
        """One pass; returns the loss sum. With ``overwrite`` the kernel reads the logits
        from ``dest``; ``check_first`` checks every target before writing anything."""
        arguments = (empty if overwrite else source, target_array, dest, element_loss,
                     overwrite, check_first, *shared)  # fmt: skip
        if serial:
            total, bad = kernels.SERIAL_KERNELS[kind](*arguments)
        else:
            with kernel.parallel_region():  # threads, fork and numba's pool's thread-safety
                total, bad = kernels.KERNELS[kind](*arguments)
        if validate and bad:
            _raise_bad_target(target, keep, ignore_index)
        return total

    # One launch writes one array: the element losses (first, while the logits are still
    # there in place, which also checks the targets before the logits are overwritten),
    # then the gradient; without either, the loss sums only.
    element_loss = logits.new_empty(num_rows * width) if out_mode == ELEMENTS else None
    if out_mode == ELEMENTS or dest is None:
        total = launch(empty, empty if element_loss is None else _array(element_loss), False, False)
    if dest is not None:
        checked = out_mode == ELEMENTS  # the first launch raised on a bad target
        total = launch(_array(dest), empty, in_place, validate and in_place and not checked)
    if out_mode == ELEMENTS:
        return element_loss.reshape(num_rows, width)
    if out_mode == ROWS:  # rows_per_item is 1: items are the row's tiles in order
        rows = item_loss.astype(np.float64).reshape(num_rows, tiles_per_row).sum(1)
        return torch.from_numpy(rows.astype(np.float32))
    # the sum of the scaled losses (from numpy: a few microseconds less than torch.tensor)
    return torch.from_numpy(np.array(total, dtype=np.float32))


def _fused(logits, target, weight, keep, pos_col, pos_row, grad_scale, kind, params, out_mode,
           validate, ignore_index, write_grad):  # fmt: skip
    """The out-of-place op's implementation: (output, gradient or an empty tensor)."""
    grad = kernel.gradient_buffer(logits.shape, logits.dtype) if write_grad else None  # R x L
    output = _run(logits, target, weight, keep, pos_col, pos_row, grad_scale, kind, params,
                  out_mode, validate, ignore_index, grad, False)  # fmt: skip
    return output, logits.new_empty(0) if grad is None else grad


@torch.library.custom_op("xloss::fused_binary", mutates_args=(), device_types="cpu")
def _fused_op(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],  # noqa: UP045 (custom_op reads the annotation)
    keep: Optional[Tensor],  # noqa: UP045
    pos_col: Tensor,
    pos_row: Tensor,
    grad_scale: Tensor,
    kind: int,
    params: list[float],
    out_mode: int,
    validate: bool,
    ignore_index: Optional[int],  # noqa: UP045
    write_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _fused(logits, target, weight, keep, pos_col, pos_row, grad_scale, kind, params,
                  out_mode, validate, ignore_index, write_grad)  # fmt: skip


@torch.library.custom_op("xloss::fused_binary_", mutates_args=("logits",), device_types="cpu")
def _fused_inplace_op(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],  # noqa: UP045 (custom_op reads the annotation)
    keep: Optional[Tensor],  # noqa: UP045
    pos_col: Tensor,
    pos_row: Tensor,
    grad_scale: Tensor,
    kind: int,
    params: list[float],
    out_mode: int,
    validate: bool,
    ignore_index: Optional[int],  # noqa: UP045
) -> Tensor:
    return _run(logits, target, weight, keep, pos_col, pos_row, grad_scale, kind, params,
                out_mode, validate, ignore_index, logits, True)  # fmt: skip


kernel.dynamo_disable_when_imported(_fused_op, _fused_inplace_op)


def fused_op(*args) -> tuple[Tensor, Tensor]:
    """``xloss::fused_binary`` (arguments as the op's). An eager call with plain CPU
    tensors (:func:`xloss._core.validation.eager_host`: not traced, no ``torch.func``
    transform, no dispatch mode) runs its body directly, which skips the custom op's
    Python dispatch (about a tenth of a millisecond, more with the caches cold after a
    pass over tens of MB)."""
    return _fused(*args) if eager_host(args[0]) else _fused_op(*args)


def fused_inplace_op(*args) -> Tensor:
    """``xloss::fused_binary_`` (arguments as the op's), run directly in eager as
    :func:`fused_op`; then the logits' version counter is bumped here, as the op's
    declared mutation does."""
    if not eager_host(args[0]):
        return _fused_inplace_op(*args)
    logits = args[0]
    output = _run(*args, logits, True)
    torch.autograd.graph.increment_version(logits)
    return output


def _no_vmap(info, in_dims, *args):
    KernelFunction.vmap(info, in_dims, *args)  # raises, naming the portable path


_fused_op.register_vmap(_no_vmap)
_fused_inplace_op.register_vmap(_no_vmap)


def _output_like(logits: Tensor, out_mode: int) -> Tensor:
    if out_mode == ELEMENTS:  # in the logits' dtype: rounded once from fp32 in the kernel
        return torch.empty_like(logits)
    shape = {SCALAR: (), ROWS: (logits.shape[0],)}[out_mode]
    return logits.new_empty(shape, dtype=torch.float32)


@_fused_op.register_fake
def _(logits, target, weight, keep, pos_col, pos_row, grad_scale, kind, params, out_mode,
      validate, ignore_index, write_grad):  # fmt: skip
    grad = torch.empty_like(logits) if write_grad else logits.new_empty(0)
    return _output_like(logits, out_mode), grad


@_fused_inplace_op.register_fake
def _(logits, target, weight, keep, pos_col, pos_row, grad_scale, kind, params, out_mode,
      validate, ignore_index):  # fmt: skip
    return _output_like(logits, out_mode)


def _scale_grad(grad: Tensor, grad_output: Tensor, out_mode: int, in_place: bool) -> Tensor:
    """grad * grad_output; no multiply when every factor is exactly 1 (eager only)."""
    if not torch.compiler.is_compiling() and all_ones(grad_output):
        return grad
    factor = grad_output.unsqueeze(-1) if out_mode == ROWS else grad_output
    return grad.mul_(factor) if in_place else (grad * factor).to(grad.dtype)


class FusedBinary(KernelFunction):
    """The out-of-place op with autograd (an ``autograd.Function`` with ``setup_context``,
    so ``torch.func.grad`` works; a custom op's registered autograd does not support it).

    forward: run ``xloss::fused_binary``, which returns the output and the gradient
    already scaled by ``grad_scale``; save the gradient.
    backward: multiply it by ``grad_output`` (skipped when 1) and return it for the logits.
    """

    @staticmethod
    def forward(logits, target, weight, keep, pos_col, pos_row, settings):
        return fused_op(logits, target, weight, keep, pos_col, pos_row, *settings, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.out_mode = inputs[-1].out_mode
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else backward gets an R x L zero tensor for `grad`
        ctx.save_for_backward(output[1], inputs[0])

    @staticmethod
    def backward(ctx, grad_output, _grad_of_grad):
        grad, logits = ctx.saved_tensors
        if grad_output is None:  # grads are not materialised
            return (None,) * 7
        grad_logits = _scale_grad(grad, grad_output, ctx.out_mode, in_place=False)
        return (first_order_only(grad_logits, logits, WHAT),) + (None,) * 6


class HostFusedBinary(torch.autograd.Function):
    """:class:`FusedBinary` for eager host calls (:func:`~xloss._core.validation.eager_host`):
    the op's body runs directly, and this ``forward(ctx, ...)`` form skips the argument
    binding (``inspect.signature``) that ``setup_context`` Functions pay at every call
    (``torch.func`` needs that form, so transformed calls take :class:`FusedBinary`).
    Same steps, same backward."""

    @staticmethod
    def forward(ctx, logits, target, weight, keep, pos_col, pos_row, settings):
        output, grad = _fused(logits, target, weight, keep, pos_col, pos_row, *settings, True)
        ctx.out_mode = settings.out_mode
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad, logits)
        return output, grad

    @staticmethod
    def backward(ctx, grad_output, _grad_of_grad):
        return FusedBinary.backward(ctx, grad_output, _grad_of_grad)


class InplaceFusedBinary(KernelFunction):
    """The in-place op with autograd: the logits' storage becomes their gradient.

    forward: 1. run ``xloss::fused_binary_`` (bumps the logits' version);
    2. save the logits, which now hold the gradient scaled by ``grad_scale``.
    backward: multiply that gradient in place by ``grad_output`` (skipped when 1) and
    return it for the logits; the other inputs get None.
    """

    @staticmethod
    def forward(logits, target, weight, keep, pos_col, pos_row, settings):
        return fused_inplace_op(logits, target, weight, keep, pos_col, pos_row, *settings)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.out_mode = inputs[-1].out_mode
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        # A fresh alias of the logits: the saved tensor may be the caller's own logits
        # object, and autograd copies a gradient that something else still references
        # before it stores it as a leaf's .grad (1 ms at 4096 x 1000 behind an identity).
        (saved,) = ctx.saved_tensors
        grad_logits = _scale_grad(saved.detach(), grad_output, ctx.out_mode, in_place=True)
        return (first_order_only(grad_logits, saved, WHAT),) + (None,) * 6


_ONE_ROW = torch.ones(1, dtype=torch.float32)  # read only, by the kernels


class KernelSettings(NamedTuple):
    """The non-tensor arguments of both ops, in their order."""

    grad_scale: Tensor | float  # 0-dim float32; a float on eager host calls
    kind: int
    params: list[float]
    out_mode: int
    validate: bool
    ignore_index: int | None


def _contiguous_rows(values: Tensor, num_rows: int, width: int, dtype: torch.dtype) -> Tensor:
    """``values`` as contiguous (R, L) in ``dtype``: itself when it already is (each torch
    op costs a few microseconds of a small call), else a view or a private copy."""
    if values.dtype == dtype and values.shape == (num_rows, width) and values.is_contiguous():
        return values
    return values.to(dtype).reshape(num_rows, width).contiguous()


def _as_rows(values: Tensor, num_rows: int, width: int, dtype: torch.dtype) -> Tensor:
    """An input-shaped tensor as (R, L), or (1, L) when it is the same for every row."""
    rows = values.to(dtype).reshape(num_rows, width)
    if num_rows > 1 and rows.stride(0) == 0:
        return rows[:1].contiguous()
    return rows.contiguous()


def _rows_layout(shape: torch.Size, dim: int | None) -> tuple[int, int]:
    """(R, L): rows of the whole class axis when it is last, else of one class each."""
    numel = math.prod(shape)
    if dim is None or dim == len(shape) - 1:
        width = 1 if dim is None else shape[-1]
    else:
        width = math.prod(shape[dim + 1 :])
    return numel // width, width


def fused_binary_loss(
    input: Tensor,
    target: Tensor,
    *,
    kind: int,
    params: tuple[float, float, float],
    smoothing: tuple[float, float],
    weight: Tensor | None,
    pos_weight: Tensor | None,
    keep: Tensor | None,
    dim: int | None,
    reduction: str,
    normalizer,
    batched: bool,
    validate_args: bool,
    ignore_index: int | None,
    inplace_backward: bool,
) -> Tensor:
    """The reduced loss of ``input`` through the kernel (see the module docstring).

    ``params``: (alpha_pos, alpha_neg, gamma) for focal, (gamma_pos, gamma_neg, clip) for
    ASL; ``smoothing``: (scale, shift) with y' = y * scale + shift; ``dim``: the class axis
    (None for 0-D input); ``keep``: the input-shaped bool mask of kept elements, or None.
    """
    shape = input.shape
    if reduction == "sample" and normalizer is None and not batched:
        raise ValueError("reduction='sample' needs a batch axis, but `input` is unbatched")
    num_rows, width = _rows_layout(shape, dim)
    host = eager_host(input, target, weight, pos_weight, keep)
    # R x L: a view of the caller's logits when they are contiguous, else a private copy
    logits = _contiguous_rows(input, num_rows, width, input.dtype)
    target_type = target.dtype if target.dtype == input.dtype else torch.float32
    target_rows = _contiguous_rows(target, num_rows, width, target_type)
    weight_rows = None if weight is None else _as_rows(
        weight.expand(shape), num_rows, width, torch.float32
    )  # fmt: skip
    keep_rows = None if keep is None else _as_rows(keep.expand(shape), num_rows, width, torch.bool)
    pos_col = pos_row = None
    if pos_weight is not None:
        along_rows = dim is None or dim == len(shape) - 1  # else one value per row
        size = width if along_rows else shape[dim]
        values = pos_weight
        if pos_weight.dtype != torch.float32 or pos_weight.shape != (size,):
            values = pos_weight.detach().to(torch.float32).reshape(-1)
        if values.numel() != size or not values.is_contiguous():
            values = values.expand(size).contiguous()
        if along_rows:
            pos_col = values
        else:
            pos_row = values
    if pos_col is None and not host:  # the op's schema takes a tensor (host: None, ones)
        pos_col = torch.ones(width, dtype=torch.float32)
    if pos_row is None:  # one value for every row; a shared constant on eager host calls
        pos_row = _ONE_ROW if host else torch.ones(1, dtype=torch.float32)

    if normalizer is not None:
        out_mode = SCALAR
        scale = safe_divide(torch.ones((), dtype=torch.float32), normalizer)
    elif reduction == "mean" and keep is None and host:
        out_mode = SCALAR  # numel > 0 here; one fp32 division, as safe_divide's
        scale = float(np.float32(1.0) / np.float32(input.numel()))
    elif reduction == "mean" and keep is None and not torch.compiler.is_compiling():
        out_mode = SCALAR
        scale = torch.tensor(np.float32(1.0) / np.float32(input.numel()))
    elif reduction == "sum" and host:
        out_mode, scale = SCALAR, 1.0
    elif reduction in ("sum", "mean"):
        out_mode = SCALAR
        scale = torch.ones((), dtype=torch.float32)
        if reduction == "mean":
            count = float(input.numel()) if keep is None else keep.sum()
            scale = safe_divide(scale, torch.as_tensor(count, dtype=torch.float32))
    else:
        out_mode = ELEMENTS if reduction == "none" else ROWS
        scale = 1.0 if host else torch.ones((), dtype=torch.float32)
    if isinstance(scale, Tensor) and (scale.dtype != torch.float32 or scale.dim() != 0):
        scale = scale.float().reshape(())
    settings = KernelSettings(
        scale,
        kind,
        [float(smoothing[0]), float(smoothing[1]), *map(float, params)],
        out_mode,
        validate_args,
        ignore_index,
    )
    tensors = (logits, target_rows, weight_rows, keep_rows, pos_col, pos_row)
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    if write_grad and inplace_backward:
        output = InplaceFusedBinary.apply(*tensors, settings)
    elif write_grad:
        output, _ = (HostFusedBinary if host else FusedBinary).apply(*tensors, settings)
    else:
        output, _ = fused_op(*tensors, *settings, False)
    if out_mode == SCALAR:
        return output
    if out_mode == ELEMENTS:
        return output.reshape(shape)
    # "sample": row sums (R,) -> per sample, over the kept elements of its rows
    samples = shape[0]
    if keep_rows is None:
        per_row_count = torch.full((num_rows,), float(width))
    else:
        per_row_count = keep_rows.expand(num_rows, width).sum(1).float()
    return reduce_loss(
        output.reshape(samples, -1),
        "sample",
        denominator=per_row_count.reshape(samples, -1),
        batched=batched,
    )
