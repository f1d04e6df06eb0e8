"""Training steps with torch's loss and with ``xloss.cross_entropy``, alternated in one process.

The model and data are those of ``xloss bench --tables training_step``. Steps alternate in
ABBA order (so neither variant always runs second); the script prints the median, the
quartiles and the range of the per-pair ratios torch / xloss, and the ratio of medians.
``part`` = ``step`` times the whole step (forward, backward, AdamW); ``head`` only the
output layer and the loss (forward and backward), on random hidden states; ``loss`` only
the loss (forward and backward) on random logits of the step's shape; ``inside`` runs
whole steps (one model, as ``shared``) and times the loss's own share inside them: its
forward (the call, from the logits to the returned loss) and the backward from
``.backward()`` until the gradient of the head's input exists (the loss's backward and
the head's), per-step medians in microseconds. There the loss runs right after the
model's forward, with the caches full of the model's data, as in training.

``FIRST`` (``torch``, the default, or ``xloss``) is the variant whose model is built
first. Where the loss is a small part of the step (V = 256: under 1% of it), the step
ratio is decided by which model's tensors landed where: with the same loss in both
variants (``FIRST`` = ``same``, torch's loss twice, reported as torch / xloss), the
per-pair median still moves by about 1% between runs. ``FIRST`` = ``shared`` builds one
model (head, batch) and alternates the loss of its steps, so that the steps differ in the
loss alone; ``shared-same`` is its control (torch's loss in both).

``LOSS`` (``step``, ``head`` and ``loss`` parts) picks xloss's variant:
``cross_entropy`` (the default) on the model's logits, or ``linear``:
``xloss.linear_cross_entropy`` with the model's head.

    python benchmarks/interleaved_steps.py V PAIRS [step|head|loss|inside] [FIRST] [LOSS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import xloss
from xloss.bench import training_step

VARIANTS = {"torch": training_step._torch_loss, "xloss": training_step._xloss_cross_entropy}


def head_steps(losses: dict, v: int) -> dict:
    """A step per loss (name: loss of (hidden, head, target)), all on one head and batch."""
    torch.manual_seed(0)
    head = torch.nn.Linear(training_step.DIM, v, bias=False)
    rows = training_step.BATCH * training_step.STEPS_PER_SAMPLE
    hidden = torch.randn(rows, training_step.DIM, requires_grad=True)
    target = torch.randint(0, v, (rows,))
    target[::10] = -100

    def make(loss_fn):
        def step():
            head.weight.grad = None
            hidden.grad = None
            loss_fn(hidden, head, target).backward()

        return step

    return {name: make(loss_fn) for name, loss_fn in losses.items()}


def loss_steps(losses: dict, v: int) -> dict:
    """A step per loss, all on one (N, V) batch of logits (the head is the identity)."""
    torch.manual_seed(0)
    rows = training_step.BATCH * training_step.STEPS_PER_SAMPLE
    logits = torch.randn(rows, v, requires_grad=True)
    target = torch.randint(0, v, (rows,))
    target[::10] = -100
    identity = torch.nn.Identity()

    def make(loss_fn):
        def step():
            logits.grad = None
            loss_fn(logits, identity, target).backward()

        return step

    return {name: make(loss_fn) for name, loss_fn in losses.items()}


def timed_losses(losses: dict, marks: dict) -> dict:
    """Losses of (hidden, head, target) for ``shared_steps`` from ``losses`` (name: loss of
    (logits, target)) that record, under their name in ``marks``, the time of the loss
    call and the time from its return (backward starts right after it) to the gradient
    of ``hidden``, in microseconds."""
    clock = time.perf_counter_ns

    def make(name, loss_fn):
        def loss(hidden, head, target):
            logits = head(hidden)
            start = clock()
            out = loss_fn(logits, target)
            returned = clock()
            hidden.register_hook(
                lambda grad: marks[name]["backward"].append((clock() - returned) / 1e3)
            )
            marks[name]["forward"].append((returned - start) / 1e3)
            return out

        return loss

    return {name: make(name, loss_fn) for name, loss_fn in losses.items()}


def inside(v: int, pairs: int, variants: dict) -> None:
    marks = {name: {"forward": [], "backward": []} for name in variants}
    steps = training_step.shared_steps(dict(v=v), timed_losses(variants, marks))
    for step in steps.values():
        for _ in range(3):
            step()
    for name in marks:
        marks[name] = {"forward": [], "backward": []}
    for i in range(pairs):
        for name in ("torch", "xloss") if i % 2 == 0 else ("xloss", "torch"):
            steps[name]()
    medians = {
        name: {part: statistics.median(values) for part, values in parts.items()}
        for name, parts in marks.items()
    }
    total = {name: sum(parts.values()) for name, parts in medians.items()}
    print(
        f"V={v} inside pairs={pairs}: "
        + "; ".join(
            f"{name} forward {m['forward']:.0f} us + backward with the head {m['backward']:.0f}"
            f" us = {total[name]:.0f} us"
            for name, m in medians.items()
        )
        + f"; xloss saves {total['torch'] - total['xloss']:.0f} us a step"
    )


def main() -> None:
    v, pairs = int(sys.argv[1]), int(sys.argv[2])
    part = sys.argv[3] if len(sys.argv) > 3 else "step"
    first = sys.argv[4] if len(sys.argv) > 4 else "torch"
    if part == "inside":
        inside(v, pairs, {"torch": F.cross_entropy, "xloss": xloss.cross_entropy})
        return
    variants = dict(VARIANTS)
    loss = sys.argv[5] if len(sys.argv) > 5 else "cross_entropy"
    if loss == "linear":
        variants["xloss"] = training_step._xloss_linear
    elif loss != "cross_entropy":
        raise SystemExit(f"LOSS must be cross_entropy or linear, got {loss!r}")
    if first in ("same", "shared-same"):  # the control: torch's loss in both
        variants["xloss"] = VARIANTS["torch"]
    order = ("xloss", "torch") if first == "xloss" else ("torch", "xloss")
    make = dict(
        step=lambda losses: training_step.shared_steps(dict(v=v), losses),
        head=lambda losses: head_steps(losses, v),
        loss=lambda losses: loss_steps(losses, v),
    )[part]
    if first.startswith("shared"):  # one model (or head, or batch) for both variants
        steps = make(variants)
    else:  # a model each, the first built first
        steps = {k: make({k: variants[k]})[k] for k in order}
    for step in steps.values():
        for _ in range(3):
            step()
    times = {name: [] for name in steps}
    for i in range(pairs):
        for name in ("torch", "xloss") if i % 2 == 0 else ("xloss", "torch"):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["torch"], times["xloss"], strict=True)]
    low, _, high = statistics.quantiles(ratios, n=4)
    torch_ms, xloss_ms = (1e3 * statistics.median(times[k]) for k in ("torch", "xloss"))
    print(
        f"V={v} {part} pairs={pairs} first={first} loss={loss}: "
        f"torch {torch_ms:.1f} ms, xloss {xloss_ms:.1f} ms; "
        f"torch/xloss median {statistics.median(ratios):.3f}x (quartiles {low:.2f}-{high:.2f}, "
        f"range {min(ratios):.2f}-{max(ratios):.2f}); ratio of medians {torch_ms / xloss_ms:.3f}x"
    )


if __name__ == "__main__":
    main()
