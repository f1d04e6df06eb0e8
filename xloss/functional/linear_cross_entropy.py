"""Linear layer + cross-entropy in one call, without materialising the N x V logits."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from xloss import backends
from xloss._core.masking import build_mask
from xloss._core.reduction import reduce_loss, safe_divide
from xloss._core.validation import (
    autocast_off,
    check_class_weight,
    check_floating_input,
    check_index_target_range,
    check_tensor,
    eager_mode,
    shape_str,
)
from xloss.functional.cross_entropy import (
    CrossEntropyStats,
    check_cross_entropy_settings,
    check_return_stats,
    cross_entropy,
    loss_dtype,
    stats_buffers,
    stats_result,
)
from xloss.ops.kernel import kernel_target


def _every_row_kept(keep: Tensor, dtype: torch.dtype) -> bool | None:
    """Whether ``keep`` keeps every row; None where that is data-dependent (traced by
    torch.compile, batched by torch.func.vmap) or would synchronise with a GPU (the
    Triton backend: its row kernel skips the dropped rows itself)."""
    if torch.compiler.is_compiling() or backends.select(keep.device.type, dtype) == "triton":
        return None
    try:
        return bool(keep.all())
    except RuntimeError:  # vmap: "attempting to use a Tensor in data-dependent control flow"
        return None


def check_chunk_size(chunk_size) -> None:
    """``chunk_size`` is None or a positive int (rows per chunk)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(
            f"`chunk_size` must be a positive int or None, got {type(chunk_size).__name__}"
        )
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1 or None, got {chunk_size}")


def check_accum_dtype(accum_dtype) -> None:
    """``accum_dtype`` is None or a floating torch.dtype."""
    if accum_dtype is not None and (
        not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point
    ):
        raise TypeError(
            "`accum_dtype` must be None or a floating torch.dtype such as torch.float32, "
            f"got {accum_dtype!r}"
        )


def _check_linear_tensors(input: Tensor, weight: Tensor, target: Tensor, bias) -> None:
    check_floating_input(input)
    check_tensor("weight", weight)
    check_tensor("target", target)
    if bias is not None:
        check_tensor("bias", bias)
    if input.dim() < 1:
        raise ValueError(
            "`input` must have shape (..., H), hidden states with a last (hidden) axis, "
            f"got {shape_str(input.shape)}"
        )
    hidden = input.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(
            f"`weight` must have shape (V, {hidden}) for `input` of shape "
            f"{shape_str(input.shape)}, got {shape_str(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("`weight` has no classes: shape (0, H)")
    tensors = [("weight", weight)] + ([] if bias is None else [("bias", bias)])
    for name, tensor in tensors:
        if tensor.dtype != input.dtype:
            raise TypeError(
                f"`{name}` must have the input's dtype {input.dtype}, got {tensor.dtype}"
            )
        if tensor.device != input.device:
            raise ValueError(
                f"`{name}` must be on the input's device {input.device}, got {tensor.device}"
            )
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"`bias` must have shape ({weight.shape[0]},), one value per class, "
                f"got {shape_str(bias.shape)}"
            )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"`target` must hold integer class indices, got dtype {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"`target` must have shape {shape_str(input.shape[:-1])} for `input` of shape "
            f"{shape_str(input.shape)}, got {shape_str(target.shape)}"
        )


# At most this many logits (1 MiB in fp32), an eager fp32 CPU call with the default
# chunking and accumulation forms its logits (``F.linear``) and takes
# ``xloss.cross_entropy``, whose gradient backpropagates through torch's own GEMMs; up to
# twice as many when the GEMMs are cheap (N x V x H at most ``SMALL_HOST_WORK``). The
# logits then fit in one chunk anyway (which the chunked path holds during the call
# too), and the chunked path's fixed costs (the gather of kept rows and its scatter back,
# the autograd Function, the gradient anchor: about 1 ms here) outweigh the GEMM rows it
# saves. Forward + backward, chunked over formed logits, with the N x H x V of
# ``(N, H) @ (V, H).T``: 256 x 256 x 256 2.02x, 1024 x 256 x 256 1.38x (3 alternated
# rounds, before the in-place fix of the short-row kernel that the chunks use); after it,
# medians of 3 runs of 5 alternated rounds: 2**18 logits 1024 x 2048 x 256 1.03-1.04x,
# 256 x 4096 x 1024 0.99-1.00x; 2**19 logits with cheap GEMMs 5400 x 64 x 97 1.25-1.51x,
# 4096 x 128 x 128 1.19-1.21x, 2048 x 256 x 256 1.06-1.09x, 512 x 256 x 1024
# 0.91-1.06x, with costly ones 1024 x 1024 x 512 0.96-1.01x, 512 x 2048 x 1024 0.94x;
# 2**20 logits 4096 x 256 x 256 0.99x, 1024 x 256 x 1024 0.96x. The formed logits'
# gradient is held until backward, so the bound stays at 1-2 MiB, where no memory saving
# is worth a slower call. In a V = 256 training step (1024 x 256 logits) the chunked path
# made the output layer with the loss 0.85x as fast as torch's; the demo's loss step
# (3072 x 64 x 97) took 1.40-1.52x as long chunked.
SMALL_HOST_LOGITS = 2**18
SMALL_HOST_WORK = 2**28


def _small_host_call(input, weight, bias, chunk_size, accum_dtype) -> bool:
    """The call forms its logits (see ``SMALL_HOST_LOGITS``): eager mode, fp32 CPU
    tensors, no ``chunk_size`` or ``accum_dtype`` other than float32, at most
    ``SMALL_HOST_LOGITS`` logits, or twice that with cheap GEMMs."""
    if not (
        chunk_size is None
        and accum_dtype in (None, torch.float32)
        and input.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and input.device.type == "cpu"
        and weight.device.type == "cpu"
    ):
        return False
    logits = math.prod(input.shape[:-1]) * weight.shape[0]
    cheap = logits <= 2 * SMALL_HOST_LOGITS and logits * weight.shape[1] <= SMALL_HOST_WORK
    return (logits <= SMALL_HOST_LOGITS or cheap) and eager_mode()


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int | None = None,
    validate_args: bool = True,
    accum_dtype: torch.dtype | None = None,
    return_stats: bool = False,
) -> Tensor | CrossEntropyStats:
    r"""Cross-entropy of the logits ``input @ weight.T + bias``, computed in row chunks.

    The result equals ``xloss.cross_entropy(input @ weight.T + bias, target,
    class_dim=-1, ...)`` with the same options, but the N x V logits are never held
    in memory: rows are processed ``chunk_size`` at a time, each chunk of logits is
    turned into its gradient in place, and three GEMMs per chunk give the gradients of
    ``input``, ``weight`` and ``bias`` (``weight`` and ``bias`` accumulated in fp32).
    With x the logits of a row, lse its log-sum-exp, w the class weights, eps the label
    smoothing and z the z-loss coefficient, the loss of a row with target y is

    .. math::
        \ell = (1-\epsilon)\, w_y (\mathrm{lse} - x_y)
             + \frac{\epsilon}{C} \sum_c w_c (\mathrm{lse} - x_c) + z\, \mathrm{lse}^2

    (x replaced by ``softcap * tanh(x / softcap)`` first when ``softcap`` is set).
    Rows whose target is ``ignore_index``, where ``mask`` is False or past
    ``lengths`` are dropped before any GEMM on CPU; they give loss 0 and zero gradient.
    On the Triton backend they stay in the GEMMs and the row kernel skips them: finding
    them first would make the host wait for the GPU (a data-dependent row count).

    Reductions as :func:`xloss.cross_entropy`: ``"mean"`` divides by the summed
    ``w[y]`` of the kept rows, ``"sum"``, ``normalizer`` (sum / normalizer),
    ``"none"`` (the target's shape) and ``"sample"`` ((B,) means for (B, T, ..., H) input).
    For ``"mean"``, ``"sum"`` and ``normalizer`` the gradients are computed during the
    forward pass (their scale is known) and backward only multiplies them by
    ``grad_output``; the forward pass then costs about as much as forward + backward.
    For ``"none"`` and ``"sample"`` the forward pass computes only the loss and backward
    recomputes each chunk's logits with ``grad_output`` folded in, so per-token weights
    applied to the returned loss get exact gradients.

    Memory of the chunked calls (more than 2**19 logits, or more than 2**18 when
    N x V x H exceeds 2**28; smaller fp32 CPU calls with the default ``chunk_size`` and
    ``accum_dtype`` form their logits and take :func:`xloss.cross_entropy`, which is
    faster there and holds their 2 MiB or less of gradient until backward): one chunk of
    logits (``chunk_size x V`` in the compute dtype; by default at most 2048 rows and the
    size of the weight gradient, at least 48 MiB), the gradients, when some rows are
    dropped a copy of the kept rows of ``input``, and for fp16 a fp32 copy of
    ``weight``. fp16 inputs are computed in fp32 (GEMMs included) and the loss is
    returned in the input's dtype. On CPU the numba row kernel is used when available;
    with it, bf16 GEMMs and chunks stay in bf16 (bf16 GEMMs ran 2.5x faster than fp32
    ones on avx512_bf16 here), the kernel computes each row in fp32 and ``grad_weight``
    accumulates in fp32. On GPUs with Triton (``xloss.backends``) the GEMMs and the
    chunk of logits stay in the input dtype (bf16 tensor-core GEMMs, no fp32 copies),
    the Triton row kernel computes in fp32, and with ``validate_args=False`` nothing
    synchronises with the host. Under ``torch.compile`` the call is a graph break and
    runs eagerly. ``torch.autocast`` does not lower the GEMMs (cast ``input`` and
    ``weight`` for bf16 GEMMs); it returns the loss in float32 for fp16/bf16 inputs, as
    ``F.cross_entropy``. Call backward outside the autocast block, as PyTorch
    recommends: inside it, autocast lowers the GEMMs of torch's own backward on the
    calls that form their logits.

    Args:
        input: hidden states, floating point, (..., H): any number of leading axes.
        weight: the linear layer's weight (V, H), the input's dtype and device.
        target: class indices, the input's shape without H (any leading axes).
        bias: the linear layer's bias (V,), or None.
        class_weight: class weights w of shape (V,).
        ignore_index: class index whose rows are dropped; None drops nothing.
        reduction: ``"none"``, ``"mean"``, ``"sum"`` or ``"sample"``.
        label_smoothing: eps in [0, 1].
        z_loss: coefficient of lse^2, >= 0.
        softcap: cap of the logit soft-capping, > 0, or None.
        mask: bool, the target's shape; False drops a row.
        lengths: (B,) valid lengths along axis 1 (T) for (B, T, ..., H) input: integers,
            or floats in (0, 1] as relative lengths.
        normalizer: divide the summed loss by this number or one-element tensor.
        chunk_size: rows per chunk; None: from a memory budget (see Memory above).
        validate_args: check target ranges and lengths (these synchronise with the
            device).
        accum_dtype: dtype of the ``weight`` and ``bias`` gradients while they are summed
            over the chunks; None: float32 (float64 for float64 input). ``torch.bfloat16``
            halves that memory at the cost of precision, like Liger-Kernel's option.
        return_stats: return a :class:`xloss.functional.cross_entropy.CrossEntropyStats`
            ``(loss, lse, entropy, predicted, accuracy)``: per position the log-sum-exp and
            entropy of the softmax and the argmax class, computed by the row kernel in the
            same pass over each chunk of logits as the loss (the logits are never kept),
            and the accuracy over kept positions. No gradient flows through them; dropped
            positions hold 0, 0 and -1.

    Shape:
        - input: (..., H), H the hidden size, any leading axes: (H), (N, H), (B, T, H),
          (B, T, K, H), ...
        - weight: (V, H), V the number of classes; bias and class_weight: (V).
        - target: (...), the input's leading axes.
        - output: a scalar; the target's shape for ``"none"``; (B) for ``"sample"``
          (the mean over all positions of each index of axis 0).

    Example:
        >>> import torch, xloss
        >>> hidden = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
        >>> weight = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, -1.0]])
        >>> target = torch.tensor([0, 2, -100])
        >>> xloss.linear_cross_entropy(hidden, weight, target, label_smoothing=0.1)
        tensor(0.4653)
        >>> xloss.linear_cross_entropy(hidden, weight, target, reduction="none")
        tensor([0.4076, 0.3064, 0.0000])
        >>> out = xloss.linear_cross_entropy(hidden, weight, target, return_stats=True)
        >>> out.predicted, out.accuracy
        (tensor([ 0,  2, -1]), tensor(1.))
    """
    label_smoothing, z_loss, softcap = check_cross_entropy_settings(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        normalizer=normalizer,
        validate_args=validate_args,
    )
    check_chunk_size(chunk_size)
    check_accum_dtype(accum_dtype)
    check_return_stats(return_stats)
    _check_linear_tensors(input, weight, target, bias)
    num_classes = weight.shape[0]
    check_class_weight(class_weight, num_classes, name="class_weight")
    if reduction == "sample" and input.dim() < 3:
        raise ValueError(
            "reduction='sample' needs (B, T, ..., H) input, got `input` of shape "
            f"{shape_str(input.shape)}"
        )
    if backends.forward_mode_ad() or _small_host_call(input, weight, bias, chunk_size, accum_dtype):
        # The chunked Function computes no tangent (jvp, jacfwd, hessian, a dual level):
        # the logits are formed and cross_entropy (torch ops under forward-mode AD) gives
        # the same loss with its tangent; chunk_size and accum_dtype do not apply. A small
        # eager fp32 CPU call takes the same route, faster (see SMALL_HOST_LOGITS). Its
        # GEMM runs in the inputs' dtype under autocast too, as the chunked Function's.
        with autocast_off(input.device.type):
            logits = torch.nn.functional.linear(input, weight, bias)
        return cross_entropy(
            logits, target, class_weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, class_dim=-1, mask=mask, lengths=lengths,
            z_loss=z_loss, softcap=softcap, normalizer=normalizer,
            validate_args=validate_args, return_stats=return_stats,
        )  # fmt: skip

    device = input.device
    target_shape = target.shape
    target = target.to(device)
    keep = build_mask(
        target_shape,
        device,
        index_target=target,
        ignore_index=ignore_index,
        mask=mask,
        lengths=lengths,
        validate_args=validate_args,
    )
    if validate_args:
        check_index_target_range(target, num_classes, ignore_index, keep)

    dtype = torch.promote_types(input.dtype, torch.float32)
    if class_weight is not None:
        class_weight = class_weight.to(device=device, dtype=dtype)
    hidden = input.reshape(-1, input.shape[-1])  # N x H
    # Kept negative indices become out of range, so the row kernels raise on them instead
    # of dropping their rows (a negative target drops a row in the kernels' contract).
    index = kernel_target(target.reshape(-1).long(), None)  # N
    kept_rows = None
    if keep is not None:
        every_row_kept = _every_row_kept(keep, input.dtype)
        if every_row_kept is None:  # no data-dependent gather: dropped rows marked -1
            index = torch.where(keep.reshape(-1), index, -1)
        elif not every_row_kept:
            # The gather copies K x H (and its backward scatters into N x H): skipped when
            # every row is kept, which the default ignore_index alone cannot tell.
            kept_rows = keep.reshape(-1).nonzero().squeeze(1)  # K
            hidden = hidden.index_select(0, kept_rows)  # K x H, gathered once
            index = index.index_select(0, kept_rows)  # K

    per_row = reduction in ("none", "sample") and normalizer is None
    if per_row:
        scale = 1.0
    elif normalizer is not None:
        scale = safe_divide(torch.ones((), dtype=dtype, device=device), normalizer)
    elif reduction == "mean":
        scored = index >= 0  # the rows not dropped (all of them after a gather)
        count = (
            scored.sum()
            if class_weight is None
            else torch.where(scored, class_weight[index.clamp(0, num_classes - 1)], 0).sum()
        )
        scale = safe_divide(torch.ones((), dtype=dtype, device=device), count)
    else:
        scale = 1.0
    # Imported here: xloss.ops.linear marks its entry point with torch.compiler.disable,
    # which imports torch._dynamo (about 1.5 s), a cost `import xloss` should not pay.
    from xloss.ops.linear import LinearCrossEntropyConfig, linear_cross_entropy_rows

    config = LinearCrossEntropyConfig(
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
        per_row=per_row,
        grad_enabled=torch.is_grad_enabled(),
        accum_dtype=accum_dtype,
        stats=stats_buffers(index.numel(), dtype, device) if return_stats else None,
    )
    result = linear_cross_entropy_rows(hidden, weight, bias, index, class_weight, scale, config)
    if per_row:
        loss = result
        if kept_rows is not None:
            loss = torch.zeros(target.numel(), dtype=dtype, device=device).index_copy(
                0, kept_rows, loss
            )
        loss = loss.reshape(target_shape)
        denominator = None
        if class_weight is not None:
            denominator = class_weight[target.long().clamp(0, num_classes - 1)]
        result = reduce_loss(loss, reduction, keep=keep, denominator=denominator)
    result = result.to(loss_dtype(input))
    if not return_stats:
        return result
    values, predicted = config.stats  # K x 2, K: the kept rows
    if kept_rows is not None:
        num_rows = target.numel()
        values = values.new_zeros(num_rows, 2).index_copy(0, kept_rows, values)
        predicted = predicted.new_full((num_rows,), -1).index_copy(0, kept_rows, predicted)
    return stats_result(result, values, predicted, target, keep, target_shape)
