"""Linear + cross-entropy forward + backward: the three bare GEMMs, torch, xloss.

- ``3 bare GEMMs``: logits = x W^T, grad_x = G W, grad_W = G^T x into preallocated
  outputs, the floor any linear cross-entropy pays (first, so "vs" reads GEMMs / time).
- ``torch``: ``F.cross_entropy(x @ W.T, y)`` with the N x V logits materialised.
- ``xloss``: ``xloss.linear_cross_entropy(x, W, y)``, chunked.

Extra memory is given as a multiple of the N x V fp32 logits, and includes the gradients
(N x H + V x H) every variant but the bare GEMMs returns. ``benchmarks/linear_ce.py``
times the same variants interleaved in one process, for ratios robust to a busy machine.
"""

from __future__ import annotations

from xloss.bench.registry import Table, register


def _inputs(case: dict, requires_grad: bool = True):
    import torch

    generator = torch.Generator().manual_seed(0)
    n, h, v = case["n"], case["h"], case["v"]
    x = torch.randn(n, h, generator=generator).requires_grad_(requires_grad)  # N x H
    w = (torch.randn(v, h, generator=generator) / h**0.5).requires_grad_(requires_grad)  # V x H
    y = torch.randint(0, v, (n,), generator=generator)
    return x, w, y


def bare_gemms(case: dict):
    import torch

    x, w, _ = _inputs(case, requires_grad=False)
    logits = torch.empty(case["n"], case["v"])  # N x V
    grad_x = torch.empty_like(x)  # N x H
    grad_w = torch.empty_like(w)  # V x H

    def step():
        torch.mm(x, w.T, out=logits)
        torch.mm(logits, w, out=grad_x)
        torch.mm(logits.T, x, out=grad_w)

    return step


def torch_matmul(case: dict):
    import torch.nn.functional as F

    x, w, y = _inputs(case)

    def step():
        F.cross_entropy(x @ w.T, y).backward()
        x.grad = w.grad = None  # the gradients count in the step's memory, not the baseline

    return step


def xloss_chunked(case: dict):
    import xloss

    x, w, y = _inputs(case)

    def step():
        xloss.linear_cross_entropy(x, w, y).backward()
        x.grad = w.grad = None

    return step


VARIANTS = {"3 bare GEMMs": bare_gemms, "torch": torch_matmul, "xloss": xloss_chunked}
SHAPES = [(8192, 512, 32000), (4096, 2048, 32000), (2048, 1024, 128256)]


def _minimal_bytes(case: dict) -> int:
    """Read x and W, write grad_x and grad_W once (fp32): far below the GEMMs' cost."""
    return 4 * 2 * (case["n"] + case["v"]) * case["h"]


register(
    Table(
        name="linear_cross_entropy",
        title="linear + cross-entropy forward + backward (fp32, mean); extra mem x N*V fp32",
        cases=[dict(n=n, h=h, v=v) for n, h, v in SHAPES],
        quick_cases=[dict(n=2048, h=512, v=32000)],
        variants=VARIANTS,
        bytes_moved=_minimal_bytes,
        input_bytes=lambda case: 4 * case["n"] * case["v"],
        label=lambda case: f"N={case['n']} H={case['h']} V={case['v']}",
    )
)
