"""PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (torch 2.13), through xloss.

Upstream: ``linear_cross_entropy(input, linear_weight, target, *, linear_bias=None,
weight=None, reduction="mean", ignore_index=None, label_smoothing=0.0, options=None)``,
equal by definition to ``F.cross_entropy(F.linear(input, linear_weight, linear_bias),
target, ...)`` with ``ignore_index=None`` meaning -100 for class-index targets. Code
written for it switches by changing one import::

    from xloss.compat.torch import linear_cross_entropy
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from xloss._core.validation import check_tensor
from xloss.functional.cross_entropy import cross_entropy
from xloss.functional.linear_cross_entropy import linear_cross_entropy as _linear_cross_entropy

TORCH_REDUCTIONS = ("mean", "sum", "none")


def _chunk_size(options) -> int | None:
    """Rows per chunk from a ``torch.nn.LinearCrossEntropyOptions`` (or None)."""
    if options is None:
        return None
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_type is not None and not isinstance(options, options_type):
        raise TypeError(
            "`options` must be a torch.nn.LinearCrossEntropyOptions or None, "
            f"got {type(options).__name__}"
        )
    return getattr(options, "batch_chunk_size", None)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
) -> Tensor:
    r"""Cross-entropy of ``F.linear(input, linear_weight, linear_bias)`` against ``target``.

    The value and gradients are those of ``F.cross_entropy(F.linear(input, linear_weight,
    linear_bias), target, weight=weight, reduction=reduction, ignore_index=ignore_index
    or -100, label_smoothing=label_smoothing)``: with x the logits of a row, lse their
    log-sum-exp, w the class weights, eps the smoothing and C the classes,

    .. math::
        \ell = (1-\epsilon)\, w_y (\mathrm{lse} - x_y)
             + \frac{\epsilon}{C} \sum_c w_c (\mathrm{lse} - x_c),

    ``"mean"`` dividing by the summed ``w[y]`` of the non-ignored rows (probability
    targets: by the rows). For class-index targets with a 2-D ``linear_weight`` (the
    common language-model head) the logits are never materialised: the call is
    :func:`xloss.linear_cross_entropy`, in row chunks, whether or not ``options`` is
    given. Probability targets and K-dimensional weights build the logits and call
    :func:`xloss.cross_entropy`, as upstream's reference path does.

    ``options`` (a ``torch.nn.LinearCrossEntropyOptions``) is accepted for compatibility;
    only ``batch_chunk_size`` is used (rows per chunk). Its accumulation settings
    (``acc_policy``, ``acc_dtype``) do not apply: xloss always computes fp16/bf16 in
    fp32 and accumulates the weight gradient in fp32. Unlike upstream's chunked path,
    label smoothing, second backward calls and ``torch.compile`` (as a graph break) all
    work with ``options`` given.

    Differences from upstream:

    - ``"mean"`` over a batch whose rows are all ignored gives 0 with a zero gradient
      (upstream: NaN).
    - Errors are ``ValueError``/``TypeError`` naming the argument (upstream:
      ``RuntimeError``), and target ranges are checked.

    Args:
        input: (in_features) or (N, in_features), floating point.
        linear_weight: (C, in_features) or (C, d_1, ..., d_K, in_features).
        target: class indices () / (N) / (N, d_1, ..., d_K), or probabilities of the
            logits' shape.
        linear_bias: (C) or (C, d_1, ..., d_K), the weight's shape without in_features.
        weight: class weights (C).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        ignore_index: class index to drop; None means -100 for class-index targets and
            must be None for probability targets.
        label_smoothing: eps in [0, 1].
        options: ``torch.nn.LinearCrossEntropyOptions`` or None.

    Shape:
        - input: (H) or (N, H), H = in_features.
        - linear_weight: (C, H) or (C, d_1, ..., d_K, H); logits: (C) / (N, C) /
          (N, C, d_1, ..., d_K).
        - target: () / (N) / (N, d_1, ..., d_K) class indices, or the logits' shape.
        - output: a scalar, or the index target's shape for ``"none"``.

    Example:
        >>> import torch
        >>> from xloss.compat.torch import linear_cross_entropy
        >>> hidden = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
        >>> head = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, -1.0]])
        >>> linear_cross_entropy(hidden, head, torch.tensor([0, 2, -100]))
        tensor(0.3570)
        >>> options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
        >>> linear_cross_entropy(hidden, head, torch.tensor([0, 2, 1]), options=options)
        tensor(0.6802)
    """
    check_tensor("input", input)
    check_tensor("linear_weight", linear_weight)
    check_tensor("target", target)
    if input.dim() not in (1, 2):
        raise ValueError(
            f"`input` must have shape (in_features) or (N, in_features), got "
            f"{tuple(input.shape)}; for (..., H) hidden states use xloss.linear_cross_entropy"
        )
    if linear_weight.dim() < 2 or linear_weight.shape[-1] != input.shape[-1]:
        raise ValueError(
            f"`linear_weight` must have shape (C, ..., {input.shape[-1]}) for `input` of "
            f"shape {tuple(input.shape)}, got {tuple(linear_weight.shape)}"
        )
    if not isinstance(reduction, str) or reduction not in TORCH_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {TORCH_REDUCTIONS}, got {reduction!r}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
    ):
        raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}")
    chunk_size = _chunk_size(options)
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None:
        check_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (num_classes, *out_features):
            raise ValueError(
                f"`linear_bias` must have shape {(num_classes, *out_features)}, "
                f"got {tuple(linear_bias.shape)}"
            )
    if out_features and input.dim() == 1:
        raise ValueError(
            f"a K-dimensional `linear_weight` {tuple(linear_weight.shape)} needs batched "
            f"`input` (N, {input.shape[-1]}), got {tuple(input.shape)}"
        )
    logits_shape = (*input.shape[:-1], num_classes, *out_features)
    probabilities = tuple(target.shape) == logits_shape
    if probabilities and ignore_index is not None:
        raise ValueError(
            "`ignore_index` must be None when `target` holds probabilities (the logits' "
            f"shape {logits_shape}), got {ignore_index}"
        )
    common = dict(reduction=reduction, label_smoothing=label_smoothing)
    if not probabilities and not out_features:
        return _linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias,
            class_weight=weight,
            ignore_index=-100 if ignore_index is None else ignore_index,
            chunk_size=chunk_size,
            **common,
        )
    # Probability targets or a K-dimensional loss: the logits are needed (as upstream).
    flat_weight = linear_weight.reshape(math.prod(out_features, start=num_classes), -1)
    flat_bias = None if linear_bias is None else linear_bias.reshape(-1)
    logits = F.linear(input, flat_weight, flat_bias).reshape(logits_shape)
    return cross_entropy(
        logits,
        target,
        weight,
        ignore_index=None if probabilities else (-100 if ignore_index is None else ignore_index),
        **common,
    )
