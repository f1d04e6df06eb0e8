"""Functional losses: the source of truth for every loss in xloss."""

from xloss.functional.cross_entropy import cross_entropy
from xloss.functional.linear_cross_entropy import linear_cross_entropy

__all__ = ["cross_entropy", "linear_cross_entropy"]
