"""Binary / multi-label losses forward + backward: torch BCE and focal, xloss BCE, focal, ASL.

Every case is a multi-label batch: (N, C) fp32 logits, 10% positive targets, mean
reduction. BCE runs with ``pos_weight`` 2.0 for every class, in torch and xloss alike.
"torch focal" is RetinaNet's loss in plain torch ops as
``torchvision.ops.sigmoid_focal_loss`` computes it (alpha 0.25, gamma 2), which is what
users without xloss run. The copy floor is a copy of 1.5x the logits: the one pass
reads the logits and the targets and writes the gradient (12 bytes an element).
"""

from __future__ import annotations

from xloss.bench.registry import Table, model_output, register


def _inputs(case: dict):
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (case["n"], case["c"])
    logits = torch.randn(shape, generator=generator).requires_grad_()  # N x C
    target = (torch.rand(shape, generator=generator) < 0.1).float()  # 10% positives
    pos_weight = torch.full((case["c"],), 2.0)
    return logits, target, pos_weight


def _training_step(loss_fn, case: dict, in_place: bool = False):
    logits, target, pos_weight = _inputs(case)

    def step():
        source = model_output(logits) if in_place else logits
        loss_fn(source, target, pos_weight).backward()
        logits.grad = None  # the gradient is part of the step's memory, not the baseline

    return step


def torch_bce(case: dict):
    import torch.nn.functional as F

    return _training_step(
        lambda x, y, pw: F.binary_cross_entropy_with_logits(x, y, pos_weight=pw), case
    )


def torch_focal(case: dict):
    """torchvision.ops.sigmoid_focal_loss's arithmetic (alpha 0.25, gamma 2), mean."""
    import torch
    import torch.nn.functional as F

    def focal(x, y, pos_weight, alpha=0.25, gamma=2.0):
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * ((1 - p_t) ** gamma)
        alpha_t = alpha * y + (1 - alpha) * (1 - y)
        return (alpha_t * loss).mean()

    return _training_step(focal, case)


def _xloss(name: str, in_place: bool):
    def setup(case: dict):
        import xloss

        def loss_fn(x, y, pos_weight):
            if name == "bce":
                return xloss.binary_cross_entropy_with_logits(
                    x, y, pos_weight=pos_weight, inplace_backward=in_place
                )
            if name == "focal":
                return xloss.sigmoid_focal_loss(x, y, inplace_backward=in_place)
            return xloss.asymmetric_loss(x, y, inplace_backward=in_place)

        return _training_step(loss_fn, case, in_place)

    return setup


def _cases(shapes):
    return [dict(n=n, c=c) for n, c in shapes]


register(
    Table(
        name="binary",
        title="binary / multi-label forward + backward (fp32, 10% positives, mean; "
        "BCE with pos_weight 2.0; focal alpha 0.25 gamma 2; ASL 1, 4, clip 0.05)",
        cases=_cases([(4096, 1000), (256, 20000), (65536, 80)]),
        quick_cases=_cases([(1024, 1000)]),
        variants={
            "torch BCE": torch_bce,
            "torch focal": torch_focal,
            "xloss BCE": _xloss("bce", False),
            "xloss BCE in place": _xloss("bce", True),
            "xloss focal": _xloss("focal", False),
            "xloss focal in place": _xloss("focal", True),
            "xloss ASL": _xloss("asl", False),
            "xloss ASL in place": _xloss("asl", True),
        },
        bytes_moved=lambda case: 12 * case["n"] * case["c"],  # logits + target in, grad out
        input_bytes=lambda case: 4 * case["n"] * case["c"],
        copy_floor_bytes=lambda case: 6 * case["n"] * case["c"],  # a copy reads and writes
        label=lambda case: f"N={case['n']} C={case['c']}",
    )
)
