"""Gradients that must not be differentiated again raise at the second backward.

The kernels compute the gradient in the forward pass; their backward only scales it. Under
``create_graph=True`` (MAML, gradient penalties, Hessian products, ``torch.func.jacrev``
of ``torch.func.grad``) such a gradient would be treated as a constant and the second
derivative would silently miss the softmax's curvature. ``torch.is_grad_enabled()`` is
True inside a backward exactly when ``create_graph=True``; there the gradient is passed
through :class:`SecondOrderError`, whose own backward raises.

The error node needs an input that is connected to the logits in the autograd graph, or
the tagged gradient would not require grad and a later ``grad_W = g^T h`` would still
come out silently wrong. :func:`grad_anchor` makes one: the sum of an empty slice of each
input, a 0-dim tensor whose graph holds no input's memory. The Functions take it as an
extra input and save it (saving their own output instead would break callers that scale
the loss in place, e.g. ``loss /= accumulation_steps``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

WAY_OUT = (
    'Run the call under `with xloss.backends.use("torch"):` (plain torch ops, differentiable '
    "twice), or do not differentiate this gradient again."
)


def second_order_message(what: str) -> str:
    return (
        f"{what} computed its gradient in the forward pass (fused kernel) and cannot be "
        "differentiated twice: the gradient from torch.autograd.grad(..., "
        f"create_graph=True) is used in a second backward here. {WAY_OUT}"
    )


class SecondOrderError(torch.autograd.Function):
    """Identity on ``grad`` whose backward raises ``message`` (a RuntimeError)."""

    @staticmethod
    def forward(grad: Tensor, anchor: Tensor, message: str) -> Tensor:
        return grad.view_as(grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[2]

    @staticmethod
    def backward(ctx, _grad):
        raise RuntimeError(ctx.message)


def grad_anchor(*tensors: Tensor | None) -> Tensor | None:
    """A 0-dim tensor connected in the autograd graph to those ``tensors`` that require
    grad (None when none does); it holds none of their memory."""
    parts = [t.reshape(-1)[:0].sum() for t in tensors if t is not None and t.requires_grad]
    if not parts:
        return None
    # a sum of adds, not torch.stack: under autocast stack refuses to promote fp16 with
    # bf16 ("Unexpected floating ScalarType in at::autocast::prioritize")
    return functools.reduce(torch.add, parts)


def first_order_only(grad: Tensor | None, anchor: Tensor, what: str) -> Tensor | None:
    """``grad`` as it is, or under ``create_graph=True`` tagged to raise when differentiated.

    ``anchor`` must be connected to the inputs in the autograd graph (see module doc).
    """
    if grad is None or anchor is None or not torch.is_grad_enabled():
        return grad
    return SecondOrderError.apply(grad, anchor, second_order_message(what))


class KernelFunction(torch.autograd.Function):
    """Base of the autograd Functions around xloss's kernels: reverse mode only.

    ``torch.func.grad`` and ``vjp`` work (``setup_context`` form); ``vmap`` raises, naming
    the way out. Under forward-mode AD (``jvp``, ``jacfwd``, ``hessian``, a dual level)
    ``xloss.backends.select`` picks torch and ``linear_cross_entropy`` forms its logits,
    so the kernels (which compute no tangent) are not reached; a Function reached anyway
    would raise PyTorch's "must implement the jvp function": a ``jvp`` staticmethod would
    stop torch.compile (Dynamo does not trace Functions that define one).
    """

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(
            "torch.func.vmap cannot batch xloss's fused kernels. Run the call under "
            '`with xloss.backends.use("torch"):` with validate_args=False (plain torch ops, '
            "which vmap batches), or loop over the batch."
        )


def hand_over(ctx, what: str) -> None:
    """Mark ``ctx``'s stored gradients as handed over by this backward; raise if an
    earlier backward through the same graph (``retain_graph=True``) already did.

    On a GPU the kernels' backward scales the stored gradient in place by
    ``grad_output`` (a test for 1 on the host would synchronise), so a second backward
    would scale it twice: it raises instead.
    """
    if getattr(ctx, "handed_over", False):
        raise RuntimeError(
            f"{what} on the Triton backend scales its stored gradient in place and hands it "
            "over at the first backward; a second backward through the same graph "
            "(retain_graph=True) cannot reuse it. Compute the loss again for each backward, "
            'or run the call under `with xloss.backends.use("torch"):`.'
        )
    ctx.handed_over = True


def all_ones(grad_output: Tensor) -> bool:
    """Every factor of ``grad_output`` is exactly 1, so a backward may hand over its stored
    gradient unscaled (host tensors only: reads values). A single factor, the usual
    ``loss.backward()``, takes one read instead of two torch ops."""
    if grad_output.numel() == 1:
        return grad_output.item() == 1.0
    return bool((grad_output == 1).all())


def is_functorch_wrapped(tensor: Tensor) -> bool:
    """True for a tensor of a ``torch.func`` transform (its storage cannot reach a kernel)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)
