"""Functional losses: the source of truth for every loss in xloss."""

from xloss.functional.binary import (
    binary_cross_entropy_with_logits,
    multilabel_balance_weights,
    positive_rate,
)
from xloss.functional.cross_entropy import CrossEntropyStats, cross_entropy
from xloss.functional.focal import asymmetric_loss, sigmoid_focal_loss
from xloss.functional.linear_cross_entropy import linear_cross_entropy

__all__ = [
    "CrossEntropyStats",
    "asymmetric_loss",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "multilabel_balance_weights",
    "positive_rate",
    "sigmoid_focal_loss",
]
