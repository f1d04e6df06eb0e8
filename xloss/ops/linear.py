"""Chunked linear + cross-entropy: the N x V logits are never held in memory at once.

The row kernel (``row_loss_and_grad_``) turns each chunk of logits into its gradient in
place; three GEMMs per chunk do the rest. The numba kernel from ``xloss.ops.kernel`` runs
on CPU when it is importable and available, the portable torch twin everywhere else.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from xloss import backends
from xloss._core.validation import autocast_off
from xloss.ops.row_grad import row_loss_and_grad_ as portable_row_loss_and_grad_
from xloss.ops.rows import cross_entropy_rows, row_stats
from xloss.ops.second_order import (
    KernelFunction,
    first_order_only,
    grad_anchor,
    hand_over,
    is_functorch_wrapped,
)

# Rows per chunk (see `_run_chunks` for the profile behind these numbers): as many rows as
# the memory budget allows, because the forward GEMM repacks the whole weight once per chunk;
# the chunk's logits are kept within a share of the V x H weight gradient that must exist
# anyway (torch 2.13's chunked op holds about one more weight's worth), never below CHUNK_BYTES.
CHUNK_BYTES = 48 * 2**20  # the budget's floor: 393 rows at V = 32000 in fp32
TARGET_ROWS = 2048  # beyond this the forward GEMM's per-chunk repacking is under ~3%
WEIGHT_SHARE = 1.0  # logits chunk <= the weight gradient's bytes


class LinearCrossEntropyConfig(NamedTuple):
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    chunk_size: int | None = None  # rows per chunk; None: default_chunk_size
    per_row: bool = False  # True: return the loss per row and compute gradients in backward
    grad_enabled: bool = True  # the caller's grad mode (forward always runs without grad)
    accum_dtype: torch.dtype | None = None  # grad_weight/grad_bias; None: fp32 (fp64 for fp64)
    # None, or ((K, 2), (K,) int64) buffers the forward's row kernel fills with (lse,
    # entropy) and the argmax of each row, in the same pass as the loss
    stats: tuple[Tensor, Tensor] | None = None


def _on_triton(device: torch.device, dtype: torch.dtype) -> bool:
    return backends.select(device.type, dtype) == "triton"


def select_row_kernel_and_dtype(device: torch.device, input_dtype: torch.dtype):
    """(row kernel, dtype of the GEMMs and logits) for ``input_dtype`` rows on ``device``.

    The Triton kernel reads fp16/bf16 logits natively, so its chunks stay in the input
    dtype (tensor-core GEMMs, half the logits memory). So does the numba kernel for bf16:
    bf16 GEMMs ran 2.5x faster than fp32 ones on this project's CPU (avx512_bf16; 393 x
    512 x 32000, interleaved, 2.19-3.29 over 15 rounds), and the kernel widens each row to
    fp32 itself. The other kernels compute in ``promote_types(input_dtype, float32)``.
    """
    if _on_triton(device, input_dtype):
        from xloss.ops.triton.cross_entropy import row_loss_and_grad_

        return row_loss_and_grad_, input_dtype
    if input_dtype == torch.bfloat16 and backends.select(device.type, input_dtype) == "numba":
        from xloss.ops.kernel import kernel_available, row_loss_and_grad_

        if kernel_available():
            return row_loss_and_grad_, input_dtype
    dtype = torch.promote_types(input_dtype, torch.float32)
    return select_row_kernel(device, dtype), dtype


PRODUCT_SLICE_BYTES = 64 * 2**20  # temporary of a mixed-dtype accumulation


def _add_product(total: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """total += a @ b in total's dtype; ``first``: total = a @ b, so that ``total`` need
    not be zero-filled (and read back) before the first chunk. A bf16/fp16 product (GEMM
    in the operands' dtype, rounded once per chunk) is added in slices of rows of
    ``total``, so the temporary stays near ``PRODUCT_SLICE_BYTES`` instead of a whole
    V x H copy."""
    if a.dtype == total.dtype:
        if first:
            torch.mm(a, b, out=total)
        else:
            total.addmm_(a, b)
        return
    step = max(1, PRODUCT_SLICE_BYTES // max(1, total.shape[1] * a.element_size()))
    for start in range(0, total.shape[0], step):
        part = torch.mm(a[start : start + step], b)
        if first:
            total[start : start + step].copy_(part)
        else:
            total[start : start + step].add_(part)


def select_row_kernel(logits_device: torch.device, dtype: torch.dtype):
    """The row kernel ``xloss.backends.select`` picks (numba for fp32 CPU logits), else
    the torch twin."""
    backend = backends.select(logits_device.type, dtype)
    if backend == "numba" and dtype == torch.float32:
        try:
            from xloss.ops.kernel import row_loss_and_grad_
        except ImportError:
            return portable_row_loss_and_grad_
        return row_loss_and_grad_
    return portable_row_loss_and_grad_


def default_chunk_size(
    num_rows: int, num_classes: int, dtype: torch.dtype, hidden_size: int = 0
) -> int:
    """Rows per chunk from a memory budget: ``TARGET_ROWS`` rows, unless their logits would
    take more than ``WEIGHT_SHARE`` of the (num_classes x hidden_size) weight gradient; at
    least ``CHUNK_BYTES`` of logits; then evened out so that no chunk is a small remainder.

    At (V, H) = (32000, 512) this allows 512 rows (62.5 MiB; 461 per chunk for 3686 rows),
    at (32000, 2048) 2048 rows (250 MiB; 2 chunks of 1843 for 3686 rows) and
    at (128256, 1024) 1024 rows (501 MiB of logits next to the 501 MiB weight gradient;
    2 chunks of 922 for 1843 rows).
    """
    item_bytes = torch.finfo(dtype).bits // 8
    row_bytes = max(num_classes, 1) * item_bytes
    weight_budget = int(WEIGHT_SHARE * num_classes * hidden_size * item_bytes)
    rows = max(CHUNK_BYTES // row_bytes, min(TARGET_ROWS, weight_budget // row_bytes))
    rows = max(1, min(num_rows, rows))
    num_chunks = max(1, -(-num_rows // rows))
    return max(1, -(-num_rows // num_chunks))


class LinearCrossEntropyFunction(KernelFunction):
    """Sum (or per-row values) of cross-entropy over ``input @ weight.T + bias``, in chunks.

    Inputs: ``input`` (K, H) rows to score (dropped rows already removed), ``weight``
    (V, H), ``bias`` (V) or None, ``target`` (K) class indices, ``class_weight`` (V) or
    None, ``scale`` a float or 0-dim tensor multiplying the summed loss (1/denominator
    for a mean), a ``LinearCrossEntropyConfig``, ``needs_grad`` (input, weight, bias) and
    ``anchor`` (``xloss.ops.second_order.grad_anchor``). Everything is computed in
    ``promote_types(input.dtype, float32)``. Outputs: the loss and, non-differentiable,
    the gradients computed in forward (empty when not).

    Forward, reduced (``per_row=False``): returns scale * sum_i loss_i, and since the
    scale is known the gradients are computed right away:
        1. logits = input[r] @ weight.T + bias for a chunk of rows r (chunk x V buffer,
           reused for every chunk)
        2. the row kernel overwrites logits with g = d(scale * loss[r]) / d logits
        3. grad_input[r] = g @ weight
        4. grad_weight += g.T @ input[r] and grad_bias += g.sum(0), in fp32 (or fp64)
    Backward, reduced: multiply the stored gradients by grad_output.

    Forward, per row (``per_row=True``): steps 1-2 per chunk, keeping only the loss;
    returns loss (K). Backward, per row: steps 1-4 again with grad_output[r] as the
    row kernel's per-row gradient scale, so weights applied after the loss are exact.

    Second order (backward under ``create_graph=True``): per-row and float64 calls save
    their inputs and recompute the gradients from torch ops that autograd records (the
    K x V logits are then held); other calls return gradients that raise when
    differentiated again (``xloss.ops.second_order``).
    """

    @staticmethod
    def forward(input, weight, bias, target, class_weight, scale, config, needs_grad, anchor):
        dtype = torch.promote_types(input.dtype, torch.float32)
        empty = input.new_empty(0, dtype=dtype)
        if config.per_row:
            loss, _ = _run_chunks(input, weight, bias, target, class_weight, 1.0, config, None)
            return loss, empty, empty, empty
        loss, grads = _run_chunks(
            input, weight, bias, target, class_weight, scale, config, needs_grad
        )
        loss = loss.sum() * torch.as_tensor(scale, dtype=dtype, device=input.device)
        return (loss, *(empty if g is None else g for g in grads))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, class_weight, scale, config, needs_grad, anchor = inputs
        ctx.config = config._replace(stats=None)  # the forward filled them already
        ctx.scale = scale
        ctx.on_device = _on_triton(input.device, input.dtype)  # a Triton kernel scales
        ctx.host = input.device.type == "cpu" and not ctx.on_device
        ctx.needs_grad = needs_grad
        ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        # float64 and per-row calls keep what a differentiable recompute needs, so their
        # gradients can be differentiated again; the others raise at a second backward.
        ctx.twice_differentiable = config.per_row or input.dtype == torch.float64
        saved = (input, weight, bias, target, class_weight) if ctx.twice_differentiable else ()
        ctx.num_saved = len(saved)
        ctx.save_for_backward(*saved, anchor, *output[1:])

    @staticmethod
    def backward(ctx, grad_output, *_grads_of_grads):
        saved = ctx.saved_tensors
        anchor = saved[ctx.num_saved]
        if grad_output is None:
            return (None,) * 9
        if torch.is_grad_enabled() and ctx.twice_differentiable:
            grads = _differentiable_grads(ctx, saved[: ctx.num_saved], grad_output)
            return (*grads, None, None, None, None, None, None)
        if ctx.config.per_row:
            input, weight, bias, target, class_weight = saved[: ctx.num_saved]
            _, grads = _run_chunks(
                input, weight, bias, target, class_weight, grad_output, ctx.config,
                ctx.needs_grad,
            )  # fmt: skip
        else:
            grads = saved[ctx.num_saved + 1 :]  # empty where not needed
            # The common loss.backward() passes 1: on CPU the stored gradients are handed
            # over as they are. On a GPU that test would synchronise: a kernel scales them
            # in place, doing nothing on the device when grad_output is 1.
            traced = torch.compiler.is_compiling() or is_functorch_wrapped(grad_output)
            if ctx.on_device and not traced:
                hand_over(ctx, "xloss.linear_cross_entropy")
                grads = tuple(_scale_in_place(g, grad_output) for g in grads)
            elif not (ctx.host and bool(grad_output == 1)):
                grads = tuple(g * grad_output.to(g.dtype) for g in grads)
        out = []
        for grad, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_grad, strict=True):
            if grad is not None and needed:
                grad = first_order_only(grad.to(dtype), anchor, "xloss.linear_cross_entropy")
            else:
                grad = None
            out.append(grad)
        return (*out, None, None, None, None, None, None)


def _scale_in_place(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad`` (any shape, contiguous) times the 0-dim ``grad_output`` in place, on the
    device, skipped there when it is 1 (``xloss.ops.triton.cross_entropy.scale_rows_``)."""
    from xloss.ops.triton.cross_entropy import scale_rows_

    if grad.numel() == 0:
        return grad
    if not grad.is_contiguous():
        return grad.mul_(grad_output.to(grad.dtype))
    return scale_rows_(grad.view(-1, grad.shape[-1]), grad_output).view(grad.shape)


def _differentiable_grads(ctx, saved, grad_output):
    """Gradients of input, weight and bias from torch ops that autograd records, for a
    backward with ``create_graph=True``: the K x V logits are held (plain autograd would
    hold them too)."""
    input, weight, bias, target, class_weight = saved
    config = ctx.config
    inputs = [t for t, n in zip((input, weight, bias), ctx.needs_grad, strict=True) if n]
    with torch.enable_grad():
        scale = 1.0 if config.per_row else ctx.scale
        if isinstance(scale, Tensor):
            scale = scale.detach()
        constant_weight = None if class_weight is None else class_weight.detach()
        loss = _plain_rows(input, weight, bias, target, constant_weight, scale, config)
        grads = iter(torch.autograd.grad(loss, inputs, grad_output, create_graph=True))
    return tuple(
        next(grads).to(dtype) if n else None
        for n, dtype in zip(ctx.needs_grad, ctx.dtypes, strict=True)
    )


@torch.compiler.disable(
    reason="xloss.linear_cross_entropy runs its chunk loop (a row kernel per chunk of logits) "
    "eagerly: a graph break (under xloss.backends.use(\"torch\") too), so compile the "
    "model with fullgraph=False"
)
def linear_cross_entropy_rows(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    scale: float | Tensor,
    config: LinearCrossEntropyConfig,
) -> Tensor:
    """``LinearCrossEntropyFunction.apply``, hidden from torch.compile's tracer (numba and
    a data-dependent loop inside). Plain torch ops instead when backend "torch" is forced,
    or when ``class_weight`` or ``scale`` (a normalizer) requires grad: the chunked
    function differentiates input, weight and bias only."""
    side_grad = config.grad_enabled and any(
        isinstance(t, Tensor) and t.requires_grad for t in (class_weight, scale)
    )
    if side_grad or backends.forced() == "torch":
        return _plain_rows(input, weight, bias, target, class_weight, scale, config)
    needs_grad = None  # no grad mode: the loss only
    if config.grad_enabled:
        needs_grad = tuple(t is not None and t.requires_grad for t in (input, weight, bias))
    anchor = grad_anchor(input, weight, bias) if config.grad_enabled else None
    return LinearCrossEntropyFunction.apply(
        input, weight, bias, target, class_weight, scale, config, needs_grad, anchor
    )[0]


def _plain_rows(input, weight, bias, target, class_weight, scale, config):
    """What LinearCrossEntropyFunction returns, from autograd-tracked torch ops: the K x V
    logits are held, and the result can be differentiated twice. Negative targets mark
    dropped rows (loss 0), as in the row kernels."""
    dtype = torch.promote_types(input.dtype, torch.float32)
    with autocast_off(input.device.type):
        logits = torch.nn.functional.linear(input, weight, bias).to(dtype)  # K x V
    scored = target >= 0
    loss = cross_entropy_rows(
        logits, torch.where(scored, target, 0), class_weight=class_weight,
        label_smoothing=config.label_smoothing, z_loss=config.z_loss, softcap=config.softcap,
    )  # fmt: skip
    loss = torch.where(scored, loss, 0.0)
    if config.stats is not None:
        values, predicted = row_stats(logits, config.softcap)
        config.stats[0].copy_(values)
        config.stats[1].copy_(predicted)
    return loss if config.per_row else loss.sum() * scale


def _run_chunks(input, weight, bias, target, class_weight, grad_scale, config, needs_grad):
    """Steps 1-4 of LinearCrossEntropyFunction; ``needs_grad`` None computes the loss only.

    ``grad_scale`` is a float, a 0-dim tensor or a (K,) tensor (per-row backward).
    Returns (loss (K,), (grad_input, grad_weight, grad_bias)), None where not needed.

    Where the time goes (profiled 2026-12-03 on 2 shared cores, fp32, MKL GEMMs of torch
    2.13; each step timed alone over all kept rows, chunked against one GEMM, interleaved,
    median (range) of the per-round ratios, and the ratio of the fastest rounds):
    - The forward GEMM ``rows @ W.T`` repacks the whole transposed V x H weight on every
      call, so its cost per row falls with the rows per chunk. At (H, V) = (512, 32000)
      over 3686 rows: chunks of 369 rows 1.23x (0.82-1.69; fastest 1.23x) one GEMM, 738
      rows 1.13x (0.94-1.47; 1.07x), 1229 rows 1.07x (0.97-1.33; 1.03x); at (1024, 128256)
      over 1843 rows: 615 rows 1.26x (fastest rounds), 922 rows 1.01x. It is a third of
      the floor, so it was the largest excess. The other layout (``W @ rows.T`` into a
      V x rows buffer) was worse (1.46x at 369 rows); oneDNN
      (``torch.ops.mkldnn._linear_pointwise``) was 1.07x at 461 rows but has no ``out=``
      (a fresh, page-faulted chunk per call) and is a private op: not used.
    - ``grad_input = G @ W`` and ``grad_weight += G.T @ rows`` do not depend on the chunk
      size (0.91-1.03x one GEMM at 369-527 rows): accumulating grad_weight chunk by chunk
      costs no more than one GEMM over all rows (which also passes over its V x H output
      once per block of the reduction axis). Zero-filling grad_weight first cost 0.7% of
      the floor: the first chunk now writes it (and grad_bias) instead.
    - At (H, V) = (2048, 32000) over 3686 rows (2 chunks of 1843), quiet, each GEMM timed
      alone over 3 rounds: forward 1.10x one GEMM, grad_input 1.01x, grad_weight 0.93x;
      in a whole call (torch.profiler) the GEMMs are 99% of the CPU time. The bare GEMMs
      themselves move by up to 20% between rounds (9.2-11.6 s), so a 3-round run can read
      1.15x where 3 runs of 6 rounds read 1.03-1.05x.
    - The row kernel: 1.4-2% of the floor's CPU time (one read and write of the logits).
      Page faults of the fresh grad_weight, chunk buffer, grad_input and gathered rows:
      about 30k per call at (4096, 512, 32000), 0.06-0.09 s of system time, 1-2% of the
      floor (the floor's GEMMs write into outputs allocated once). The gather of kept rows
      and its backward take 1-18 ms; backward hands the stored gradients to autograd
      without a copy; numba ran its "workqueue" layer then (threads block, do not spin;
      now the "omp" layer on torch's own OpenMP team where that is shared), and no
      handoff cost between torch's and numba's pools showed.
    So the chunk size depends on rows, and memory caps it: ``default_chunk_size`` takes up
    to ``TARGET_ROWS`` rows while their logits fit in ``WEIGHT_SHARE`` (1.0) of the weight
    gradient's bytes, and evens out the chunks so that none is a small remainder. Peak
    extra memory stays below torch 2.13's chunked path (peak RSS of one step in a fresh
    process, xloss / torch chunked): 147 / 154 MiB at (4096, 512, 32000), 166 / 170 at
    (8192, 512, 32000), 547 / 578 at (4096, 2048, 32000), 981 / 1030 at
    (2048, 1024, 128256). At H = 512 that budget still leaves 461-492 rows per chunk,
    where the forward GEMM costs 1.16x (1.01-1.35; fastest rounds 1.10x) one GEMM over
    all rows (369 rows before: 1.23x): the largest excess left at small H. Not done:
    reusing the chunk buffer between calls (its page faults, under 1% of the floor) and
    oneDNN for the forward GEMM (see above).
    """
    num_rows, hidden_size = input.shape
    num_classes = weight.shape[0]
    device = input.device
    row_kernel, dtype = select_row_kernel_and_dtype(device, input.dtype)  # dtype: GEMMs, logits
    extra = {}
    accum_dtype = config.accum_dtype or torch.promote_types(input.dtype, torch.float32)
    chunk = config.chunk_size or default_chunk_size(num_rows, num_classes, dtype, hidden_size)
    chunk = max(1, min(chunk, num_rows))
    want_input, want_weight, want_bias = needs_grad or (False, False, False)
    want_bias = want_bias and bias is not None

    weight_c = weight.to(dtype)  # V x H; a copy only for fp16/bf16 weights
    bias_c = None if bias is None else bias.to(dtype)  # V
    loss_dtype = torch.promote_types(dtype, torch.float32)  # also of the row scales
    class_weight_c = None if class_weight is None else class_weight.to(loss_dtype)
    on_triton = _on_triton(device, input.dtype)
    if isinstance(grad_scale, Tensor) and grad_scale.dim() == 0:
        # A known scale: a float for the CPU kernels (free); the Triton kernel reads the
        # 0-dim tensor on the device; the torch twin elsewhere gets a per-row view. No sync.
        grad_scale = grad_scale.to(loss_dtype)
        if not on_triton:
            grad_scale = float(grad_scale) if device.type == "cpu" else grad_scale.expand(num_rows)
    elif isinstance(grad_scale, Tensor):
        grad_scale = grad_scale.to(loss_dtype).contiguous()

    loss = torch.empty(num_rows, dtype=loss_dtype, device=device)  # K
    grad_input = torch.empty_like(input, dtype=dtype) if want_input else None  # K x H
    # the first chunk writes grad_weight and grad_bias (no zero fill) unless there is none
    new_like = torch.empty_like if num_rows > 0 else torch.zeros_like
    grad_weight = new_like(weight, dtype=accum_dtype) if want_weight else None  # V x H
    grad_bias = new_like(bias, dtype=accum_dtype) if want_bias else None  # V
    buffer = torch.empty(chunk, num_classes, dtype=dtype, device=device)  # chunk x V
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        rows = input[start:stop].to(dtype)  # rows x H
        logits = buffer[: stop - start]  # rows x V
        # 1. logits of this chunk, into the reused buffer
        if bias_c is None:
            torch.mm(rows, weight_c.T, out=logits)
        else:
            torch.addmm(bias_c, rows, weight_c.T, out=logits)
        # 2. the row kernel turns the logits into their gradient in place
        scale = grad_scale
        if isinstance(grad_scale, Tensor) and grad_scale.dim() == 1:
            scale = grad_scale[start:stop]
        if config.stats is not None:
            extra["stats"] = (config.stats[0][start:stop], config.stats[1][start:stop])
        loss[start:stop] = row_kernel(
            logits,
            target[start:stop],
            grad_scale=scale,
            class_weight=class_weight_c,
            label_smoothing=config.label_smoothing,
            z_loss=config.z_loss,
            softcap=config.softcap,
            **extra,
        )
        # 3. grad_input = g @ W
        if want_input:
            torch.mm(logits, weight_c, out=grad_input[start:stop])  # rows x H
        # 4. grad_weight += g.T @ h, grad_bias += sum of g over rows
        if want_weight:
            _add_product(grad_weight, logits.T, rows, first=start == 0)  # V x H
        if want_bias and start == 0:
            torch.sum(logits, 0, dtype=accum_dtype, out=grad_bias)  # V
        elif want_bias:
            grad_bias.add_(logits.sum(0, dtype=accum_dtype))  # V
    return loss, (grad_input, grad_weight, grad_bias)
