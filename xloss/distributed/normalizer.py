"""Global token counts: the normaliser that makes data-parallel sums equal the global mean."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from xloss._core.masking import build_mask
from xloss._core.validation import check_ignore_index, check_tensor
from xloss.distributed._comm import resolve_group


def global_token_count(
    target: Tensor,
    ignore_index: int | None = -100,
    mask: Tensor | None = None,
    group=None,
) -> Tensor:
    r"""The number of kept target positions, summed over the ranks of ``group``.

    A position is kept unless its target equals ``ignore_index`` or ``mask`` is False
    there, exactly as in the ``"mean"`` of :func:`xloss.cross_entropy`. The count is an
    all-reduce (SUM) of an int64 tensor on the target's device; nothing is read on the
    host, so it can be passed straight to ``normalizer=``.

    Why: when each rank (and each gradient-accumulation micro-batch) takes the mean over
    its own tokens, and the ranks' gradients are then averaged, short sequences weigh
    more than long ones: the result is not the mean over all tokens (the classic
    gradient-accumulation loss bug). Summing each micro-batch's loss and dividing by the
    global count of the whole optimizer step gives exactly the global token mean:

    .. math::
        \sum_{r}\sum_{k} \frac{\sum_{i \in (r, k)} \ell_i}{N_{\mathrm{tokens}}}
        = \frac{1}{N_{\mathrm{tokens}}} \sum_{\text{all tokens}} \ell_i

    Note that DDP averages gradients over ranks: multiply such a loss by the world size
    (or all-reduce the gradients with SUM) to get the gradient of the global mean.

    Args:
        target: class indices of this rank (any shape).
        ignore_index: target value whose positions are not counted; None counts all.
        mask: bool, the target's shape; False positions are not counted.
        group: the data-parallel process group; None for the default group.

    Shape:
        - target, mask: any shape (the same).
        - output: a 0-dim int64 tensor on the target's device.

    Example (gradient accumulation over micro-batches; here a 1-process group):
        >>> import torch, torch.distributed as dist, xloss
        >>> from xloss.distributed import global_token_count
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> weight = torch.zeros(4, 3, requires_grad=True)
        >>> micro_batches = [
        ...     (torch.ones(2, 5, 4), torch.tensor([[0, 1, 2, -100, -100], [1] * 5])),
        ...     (torch.ones(1, 5, 4), torch.tensor([[2, -100, -100, -100, -100]])),
        ... ]
        >>> tokens = sum(global_token_count(t) for _, t in micro_batches)  # whole step
        >>> tokens
        tensor(9)
        >>> for hidden, target in micro_batches:
        ...     loss = xloss.cross_entropy(hidden @ weight, target, class_dim=-1,
        ...                                reduction="sum", normalizer=tokens)
        ...     loss.backward()  # accumulates the gradient of the mean over all 9 tokens
        >>> loss.detach()  # the last micro-batch's share: 1 of the 9 tokens
        tensor(0.1221)
        >>> dist.destroy_process_group()
    """
    check_tensor("target", target)
    check_ignore_index(ignore_index)
    if target.is_floating_point():
        index_target = None  # probability targets: no ignore_index
    else:
        index_target = target
    keep = build_mask(
        target.shape, target.device, index_target=index_target, ignore_index=ignore_index, mask=mask
    )
    group = resolve_group(group)
    if keep is None:
        count = torch.full((), target.numel(), dtype=torch.int64, device=target.device)
    else:
        count = keep.sum(dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count
