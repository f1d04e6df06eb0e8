"""Vocab-parallel cross-entropy and global token counts against float64 references.

The multi-process tests spawn ONE gloo group per world size (2 and 3 ranks); every worker
(tests/distributed_cases.py) runs all cases and saves its results to a file, and the main
process compares them with the single-process float64 references written below.
Starting a process that imports torch costs seconds here, hence many cases per spawn.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from distributed_cases import (
    CE_CASES,
    LINEAR_CASES,
    SPLITS,
    ce_data,
    ce_kwargs,
    dp_data,
    grad_upstream,
    linear_data,
    spawn_group,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from xloss.distributed import (
    global_token_count,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)
from xloss.distributed._rows import local_partials

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}


# ----------------------------------------------------------------------------------------
# float64 references (independent of xloss)


def reference_rows(logits, target, keep, label_smoothing, z_loss):
    """Per-position loss in float64; 0 where ``keep`` is False."""
    logits = logits.double()
    num_classes = logits.shape[-1]
    lse = torch.logsumexp(logits, -1)
    safe = torch.where(keep, target, 0)
    target_logit = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = (1 - label_smoothing) * (lse - target_logit)
    if label_smoothing > 0:  # (else 0 * inf = nan for a row with -inf logits)
        loss = loss + label_smoothing / num_classes * (num_classes * lse - logits.sum(-1))
    loss = loss + z_loss * lse**2
    return torch.where(keep, loss, torch.zeros_like(loss))


def reference_stats(logits, target, keep):
    """float64 (lse, entropy, argmax, accuracy) of the full logits; 0, 0, -1 where dropped."""
    logits = logits.detach().double()
    lse = torch.logsumexp(logits, -1)
    log_p = torch.log_softmax(logits, -1)
    entropy = -(log_p.exp() * torch.where(log_p.isinf(), 0.0, log_p)).sum(-1)
    predicted = torch.where(keep, logits.argmax(-1), -1)
    hits = ((predicted == target) & keep).sum().double()
    accuracy = hits / keep.sum() if keep.any() else torch.zeros((), dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    return dict(
        lse=torch.where(keep, lse, zero),
        entropy=torch.where(keep, entropy, zero),
        predicted=predicted,
        accuracy=accuracy,
    )


def check_stats(label, result, logits, target, keep, tol, failures):
    """The side outputs of one rank against the float64 reference (exact argmax)."""
    expected = reference_stats(logits, target, keep)
    if set(expected) - set(result):
        failures.append(f"{label}: no side outputs in {sorted(result)}")
        return
    for name in ("lse", "entropy", "accuracy"):
        close(f"{label} {name}", result[name].double(), expected[name], tol, failures)
    if not torch.equal(result["predicted"], expected["predicted"]):
        failures.append(f"{label} predicted {result['predicted']} != {expected['predicted']}")


def reference_reduce(loss, keep, reduction, normalizer=None):
    if normalizer is not None:
        return loss.sum() / normalizer
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        count = keep.sum()
        return loss.sum() / count if count > 0 else loss.sum() * 0
    per_sample = loss.reshape(loss.shape[0], -1).sum(1)
    counts = keep.reshape(keep.shape[0], -1).sum(1).double()
    return torch.where(counts > 0, per_sample / counts.clamp(min=1), 0.0)


# ----------------------------------------------------------------------------------------
# main side: compare every rank's results with the references


def close(name, got, expected, tol, failures):
    if got is None or expected is None:
        if got is not expected:
            failures.append(f"{name}: got {got}, expected {expected}")
        return
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=tol):
        failures.append(f"{name}: got {got}, expected {expected}")


def check_ce_case(case, index, results, world, failures):
    logits, target, mask, upstream = ce_data(case, index)
    logits = logits.double().requires_grad_(True)
    kwargs = ce_kwargs(case, mask)
    keep = torch.ones(target.shape, dtype=torch.bool)
    if kwargs["ignore_index"] is not None:
        keep &= target != kwargs["ignore_index"]
    if mask is not None:
        keep &= mask
    rows = reference_rows(logits, target, keep, kwargs["label_smoothing"], kwargs["z_loss"])
    normalizer = kwargs["normalizer"]
    normalizer = None if normalizer is None else float(normalizer)
    expected = reference_reduce(rows, keep, case["reduction"], normalizer)
    expected.backward(grad_upstream(expected, upstream, case["reduction"]))
    tol = TOLERANCE[case.get("dtype", torch.float64)]
    scale = case.get("scale", 1.0)
    sizes = SPLITS[world]
    for rank, result in enumerate(results):
        label = f"world {world} rank {rank} ce/{case['name']}"
        if isinstance(result, str):
            failures.append(f"{label} raised:\n{result}")
            continue
        close(f"{label} loss", result["loss"], expected.detach(), tol * scale, failures)
        start = sum(sizes[:rank])
        local_grad = logits.grad[..., start : start + sizes[rank]]
        close(f"{label} grad", result["grad"], local_grad, tol, failures)
        if case.get("stats"):
            check_stats(label, result, logits, target, keep, tol * scale, failures)


def check_linear_case(case, index, results, world, failures):
    hidden, weight, bias, target, mask, upstream = linear_data(case, index)
    hidden = hidden.double().requires_grad_(True)
    weight = weight.double().requires_grad_(True)
    bias = None if bias is None else bias.double().requires_grad_(True)
    logits = hidden @ weight.T + (0 if bias is None else bias)
    keep = target != -100
    if mask is not None:
        keep &= mask
    rows = reference_rows(
        logits, target, keep, case.get("label_smoothing", 0.0), case.get("z_loss", 0.0)
    )
    expected = reference_reduce(rows, keep, case["reduction"], case.get("normalizer"))
    expected.backward(grad_upstream(expected, upstream, case["reduction"]))
    tol = TOLERANCE[case.get("dtype", torch.float64)]
    sizes = SPLITS[world]
    for rank, result in enumerate(results):
        label = f"world {world} rank {rank} linear/{case['name']}"
        if isinstance(result, str):
            failures.append(f"{label} raised:\n{result}")
            continue
        part = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        close(f"{label} loss", result["loss"], expected.detach(), tol, failures)
        close(f"{label} grad_input", result["grad_input"], hidden.grad, tol, failures)
        close(f"{label} grad_weight", result["grad_weight"], weight.grad[part], tol, failures)
        expected_bias = None if bias is None else bias.grad[part]
        close(f"{label} grad_bias", result["grad_bias"], expected_bias, tol, failures)
        if case.get("stats"):
            check_stats(label, result, logits, target, keep, tol, failures)


def check_dp_case(results, world, failures):
    if any(isinstance(r, str) for r in results):
        failures.extend(f"world {world} dp raised:\n{r}" for r in results if isinstance(r, str))
        return
    weight, batches = dp_data(world)
    weight.requires_grad_(True)
    losses, keeps = [], []
    for hidden, target, mask in batches.values():
        keep = (target != -100) & mask
        losses.append(reference_rows(hidden @ weight, target, keep, 0.0, 0.0)[keep])
        keeps.append(keep)
    all_losses = torch.cat(losses)
    global_mean = all_losses.mean()
    global_mean.backward()
    tokens = sum(int(k.sum()) for k in keeps)
    # The test data must make the naive mean of per-rank means differ from the global one.
    naive = torch.stack([loss.mean() for loss in losses]).mean()
    assert abs(float(naive.detach() - global_mean.detach())) > 1e-3
    summed_loss = sum(r["loss"] for r in results)
    summed_grad = sum(r["grad"] for r in results)
    close(f"world {world} dp loss", summed_loss, global_mean.detach(), 1e-10, failures)
    close(f"world {world} dp grad", summed_grad, weight.grad, 1e-10, failures)
    for rank, result in enumerate(results):
        if int(result["tokens"]) != tokens or result["tokens"].dtype != torch.int64:
            failures.append(f"world {world} rank {rank} tokens {result['tokens']} != {tokens}")


@pytest.mark.parametrize("world", [2, 3])
def test_multi_process_matches_single_process_reference(world, tmp_path):
    results = spawn_group(world, tmp_path)
    failures = []
    for index, case in enumerate(CE_CASES):
        check_ce_case(case, index, [r[f"ce/{case['name']}"] for r in results], world, failures)
    for index, case in enumerate(LINEAR_CASES):
        name = f"linear/{case['name']}"
        check_linear_case(case, index, [r[name] for r in results], world, failures)
    check_dp_case([r["dp"] for r in results], world, failures)
    expected_counts = {
        "ce-forward": 2,  # one MAX, one packed SUM; the slice start rides on the MAX
        "ce-backward": 0,
        "ce-stats-forward": 3,  # and one MIN for the argmax
        "ce-stats-backward": 0,
        "linear-mean-forward": 2 * math.ceil(10 / 4) + 1,  # 2 per chunk + grad_input
        "linear-mean-backward": 0,
        "linear-none-forward": 2 * math.ceil(10 / 4),
        "linear-none-backward": 1,  # the grad_input all-reduce
        "other": 0,
    }
    for rank, result in enumerate(r["collectives"] for r in results):
        if result != expected_counts:
            failures.append(f"world {world} rank {rank} collectives {result}")
    for rank, result in enumerate(r["bad-vocab-start"] for r in results):
        # every rank raises: overlapping slices (all start at 0) and a shift past C
        raised = isinstance(result, dict) and all("tile [0, 11)" in e for e in result.values())
        if not raised:
            failures.append(f"world {world} rank {rank} bad vocab_start: {result}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------
# in-process tests: errors before any communication, and a 1-process group


LOGITS = torch.zeros(4, 5)
TARGET = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(reduction="avg"), ValueError, "`reduction` must be one of"),
        (dict(label_smoothing=1.5), ValueError, "`label_smoothing` must lie in"),
        (dict(z_loss=-1.0), ValueError, "`z_loss` must be >= 0"),
        (dict(ignore_index=1.5), TypeError, "`ignore_index` must be an int"),
        (dict(normalizer=2.0, reduction="none"), ValueError, "`normalizer` divides"),
        (dict(vocab_start=-1), ValueError, "`vocab_start` must be >= 0"),
        (dict(vocab_start=1.0), TypeError, "`vocab_start` must be an int"),
        (dict(target=TARGET.float()), TypeError, "needs integer class indices"),
        (dict(target=TARGET[:3]), ValueError, r"`target` must have shape \(4,\)"),
        (dict(input=LOGITS.long()), TypeError, "floating-point tensor of logits"),
        (dict(input=torch.zeros(4, 0)), ValueError, "has no classes"),
        (dict(mask=torch.ones(4)), TypeError, "`mask` must be a bool tensor"),
        (dict(return_stats=1), TypeError, "`return_stats` must be a bool"),
    ],
)
def test_vocab_parallel_errors_before_communication(kwargs, error, match):
    kwargs = dict(kwargs)
    input = kwargs.pop("input", LOGITS)
    target = kwargs.pop("target", TARGET)
    with pytest.raises(error, match=match):
        vocab_parallel_cross_entropy(input, target, **kwargs)


HIDDEN = torch.zeros(4, 3)
WEIGHT = torch.zeros(5, 3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight=torch.zeros(5, 2)), ValueError, r"must have shape \(V_local, 3\)"),
        (dict(weight=torch.zeros(0, 3)), ValueError, "V_local >= 1"),
        (dict(weight=WEIGHT.double()), TypeError, "`local_weight` must have the input's dtype"),
        (dict(bias=torch.zeros(4)), ValueError, r"`bias` must have shape \(5,\)"),
        (dict(bias=torch.zeros(5, dtype=torch.float64)), TypeError, "`bias` must have the"),
        (dict(target=torch.zeros(4, 1, dtype=torch.long)), ValueError, "hidden axis last"),
        (dict(input=torch.tensor(1.0)), ValueError, "must have a hidden axis"),
        (dict(chunk_size=0), ValueError, "`chunk_size` must be >= 1"),
        (dict(chunk_size=2.0), TypeError, "`chunk_size` must be an int"),
        (dict(reduction="avg"), ValueError, "`reduction` must be one of"),
        (dict(return_stats="yes"), TypeError, "`return_stats` must be a bool"),
    ],
)
def test_linear_errors_before_communication(kwargs, error, match):
    kwargs = dict(kwargs)
    input = kwargs.pop("input", HIDDEN)
    weight = kwargs.pop("weight", WEIGHT)
    target = kwargs.pop("target", TARGET)
    with pytest.raises(error, match=match):
        vocab_parallel_linear_cross_entropy(input, weight, target, **kwargs)


def test_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(LOGITS, TARGET)
    with pytest.raises(RuntimeError, match="init_process_group"):
        global_token_count(TARGET)


def test_target_range_checked_after_the_collectives(one_process_group):
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\] or equal ignore_index=-100"):
        vocab_parallel_cross_entropy(LOGITS, torch.tensor([0, 1, 5, -100]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\]"):
        vocab_parallel_linear_cross_entropy(HIDDEN, WEIGHT, torch.tensor([0, 1, 5, 2]))
    # validate_args=False skips the check (and the host sync): no error, and the row of
    # the bad target gets a NaN loss and gradient (not a finite loss missing x_y).
    logits = LOGITS.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(
        logits, torch.tensor([0, 1, 5, -100]), validate_args=False, reduction="none"
    )
    loss.sum().backward()
    assert loss[2].isnan() and bool(loss[[0, 1, 3]].isfinite().all()) and loss[3] == 0
    assert bool(logits.grad[2].isnan().all()) and bool(logits.grad[[0, 1, 3]].isfinite().all())
    hidden = HIDDEN.clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(
        hidden, WEIGHT, torch.tensor([0, 1, 5, 2]), validate_args=False, reduction="none"
    )
    loss.sum().backward()
    assert loss[2].isnan() and bool(loss[[0, 1, 3]].isfinite().all())
    assert bool(hidden.grad[2].isnan().all()) and bool(hidden.grad[[0, 1, 3]].isfinite().all())


def test_vocab_start_must_tile_the_vocabulary_one_process(one_process_group):
    """Regression: a shifted slice gave a plausible wrong loss instead of an error."""
    logits = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 4])
    with pytest.raises(ValueError, match=r"must tile \[0, 5\).*\[\(1, 6\)\]"):
        vocab_parallel_cross_entropy(logits, target, vocab_start=1)
    with pytest.raises(ValueError, match=r"must tile \[0, 5\)"):
        vocab_parallel_linear_cross_entropy(HIDDEN, WEIGHT, TARGET, vocab_start=2)
    expected = torch.nn.functional.cross_entropy(logits, target)
    got = vocab_parallel_cross_entropy(logits, target, vocab_start=0)
    torch.testing.assert_close(got, expected)


def test_gradcheck_one_process(one_process_group):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -100, 5])
    torch.autograd.gradcheck(
        lambda x: vocab_parallel_cross_entropy(
            x, target, label_smoothing=0.1, z_loss=0.1, reduction="none"
        ),
        (logits,),
    )
    hidden = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2])
    for reduction in ("mean", "none"):
        torch.autograd.gradcheck(
            lambda h, w, b, reduction=reduction: vocab_parallel_linear_cross_entropy(
                h,
                w,
                target,
                bias=b,
                label_smoothing=0.2,
                z_loss=0.05,
                reduction=reduction,
                chunk_size=2,
            ),
            (hidden, weight, bias),
        )


def test_half_precision_one_process(one_process_group):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 9, generator=gen) * 4
    target = torch.randint(0, 9, (4, 7), generator=gen)
    keep = torch.ones(4, 7, dtype=torch.bool)
    expected = reference_rows(logits, target, keep, 0.1, 0.0).mean()
    for dtype in (torch.float16, torch.bfloat16):
        half = logits.to(dtype).requires_grad_(True)
        loss = vocab_parallel_cross_entropy(half, target, label_smoothing=0.1)
        loss.backward()
        assert loss.dtype == dtype and half.grad.dtype == dtype
        assert torch.allclose(loss.double(), expected, rtol=1e-2)
        rows = half.detach().double().requires_grad_(True)
        reference_rows(rows, target, keep, 0.1, 0.0).mean().backward()
        assert torch.allclose(half.grad.double(), rows.grad, atol=2e-3)


def test_matches_torch_cross_entropy_one_process(one_process_group):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 13, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 13, (6,), generator=gen)
    target[2] = -100
    ours = vocab_parallel_cross_entropy(logits, target, label_smoothing=0.15)
    theirs = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.15)
    assert torch.allclose(ours, theirs, rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(0, 6),
    classes=st.integers(1, 9),
    smoothing=st.sampled_from([0.0, 0.3]),
    z_loss=st.sampled_from([0.0, 0.1]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    chunk_size=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_linear_equals_reference(
    rows, classes, smoothing, z_loss, reduction, chunk_size, seed
):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(classes, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, classes, (rows,), generator=gen)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        loss = vocab_parallel_linear_cross_entropy(
            hidden,
            weight,
            target,
            label_smoothing=smoothing,
            z_loss=z_loss,
            reduction=reduction,
            chunk_size=chunk_size,
        )
    finally:
        dist.destroy_process_group()
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    keep = torch.ones(rows, dtype=torch.bool)
    expected = reference_reduce(
        reference_rows(h @ w.T, target, keep, smoothing, z_loss), keep, reduction
    )
    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-12)
    loss.sum().backward()
    expected.sum().backward()
    assert torch.allclose(hidden.grad, h.grad, atol=1e-10)
    assert torch.allclose(weight.grad, w.grad, atol=1e-10)


def test_linear_bf16_one_process(one_process_group):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 5, generator=gen)
    weight = torch.randn(9, 5, generator=gen)
    target = torch.randint(0, 9, (7,), generator=gen)
    h = hidden.bfloat16().requires_grad_(True)
    w = weight.bfloat16().requires_grad_(True)
    loss = vocab_parallel_linear_cross_entropy(h, w, target, label_smoothing=0.1, chunk_size=3)
    loss.backward()
    assert loss.dtype == h.grad.dtype == w.grad.dtype == torch.bfloat16
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    keep = torch.ones(7, dtype=torch.bool)
    expected = reference_rows(h64 @ w64.T, target, keep, 0.1, 0.0).mean()
    expected.backward()
    assert torch.allclose(loss.double(), expected, rtol=1e-2)
    assert torch.allclose(h.grad.double(), h64.grad, atol=2e-2)
    assert torch.allclose(w.grad.double(), w64.grad, atol=2e-2)


def test_global_token_count_one_process(one_process_group):
    target = torch.tensor([[3, -100, 1], [-100, -100, 2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert global_token_count(target).item() == 3
    assert global_token_count(target, mask=mask).item() == 2
    assert global_token_count(target, ignore_index=None).item() == 6
    assert global_token_count(target, ignore_index=1).dtype == torch.int64
    with pytest.raises(TypeError, match="`mask` must be a bool tensor"):
        global_token_count(target, mask=mask.float())
    with pytest.raises(TypeError, match="`ignore_index` must be an int"):
        global_token_count(target, ignore_index=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("sum_logits", "entropy"), [(False, False), (True, False), (True, True)])
def test_local_partials_match_float64(dtype, sum_logits, entropy):
    """Step 2's partial sums of one slice, with M the row max of the WHOLE row."""
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(5, 11, generator=gen, dtype=torch.float64) * 3
    full[1, 3] = -math.inf  # a masked class: e = 0, e * (x - M) counts 0
    full[2] += 1e4  # large logits: the shifted entropy partial must not cancel
    row_max = full.amax(-1)
    start, stop = 4, 9  # this slice: classes 4..8
    target = torch.tensor([5, 0, 8, -1, 10])
    in_slice = (target >= start) & (target < stop)
    local_target = torch.where(in_slice, target - start, 0)
    got = local_partials(
        full[:, start:stop].to(dtype), row_max.to(dtype), local_target, in_slice,
        sum_logits=sum_logits, entropy=entropy,
    )  # fmt: skip
    local = full[:, start:stop].to(dtype).double()  # the values the function saw
    shifted = local - row_max.to(dtype).double().unsqueeze(-1)
    expected = [torch.where(in_slice, local.gather(-1, local_target[:, None])[:, 0], 0.0)]
    if sum_logits:
        expected.append(local.sum(-1))
    expected.append(shifted.exp().sum(-1))
    if entropy:
        finite = torch.where(local.isfinite(), shifted, 0.0)
        expected.append((shifted.exp() * finite).sum(-1))
    assert len(got) == len(expected)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)


def test_stats_one_process_fp16_nan_and_no_grad(one_process_group):
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(4, 9, generator=gen) * 4).half()
    logits[2, 6] = float("nan")  # torch.argmax takes a NaN as the max
    target = torch.tensor([1, -100, 3, 8])
    keep = target != -100
    out = vocab_parallel_cross_entropy(logits.requires_grad_(), target, return_stats=True)
    assert out.lse.dtype == torch.float32 and out.loss.dtype == torch.float16
    assert torch.equal(out.predicted, torch.where(keep, logits.double().argmax(-1), -1))
    finite = torch.tensor([True, True, False, True])
    expected = reference_stats(logits[finite], target[finite], keep[finite])
    for name in ("lse", "entropy"):
        torch.testing.assert_close(getattr(out, name)[finite].double(), expected[name],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    hidden, weight = torch.randn(5, 3, generator=gen), torch.randn(9, 3, generator=gen)
    target = torch.tensor([0, 8, 4, -100, 2])
    with torch.no_grad():
        out = vocab_parallel_linear_cross_entropy(hidden, weight, target, return_stats=True,
                                                  reduction="none", chunk_size=2)  # fmt: skip
    expected = reference_stats(hidden @ weight.T, target, target != -100)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name).double(), value.double(), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
