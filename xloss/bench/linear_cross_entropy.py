"""Linear + cross-entropy forward + backward: the bare GEMMs, torch, torch's chunked op, xloss.

Every case ignores 10% of the targets (``ignore_index=-100``), as a padded batch does.

- ``3 bare GEMMs``: logits = x W^T, grad_x = G W, grad_W = G^T x over the KEPT rows only,
  into preallocated outputs: the floor of a linear cross-entropy that drops ignored rows
  before its GEMMs (first, so "vs" reads GEMMs / time).
- ``torch``: ``F.cross_entropy(x @ W.T, y)`` with the N x V logits materialised.
- ``torch chunked``: torch 2.13's ``F.linear_cross_entropy(x, W, y,
  options=torch.nn.LinearCrossEntropyOptions())`` (label smoothing 0: with smoothing it
  warns and falls back to the materialised path).
- ``xloss``: ``xloss.linear_cross_entropy(x, W, y)``, chunked.

Extra memory is given in MiB and as a multiple of the N x V logits, and includes the
gradients (N x H + V x H) every variant but the bare GEMMs returns. ``dtype`` bf16 cases
run x and W in bf16 (the GEMMs too). ``benchmarks/linear_ce.py`` times the same variants
interleaved in one process, for ratios robust to a busy machine.
"""

from __future__ import annotations

from xloss.bench.registry import Table, register

IGNORED_SHARE = 0.1  # every 10th target is ignore_index


def _dtype(case: dict):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[case.get("dtype", "fp32")]


def _inputs(case: dict, requires_grad: bool = True):
    import torch

    generator = torch.Generator().manual_seed(0)
    n, h, v = case["n"], case["h"], case["v"]
    dtype = _dtype(case)
    x = torch.randn(n, h, generator=generator).to(dtype)  # N x H
    w = (torch.randn(v, h, generator=generator) / h**0.5).to(dtype)  # V x H
    y = torch.randint(0, v, (n,), generator=generator)
    y[:: round(1 / IGNORED_SHARE)] = -100
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), y


def bare_gemms(case: dict):
    import torch

    x, w, y = _inputs(case, requires_grad=False)
    x = x[y != -100]  # kept rows x H
    logits = torch.empty(x.shape[0], case["v"], dtype=x.dtype)  # kept rows x V
    grad_x = torch.empty_like(x)  # kept rows x H
    grad_w = torch.empty_like(w)  # V x H

    def step():
        torch.mm(x, w.T, out=logits)
        torch.mm(logits, w, out=grad_x)
        torch.mm(logits.T, x, out=grad_w)

    return step


def _training_step(loss_fn, case: dict):
    x, w, y = _inputs(case)

    def step():
        loss_fn(x, w, y).backward()
        x.grad = w.grad = None  # the gradients count in the step's memory, not the baseline

    return step


def torch_matmul(case: dict):
    import torch.nn.functional as F

    return _training_step(lambda x, w, y: F.cross_entropy(x @ w.T, y), case)


def torch_chunked(case: dict):
    import torch
    import torch.nn.functional as F

    options = torch.nn.LinearCrossEntropyOptions()
    return _training_step(lambda x, w, y: F.linear_cross_entropy(x, w, y, options=options), case)


def xloss_chunked(case: dict):
    import xloss

    return _training_step(xloss.linear_cross_entropy, case)


VARIANTS = {
    "3 bare GEMMs": bare_gemms,
    "torch": torch_matmul,
    "torch chunked": torch_chunked,
    "xloss": xloss_chunked,
}
SHAPES = [(4096, 512, 32000), (8192, 512, 32000), (4096, 2048, 32000), (2048, 1024, 128256)]


register(
    Table(
        name="linear_cross_entropy",
        title="linear + cross-entropy forward + backward (mean, 10% of targets ignored; "
        "extra mem x N*V logits)",
        cases=[dict(n=n, h=h, v=v) for n, h, v in SHAPES]
        + [dict(n=4096, h=512, v=32000, dtype="bf16")],
        quick_cases=[dict(n=1024, h=256, v=32000)],
        variants=VARIANTS,
        input_bytes=lambda case: 4 * case["n"] * case["v"],
        label=lambda case: f"N={case['n']} H={case['h']} V={case['v']} {case.get('dtype', 'fp32')}",
        bandwidth=False,
    )
)
