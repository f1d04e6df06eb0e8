"""Test-session setup.

TRITON_INTERPRET=1 lets the Triton kernels run on CPU tensors (Triton's interpreter) when
a test forces ``xloss.backends.use("triton")``. Triton reads it when a kernel is defined,
so it is set here, before any test imports xloss's Triton module. Nothing else is
affected: without a forced "triton", CPU tensors run on numba or torch as always.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
