"""What ``xloss bench`` measures: tables of cases x variants, registered by name.

A :class:`Table` lists its cases (full and ``--quick`` sets) and its variants. A variant
is a setup function: given a case it creates the inputs and returns a ``step`` callable
that runs one forward + backward. Each (case, variant) runs in a fresh subprocess (see
:mod:`xloss.bench.worker`), so peak memory is that of the step alone. Another table
(linear cross-entropy, say) is one more :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Step = Callable[[], None]
Setup = Callable[[dict], Step]


@dataclass
class Table:
    name: str
    title: str
    cases: list[dict]
    quick_cases: list[dict]
    variants: dict[str, Setup] = field(default_factory=dict)
    # bytes one step must move at least (for the effective bandwidth)
    bytes_moved: Callable[[dict], int] = lambda case: 0
    # bytes of the main input, to express memory as a multiple of it
    input_bytes: Callable[[dict], int] = lambda case: 0
    label: Callable[[dict], str] = lambda case: str(case)
    # show the effective bandwidth and its share of the STREAM triad
    bandwidth: bool = True
    # bytes of a copy whose time (read + write, measured in the worker) is the floor
    copy_floor_bytes: Callable[[dict], int] | None = None


TABLES: dict[str, Table] = {}


def register(table: Table) -> Table:
    TABLES[table.name] = table
    return table


def load_tables() -> dict[str, Table]:
    """Import the modules that register tables."""
    from xloss.bench import (  # noqa: F401
        binary,
        cross_entropy,
        linear_cross_entropy,
        training_step,
    )

    return TABLES


def model_output(logits):
    """The leaf's storage as a non-leaf, as a model's logits are (no copy): in place on
    the leaf itself raises, as PyTorch's in-place ops do."""
    import torch

    class ModelOutput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.detach()

        @staticmethod
        def backward(ctx, grad):
            return grad

    return ModelOutput.apply(logits)
