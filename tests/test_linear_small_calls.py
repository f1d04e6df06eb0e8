"""Small fp32 CPU calls of linear_cross_entropy form their logits and take cross_entropy
(``SMALL_HOST_LOGITS``): same values and gradients as the chunked Function, which the
other calls still take."""

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import xloss
from xloss.ops import linear as linear_ops

linear_functional = sys.modules["xloss.functional.linear_cross_entropy"]

N, H, V = 37, 6, 13


def make_inputs(seed=0, dtype=torch.float32, rows=N):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, H, generator=gen).to(dtype)
    weight = torch.randn(V, H, generator=gen).to(dtype)
    bias = torch.randn(V, generator=gen).to(dtype)
    target = torch.randint(0, V, (rows,), generator=gen)
    target[3::7] = -100
    return hidden, weight, bias, target


@pytest.fixture
def chunks_run(monkeypatch):
    """How many times the chunked Function ran its chunks."""
    calls = []
    run_chunks = linear_ops._run_chunks

    def spy(*args):
        calls.append(args[0].shape)
        return run_chunks(*args)

    monkeypatch.setattr(linear_ops, "_run_chunks", spy)
    return calls


def grads_of(options, chunked, monkeypatch, upstream=None, seed=0):
    """(loss, grads of input, weight, bias) of one call, chunked or not."""
    limit = -1 if chunked else linear_functional.SMALL_HOST_LOGITS
    monkeypatch.setattr(linear_functional, "SMALL_HOST_LOGITS", limit)
    hidden, weight, bias, target = make_inputs(seed)
    if "ignore_index" in options:  # the dropped rows carry this call's ignore_index
        target[target == -100] = 0 if options["ignore_index"] is None else options["ignore_index"]
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    loss = xloss.linear_cross_entropy(hidden, weight, target, bias, **options)
    if upstream is None:
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(loss, leaves, upstream)
    return loss.detach(), grads


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2, "z_loss": 1e-3},
    {"softcap": 3.0},
    {"class_weight": torch.linspace(0.5, 1.5, V)},
    {"class_weight": torch.linspace(1.5, 0.5, V), "label_smoothing": 0.1, "reduction": "sum"},
    {"ignore_index": 4},
    {"ignore_index": None, "reduction": "sum"},
    {"normalizer": 10.0},
    {"mask": torch.arange(N) % 3 != 0},
]  # lengths, "sample" and return_stats: test_small_call_with_sequences


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "defaults")
def test_small_call_matches_the_chunked_function(options, monkeypatch, chunks_run):
    loss, grads = grads_of(options, chunked=False, monkeypatch=monkeypatch)
    assert chunks_run == []  # formed logits, cross_entropy
    expected_loss, expected_grads = grads_of(options, chunked=True, monkeypatch=monkeypatch)
    assert len(chunks_run) >= 1  # twice for "none" (the backward runs them again)
    torch.testing.assert_close(loss, expected_loss, rtol=2e-5, atol=2e-6)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)


def test_small_call_against_float64_torch(chunks_run):
    """Independent reference: F.cross_entropy on float64 logits formed here."""
    hidden, weight, bias, target = make_inputs(seed=3)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    loss = xloss.linear_cross_entropy(hidden, weight, target, bias, label_smoothing=0.1)
    assert chunks_run == []
    grads = torch.autograd.grad(loss, leaves)
    wide = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    reference = F.cross_entropy(F.linear(*wide), target, label_smoothing=0.1)
    expected = torch.autograd.grad(reference, wide)
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_small_call_with_sequences(monkeypatch, chunks_run):
    """(B, T, H) input with lengths, reduction "sample" and return_stats."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    target = torch.randint(0, V, (3, 5), generator=gen)
    lengths = torch.tensor([5, 2, 4])
    results = []
    for limit in (linear_functional.SMALL_HOST_LOGITS, -1):
        monkeypatch.setattr(linear_functional, "SMALL_HOST_LOGITS", limit)
        sample = xloss.linear_cross_entropy(
            hidden, weight, target, lengths=lengths, reduction="sample"
        )
        stats = xloss.linear_cross_entropy(hidden, weight, target, lengths=lengths,
                                           return_stats=True)  # fmt: skip
        results.append((sample, stats))
    assert len(chunks_run) == 2  # the chunked calls only
    (sample, stats), (sample_chunked, stats_chunked) = results
    torch.testing.assert_close(sample, sample_chunked)
    for got, expected in zip(stats, stats_chunked, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "case",
    ["chunk_size", "accum_dtype", "bfloat16", "float64", "large", "compiling"],
)
def test_other_calls_keep_the_chunked_function(case, chunks_run, monkeypatch):
    dtype = {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(case, torch.float32)
    rows = 2**19 // V + 1 if case == "large" else N
    hidden, weight, bias, target = make_inputs(dtype=dtype, rows=rows)
    options = {"chunk_size": {"chunk_size": 8}, "accum_dtype": {"accum_dtype": torch.float64}}
    if case == "compiling":  # what torch.compile's trace sees (eager_mode() is False)
        monkeypatch.setattr(linear_functional, "eager_mode", lambda: False)
    xloss.linear_cross_entropy(hidden, weight, target, bias, **options.get(case, {}))
    assert len(chunks_run) >= 1


def test_small_call_bounds_are_inclusive(chunks_run):
    """Up to SMALL_HOST_LOGITS logits; up to twice that while N x V x H stays within
    SMALL_HOST_WORK."""

    def call(rows, hidden_size):
        hidden = torch.randn(rows, hidden_size)
        weight = torch.randn(256, hidden_size) / hidden_size**0.5
        xloss.linear_cross_entropy(hidden, weight, torch.randint(0, 256, (rows,)))
        return len(chunks_run)

    rows = linear_functional.SMALL_HOST_LOGITS // 256
    cheap = linear_functional.SMALL_HOST_WORK // (2 * rows * 256)  # H at the work bound
    assert call(rows, cheap + 1) == 0  # at the logits bound: any H
    assert call(2 * rows, cheap) == 0  # twice the logits, cheap GEMMs
    assert call(2 * rows, cheap + 1) == 1
    assert call(2 * rows + 1, 8) == 2


def test_small_call_edges():
    """N = 0, every row ignored, a bad target with and without validate_args, and a
    second-order backward: as xloss.cross_entropy on the formed logits."""
    weight = torch.randn(V, H, requires_grad=True)
    empty = xloss.linear_cross_entropy(torch.zeros(0, H), weight, torch.zeros(0, dtype=torch.long))
    expected = xloss.cross_entropy(torch.zeros(0, V), torch.zeros(0, dtype=torch.long))
    torch.testing.assert_close(empty, expected, equal_nan=True)
    none_kept = torch.full((4,), -100)
    ignored = xloss.linear_cross_entropy(torch.randn(4, H), weight, none_kept)
    torch.testing.assert_close(
        ignored, xloss.cross_entropy(torch.randn(4, V), none_kept), equal_nan=True
    )
    bad = torch.tensor([0, V])
    message = rf"must lie in \[0, {V - 1}\] or equal ignore_index=-100, found {V}"
    with pytest.raises(ValueError, match=message):
        xloss.linear_cross_entropy(torch.randn(2, H), weight, bad)
    with pytest.raises(ValueError, match=rf"found {V} \(row 1 of the flattened target\)"):
        xloss.linear_cross_entropy(torch.randn(2, H), weight, bad, validate_args=False)
    hidden = torch.randn(4, H, requires_grad=True)
    loss = xloss.linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 3]))
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="xloss"):
        torch.autograd.grad(grad.sum(), weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_does_not_lower_the_gemm_on_any_path(dtype, monkeypatch, chunks_run):
    """fp32 leaves under CPU autocast: every path (formed logits, the chunked Function,
    its torch-ops twin) computes in float32, as outside it (the formed-logits route once
    ran its GEMM in ``dtype``, so a call's numbers changed at the ``SMALL_HOST_LOGITS``
    bound); with a class weight and label smoothing, whose weighted logit sum is a GEMM
    of its own on the torch-ops paths. The backward runs outside autocast, as PyTorch
    recommends (inside it, autocast lowers the GEMMs of torch's own backward)."""
    hidden, weight, bias, target = make_inputs(seed=4)
    options = dict(class_weight=torch.linspace(0.5, 1.5, V), label_smoothing=0.3)
    wide = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    reference = F.cross_entropy(F.linear(*wide), target, weight=options["class_weight"].double(),
                                label_smoothing=0.3)  # fmt: skip
    expected_grads = torch.autograd.grad(reference, wide)
    for path in ("formed", "chunked", "torch ops"):
        chunked = path != "formed"
        monkeypatch.setattr(linear_functional, "SMALL_HOST_LOGITS", -1 if chunked else 2**18)
        if path == "torch ops":
            monkeypatch.setenv("XLOSS_BACKEND", "torch")
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast("cpu", dtype=dtype):
            loss = xloss.linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], **options)
        grads = torch.autograd.grad(loss, leaves)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, expected_grads, strict=True):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert len(chunks_run) == 1  # the chunked call only


def test_small_calls_under_jit_trace_and_inference_mode(chunks_run):
    """torch.jit.trace takes the chunked Function (the traced function follows new
    targets); inference mode takes the formed-logits route."""
    gen = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(6, 5, generator=gen), torch.randn(9, 5, generator=gen)
    target = torch.tensor([0, 1, 2, -100, 4, 8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace's notes on Python values
        traced = torch.jit.trace(
            lambda a, b, c: xloss.linear_cross_entropy(a, b, c), (hidden, weight, target),
            check_trace=False,
        )  # fmt: skip
    assert len(chunks_run) == 1
    other_hidden = torch.randn(6, 5, generator=gen)
    other_target = torch.tensor([3, -100, 0, 5, -100, 1])
    want = F.cross_entropy(other_hidden.double() @ weight.double().T, other_target)
    got = traced(other_hidden, weight, other_target)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    calls = len(chunks_run)
    with torch.inference_mode():
        got = xloss.linear_cross_entropy(other_hidden, weight, other_target)
    assert len(chunks_run) == calls  # formed logits
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_half_inputs_under_autocast_of_the_other_half_dtype():
    """fp16 leaves under bf16 autocast: a float32 loss and gradients in fp16, as torch's
    F.linear + F.cross_entropy (torch.stack in the autograd anchor once refused the mix:
    "Unexpected floating ScalarType in at::autocast::prioritize")."""
    hidden, weight, bias, target = make_inputs(seed=6, dtype=torch.float16)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = xloss.linear_cross_entropy(*leaves[:2], target, leaves[2])
    grads = torch.autograd.grad(loss, leaves)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float16 for g in grads)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    reference = F.cross_entropy(F.linear(*wide), target)
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=2e-3, atol=2e-3)
    for got, want in zip(grads, torch.autograd.grad(reference, wide), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_meta_tensors_create_nothing_elsewhere(backend, monkeypatch):
    """On the meta device (no autocast there: the autocast guard must not ask about it)."""
    if backend is None:
        monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("XLOSS_BACKEND", backend)
    hidden, weight = torch.empty(5, 4, device="meta"), torch.empty(V, 4, device="meta")
    target = torch.empty(5, dtype=torch.long, device="meta")
    options = dict(class_weight=torch.empty(V, device="meta"), label_smoothing=0.1)
    out = xloss.linear_cross_entropy(hidden, weight, target, validate_args=False, **options)
    assert out.device.type == "meta"
