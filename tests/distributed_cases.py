"""Cases and the spawned worker of tests/test_distributed.py (kept light to import).

Each case's data is a pure function of the case, so the workers and the main process
build the same tensors. A worker runs every case on its rank and saves its results (or
the traceback) to a file; the float64 references live in the test file.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback

import torch
import torch.distributed as dist

import xloss
from xloss.distributed import (
    global_token_count,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

REDUCTIONS = ("none", "mean", "sum", "sample")
SPLITS = {1: [11], 2: [4, 7], 3: [5, 1, 5]}  # uneven slices of V = 11 classes

# ----------------------------------------------------------------------------------------
# cases: the data is a pure function of the case, so workers and the main process agree

CE_OPTIONS = [
    dict(label_smoothing=0.0, z_loss=0.0),
    dict(label_smoothing=0.2, z_loss=1e-2),
]
CE_CASES = [
    dict(name=f"{reduction}-{i}", reduction=reduction, **options)
    for reduction in REDUCTIONS
    for i, options in enumerate(CE_OPTIONS)
] + [
    dict(
        name="mask-ignore-smooth-sample",
        reduction="sample",
        label_smoothing=0.1,
        use_mask=True,
        stats=True,
    ),
    dict(name="mask-mean-z", reduction="mean", z_loss=1e-3, use_mask=True),
    dict(name="normalizer", reduction="sum", normalizer=7.0, label_smoothing=0.3),
    dict(name="normalizer-tensor", reduction="mean", normalizer="tensor", use_mask=True),
    dict(
        name="vocab-start-given", reduction="mean", label_smoothing=0.1, pass_start=True, stats=True
    ),
    dict(name="ignore-valid-class", reduction="mean", ignore_index=0),
    dict(name="ignore-none", reduction="sum", ignore_index=None, label_smoothing=0.1),
    dict(name="all-ignored", reduction="mean", all_ignored=True, label_smoothing=0.1, stats=True),
    dict(name="extreme-logits", reduction="mean", scale=1e4, label_smoothing=0.1, stats=True),
    dict(name="unbatched", reduction="sum", shape=(), label_smoothing=0.1, z_loss=0.1, stats=True),
    dict(name="stats-ties", reduction="none", ties=True, stats=True),
    dict(name="fp32", reduction="mean", dtype=torch.float32, label_smoothing=0.1, z_loss=1e-3),
    dict(name="bf16", reduction="none", dtype=torch.bfloat16, label_smoothing=0.1, stats=True),
]


def ce_data(case, index):
    gen = torch.Generator().manual_seed(1000 + index)
    shape = case.get("shape", (3, 5))
    logits = torch.randn(*shape, 11, generator=gen, dtype=torch.float64) * case.get("scale", 3.0)
    target = torch.randint(0, 11, shape, generator=gen)
    ignore_index = case.get("ignore_index", -100)
    if ignore_index is not None and shape:
        target[0, ::2] = ignore_index
    if case.get("all_ignored"):
        target.fill_(-100)
    if case.get("ties"):
        # row maxima shared by two classes: within a slice and across ranks' slices, for
        # every split in SPLITS (the first index must win, as torch.argmax); a -inf slice
        for row, classes in enumerate([(2, 9), (5, 8), (0, 3), (6, 7), (1, 10)]):
            logits[0, row, list(classes)] = logits[0, row].max() + 1.0
        logits[1, 0, 4:] = float("-inf")  # all of rank 1's slice when world = 2
        target[1, 0] = 3
        logits[1, 1, :] = 7.0  # all equal: class 0
    mask = torch.rand(shape, generator=gen) > 0.3 if case.get("use_mask") else None
    upstream = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    dtype = case.get("dtype", torch.float64)
    return logits.to(dtype), target, mask, upstream


def ce_kwargs(case, mask):
    normalizer = case.get("normalizer")
    if normalizer == "tensor":
        normalizer = torch.tensor(5.0)
    return dict(
        label_smoothing=case.get("label_smoothing", 0.0),
        z_loss=case.get("z_loss", 0.0),
        ignore_index=case.get("ignore_index", -100),
        reduction=case["reduction"],
        mask=mask,
        normalizer=normalizer,
    )


LINEAR_CASES = [
    dict(
        name="lin-mean-bias-smooth",
        reduction="mean",
        bias=True,
        label_smoothing=0.1,
        z_loss=0.01,
        stats=True,
    ),
    dict(name="lin-sum", reduction="sum", bias=False),
    dict(
        name="lin-none-bias",
        reduction="none",
        bias=True,
        label_smoothing=0.2,
        use_mask=True,
        stats=True,
    ),
    dict(name="lin-sample-z", reduction="sample", bias=False, z_loss=0.05),
    dict(name="lin-normalizer-mask", reduction="sum", normalizer=4.0, bias=True, use_mask=True),
    dict(
        name="lin-fp32",
        reduction="mean",
        bias=True,
        dtype=torch.float32,
        label_smoothing=0.1,
        stats=True,
    ),
    dict(name="lin-one-chunk", reduction="mean", bias=False, chunk_size=None),
]


def linear_data(case, index):
    gen = torch.Generator().manual_seed(2000 + index)
    hidden = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(11, generator=gen, dtype=torch.float64) if case["bias"] else None
    target = torch.randint(0, 11, (2, 5), generator=gen)
    target[1, 1] = -100
    mask = torch.rand(2, 5, generator=gen) > 0.3 if case.get("use_mask") else None
    upstream = torch.rand(2, 5, generator=gen, dtype=torch.float64) + 0.5
    dtype = case.get("dtype", torch.float64)
    bias = None if bias is None else bias.to(dtype)
    return hidden.to(dtype), weight.to(dtype), bias, target, mask, upstream


def dp_data(world):
    """Per (rank, step) micro-batches of very different valid-token counts."""
    gen = torch.Generator().manual_seed(3000 + world)
    weight = torch.randn(4, 11, generator=gen, dtype=torch.float64)
    batches = {}
    for rank in range(world):
        for step in range(2):
            length = 2 + 3 * rank + 4 * step  # uneven sequence lengths
            hidden = torch.randn(2, length, 4, generator=gen, dtype=torch.float64)
            target = torch.randint(0, 11, (2, length), generator=gen)
            target[rank % 2, : length // 2 + rank] = -100  # uneven ignored counts
            mask = torch.rand(2, length, generator=gen) > 0.2
            batches[rank, step] = (hidden, target, mask)
    return weight, batches


def grad_upstream(out, upstream, reduction):
    if reduction == "none":
        return upstream
    if reduction == "sample":
        return upstream[:, 0]
    return None


# ----------------------------------------------------------------------------------------
# worker side


def _run_ce_case(case, index, rank, world):
    logits, target, mask, upstream = ce_data(case, index)
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    local = logits[..., start : start + sizes[rank]].clone().requires_grad_(True)
    extra = dict(vocab_start=start) if case.get("pass_start") else {}
    if case.get("stats"):
        extra["return_stats"] = True
    out = vocab_parallel_cross_entropy(local, target, **ce_kwargs(case, mask), **extra)
    stats = _stats_of(out)
    out = out.loss if stats else out
    out.backward(grad_upstream(out, upstream.to(out.dtype), case["reduction"]))
    return dict(loss=out.detach().double(), grad=local.grad.double(), **stats)


def _stats_of(out):
    """The side outputs of a return_stats=True result, or {}."""
    if isinstance(out, torch.Tensor):
        return {}
    assert isinstance(out, xloss.CrossEntropyStats)
    assert not any(t.requires_grad for t in out[1:])
    return dict(lse=out.lse, entropy=out.entropy, predicted=out.predicted, accuracy=out.accuracy)


def _run_linear_case(case, index, rank, world):
    hidden, weight, bias, target, mask, upstream = linear_data(case, index)
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    part = slice(start, start + sizes[rank])
    hidden = hidden.clone().requires_grad_(True)
    local_weight = weight[part].clone().requires_grad_(True)
    local_bias = None if bias is None else bias[part].clone().requires_grad_(True)
    out = vocab_parallel_linear_cross_entropy(
        hidden,
        local_weight,
        target,
        bias=local_bias,
        label_smoothing=case.get("label_smoothing", 0.0),
        z_loss=case.get("z_loss", 0.0),
        reduction=case["reduction"],
        mask=mask,
        normalizer=case.get("normalizer"),
        chunk_size=case.get("chunk_size", 3),
        return_stats=case.get("stats", False),
    )
    stats = _stats_of(out)
    out = out.loss if stats else out
    out.backward(grad_upstream(out, upstream.to(out.dtype), case["reduction"]))
    return dict(
        **stats,
        loss=out.detach().double(),
        grad_input=hidden.grad.double(),
        grad_weight=local_weight.grad.double(),
        grad_bias=None if local_bias is None else local_bias.grad.double(),
    )


def _run_dp_case(rank, world):
    weight, batches = dp_data(world)
    weight = weight.clone().requires_grad_(True)
    counts = [
        global_token_count(batches[rank, step][1], mask=batches[rank, step][2]) for step in range(2)
    ]
    tokens = counts[0] + counts[1]  # the whole optimizer step, over all ranks
    total = 0.0
    for step in range(2):
        hidden, target, mask = batches[rank, step]
        loss = xloss.cross_entropy(
            hidden @ weight, target, class_dim=-1, mask=mask, reduction="sum", normalizer=tokens
        )
        loss.backward()  # accumulates over the steps
        total = total + loss.detach()
    return dict(loss=total, grad=weight.grad.clone(), tokens=tokens.clone())


def _count_collectives(rank, world):
    """How many all-reduces forward and backward issue (monkeypatched counters)."""
    calls = {"all_reduce": 0, "other": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["all_reduce"] += 1
        return real_all_reduce(*args, **kwargs)

    def forbidden(*args, **kwargs):
        calls["other"] += 1
        raise RuntimeError("unexpected collective")

    counts = {}
    patched = {"all_gather": dist.all_gather, "all_gather_into_tensor": dist.all_gather_into_tensor}
    dist.all_reduce = counting_all_reduce
    for name in patched:
        setattr(dist, name, forbidden)
    try:
        logits, target, _, _ = ce_data(CE_CASES[1], 1)
        start = sum(SPLITS[world][:rank])
        local = logits[..., start : start + SPLITS[world][rank]].clone().requires_grad_(True)
        hidden, weight, bias, target_lin, _, upstream = linear_data(LINEAR_CASES[0], 0)
        hidden.requires_grad_(True)
        local_weight = weight[start : start + SPLITS[world][rank]].clone().requires_grad_(True)

        def measure(name, forward, backward_arg=None):
            calls["all_reduce"] = 0
            out = forward()
            counts[name + "-forward"] = calls["all_reduce"]
            calls["all_reduce"] = 0
            out.backward(backward_arg)
            counts[name + "-backward"] = calls["all_reduce"]

        measure(
            "ce",
            lambda: vocab_parallel_cross_entropy(local, target, label_smoothing=0.1, z_loss=0.1),
        )
        measure(
            "ce-stats",
            lambda: (
                vocab_parallel_cross_entropy(
                    local, target, label_smoothing=0.1, return_stats=True
                ).loss
            ),
        )
        for reduction in ("mean", "none"):
            measure(
                f"linear-{reduction}",
                lambda reduction=reduction: vocab_parallel_linear_cross_entropy(
                    hidden, local_weight, target_lin, reduction=reduction, chunk_size=4
                ),
                None if reduction == "mean" else upstream,
            )
    finally:
        dist.all_reduce = real_all_reduce
        for name, function in patched.items():
            setattr(dist, name, function)
    counts["other"] = calls["other"]
    return counts


def _run_bad_vocab_start(rank, world):
    """Overlapping / gapped / shifted slices: every rank must raise (error text per rank),
    and validate_args=False must still return (no hang)."""
    logits, target, _, _ = ce_data(CE_CASES[0], 0)
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    local = logits[..., start : start + sizes[rank]]
    errors = {}
    for name, bad_start in [("overlap", 0), ("shift", start + 1)]:
        try:
            vocab_parallel_cross_entropy(local, target, vocab_start=bad_start)
            errors[name] = "no error"
        except ValueError as error:
            errors[name] = str(error)
        try:
            vocab_parallel_linear_cross_entropy(
                logits[..., :3].contiguous(), torch.ones(sizes[rank], 3, dtype=logits.dtype),
                target, vocab_start=bad_start,
            )  # fmt: skip
            errors[name + "-linear"] = "no error"
        except ValueError as error:
            errors[name + "-linear"] = str(error)
    vocab_parallel_cross_entropy(local, target, vocab_start=start + 1, validate_args=False)
    return errors


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    jobs = [(f"ce/{c['name']}", _run_ce_case, (c, i)) for i, c in enumerate(CE_CASES)]
    jobs += [(f"linear/{c['name']}", _run_linear_case, (c, i)) for i, c in enumerate(LINEAR_CASES)]
    jobs += [("dp", lambda r, w: _run_dp_case(r, w), ()), ("collectives", _count_collectives, ())]
    jobs += [("bad-vocab-start", _run_bad_vocab_start, ())]
    for name, function, args in jobs:
        try:
            results[name] = function(*args, rank, world)
        except Exception:
            results[name] = traceback.format_exc()
            dist.barrier()  # the other ranks may have failed elsewhere; re-align
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def spawn_group(world, tmp_path, timeout=120.0):
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=_worker, args=(rank, world, tmp_path / "init", tmp_path))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
        process.join(5)
    assert not hung, f"{len(hung)} of {world} ranks did not finish within {timeout} s"
    codes = [p.exitcode for p in processes]
    assert codes == [0] * world, f"rank exit codes {codes}"
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
