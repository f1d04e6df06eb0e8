"""xloss: classification losses for PyTorch, right on every shape, mask and dtype."""

from xloss import distributed  # noqa: F401  (xloss.distributed.vocab_parallel_...)
from xloss.functional import cross_entropy
from xloss.nn import CrossEntropyLoss

__version__ = "0.1.0"

__all__ = ["CrossEntropyLoss", "cross_entropy"]
