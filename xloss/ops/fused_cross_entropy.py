"""Cross-entropy through the fused CPU row kernel, as ``torch.library`` custom ops.

Two ops in the ``xloss`` namespace, each with a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through them:

- ``xloss::fused_cross_entropy`` returns ``(output, grad, values, predicted)`` with
  ``grad`` a new buffer;
  :class:`FusedCrossEntropy` (an ``autograd.Function`` in ``setup_context`` form, which
  ``torch.func.grad`` needs; ``register_autograd`` generates one without it) carries its
  autograd formula.
- ``xloss::fused_cross_entropy_`` writes the gradient into ``logits`` itself
  (``inplace_backward=True``). PyTorch allows no autograd formula on a mutating op, so
  :class:`InplaceFusedCrossEntropy` (an ``autograd.Function``) carries it. Declaring the
  mutation makes the dispatcher bump the version counter of ``logits``, so autograd
  raises instead of silently using a tensor that another op saved. It returns
  ``(output, values, predicted)``.

With ``with_stats`` the same kernel pass also fills the side outputs of
``return_stats=True``: ``values`` (R, 2) float32 (lse, entropy) and ``predicted`` (R,)
int64, the argmax (0, 0 and -1 at dropped rows); without, they are empty ((0, 2), (0,)).
They are read before the row is overwritten, so in place gives them too. Not
differentiable.

Forward, step by step:

1. the kernel reads each row once and writes its gradient while the row is in cache,
   already multiplied by ``grad_scale`` (1/denominator of a mean, 1 for a sum);
2. ``output`` is ``grad_scale * sum(loss)`` (a scalar) or, with ``per_row``, the (R,)
   losses, which the caller reduces with ``reduce_loss`` ("none", "sample");
3. without a gradient to compute (grad mode off, logits not requiring grad) the kernel
   writes no gradient (the side outputs still).

Eager calls on plain CPU tensors (no tracing, ``torch.func`` transform, dispatch mode or
subclass) skip the op: :class:`HostFusedCrossEntropy` runs its body directly, and plain
contiguous (N, C) fp32, fp16 and bf16 calls (class axis last, int64 targets, no mask,
lengths or stats) take :func:`host_cross_entropy`, where one kernel call checks the
targets, counts the kept rows, runs the rows and reduces them on numpy views: at
16 x 256 the fixed cost of forward + backward is most of the call.

Backward multiplies the stored gradient by ``grad_output`` (one factor per row with
``per_row``); on CPU (numba) it skips the multiply when every factor is exactly 1; on a
GPU it never reads a device value (no host synchronisation): a kernel scales the stored
gradient in place, skipping rows whose factor is 1 on the device, and hands it over, so
a second backward through the same graph raises there. That gradient is
not differentiable again: under ``create_graph=True`` it raises at the second backward
(``xloss.ops.second_order``); ``vmap`` raises too. Forward-mode AD never gets here
(``xloss.backends.select`` picks torch under it).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from xloss import backends
from xloss._core.reduction import reduce_loss, safe_divide
from xloss._core.validation import (
    eager_host,
    eager_mode,
    index_range_message,
    plain_float32_vector,
)
from xloss.ops import kernel
from xloss.ops.second_order import (
    KernelFunction,
    all_ones,
    first_order_only,
    grad_anchor,
    hand_over,
    is_functorch_wrapped,
)

_KERNEL_BACKENDS = ("numba", "triton")  # backends these ops launch
_DEVICES = ("cpu", "cuda")  # numba; Triton (also CPU under its interpreter)


def fused_kernel_applies(input: Tensor, soft_target: bool) -> bool:
    """A kernel serves the call: class-index targets in fp32, fp16 or bf16, on a device
    whose kernel backend ``xloss.backends.select`` picks (numba on CPU)."""
    return backends.select(input.device.type, input.dtype, not soft_target) in _KERNEL_BACKENDS


def _launcher(logits: Tensor):
    """The row kernel's launch function for these logits: numba, or Triton (GPU tensors,
    or CPU tensors when ``xloss.backends`` forces it under ``TRITON_INTERPRET=1``)."""
    if backends.select(logits.device.type, logits.dtype) == "triton":
        from xloss.ops.triton.cross_entropy import launch

        return launch
    return kernel._launch


def kernel_fills_stats(input: Tensor) -> bool:
    """The row kernel serving ``input`` fills the ``return_stats`` side outputs in its loss
    pass (numba and Triton: ``stats=`` of their launch); elsewhere the caller takes them
    from torch ops before the loss."""
    return backends.select(input.device.type, input.dtype) in _KERNEL_BACKENDS


def _stats_outputs(logits: Tensor, with_stats: bool) -> tuple[Tensor, Tensor]:
    """((R, 2) float32 (lse, entropy), (R,) int64 argmax) to fill, or empty ones."""
    rows = logits.shape[0] if with_stats else 0
    values = logits.new_empty((rows, 2), dtype=torch.float32)  # R x 2
    return values, logits.new_empty((rows,), dtype=torch.int64)


def _forward(logits, target, class_weight, grad_scale, label_smoothing, z_loss, softcap,
             per_row, grad, with_stats):  # fmt: skip
    """Launch the kernel; returns (output, values, predicted), the last two empty unless
    ``with_stats`` (a launch without them runs the kernel compiled without them)."""
    stats = _stats_outputs(logits, with_stats)
    extra = {"stats": stats} if with_stats else {}
    # a float factor marks an eager host call (see _eager_host): the numba kernel
    launch = kernel._launch if isinstance(grad_scale, float) else _launcher(logits)
    loss = launch(
        logits,
        target,
        grad,
        grad_scale=grad_scale,
        class_weight=class_weight,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap if softcap > 0 else None,
        **extra,
    )
    if per_row:
        output = loss
    elif isinstance(grad_scale, float):  # an eager host call (see _eager_host)
        output = _host_output(loss.numpy(), grad_scale)
    else:
        output = (loss.double().sum() * grad_scale).float()
    return output, *stats


def _host_output(loss: np.ndarray, grad_scale: float) -> Tensor:
    """The scalar output of an eager host call, as the op computes it: the float64 sum of
    the (R,) row losses times the float32 factor, rounded once to float32."""
    total = float(loss.sum(dtype=np.float64)) * float(np.float32(grad_scale))
    return torch.from_numpy(np.array(total, dtype=np.float32))


_NO_WEIGHT = np.empty(0, dtype=np.float32)


def _host_rows(logits, target, class_weight, settings, write_grad: bool):
    """:func:`_fused` for an eager host call without side outputs, on numpy arrays (fp16
    and bf16 as their bit patterns): returns (output, grad) with grad None unless
    ``write_grad``. Each torch op costs a few microseconds of dispatch, a numpy view or
    array a fraction of one, and at 16 x 256 the whole kernel takes about 10
    microseconds."""
    rows = kernel._as_array(logits)
    grad = kernel.gradient_buffer(logits.shape, logits.dtype) if write_grad else None  # R x C
    loss = np.empty(rows.shape[0], dtype=np.float32)
    weight = _NO_WEIGHT if class_weight is None else class_weight.detach().numpy()
    options = (weight, np.float32(settings.label_smoothing), np.float32(settings.z_loss),
               np.float32(settings.softcap))  # fmt: skip
    scale = np.array([settings.grad_scale], dtype=np.float32)
    dest = None if grad is None else kernel._as_array(grad)
    if logits.dtype == torch.float32:
        kernel.run_f32(kernel._kernels(), rows, dest, target.numpy(), scale, options, loss)
    else:
        kernel.run_half(kernel._kernels(), rows, dest, target.numpy(), scale, options, loss,
                        logits.dtype == torch.bfloat16)  # fmt: skip
    if settings.per_row:
        return torch.from_numpy(loss), grad
    return _host_output(loss, settings.grad_scale), grad


def _host_fused(logits, target, class_weight, settings: KernelSettings, write_grad: bool):
    """The op's body on an eager host call: (output, grad, *stats), stats empty without
    ``with_stats``; without side outputs it takes :func:`_host_rows`."""
    if not settings.with_stats:
        return _host_rows(logits, target, class_weight, settings, write_grad)
    return _fused(logits, target, class_weight, *settings, write_grad)


def _fused(logits, target, class_weight, grad_scale, label_smoothing, z_loss, softcap,
           per_row, with_stats, write_grad):  # fmt: skip
    """The body of ``xloss::fused_cross_entropy`` (eager host calls run it directly)."""
    if write_grad and logits.device.type != "cpu":
        grad = torch.empty_like(logits)  # R x C
    elif write_grad:
        grad = kernel.gradient_buffer(logits.shape, logits.dtype)  # R x C, reused
    else:
        grad = logits.new_empty(0)
    output, *stats = _forward(logits, target, class_weight, grad_scale, label_smoothing,
                              z_loss, softcap, per_row, grad if write_grad else None,
                              with_stats)  # fmt: skip
    return output, grad, *stats


@torch.library.custom_op("xloss::fused_cross_entropy", mutates_args=(), device_types=_DEVICES)
def _fused_op(
    logits: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],  # noqa: UP045 (custom_op reads the annotation)
    grad_scale: Tensor,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    per_row: bool,
    with_stats: bool,
    write_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _fused(logits, target, class_weight, grad_scale, label_smoothing, z_loss, softcap,
                  per_row, with_stats, write_grad)  # fmt: skip


@torch.library.custom_op(
    "xloss::fused_cross_entropy_", mutates_args=("logits",), device_types=_DEVICES
)
def _fused_inplace_op(
    logits: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],  # noqa: UP045 (custom_op reads the annotation)
    grad_scale: Tensor,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    per_row: bool,
    with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(logits, target, class_weight, grad_scale, label_smoothing, z_loss,
                    softcap, per_row, logits, with_stats)  # fmt: skip


kernel.dynamo_disable_when_imported(_fused_op, _fused_inplace_op)


def _output_like(logits: Tensor, per_row: bool) -> Tensor:
    shape = (logits.shape[0],) if per_row else ()
    return logits.new_empty(shape, dtype=torch.float32)


@_fused_op.register_fake
def _(logits, target, class_weight, grad_scale, label_smoothing, z_loss, softcap, per_row,
      with_stats, write_grad):  # fmt: skip
    grad = torch.empty_like(logits) if write_grad else logits.new_empty(0)
    return _output_like(logits, per_row), grad, *_stats_outputs(logits, with_stats)


@_fused_inplace_op.register_fake
def _(logits, target, class_weight, grad_scale, label_smoothing, z_loss, softcap, per_row,
      with_stats):  # fmt: skip
    return _output_like(logits, per_row), *_stats_outputs(logits, with_stats)


def _host_kernel(logits: Tensor) -> bool:
    """The numba kernel serves these logits: their values are in host memory, so reading
    one there costs no device synchronisation."""
    return backends.select(logits.device.type, logits.dtype) == "numba"


def _eager_host(logits: Tensor) -> bool:
    """An eager call on the numba kernel with a plain tensor: no ``torch.compile`` tracing,
    no ``torch.func`` transform, no dispatch mode (FakeTensor, a tracer) and no tensor
    subclass, so nothing needs the custom op. Such calls run its body directly, through
    :class:`HostFusedCrossEntropy`, with the mean's factor as a float computed on the
    host (free there). The custom op's dispatch, the ``setup_context`` Function's argument
    binding (``inspect.signature`` at every call) and the torch ops on the 0-dim factor
    cost about 0.3 ms a call, more than the kernel takes on a 1024 x 256 batch."""
    return eager_host(logits) and _host_kernel(logits)


def _kernel_backward(ctx, grad_output: Tensor | None, in_place: bool, saved=None):
    """The backward of the three Functions: the saved gradient scaled by ``grad_output``
    for the logits (tagged under ``create_graph=True``), None for the other inputs.
    ``saved``: (gradient, anchor), by default ``ctx.saved_tensors``."""
    grad, anchor = ctx.saved_tensors if saved is None else saved
    if grad_output is None:  # grads are not materialised
        return None, None, None, None, None
    grad_logits = _scale_grad(ctx, grad, grad_output, in_place=in_place)
    grad_logits = first_order_only(grad_logits, anchor, "xloss.cross_entropy")
    return grad_logits, None, None, None, None


def _scale_grad(ctx, grad: Tensor, grad_output: Tensor, in_place: bool) -> Tensor:
    """grad * grad_output, rounded once to grad's dtype.

    On CPU (numba, eager): no multiply when every factor is exactly 1, which saves a pass
    over R x C (and, out of place, a fresh buffer). On a GPU that test would make the
    host wait for the device at every step, so no value is read there: a Triton kernel
    tests each row's factor on the device, scales the stored gradient in place and skips
    the rows whose factor is 1 (no bytes moved for the usual ``loss.backward()``), and
    the stored gradient is handed over: a second backward through the same graph raises
    (see :func:`xloss.ops.second_order.hand_over`).
    """
    # traced (torch.compile) or transformed (torch.func): torch ops only
    traced = torch.compiler.is_compiling() or is_functorch_wrapped(grad_output)
    if ctx.host and not traced and all_ones(grad_output):
        return grad
    if not ctx.host and not traced:
        hand_over(ctx, "xloss.cross_entropy")
        from xloss.ops.triton.cross_entropy import scale_rows_

        return scale_rows_(grad, grad_output)
    factor = grad_output.unsqueeze(-1) if ctx.per_row else grad_output
    if in_place:
        return grad.mul_(factor)
    return (grad * factor).to(grad.dtype)  # R x C


class FusedCrossEntropy(KernelFunction):
    """``xloss::fused_cross_entropy`` with autograd (``setup_context`` form, so ``torch.func``
    transforms run it).

    forward: run the op, which writes the gradient into a (pooled) buffer while it computes
    the loss. backward: scale the buffer by ``grad_output`` (on CPU skipped when 1). Under
    ``create_graph=True`` the gradient raises when differentiated again
    (``xloss.ops.second_order``).
    """

    @staticmethod
    def forward(logits, target, class_weight, settings, anchor):
        return _fused_op(logits, target, class_weight, *settings, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.per_row = inputs[3].per_row
        ctx.host = _host_kernel(inputs[0])
        ctx.mark_non_differentiable(*output[1:])  # the gradient and the side outputs
        ctx.set_materialize_grads(False)  # else backward gets an R x C zero tensor for `grad`
        ctx.save_for_backward(output[1], inputs[4])  # the gradient, the second-order anchor

    @staticmethod
    def backward(ctx, grad_output, *_grads_of_other_outputs):
        return _kernel_backward(ctx, grad_output, in_place=False)


class HostFusedCrossEntropy(torch.autograd.Function):
    """:class:`FusedCrossEntropy` for eager host calls (:func:`_eager_host`): the op's body
    runs directly, and this ``forward(ctx, ...)`` form skips the argument binding that
    ``setup_context`` Functions pay at every call (``torch.func`` needs that form, so
    transformed calls take :class:`FusedCrossEntropy`). Same backward. Returns the output
    and, with ``with_stats``, the side outputs.

    ``anchor`` (see :func:`_host_anchor`) is kept as an attribute of ``ctx``, not saved:
    it may be the logits themselves, which a caller may change in place after the loss
    (the gradient is already computed) without making the backward raise.
    """

    @staticmethod
    def forward(ctx, logits, target, class_weight, settings, anchor):
        output, grad, *stats = _host_fused(logits, target, class_weight, settings, True)
        if stats:
            ctx.mark_non_differentiable(*stats)
        _keep_for_backward(ctx, grad, settings.per_row, anchor)
        return output, *stats

    @staticmethod
    def backward(ctx, grad_output, *_grads_of_other_outputs):
        grad = ctx.saved_tensors[0]
        if _unit_factor(grad_output):  # the usual loss.backward(): hand the gradient over
            return grad, None, None, None, None
        return _kernel_backward(ctx, grad_output, in_place=False, saved=(grad, ctx.anchor))


def _keep_for_backward(ctx, grad: Tensor, per_row: bool, anchor: Tensor) -> None:
    """What the backward of both host Functions reads. ``anchor`` (see
    :func:`_host_anchor`) is an attribute, not saved: see :class:`HostFusedCrossEntropy`."""
    ctx.per_row = per_row
    ctx.host = True
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    ctx.anchor = anchor


def _unit_factor(grad_output: Tensor | None) -> bool:
    """Every factor of ``grad_output`` is 1 and no graph is being built: the stored
    gradient is the answer as it stands. :func:`_scale_grad`'s test for host calls
    (``first_order_only`` has nothing to do then either), reached in fewer calls: a host
    backward runs right after the model's own forward pass, when each Python call costs
    several microseconds (see :func:`host_cross_entropy`)."""
    return (
        grad_output is not None
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not is_functorch_wrapped(grad_output)
        and all_ones(grad_output)
    )


# Logits of at most this many elements are their own second-order anchor (see _host_anchor).
_SMALL_ANCHOR_ELEMENTS = 2**18


def _host_anchor(logits: Tensor) -> Tensor:
    """The second-order anchor of :class:`HostFusedCrossEntropy`: small logits (at most
    1 MiB in fp32) are their own anchor, kept alive with the graph; larger ones get
    :func:`~xloss.ops.second_order.grad_anchor`, a 0-dim tensor that holds no memory of
    theirs. Its three autograd nodes also run in every backward (with no gradient): about
    25 microseconds a step measured here, more than the kernel takes at 16 x 256."""
    return logits if logits.numel() <= _SMALL_ANCHOR_ELEMENTS else grad_anchor(logits)


def _no_vmap(info, in_dims, *args):
    KernelFunction.vmap(info, in_dims, *args)  # raises


_fused_op.register_vmap(_no_vmap)
_fused_inplace_op.register_vmap(_no_vmap)


class InplaceFusedCrossEntropy(KernelFunction):
    """The in-place op with autograd: the logits' storage becomes their gradient.

    forward: 1. run ``xloss::fused_cross_entropy_`` (bumps the logits' version);
    2. save the logits, which now hold the gradient scaled by ``grad_scale``.
    backward: multiply that gradient in place by ``grad_output`` (on CPU skipped when 1) and
    return it for ``logits``; the other inputs get None. Under ``create_graph=True`` the
    gradient raises when differentiated again (``xloss.ops.second_order``).
    """

    @staticmethod
    def forward(logits, target, class_weight, settings, anchor):
        return _fused_inplace_op(logits, target, class_weight, *settings)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, _, _, settings, anchor = inputs
        ctx.per_row = settings.per_row
        ctx.host = _host_kernel(logits)
        ctx.mark_non_differentiable(*output[1:])  # the side outputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, anchor)

    @staticmethod
    def backward(ctx, grad_output, *_grads_of_stats):
        return _kernel_backward(ctx, grad_output, in_place=True)


class KernelSettings(NamedTuple):
    """The scalar arguments of both ops, in their order."""

    grad_scale: Tensor | float  # 0-dim float32; a float on eager host calls
    label_smoothing: float
    z_loss: float
    softcap: float  # 0 for none
    per_row: bool
    with_stats: bool  # also return the side outputs of return_stats=True


def _scalar_scale(reduction, keep, denominator, normalizer, like: Tensor) -> Tensor:
    """The factor s with reduced = s * sum(loss) for "mean", "sum" and a normalizer.

    A 0-dim float32 tensor, so ``torch.compile`` needs no data-dependent branch.
    """
    one = torch.ones((), dtype=torch.float32, device=like.device)
    if normalizer is not None:
        return safe_divide(one, normalizer)
    if reduction == "sum":
        return one
    if denominator is not None:
        count = (denominator if keep is None else torch.where(keep, denominator, 0)).sum()
    else:
        count = torch.tensor(like.shape[0], device=like.device) if keep is None else keep.sum()
    return safe_divide(one, count.float())


def _host_scale(reduction, keep, denominator, normalizer, like: Tensor) -> float:
    """:func:`_scalar_scale` as a float, on host tensors (reading them costs no sync)."""
    if normalizer is not None:
        count = float(normalizer)
    elif reduction == "sum":
        return 1.0
    elif denominator is not None:
        weights = denominator if keep is None else torch.where(keep, denominator, 0)
        count = float(weights.sum())  # float32, as in _scalar_scale
    else:
        count = like.shape[0] if keep is None else int(keep.numpy().sum())
    return _reciprocal(count)


def _reciprocal(count) -> float:
    """1/count rounded to float32, as :func:`_scalar_scale`'s tensor; 0 for count 0."""
    return 0.0 if count == 0 else float(np.float32(1.0) / np.float32(count))


def fused_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    keep: Tensor | None,
    reduction: str,
    normalizer=None,
    batched: bool = True,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Reduced cross-entropy of ``logits`` (..., C), class axis last, through the kernel.

    Returns the loss and, with ``return_stats`` (for a backend where
    :func:`kernel_fills_stats`), the per-row ((R, 2) float32 (lse, entropy), (R,) int64
    argmax) from the same kernel pass, 0, 0 and -1 at dropped rows; else None.

    ``target`` holds class indices of shape ``logits.shape[:-1]``; ``keep`` marks the
    kept positions (None: all). With ``inplace_backward`` the gradient is written into
    the logits' storage when they are contiguous with the class axis last; any other
    layout (class_dim=1 on (N, C, d) input, a strided slice) is copied first, so only
    the copy is overwritten and the caller's tensor is untouched.
    """
    target_shape = logits.shape[:-1]
    # R x C: a view of the caller's logits when they are contiguous, else a private copy
    rows = logits.reshape(-1, logits.shape[-1]).contiguous()
    # dropped rows -1 (the kernel skips them); kept out-of-range indices make it raise
    index = kernel.kernel_target(
        target.reshape(-1).long(), None if keep is None else keep.reshape(-1)
    )
    denominator = _denominator(class_weight, target, keep)
    per_row = normalizer is None and reduction in ("none", "sample")
    write_grad = torch.is_grad_enabled() and rows.requires_grad
    in_place = write_grad and inplace_backward  # the mutating op (its version bump) runs
    eager = not in_place and _eager_host(rows)
    if per_row:
        scale = 1.0 if eager else torch.ones((), dtype=torch.float32, device=rows.device)
    elif eager:
        scale = _host_scale(reduction, keep, denominator, normalizer, rows)
    else:
        scale = _scalar_scale(reduction, keep, denominator, normalizer, rows)
    settings = KernelSettings(
        scale, label_smoothing, z_loss, 0.0 if softcap is None else softcap, per_row,
        return_stats,
    )  # fmt: skip
    if in_place:
        anchor = grad_anchor(rows)  # made before the op overwrites the rows
        output, *stats = InplaceFusedCrossEntropy.apply(rows, index, class_weight, settings, anchor)
    elif write_grad and eager:
        anchor = _host_anchor(rows)
        output, *stats = HostFusedCrossEntropy.apply(rows, index, class_weight, settings, anchor)
    elif write_grad:
        anchor = grad_anchor(rows)
        output, _, *stats = FusedCrossEntropy.apply(rows, index, class_weight, settings, anchor)
    elif eager:
        output, _, *stats = _host_fused(rows, index, class_weight, settings, False)
    else:
        output, _, *stats = _fused_op(rows, index, class_weight, *settings, False)
    stats = tuple(stats) if return_stats else None
    if not per_row:
        return output, stats
    return reduce_loss(
        output.reshape(target_shape),
        reduction,
        keep=keep,
        denominator=denominator,
        batched=batched,
    ), stats


def _denominator(class_weight, target, keep):
    """w[y] per position for a weighted mean (dropped positions read class 0).

    The index is clamped into [0, C - 1]: with ``validate_args=False`` nothing checked the
    targets yet, and the kernel, which reports an out-of-range target with xloss's own
    error, runs after this gather (the clamped value is never used then)."""
    if class_weight is None:
        return None
    index = target.long() if keep is None else torch.where(keep, target.long(), 0)
    return class_weight[index.clamp(0, class_weight.shape[0] - 1)]


def host_call_applies(input, target, weight, class_dim) -> bool:
    """:func:`host_cross_entropy` serves the call: plain contiguous (N, C) float32, float16
    or bfloat16 CPU logits with the class axis last (``class_dim`` 1 or -1), (N,) int64
    CPU targets,
    ``weight`` None or a plain contiguous (C,) float32 CPU tensor that no gradient is
    asked for, in eager mode (no tracing, transform or dispatch mode: see
    :func:`~xloss._core.validation.eager_host`) on the numba kernel. Only attribute
    reads: a call that fails any test takes the general path, which validates it."""
    return (
        type(input) is Tensor
        and type(target) is Tensor
        and input.dtype in kernel.KERNEL_DTYPES
        and target.dtype == torch.int64
        and input.is_cpu
        and target.is_cpu
        and input.dim() == 2
        and target.dim() == 1
        and type(class_dim) is int
        and class_dim in (1, -1)
        and target.shape[0] == input.shape[0]
        and input.shape[1] > 0
        and input.is_contiguous()
        and (weight is None or plain_float32_vector(weight, input.shape[1]))
        and eager_mode()
        and not is_functorch_wrapped(input)  # a leaked wrapper of a finished transform
        and backends.select("cpu", input.dtype) == "numba"
    )


def host_call(ignore_index, reduction, normalizer, label_smoothing, z_loss, softcap,
              validate_args) -> HostCall | None:  # fmt: skip
    """The :class:`HostCall` of checked ``xloss.cross_entropy`` settings, or None where
    :func:`host_cross_entropy` does not serve them (a tensor ``normalizer``)."""
    if isinstance(normalizer, Tensor):
        return None
    return HostCall(
        -1 if ignore_index is None else ignore_index,
        ignore_index is not None,
        np.float32(1.0 if normalizer is None else _reciprocal(float(normalizer))),
        normalizer is None and reduction == "mean",
        normalizer is None and reduction == "none",
        (np.float32(label_smoothing), np.float32(z_loss), np.float32(softcap or 0.0)),
        validate_args,
    )


def host_cross_entropy(logits: Tensor, target: Tensor, class_weight: Tensor | None,
                       call: HostCall) -> Tensor:  # fmt: skip
    """``xloss.cross_entropy`` on a call :func:`host_call_applies` to, with the settings
    of ``call`` (reduction "none", "mean" or "sum", a numeric ``normalizer`` or None).

    One numba call (``host_rows_f32`` / ``host_rows_half`` in ``xloss.ops._numba_rows``)
    checks the targets, counts the kept rows (or sums their class weights), runs the rows
    and reduces them, on numpy views: each torch or numpy operation around the kernel is
    a fixed cost that a small call feels, and right after a model's forward, when their
    code has left the caches, each costs tens of microseconds.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        anchor = _host_anchor(logits)
        return _apply_host_call(logits, target, class_weight, call, anchor)
    return _host_call(logits, target, class_weight, call, False)[0]


class HostCall(NamedTuple):
    """The settings of a :func:`host_cross_entropy` call, as its kernel takes them."""

    ignore_index: int  # -1 without one
    has_ignore: bool
    fixed_scale: np.float32  # the factor of "sum" or a normalizer (not of a mean)
    mean: bool  # divide by the kept rows' count (or class weights' sum)
    per_row: bool  # reduction "none": the (N,) row losses
    options: tuple  # (label smoothing, z-loss, softcap or 0) as float32
    validate_args: bool


_NO_ROWS = {torch.float32: np.empty((0, 0), np.float32)}  # the gradient not written
_NO_ROWS[torch.float16] = _NO_ROWS[torch.bfloat16] = np.empty((0, 0), np.uint16)


def _host_call(logits, target, class_weight, call: HostCall, write_grad: bool):
    """(output, grad) of a host call, grad None unless ``write_grad``. Raises when a kept
    target is out of range (before any row is computed)."""
    rows = kernel._as_array(logits)
    grad = None
    if write_grad and rows.size <= kernel.SERIAL_ELEMENTS:
        # torch's allocator hands out a block of this size that was freed recently, still
        # in cache, where the pooled buffer was last touched a whole training step ago
        grad = torch.empty_like(logits)  # R x C
    elif write_grad:
        grad = kernel.gradient_buffer(logits.shape, logits.dtype)  # R x C, reused
    loss = np.empty(rows.shape[0], dtype=np.float32)
    out = np.empty((), dtype=np.float32)
    index = target.numpy()
    arguments = (
        rows, _NO_ROWS[logits.dtype] if grad is None else kernel._as_array(grad), index,
        call.ignore_index, call.has_ignore,
        _NO_WEIGHT if class_weight is None else class_weight.detach().numpy(),
        *call.options, call.fixed_scale, call.mean,
    )  # fmt: skip
    kernels = kernel._kernels()
    if logits.dtype == torch.float32:
        serial_kernel, parallel_kernel = kernels.host_rows_f32, kernels.host_rows_f32_parallel
    else:
        serial_kernel, parallel_kernel = kernels.host_rows_half, kernels.host_rows_half_parallel
        arguments += (logits.dtype == torch.bfloat16,)  # is_bf16
    if kernel.host_serial(rows.size, logits.dtype):
        bad_row = serial_kernel(*arguments, write_grad, loss, out)
    else:
        with kernel.parallel_region():
            bad_row = parallel_kernel(*arguments, write_grad, loss, out)
    if bad_row >= 0:
        _raise_bad_target(bad_row, int(index[bad_row]), rows.shape[1], call)
    return torch.from_numpy(loss if call.per_row else out), grad


def _raise_bad_target(row: int, value: int, num_classes: int, call: HostCall) -> None:
    """The error of the general path for a kept target outside [0, C): the range check's
    with ``validate_args``, else the kernel's."""
    if call.validate_args:
        ignore_index = call.ignore_index if call.has_ignore else None
        raise ValueError(f"{index_range_message(num_classes, ignore_index)}, found {value}")
    kernel.raise_out_of_range(row, value, num_classes)


class HostCallCrossEntropy(HostFusedCrossEntropy):
    """:class:`HostFusedCrossEntropy` for :func:`host_cross_entropy`: the forward is one
    kernel call (:func:`_host_call`); the same backward."""

    @staticmethod
    def forward(ctx, logits, target, class_weight, call, anchor):
        output, grad = _host_call(logits, target, class_weight, call, True)
        _keep_for_backward(ctx, grad, call.per_row, anchor)
        return output


# ``HostCallCrossEntropy.apply`` without ``autograd.Function.apply``'s Python layer, which
# binds default arguments for ``setup_context`` Functions (this one has none), unwraps
# the dead wrappers of finished ``torch.func`` transforms (host_call_applies turns
# those away) and sends calls under a transform to functorch (host calls run in eager
# mode only): about eight Python calls a step, each tens of microseconds right after a
# model's forward.
_apply_host_call = super(torch.autograd.Function, HostCallCrossEntropy).apply
