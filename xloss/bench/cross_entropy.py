"""Cross-entropy forward + backward: torch eager, torch.compile, xloss, xloss in place."""

from __future__ import annotations

from xloss.bench.registry import Table, model_output, register


def _inputs(case: dict):
    import torch

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(case["n"], case["v"], generator=generator).requires_grad_()  # N x V
    target = torch.randint(0, case["v"], (case["n"],), generator=generator)
    return logits, target


def _training_step(loss_fn, logits, target):
    def step():
        loss_fn(logits, target).backward()
        logits.grad = None  # the gradient is part of the step's memory, not the baseline

    return step


def torch_eager(case: dict):
    import torch.nn.functional as F

    eps = case["eps"]
    logits, target = _inputs(case)
    return _training_step(lambda x, t: F.cross_entropy(x, t, label_smoothing=eps), logits, target)


def torch_compile(case: dict):
    import torch
    import torch.nn.functional as F

    eps = case["eps"]
    logits, target = _inputs(case)
    compiled = torch.compile(lambda x, t: F.cross_entropy(x, t, label_smoothing=eps))
    return _training_step(compiled, logits, target)


def xloss_default(case: dict):
    import xloss

    eps = case["eps"]
    logits, target = _inputs(case)
    return _training_step(
        lambda x, t: xloss.cross_entropy(x, t, label_smoothing=eps), logits, target
    )


def xloss_inplace(case: dict):
    import xloss

    eps = case["eps"]
    logits, target = _inputs(case)

    loss_fn = lambda x, t: xloss.cross_entropy(  # noqa: E731
        model_output(x), t, label_smoothing=eps, inplace_backward=True
    )
    return _training_step(loss_fn, logits, target)


def _cases(shapes, smoothings):
    return [dict(n=n, v=v, eps=eps) for n, v in shapes for eps in smoothings]


register(
    Table(
        name="cross_entropy",
        title="cross-entropy forward + backward (fp32, mean reduction)",
        cases=_cases([(4096, 32000), (8192, 50257), (2048, 128256)], [0.0, 0.1]),
        quick_cases=_cases([(1024, 32000)], [0.1]),
        variants={
            "torch eager": torch_eager,
            "torch.compile": torch_compile,
            "xloss": xloss_default,
            "xloss in place": xloss_inplace,
        },
        input_bytes=lambda case: 4 * case["n"] * case["v"],
        copy_floor_bytes=lambda case: 4 * case["n"] * case["v"],  # read + write the logits
        label=lambda case: f"N={case['n']} V={case['v']} eps={case['eps']}",
        bandwidth=False,
    )
)
