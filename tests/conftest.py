"""Test-session setup.

TRITON_INTERPRET=1 lets the Triton kernels run on CPU tensors (Triton's interpreter) when
a test forces ``xloss.backends.use("triton")``. Triton reads it when a kernel is defined,
so it is set here, before any test imports xloss's Triton module. Nothing else is
affected: without a forced "triton", CPU tensors run on numba or torch as always.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_process_group():
    """A gloo process group of one rank in this process (vocab-parallel tests)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
