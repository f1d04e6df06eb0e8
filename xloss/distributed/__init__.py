"""Losses over ``torch.distributed``: vocab-parallel cross-entropy and global normalisers."""

from xloss.distributed.normalizer import global_token_count
from xloss.distributed.vocab_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

__all__ = [
    "global_token_count",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]
