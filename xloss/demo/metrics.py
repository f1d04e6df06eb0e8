"""Evaluation metrics of the demo, written out so that a reader can check them by hand.

- Expected calibration error (ECE): predictions are put into ``bins`` equal-width bins of
  their confidence, (0, 1/B], (1/B, 2/B], ..., and ECE = sum_b (n_b / n) |acc_b - conf_b|,
  with acc_b the fraction correct and conf_b the mean confidence in bin b.
- Average precision (AP) of one label, as scikit-learn defines it:
  AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds taken from high to
  low, with P_k and R_k the precision and recall of predicting "positive" at scores
  >= the k-th threshold (tied scores enter together). mAP is the mean over labels.
- F1 at a threshold: micro pools the true/false positives and negatives of all labels,
  macro averages the per-label F1 (a label with no positive and no prediction scores 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of a reliability diagram; empty bins have count 0."""

    lower: Tensor  # (B,) bin lower edges
    upper: Tensor  # (B,) bin upper edges
    count: Tensor  # (B,) predictions per bin
    confidence: Tensor  # (B,) mean confidence per bin (0 where empty)
    accuracy: Tensor  # (B,) fraction correct per bin (0 where empty)


def reliability_bins(confidence: Tensor, correct: Tensor, bins: int = 15) -> ReliabilityBins:
    """Bin top-1 ``confidence`` (values in [0, 1]) and ``correct`` (bool) into ``bins``."""
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ValueError(
            "`confidence` and `correct` must be 1-D of the same length, got "
            f"{tuple(confidence.shape)} and {tuple(correct.shape)}"
        )
    if bins < 1:
        raise ValueError(f"`bins` must be >= 1, got {bins}")
    confidence = confidence.double()
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    # Bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 joins the first bin.
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct.double(), minlength=bins)
    safe = count.clamp(min=1)
    return ReliabilityBins(edges[:-1], edges[1:], count.long(), conf_sum / safe, correct_sum / safe)


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = 15) -> float:
    """ECE of top-1 predictions: sum over bins of (bin share) x |accuracy - confidence|.

    Example:
        >>> import torch
        >>> conf = torch.tensor([0.9, 0.9, 0.6, 0.6])
        >>> correct = torch.tensor([True, False, True, True])
        >>> round(expected_calibration_error(conf, correct, bins=10), 4)  # (0.4 + 0.4) / 2
        0.4
    """
    stats = reliability_bins(confidence, correct, bins)
    total = stats.count.sum().clamp(min=1).double()
    gap = (stats.accuracy - stats.confidence).abs()
    return float((stats.count.double() / total * gap).sum())


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision of one label; NaN when it has no positive example.

    Example:
        >>> import torch
        >>> average_precision(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]))
        0.8333333333333333
    """
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(
            "`scores` and `labels` must be 1-D of the same length, got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    positives = labels.bool()
    num_positive = int(positives.sum())
    if num_positive == 0:
        return float("nan")
    order = torch.argsort(scores.double(), descending=True, stable=True)
    sorted_scores = scores.double()[order]
    true_pos = torch.cumsum(positives[order].double(), 0)
    # Only the last position of each run of tied scores is a threshold.
    last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    true_pos = true_pos[last_of_tie]
    predicted = (torch.nonzero(last_of_tie).squeeze(1) + 1).double()
    precision = true_pos / predicted
    recall = true_pos / num_positive
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_step * precision).sum())


def mean_average_precision(scores: Tensor, labels: Tensor) -> float:
    """Mean of :func:`average_precision` over the labels (columns) that have a positive."""
    values = torch.tensor(
        [average_precision(scores[:, c], labels[:, c]) for c in range(scores.shape[1])]
    )
    return float(values[~values.isnan()].mean())


def f1_scores(scores: Tensor, labels: Tensor, threshold: float = 0.5) -> tuple[float, float]:
    """(micro F1, macro F1) of ``scores >= threshold`` against 0/1 ``labels``, shape (N, L)."""
    predicted = scores >= threshold
    actual = labels.bool()
    true_pos = (predicted & actual).sum(0).double()
    false_pos = (predicted & ~actual).sum(0).double()
    false_neg = (~predicted & actual).sum(0).double()
    micro_denominator = 2 * true_pos.sum() + false_pos.sum() + false_neg.sum()
    micro = float(2 * true_pos.sum() / micro_denominator) if micro_denominator > 0 else 0.0
    per_label_denominator = 2 * true_pos + false_pos + false_neg
    per_label = torch.where(
        per_label_denominator > 0, 2 * true_pos / per_label_denominator.clamp(min=1), 0.0
    )
    return micro, float(per_label.mean())
