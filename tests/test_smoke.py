import torch

import xloss


def test_import_exposes_cross_entropy():
    assert callable(xloss.cross_entropy)
    loss = xloss.cross_entropy(torch.zeros(2, 4), torch.tensor([1, 3]))
    assert torch.allclose(loss, torch.log(torch.tensor(4.0)))


def test_import_is_light():
    """`import xloss` loads no numba, triton or torch._dynamo (seconds each); they load on use."""
    import subprocess
    import sys

    code = (
        "import sys, xloss; "
        "print(sorted(m for m in ('numba', 'torch._dynamo', 'triton') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
