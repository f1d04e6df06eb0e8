"""SpeechBrain's masked sequence losses, with their reductions and smoothing fixed.

Upstream: ``speechbrain.nnet.losses.nll_loss(log_probabilities, targets, length=None,
label_smoothing=0.0, allowed_len_diff=3, weight=None, reduction="mean")`` and
``speechbrain.nnet.losses.bce_loss(inputs, targets, length=None, weight=None,
pos_weight=None, reduction="mean", allowed_len_diff=3, label_smoothing=0.0)``.

Shared conventions (as upstream):

- ``length`` holds relative lengths in [0, 1], one per sample; position t of sample n is
  kept when ``t < length[n] * T - 1e-6`` (T the size of axis 1), the exact rule of
  SpeechBrain's ``compute_length_mask``. A length outside [0, 1] (frame counts passed
  by mistake) or NaN raises ValueError; upstream keeps every position for a length above 1.
- When the inputs and the targets differ in length along axis 1 by at most
  ``allowed_len_diff``, the longer one is truncated; a larger difference raises ValueError.
- Reductions: ``"mean"`` (sum over kept positions / their count), ``"batch"`` (the same,
  per sample: shape (N,)), ``"batchmean"`` (sum / N), ``"sum"`` and ``"none"``
  (the per-position loss, 0 at dropped positions).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from xloss._core.masking import build_mask, relative_length_counts
from xloss._core.reduction import reduce_loss
from xloss._core.validation import any_violation, check_floating_input, check_tensor, shape_str
from xloss.functional.binary import binary_cross_entropy_with_logits
from xloss.functional.cross_entropy import cross_entropy

SPEECHBRAIN_REDUCTIONS = ("mean", "batch", "batchmean", "sum", "none")
NLL_IGNORE_INDEX = -100  # F.nll_loss's default, which upstream inherits


def check_speechbrain_reduction(reduction) -> None:
    if not isinstance(reduction, str) or reduction not in SPEECHBRAIN_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {SPEECHBRAIN_REDUCTIONS}, got {reduction!r}")


def check_allowed_len_diff(allowed_len_diff) -> int:
    if isinstance(allowed_len_diff, bool) or not isinstance(allowed_len_diff, numbers.Integral):
        raise TypeError(f"`allowed_len_diff` must be an int, got {type(allowed_len_diff).__name__}")
    if allowed_len_diff < 0:
        raise ValueError(f"`allowed_len_diff` must be >= 0, got {allowed_len_diff}")
    return int(allowed_len_diff)


def truncate(predictions: Tensor, targets: Tensor, allowed_len_diff: int):
    """Cut the longer of the two along axis 1, if the lengths differ by <= allowed_len_diff."""
    if targets.dim() < 2:
        raise ValueError(
            f"`targets` must have a time axis (axis 1) for inputs of shape "
            f"{shape_str(predictions.shape)}, got {shape_str(targets.shape)}"
        )
    steps = min(predictions.shape[1], targets.shape[1])
    difference = predictions.shape[1] - targets.shape[1]
    if abs(difference) > allowed_len_diff:
        raise ValueError(
            "inputs and targets must have the same length along axis 1, up to "
            f"allowed_len_diff={allowed_len_diff}, got {predictions.shape[1]} and "
            f"{targets.shape[1]}"
        )
    return predictions[:, :steps], targets[:, :steps]


def length_counts(length, steps: int) -> Tensor:
    """Relative lengths -> kept positions per sample: #{t < length * steps - 1e-6}."""
    check_tensor("length", length)
    if length.dim() != 1:
        raise ValueError(
            f"`length` must be 1-D, one relative length per sample, "
            f"got shape {shape_str(length.shape)}"
        )
    if length.dtype == torch.bool or length.is_complex():
        raise TypeError(f"`length` must hold relative lengths (floats), got dtype {length.dtype}")
    # written so that NaN fails it; frame counts (say 9 of 9) would otherwise keep everything
    in_range = (length >= 0) & (length <= 1)
    if any_violation(~in_range, "`length` must hold relative lengths in [0, 1]"):
        raise ValueError(
            "`length` must hold relative lengths in [0, 1] (not frame counts), got "
            f"{[float(v) for v in length[:8]]} (NaN and inf are rejected too)"
        )
    return relative_length_counts(length, steps)


def reduce_speechbrain(loss: Tensor, keep: Tensor | None, reduction: str, dtype) -> Tensor:
    """SpeechBrain's reductions of a per-position loss (zero where dropped), in fp32+."""
    loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
    if reduction == "none":
        reduced = loss
    elif reduction == "sum":
        reduced = reduce_loss(loss, "sum")
    elif reduction == "mean":
        reduced = reduce_loss(loss, "mean", keep=keep)
    elif reduction == "batch":
        reduced = reduce_loss(loss, "sample", keep=keep)
    else:  # batchmean
        reduced = reduce_loss(loss, "sum", normalizer=loss.shape[0])
    return reduced.to(dtype)


def nll_loss(
    log_probabilities: Tensor,
    targets: Tensor,
    length: Tensor | None = None,
    label_smoothing: float = 0.0,
    allowed_len_diff: int = 3,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of log-probabilities, as SpeechBrain's ``nll_loss``.

    Upstream signature: ``nll_loss(log_probabilities, targets, length=None,
    label_smoothing=0.0, allowed_len_diff=3, weight=None, reduction="mean")``. With
    :math:`l = ` ``log_probabilities`` at one position (C classes, class axis last), w the
    class weights (1 when not given) and a the label smoothing,

    .. math::
        \ell = -(1-a)\, w_y\, l_y - \frac{a}{C} \sum_c w_c\, l_c .

    Upstream's smoothing term is :math:`-a \cdot \mathrm{mean}_c\, l_c` (it subtracts
    ``label_smoothing * mean(log_probabilities)`` over the class axis), which is this
    formula when unweighted: the uniform smoothing of ``F.cross_entropy``, not the
    :math:`a / (C - 1)` rule of SpeechBrain's ``kldiv_loss``.

    Computation: :func:`xloss.cross_entropy` on the log-probabilities with
    ``class_dim=-1``. For log-probabilities, logsumexp is 0, so cross-entropy equals NLL and
    the gradient reaching the network (through its log_softmax) is identical; for
    un-normalised scores the result is the NLL of ``log_softmax(log_probabilities)``.

    Deliberate differences from upstream:

    - ``reduction="sum"`` returns the sum (upstream returns the unreduced tensor).
    - Positions with target -100 (``F.nll_loss``'s ignore_index) are dropped from the
      means too (upstream gives them loss 0 but counts them).
    - With ``weight`` and ``label_smoothing``, the smoothing term is weighted by the class
      weights, as in ``F.cross_entropy`` (upstream leaves it unweighted). The means
      divide by the number of kept positions, as upstream does (not by summed weights).
    - ``length`` with (N, C) inputs raises ValueError (upstream fails with IndexError).
    - A mean over no kept position is 0, not NaN.

    Args:
        log_probabilities: (N, C) or (N, T, C) log-probabilities.
        targets: (N) or (N, T) class indices (cast to int64, as upstream does).
        length: (N) relative lengths in [0, 1], for (N, T, C) inputs.
        label_smoothing: a in [0, 1].
        allowed_len_diff: the largest tolerated length difference along axis 1.
        weight: class weights (C,).
        reduction: ``"mean"``, ``"batch"``, ``"batchmean"``, ``"sum"`` or ``"none"``.

    Shape:
        - log_probabilities: (N, C) or (N, T, C).
        - targets: (N) or (N, T'), |T - T'| <= allowed_len_diff.
        - output: scalar; (N) for ``"batch"``; (N) or (N, min(T, T')) for ``"none"``.

    Example:
        >>> import torch
        >>> from xloss.compat.speechbrain import nll_loss
        >>> probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
        >>> nll_loss(torch.log(probs), torch.tensor([1, 1]))
        tensor(1.2040)
        >>> log_probs = torch.log_softmax(torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 0.0]]]), -1)
        >>> nll_loss(log_probs, torch.tensor([[0, 1, 1]]), length=torch.tensor([2 / 3]),
        ...          reduction="batch")
        tensor([0.2201])
    """
    check_speechbrain_reduction(reduction)
    allowed_len_diff = check_allowed_len_diff(allowed_len_diff)
    check_floating_input(log_probabilities)
    check_tensor("targets", targets)
    if log_probabilities.dim() == 3:
        log_probabilities, targets = truncate(log_probabilities, targets, allowed_len_diff)
    targets = targets.long().to(log_probabilities.device)
    counts = None
    if length is not None:
        if log_probabilities.dim() != 3:
            raise ValueError(
                "`length` needs frame-level inputs (N, T, C), got log_probabilities of shape "
                f"{shape_str(log_probabilities.shape)}"
            )
        counts = length_counts(length, targets.shape[1])
    loss = cross_entropy(
        log_probabilities,
        targets,
        weight,
        ignore_index=NLL_IGNORE_INDEX,
        reduction="none",
        label_smoothing=label_smoothing,
        class_dim=-1,
        lengths=counts,
    )
    keep = build_mask(
        targets.shape,
        targets.device,
        index_target=targets,
        ignore_index=NLL_IGNORE_INDEX,
        lengths=counts,
    )
    return reduce_speechbrain(loss, keep, reduction, log_probabilities.dtype)


def bce_loss(
    inputs: Tensor,
    targets: Tensor,
    length: Tensor | None = None,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
    allowed_len_diff: int = 3,
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Binary cross-entropy from logits, as SpeechBrain's ``bce_loss``, with smoothing fixed.

    Upstream signature: ``bce_loss(inputs, targets, length=None, weight=None,
    pos_weight=None, reduction="mean", allowed_len_diff=3, label_smoothing=0.0)``. With s
    the sigmoid, a the label smoothing, w the weight and p the positive weight, each kept
    position has the smoothed target :math:`y' = y (1 - a) + a / 2` and

    .. math::
        \ell = -w \left[ p\, y' \log s(x) + (1 - y') \log(1 - s(x)) \right].

    Computed by :func:`xloss.binary_cross_entropy_with_logits` (``smoothing_rule="binary"``,
    class axis last for ``pos_weight``). As upstream: a trailing singleton axis of
    ``inputs`` is squeezed when ``inputs`` has one more axis than ``targets``; a 1-D weight
    whose length is the batch size weighs whole samples (upstream unsqueezes it to (N, 1));
    ``length`` needs inputs with a time axis.

    Deliberate differences from upstream:

    - Label smoothing smooths the target, :math:`y (1-a) + a/2`, so the loss stays
      bounded below. Upstream subtracts ``a * mean(inputs, dim=1)`` from the loss, which is
      unbounded in the logits, fails on 1-D inputs (before SpeechBrain's fix) and, after
      it, broadcasts an (N,) term against the (N, 1) mask into an (N, N) matrix.
    - ``reduction="sum"`` returns the sum (upstream returns the unreduced tensor).
    - ``"none"`` on 1-D inputs returns shape (N,) (upstream: (N, 1)).
    - Targets must lie in [0, 1]; a mean over no kept position is 0, not NaN.

    Args:
        inputs: logits (N), (N, 1), (N, T), (N, T, 1) or (N, T, C).
        targets: (N), (N, T) or (N, T, C), values in [0, 1].
        length: (N) relative lengths in [0, 1], for inputs with a time axis.
        weight: element weight broadcastable to the inputs (after the squeeze), or (N).
        pos_weight: positive weight per class (C,) (last axis) or a single value.
        reduction: ``"mean"``, ``"batch"``, ``"batchmean"``, ``"sum"`` or ``"none"``.
        allowed_len_diff: the largest tolerated length difference along axis 1.
        label_smoothing: a in [0, 1].

    Shape:
        - inputs: (N), (N, T) or (N, T, C), optionally with a trailing singleton axis.
        - targets: the inputs' shape (without that axis), up to ``allowed_len_diff``
          along axis 1.
        - output: scalar; (N) for ``"batch"``; the targets' shape for ``"none"``.

    Example:
        >>> import torch
        >>> from xloss.compat.speechbrain import bce_loss
        >>> inputs = torch.tensor([10.0, -6.0])
        >>> targets = torch.tensor([1, 0])
        >>> bce_loss(inputs, targets)
        tensor(0.0013)
        >>> bce_loss(inputs, targets, label_smoothing=0.1)  # 1-D input with smoothing
        tensor(0.4013)
        >>> frames = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]).unsqueeze(-1)
        >>> labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
        >>> bce_loss(frames, labels, length=torch.tensor([1.0, 2 / 3]), reduction="batch")
        tensor([0.3048, 0.3709])
    """
    check_speechbrain_reduction(reduction)
    allowed_len_diff = check_allowed_len_diff(allowed_len_diff)
    check_floating_input(inputs)
    check_tensor("targets", targets)
    if inputs.dim() == targets.dim() + 1 and inputs.shape[-1] == 1:
        inputs = inputs.squeeze(-1)
    unbatched = inputs.dim() < 2
    if not unbatched:
        inputs, targets = truncate(inputs, targets, allowed_len_diff)
    elif length is not None:
        raise ValueError(
            f"`length` needs inputs with a time axis (axis 1), got inputs of shape "
            f"{shape_str(inputs.shape)}"
        )
    else:  # one prediction per sample: a time axis of size 1, as upstream does
        inputs, targets = inputs.unsqueeze(-1), targets.unsqueeze(-1)
    targets = targets.to(inputs.device)
    if weight is not None:
        check_tensor("weight", weight)
        if weight.dim() == 1 and weight.shape[0] == inputs.shape[0] and inputs.dim() > 1:
            weight = weight.reshape((-1,) + (1,) * (inputs.dim() - 1))  # one weight per sample
    counts = None if length is None else length_counts(length, targets.shape[1])
    loss = binary_cross_entropy_with_logits(
        inputs,
        targets,
        weight,
        pos_weight=pos_weight,
        reduction="none",
        label_smoothing=label_smoothing,
        smoothing_rule="binary",
        lengths=counts,
        class_dim=-1,
    )
    keep = build_mask(targets.shape, inputs.device, lengths=counts)
    reduced = reduce_speechbrain(loss, keep, reduction, inputs.dtype)
    if unbatched and reduction == "none":
        reduced = reduced.squeeze(-1)
    return reduced
