"""Cross-entropy over a vocabulary sharded across the ranks of a tensor-parallel group.

Each rank holds a contiguous slice of the vocabulary (slices may differ in size). The
loss and the gradient equal those of single-process cross-entropy on the full logits;
the forward costs two all-reduces per block of rows and the backward of
``vocab_parallel_cross_entropy`` none.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from xloss import backends
from xloss._core.layout import class_layout
from xloss._core.masking import build_mask
from xloss._core.reduction import reduce_loss, safe_divide
from xloss._core.validation import (
    autocast_off,
    check_floating_input,
    check_index_target_range,
    check_tensor,
    shape_str,
)
from xloss.distributed._comm import resolve_group
from xloss.distributed._rows import RowStats, global_row_stats, local_gradient_
from xloss.functional.cross_entropy import (
    CrossEntropyStats,
    check_cross_entropy_settings,
    check_return_stats,
    compute_dtype,
    loss_dtype,
    masked_stats,
    stats_result,
)
from xloss.ops.second_order import KernelFunction, first_order_only, grad_anchor

_WHAT = "xloss.distributed's vocab-parallel cross-entropy"


class VocabParallelSettings(NamedTuple):
    vocab_start: int | None
    label_smoothing: float
    z_loss: float
    group: object
    validate_args: bool = True  # a given vocab_start: check that the slices tile [0, C)
    with_stats: bool = False  # also the entropy and the argmax (return_stats=True)


def check_vocab_start(vocab_start) -> None:
    if vocab_start is None:
        return
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
        raise TypeError(f"`vocab_start` must be an int or None, got {type(vocab_start).__name__}")
    if vocab_start < 0:
        raise ValueError(f"`vocab_start` must be >= 0, got {vocab_start}")


def check_index_target(target) -> None:
    check_tensor("target", target)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            "vocab-parallel cross-entropy needs integer class indices as `target` "
            f"(probability targets are not supported), got dtype {target.dtype}"
        )


def _dropped_as_negative(target: Tensor, keep: Tensor | None) -> Tensor:
    """int64 global class indices, -1 at dropped positions (no rank holds class -1)."""
    index = target.long()
    return index if keep is None else torch.where(keep, index, -1)


def _side_outputs(stats: RowStats, settings: VocabParallelSettings) -> tuple[Tensor, Tensor]:
    """(entropy, predicted) of ``stats``; empty tensors without ``with_stats``."""
    if settings.with_stats:
        return stats.entropy, stats.predicted
    return stats.loss.new_empty(0), stats.local_target.new_empty(0)


def _stats_or_loss(loss: Tensor, rows: tuple[Tensor, ...] | None, target, keep, shape):
    """The loss, or with per-row (lse, entropy, predicted) the :class:`CrossEntropyStats`
    (0, 0 and -1 where ``keep`` drops the position)."""
    if rows is None:
        return loss
    lse, entropy, predicted = rows
    values, predicted = masked_stats(torch.stack((lse, entropy), -1), predicted, keep)
    return stats_result(loss, values, predicted, target, keep, shape)


class _VocabParallelCrossEntropy(KernelFunction):
    """Per-row loss of local logits (R, V_local); see ``vocab_parallel_cross_entropy``.

    Forward: steps 1-3 (two all-reduces; a third with ``with_stats``). Saves the local
    logits as given (no copy for fp32), lse, C and where the target lies in this slice.
    Also returns (non-differentiable) C, lse, the target's place, and the entropy and
    argmax (empty without ``with_stats``). Backward: step 4, the local
    gradient grad_loss * [(1 + 2 z lse) softmax - (1-eps) onehot - eps/C] with the softmax
    recomputed as exp(x - lse); no communication.
    """

    @staticmethod
    def forward(logits: Tensor, target: Tensor, settings: VocabParallelSettings):
        dtype = compute_dtype(logits.dtype)
        on_triton = backends.select(logits.device.type, logits.dtype) == "triton"
        stats = global_row_stats(
            logits if on_triton else logits.to(dtype),  # Triton reads fp16/bf16 natively
            target,
            vocab_start=settings.vocab_start,
            label_smoothing=settings.label_smoothing,
            z_loss=settings.z_loss,
            group=settings.group,
            check_slices=settings.validate_args,
            with_stats=settings.with_stats,
        )
        return (
            stats.loss, stats.num_classes, stats.row_logsumexp, stats.local_target,
            stats.in_slice, *_side_outputs(stats, settings),
        )  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        loss, num_classes, row_logsumexp, local_target, in_slice, *_ = output
        ctx.settings = inputs[2]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], row_logsumexp, num_classes, local_target, in_slice)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_grads_of_stats):
        logits, row_logsumexp, num_classes, local_target, in_slice = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None
        settings = ctx.settings
        stats = RowStats(row_logsumexp, None, None, num_classes, local_target, in_slice)
        with torch.no_grad():  # first order only (tagged below): record nothing
            grad_loss = grad_loss.to(row_logsumexp.dtype)
            # 4. Local gradient: softmax recomputed from the local logits and the global lse.
            if backends.select(logits.device.type, logits.dtype) == "triton":
                from xloss.ops.triton.vocab_parallel import local_gradient

                grad = local_gradient(logits, row_logsumexp, grad_loss, local_target, in_slice,
                                      num_classes, label_smoothing=settings.label_smoothing,
                                      z_loss=settings.z_loss)  # fmt: skip
            else:
                probs = (logits.to(row_logsumexp.dtype) - row_logsumexp.unsqueeze(-1)).exp_()
                row_factor = grad_loss * (1.0 + 2.0 * settings.z_loss * row_logsumexp)
                grad = local_gradient_(
                    probs, row_factor, grad_loss, stats, label_smoothing=settings.label_smoothing
                )
        # lse is a constant here (its derivative needs the other ranks): first order only;
        # the saved logits (with their graph) anchor the error node.
        grad = first_order_only(grad.to(logits.dtype), logits, _WHAT)
        return grad, None, None


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    validate_args: bool = True,
    return_stats: bool = False,
) -> Tensor | CrossEntropyStats:
    r"""Cross-entropy of logits whose vocabulary is split across the ranks of ``group``.

    Rank r holds the contiguous slice ``[start_r, start_r + V_r)`` of the C classes
    (``C = sum_r V_r``; the V_r may differ, each >= 1). With lse the log-sum-exp of the
    whole row of logits x, eps the label smoothing and z the z-loss coefficient, a
    position with target y has the loss of :func:`xloss.cross_entropy`

    .. math::
        \ell = (1-\epsilon)(\mathrm{lse} - x_y)
             + \frac{\epsilon}{C} \sum_{c=1}^{C} (\mathrm{lse} - x_c) + z\, \mathrm{lse}^2

    with C the GLOBAL vocabulary size (Megatron-LM divides the smoothing term by the
    local size, a known bug). Every rank returns the same loss; the gradient of each rank
    is the slice of the full gradient for its local logits.

    Algorithm (the code repeats these steps as comments):

    1. All-reduce (MAX) the row max m of the local logits, packed with a one-hot of this
       rank's slice size, which gives C and, when ``vocab_start`` is None, this rank's
       start (the sum of the sizes of the lower ranks).
    2. All-reduce (SUM) ONE tensor packing the local sum of exp(x - m), the target logit
       (only the rank whose slice holds the target contributes it) and, with smoothing,
       the sum of the logits.
    3. lse = m + log S and the loss above, on every rank.
       With ``return_stats``: the entropy H = log S - sum_c e^(x_c - m) (x_c - m) / S
       (its numerator rides in step 2's SUM) and the argmax: each rank offers the global
       index of its first local max where that equals m, and ONE all-reduce (MIN) keeps
       the smallest, the first index on ties as ``torch.argmax``.
    4. Backward: grad = g [(1 + 2 z lse) softmax(x) - (1-eps) onehot_y - eps/C] on the
       local slice, the softmax recomputed as exp(x - lse) from the saved local logits;
       no communication.

    So a call costs 2 collectives (3 with ``return_stats``), each moving O(rows) numbers,
    never the logits. Nothing
    synchronises with the host (no ``.item()``) unless ``validate_args`` is true: the
    target range check, the slice-tiling check of a given ``vocab_start`` and a tensor
    ``normalizer`` check read values on the host.

    Reductions: ``"none"``, ``"sum"``, ``"mean"`` (over positions kept by ``ignore_index``
    and ``mask``) and ``"sample"`` (the mean of each sample's kept positions), or the sum
    divided by ``normalizer`` (e.g. :func:`global_token_count`), as in
    :func:`xloss.cross_entropy`. A batch with no kept position gives 0. Class weights and
    probability targets are not supported.

    ``target``, ``mask`` and the options must be identical on every rank of the group (they
    are not communicated); the data checks run after the collectives, so every rank raises
    the same error instead of leaving the others waiting.

    Args:
        local_logits: this rank's slice of the logits, vocabulary axis last; floating
            point. fp16 and bf16 are computed in fp32 and the loss is returned in the
            input's dtype.
        target: global class indices in [0, C), the logits' shape without the last axis.
        group: the tensor-parallel process group; None for the default group.
        vocab_start: this rank's first class. None: slices follow rank order and the
            start is taken from the sizes exchanged in step 1 (no extra collective).
            Given starts ride on the same collective; with ``validate_args`` every rank
            checks that the slices tile [0, C) and raises ValueError otherwise.
        label_smoothing: eps in [0, 1].
        ignore_index: class index whose positions are dropped; None drops nothing.
        reduction: ``"none"``, ``"mean"``, ``"sum"`` or ``"sample"``.
        z_loss: coefficient of lse^2, >= 0.
        mask: bool, the target's shape; False drops a position.
        normalizer: divide the summed loss by this number or one-element tensor.
        validate_args: check the target range and that given ``vocab_start`` slices tile
            [0, C) (after the collectives; synchronises).
        return_stats: return a :class:`xloss.CrossEntropyStats` ``(loss, lse, entropy,
            predicted, accuracy)`` as :func:`xloss.cross_entropy` does, computed from the
            local slices (no gather of the logits): lse and entropy of the whole row, the
            global argmax, and the accuracy over kept positions; 0, 0 and -1 at dropped
            positions. The same on every rank. No gradient flows through them.

    Shape:
        - local_logits: (V_r), (N, V_r) or (N, d_1, ..., d_K, V_r), e.g. (B, T, V_r).
        - target: (), (N) or (N, d_1, ..., d_K).
        - output: a scalar; the target's shape for ``"none"``; (N) for ``"sample"``.
        - lse, entropy, predicted (``return_stats``): the target's shape; accuracy: a
          scalar.

    Here V_r is the size of this rank's slice of the vocabulary.

    Example (a 1-process group, so the slice is the whole vocabulary):
        >>> import torch, torch.distributed as dist, xloss
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
        >>> target = torch.tensor([0, 2])
        >>> xloss.distributed.vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1)
        tensor(0.3455)
        >>> xloss.cross_entropy(logits, target, label_smoothing=0.1)
        tensor(0.3455)
        >>> out = xloss.distributed.vocab_parallel_cross_entropy(logits, target,
        ...                                                      return_stats=True)
        >>> out.predicted, out.accuracy, out.lse
        (tensor([0, 2]), tensor(1.), tensor([2.2413, 3.1096]))
        >>> dist.destroy_process_group()
    """
    # Settings and shapes are checked before any communication.
    label_smoothing, z_loss, _ = check_cross_entropy_settings(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=None,
        normalizer=normalizer,
        validate_args=validate_args,
    )
    check_vocab_start(vocab_start)
    check_return_stats(return_stats)
    check_floating_input(local_logits)
    check_index_target(target)
    layout = class_layout(local_logits, target, -1)
    device = local_logits.device
    target = target.to(device)
    keep = build_mask(
        layout.target_shape, device, index_target=target, ignore_index=ignore_index, mask=mask
    )
    group = resolve_group(group)
    index = _dropped_as_negative(target, keep).reshape(-1)
    rows = layout.logits.reshape(-1, layout.num_classes)  # R x V_local
    settings = VocabParallelSettings(
        vocab_start, label_smoothing, z_loss, group, validate_args, return_stats
    )
    row_loss, num_classes, row_logsumexp, _, _, *side = _VocabParallelCrossEntropy.apply(
        rows, index, settings
    )
    if validate_args:
        check_index_target_range(target, int(num_classes), ignore_index, keep)

    loss = row_loss.reshape(layout.target_shape)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
    reduced = reduce_loss(loss, reduction, keep=keep, normalizer=normalizer, batched=layout.batched)
    side_rows = (row_logsumexp, *side) if return_stats else None
    return _stats_or_loss(
        reduced.to(loss_dtype(local_logits)), side_rows, target, keep, layout.target_shape
    )


class LinearSettings(NamedTuple):
    vocab: VocabParallelSettings
    chunk_size: int
    needs_grad: tuple[bool, bool, bool]  # hidden, weight, bias: for the fused mode


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The chunk's local logits in the inputs' dtype (autocast does not lower the GEMM,
    as in xloss.linear_cross_entropy)."""
    with autocast_off(hidden.device.type):
        if bias is None:
            return hidden @ weight.T  # chunk x V_local
        return torch.addmm(bias, hidden, weight.T)  # chunk x V_local


def _row_chunks(rows: int, chunk_size: int):
    for begin in range(0, rows, chunk_size):
        yield slice(begin, min(begin + chunk_size, rows))


class _GradBuffers:
    """fp32 (or fp64) gradient accumulators for hidden (R x H), weight and bias."""

    def __init__(self, hidden, weight, bias, needs_grad, dtype):
        need_hidden, need_weight, need_bias = needs_grad
        self.hidden = (
            torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
        )
        self.weight = (
            torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        )
        self.bias = (
            torch.zeros(bias.shape, dtype=dtype, device=bias.device)
            if bias is not None and need_bias
            else None
        )

    def add_chunk(self, part: slice, grad_logits: Tensor, hidden_c: Tensor, weight_c: Tensor):
        if self.hidden is not None:
            torch.mm(grad_logits, weight_c, out=self.hidden[part])  # chunk x H
        if self.weight is not None:
            self.weight.addmm_(grad_logits.T, hidden_c)  # V_local x H
        if self.bias is not None:
            self.bias += grad_logits.sum(0)

    def all_reduce_hidden(self, group) -> None:
        # 5. hidden is replicated over the group: each rank's grad covers its slice only.
        if self.hidden is not None:
            dist.all_reduce(self.hidden, op=dist.ReduceOp.SUM, group=group)


class _VocabParallelLinearCrossEntropy(KernelFunction):
    """Cross-entropy of ``hidden @ local_weight.T + bias`` by chunks of rows.

    Two modes, chosen by ``grad_scale``:

    - fused (``grad_scale`` (R,) given, for mean/sum/normalizer): returns the scalar
      sum_i grad_scale_i loss_i and computes the gradients in the forward pass, chunk by
      chunk, in the logits buffer; grad_hidden is all-reduced (SUM) once at the end of
      the forward; backward only scales the stored gradients by grad_output.
    - per row (``grad_scale`` None, for none/sample): returns the (R,) losses and saves
      lse; backward recomputes each chunk's logits (one more GEMM) and all-reduces
      grad_hidden (SUM) once, its only communication.

    Also returns C (non-differentiable) for the target range check, and, for
    ``setup_context``, the per-row statistics (the entropy and argmax empty without
    ``with_stats``) and the stored gradients (empty when not computed). The gradients
    are first order only: a second backward through them raises
    (``xloss.ops.second_order``).
    """

    @staticmethod
    def forward(hidden, weight, bias, target, grad_scale, settings: LinearSettings, anchor):
        vocab = settings.vocab
        dtype = compute_dtype(hidden.dtype)
        weight_c = weight.to(dtype)  # V_local x H (no copy for fp32)
        bias_c = None if bias is None else bias.to(dtype)
        fused = grad_scale is not None
        grads = None
        if fused and any(settings.needs_grad):
            grads = _GradBuffers(hidden, weight, bias, settings.needs_grad, dtype)
        row_loss = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)
        row_logsumexp = torch.zeros_like(row_loss)
        row_entropy = torch.zeros_like(row_loss) if vocab.with_stats else row_loss.new_empty(0)
        predicted = torch.zeros_like(target) if vocab.with_stats else target.new_empty(0)
        local_target = torch.zeros_like(target)
        in_slice = torch.zeros_like(target, dtype=torch.bool)
        num_classes = torch.zeros((), dtype=dtype, device=hidden.device)
        for part in _row_chunks(hidden.shape[0], settings.chunk_size):
            hidden_c = hidden[part].to(dtype)
            logits = _chunk_logits(hidden_c, weight_c, bias_c)  # chunk x V_local
            # 1-3. Two all-reduces per chunk; the logits buffer becomes exp(x - m).
            stats = global_row_stats(
                logits,
                target[part],
                vocab_start=vocab.vocab_start,
                label_smoothing=vocab.label_smoothing,
                z_loss=vocab.z_loss,
                group=vocab.group,
                exp_in_place=True,
                check_slices=vocab.validate_args,
                with_stats=vocab.with_stats,
            )
            row_loss[part] = stats.loss
            if vocab.with_stats:
                row_entropy[part] = stats.entropy
                predicted[part] = stats.predicted
            row_logsumexp[part] = stats.row_logsumexp
            local_target[part] = stats.local_target
            in_slice[part] = stats.in_slice
            num_classes = stats.num_classes
            if grads is not None:
                # 4. The local gradient in the logits buffer (exp(x - m) / S = softmax).
                scale = grad_scale[part]
                row_factor = scale * (1.0 + 2.0 * vocab.z_loss * stats.row_logsumexp)
                grad_logits = local_gradient_(
                    logits,
                    row_factor / stats.sum_exp,
                    scale,
                    stats,
                    label_smoothing=vocab.label_smoothing,
                )
                grads.add_chunk(part, grad_logits, hidden_c, weight_c)
        empty = row_loss.new_empty(0)
        kept_loss = torch.where(target >= 0, row_loss, 0.0)
        if fused:
            result = (grad_scale * kept_loss).sum()
            if grads is not None:
                grads.all_reduce_hidden(vocab.group)
        else:
            result = row_loss
        stored = [empty] * 3 if grads is None else [grads.hidden, grads.weight, grads.bias]
        stored = [empty if g is None else g for g in stored]
        return (result, num_classes, kept_loss, row_logsumexp, local_target, in_slice,
                row_entropy, predicted, *stored)  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, _, grad_scale, settings, anchor = inputs
        result, num_classes, kept_loss, row_logsumexp, local_target, in_slice = output[:6]
        stored = output[8:]
        ctx.settings = settings
        ctx.fused = grad_scale is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        if ctx.fused:
            ctx.save_for_backward(anchor, kept_loss, *stored)
        else:
            ctx.save_for_backward(
                anchor, hidden, weight, bias, row_logsumexp, num_classes, local_target, in_slice
            )

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_grads_of_side_outputs):
        if grad_loss is None:
            return (None,) * 7
        anchor, *saved = ctx.saved_tensors
        grad_scale = None
        if ctx.fused:
            kept_loss, *grads = saved
            scaled = [grad_loss.to(g.dtype) * g for g in grads]
            if ctx.needs_input_grad[4]:  # a normalizer that requires grad
                grad_scale = grad_loss * kept_loss
        else:
            with torch.no_grad():  # first order only (tagged below): record nothing
                scaled = _recompute_gradients(ctx, saved, grad_loss)
        results = [
            None if g is None or not needed else first_order_only(g.to(dtype), anchor, _WHAT)
            for g, needed, dtype in zip(scaled, ctx.needs_input_grad[:3], ctx.dtypes, strict=True)
        ]
        return (*results, None, grad_scale, None, None)


def _recompute_gradients(ctx, saved, grad_loss: Tensor):
    """Per-row mode backward: steps 4-5 with each chunk's logits recomputed."""
    hidden, weight, bias, row_logsumexp, num_classes, local_target, in_slice = saved
    vocab = ctx.settings.vocab
    dtype = row_logsumexp.dtype
    weight_c = weight.to(dtype)
    bias_c = None if bias is None else bias.to(dtype)
    grad_loss = grad_loss.to(dtype)
    grads = _GradBuffers(hidden, weight, bias, ctx.needs_input_grad[:3], dtype)
    for part in _row_chunks(hidden.shape[0], ctx.settings.chunk_size):
        hidden_c = hidden[part].to(dtype)
        logits = _chunk_logits(hidden_c, weight_c, bias_c)  # chunk x V_local
        lse = row_logsumexp[part]
        stats = RowStats(lse, None, None, num_classes, local_target[part], in_slice[part])
        probs = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place
        scale = grad_loss[part]
        grad_logits = local_gradient_(
            probs,
            scale * (1.0 + 2.0 * vocab.z_loss * lse),
            scale,
            stats,
            label_smoothing=vocab.label_smoothing,
        )
        grads.add_chunk(part, grad_logits, hidden_c, weight_c)
    grads.all_reduce_hidden(vocab.group)
    return grads.hidden, grads.weight, grads.bias


def check_local_weight(input: Tensor, local_weight, bias) -> None:
    check_tensor("local_weight", local_weight)
    if local_weight.dtype != input.dtype:
        raise TypeError(
            f"`local_weight` must have the input's dtype {input.dtype}, got {local_weight.dtype}"
        )
    hidden = input.shape[-1]
    if local_weight.dim() != 2 or local_weight.shape[1] != hidden or local_weight.shape[0] == 0:
        raise ValueError(
            f"`local_weight` must have shape (V_local, {hidden}) with V_local >= 1 for `input` "
            f"of shape {shape_str(input.shape)}, got {shape_str(local_weight.shape)}"
        )
    if bias is None:
        return
    check_tensor("bias", bias)
    if bias.dtype != input.dtype:
        raise TypeError(f"`bias` must have the input's dtype {input.dtype}, got {bias.dtype}")
    if bias.shape != local_weight.shape[:1]:
        raise ValueError(
            f"`bias` must have shape ({local_weight.shape[0]},), one value per local class, "
            f"got {shape_str(bias.shape)}"
        )


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"`chunk_size` must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")


def default_chunk_size(rows: int, local_size: int) -> int:
    """Rows per chunk so that the chunk's logits take about 16 MiB in fp32."""
    return max(1, min(rows, (1 << 22) // local_size))


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    group=None,
    vocab_start: int | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int | None = None,
    validate_args: bool = True,
    return_stats: bool = False,
) -> Tensor | CrossEntropyStats:
    r"""Cross-entropy of ``input @ local_weight.T + bias`` with the vocabulary split over ranks.

    The output layer of a tensor-parallel model: ``input`` (the hidden states) is
    replicated on every rank of ``group``, rank r holds the rows ``[start_r, start_r + V_r)``
    of the output weight. The loss is that of :func:`vocab_parallel_cross_entropy` (and of
    :func:`xloss.cross_entropy` on the full logits); the logits are computed by chunks of
    rows and never held for all N rows at once (at most ``chunk_size x V_r``).

    Algorithm, per chunk of rows (the code repeats these steps as comments):

    1-3. logits = h W_r^T + b_r (chunk x V_r), then steps 1-3 of
         :func:`vocab_parallel_cross_entropy`: a MAX and ONE packed SUM all-reduce.
    4. The local gradient g = s [(1 + 2 z lse) softmax - (1-eps) onehot_y - eps/C] is
       written into the logits buffer, then grad_h = g W_r (chunk x H),
       grad_W_r += g^T h and grad_b_r += sum of g, accumulated in fp32.
    5. grad_h is all-reduced (SUM) over the group once for all rows: the input is
       replicated, and each rank's g only covers its slice. Every rank gets the full
       gradient of the input, so the caller must not all-reduce it again. grad_W_r and
       grad_b_r stay local.

    With ``reduction="mean"`` or ``"sum"`` (or a ``normalizer``) the row scales s are known
    in the forward pass, so steps 4-5 run there (three GEMMs in all, the grad_h all-reduce
    in forward) and the backward only multiplies the stored gradients by the incoming
    gradient: no communication in backward. With ``"none"`` or ``"sample"`` the forward
    keeps lse only; the backward recomputes the logits chunk by chunk (one more GEMM) and
    its one communication is the grad_h all-reduce of step 5.

    A call costs 2 small all-reduces per chunk (O(chunk) numbers each; 3 with
    ``return_stats``) and one of N x H.
    Nothing synchronises with the host unless ``validate_args`` is true (target range).
    Class weights, soft targets and softcap are not supported. ``input``, ``target``,
    ``mask`` and the options must be identical on every rank.

    Args:
        input: hidden states h, replicated on every rank; floating point. fp16/bf16 are
            computed in fp32; gradients are returned in the dtypes of their tensors.
            ``torch.autocast`` does not lower the GEMMs (fp32 inputs stay fp32).
        local_weight: this rank's rows of the output weight, same dtype as ``input``.
        target: global class indices in [0, C), the input's shape without the last axis.
        bias: this rank's slice of the output bias, or None.
        group, vocab_start, label_smoothing, ignore_index, reduction, z_loss, mask,
        normalizer, validate_args: as in :func:`vocab_parallel_cross_entropy`.
        chunk_size: rows per chunk; None picks about 16 MiB of fp32 logits per chunk.
        return_stats: return a :class:`xloss.CrossEntropyStats` as
            :func:`vocab_parallel_cross_entropy` does, from each chunk's local logits.

    Shape:
        - input: (H), (N, H) or (N, d_1, ..., d_K, H).
        - local_weight: (V_r, H); bias: (V_r).
        - target: (), (N) or (N, d_1, ..., d_K).
        - output: a scalar; the target's shape for ``"none"``; (N) for ``"sample"``.
        - lse, entropy, predicted (``return_stats``): the target's shape; accuracy: a
          scalar.

    Example (a 1-process group):
        >>> import torch, torch.distributed as dist, xloss
        >>> from xloss.distributed import vocab_parallel_linear_cross_entropy
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> hidden = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]], requires_grad=True)
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
        >>> target = torch.tensor([0, 2, -100])
        >>> loss = vocab_parallel_linear_cross_entropy(hidden, weight, target, chunk_size=2)
        >>> loss.detach()
        tensor(0.4813)
        >>> xloss.cross_entropy(hidden @ weight.T, target).detach()
        tensor(0.4813)
        >>> out = vocab_parallel_linear_cross_entropy(hidden, weight, target, return_stats=True)
        >>> out.predicted, out.accuracy
        (tensor([ 0,  2, -1]), tensor(1.))
        >>> dist.destroy_process_group()
    """
    # Settings and shapes are checked before any communication.
    label_smoothing, z_loss, _ = check_cross_entropy_settings(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=None,
        normalizer=normalizer,
        validate_args=validate_args,
    )
    check_vocab_start(vocab_start)
    check_chunk_size(chunk_size)
    check_return_stats(return_stats)
    check_floating_input(input)
    check_index_target(target)
    if input.dim() == 0:
        raise ValueError("`input` must have a hidden axis (last), got a 0-dimensional tensor")
    check_local_weight(input, local_weight, bias)
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"`target` must have shape {shape_str(input.shape[:-1])} for `input` of shape "
            f"{shape_str(input.shape)} (hidden axis last), got {shape_str(target.shape)}"
        )
    device = input.device
    target = target.to(device)
    keep = build_mask(
        target.shape, device, index_target=target, ignore_index=ignore_index, mask=mask
    )
    group = resolve_group(group)
    index = _dropped_as_negative(target, keep).reshape(-1)
    hidden = input.reshape(-1, input.shape[-1])  # R x H
    rows, local_size = hidden.shape[0], local_weight.shape[0]
    settings = LinearSettings(
        vocab=VocabParallelSettings(
            vocab_start, label_smoothing, z_loss, group, validate_args, return_stats
        ),
        chunk_size=chunk_size or default_chunk_size(rows, local_size),
        needs_grad=tuple(
            torch.is_grad_enabled() and t is not None and t.requires_grad
            for t in (input, local_weight, bias)
        ),
    )
    anchor = grad_anchor(hidden, local_weight, bias) if torch.is_grad_enabled() else None
    if normalizer is not None or reduction in ("mean", "sum"):
        dtype = compute_dtype(input.dtype)
        counts = (
            torch.ones(rows, dtype=dtype, device=device)
            if keep is None
            else keep.reshape(-1).to(dtype)
        )
        if normalizer is not None:
            grad_scale = safe_divide(counts, normalizer)
        elif reduction == "mean":
            grad_scale = safe_divide(counts, counts.sum())
        else:
            grad_scale = counts
    else:
        grad_scale = None
    outputs = _VocabParallelLinearCrossEntropy.apply(
        hidden, local_weight, bias, index, grad_scale, settings, anchor
    )
    loss, num_classes, row_logsumexp, side_rows = outputs[0], outputs[1], outputs[3], outputs[6:8]
    if grad_scale is None:
        loss = loss.reshape(target.shape)
        if keep is not None:
            loss = torch.where(keep, loss, 0.0)
        loss = reduce_loss(loss, reduction, keep=keep, batched=input.dim() > 1)
    if validate_args and rows > 0:
        check_index_target_range(target, int(num_classes), ignore_index, keep)
    side_rows = (row_logsumexp, *side_rows) if return_stats else None
    return _stats_or_loss(loss.to(loss_dtype(input)), side_rows, target, keep, target.shape)
