"""Drop-in adapters for loss APIs that users already have, with their known bugs fixed.

Each submodule mirrors one upstream library: same names, signatures, argument names,
defaults and return types, computed through xloss's functionals. Every docstring quotes
the upstream signature and lists each deliberate difference. The submodules are imported
on first use, so ``import xloss.compat`` costs nothing::

    from xloss.compat.speechbrain import bce_loss, nll_loss
    from xloss.compat.paddleclas import MultiLabelLoss, MultiLabelAsymmetricLoss
    from xloss.compat.torchreid import CrossEntropyLoss
    from xloss.compat.liger import LigerCrossEntropyLoss
    from xloss.compat.timm import BinaryCrossEntropy, LabelSmoothingCrossEntropy
    from xloss.compat.torch import linear_cross_entropy

None of the upstream packages is imported or needed.
"""

from __future__ import annotations

import importlib

SUBMODULES = ("liger", "paddleclas", "speechbrain", "timm", "torch", "torchreid")

__all__ = list(SUBMODULES)


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(SUBMODULES))
