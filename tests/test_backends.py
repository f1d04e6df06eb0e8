"""xloss.backends: which implementation serves a call, and forcing one."""

import os
import threading

import pytest
import torch

import xloss
from xloss import backends
from xloss.ops import kernel
from xloss.ops.fused_cross_entropy import fused_kernel_applies

NUMBA = kernel.kernel_available()


def reference_loss(x, target, eps=0.0):
    """float64 mean cross-entropy with label smoothing, from the formula."""
    logp = x.double().log_softmax(-1)
    nll = -logp.gather(1, target[:, None])[:, 0]
    return ((1 - eps) * nll - eps * logp.mean(-1)).mean()


def test_available_lists_torch_last_and_numba_when_it_imports():
    names = backends.available()
    assert names[-1] == "torch"
    assert ("numba" in names) == NUMBA
    assert set(names) <= set(backends.BACKENDS)


@pytest.mark.skipif(not NUMBA, reason="numba is unavailable")
def test_default_choice_per_device_and_dtype(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.select("cpu", torch.float32) == "numba"
    assert backends.select("cpu", torch.bfloat16) == "numba"
    assert backends.select("cpu", torch.float64) == "torch"  # no kernel for float64
    assert backends.select("cpu", torch.float32, kernel_ok=False) == "torch"  # soft targets
    assert backends.select("meta", torch.float32) == "torch"
    monkeypatch.setattr(backends, "_triton_ok", {"ok": True})
    assert backends.select("cuda", torch.bfloat16) == "triton"
    monkeypatch.setattr(backends, "_triton_ok", {"ok": False})
    assert backends.select("cuda", torch.bfloat16) == "torch"


def test_use_forces_a_backend_and_nests():
    assert backends.forced() is None
    with backends.use("torch"):
        assert backends.select("cpu", torch.float32) == "torch"
        assert not fused_kernel_applies(torch.zeros(2, 3), False)
        if NUMBA:
            with backends.use("numba"):
                assert backends.select("cpu", torch.float32) == "numba"
        assert backends.forced() == "torch"
    assert backends.forced() is None


def test_use_is_per_thread():
    seen = []
    with backends.use("torch"):
        worker = threading.Thread(target=lambda: seen.append(backends.forced()))
        worker.start()
        worker.join()
        seen.append(backends.forced())
    assert seen == [None, "torch"]


@pytest.mark.parametrize("store", ["os.environ's own", "none (os.environ.get)"])
def test_environment_read_follows_os_environ(monkeypatch, store):
    """The variable is read at each call, as os.environ holds it: set, changed, deleted,
    non-ASCII; with os.environ's own store and without it (non-POSIX)."""
    if store.startswith("none"):
        monkeypatch.setattr(backends, "_ENV_STORE", None)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends._env_value() == ""
    for value in ("torch", "auto", "", "t\u00f6rch", "numba"):
        os.environ[backends.ENV_VAR] = value
        assert backends._env_value() == os.environ.get(backends.ENV_VAR) == value
    del os.environ[backends.ENV_VAR]
    assert backends._env_value() == "" and backends.forced() is None
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.forced() == "torch"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.forced() == "torch"
    assert backends.select("cpu", torch.float32) == "torch"
    if NUMBA:
        with backends.use("numba"):  # the context manager wins over the variable
            assert backends.select("cpu", torch.float32) == "numba"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert backends.forced() is None
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    message = "XLOSS_BACKEND must be one of 'numba', 'triton', 'torch', got 'cuda'"
    with pytest.raises(ValueError, match=message):
        xloss.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_errors_name_the_backend_and_the_way_out(monkeypatch):
    with pytest.raises(ValueError, match="`name` must be one of"):
        with backends.use("gpu"):
            pass
    monkeypatch.setattr(backends, "_triton_ok", {"ok": False})
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable.*use backend 'torch'"):
        with backends.use("triton"):
            pass
    monkeypatch.setattr(backends, "_numba_available", lambda: False)
    with pytest.raises(RuntimeError, match="backend 'numba' is unavailable"):
        with backends.use("numba"):
            pass


@pytest.mark.skipif(not NUMBA, reason="numba is unavailable")
def test_forced_kernel_on_the_wrong_device_raises():
    with backends.use("numba"):
        with pytest.raises(RuntimeError, match="'numba' runs on CPU tensors only, got meta"):
            backends.select("meta", torch.float32)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "_triton_ok", {"ok": True})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backends.use("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            xloss.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_forced_torch_never_launches_a_kernel(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(kernel, "_launch", boom)
    monkeypatch.setattr("xloss.ops.linear.select_row_kernel", lambda *a: boom)
    x = torch.randn(5, 7)
    target = torch.tensor([0, 6, 2, 3, 1])
    with backends.use("torch"):
        loss = xloss.cross_entropy(x, target, label_smoothing=0.1)
        linear = xloss.linear_cross_entropy(x, torch.randn(4, 7), target.clamp(max=3))
    torch.testing.assert_close(loss.double(), reference_loss(x, target, 0.1))
    assert linear.isfinite()


def hessian_vector_product(loss_fn, x, v):
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * v).sum(), x)
    return hvp


def test_forced_torch_gives_second_order_gradients_of_cross_entropy():
    torch.manual_seed(0)
    x = torch.randn(6, 9)
    target = torch.randint(0, 9, (6,))
    v = torch.randn(6, 9)
    with backends.use("torch"):
        got = hessian_vector_product(
            lambda z: xloss.cross_entropy(z, target, label_smoothing=0.1), x, v
        )
    want = hessian_vector_product(lambda z: reference_loss(z, target, 0.1), x.double(), v.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_forced_torch_gives_second_order_gradients_of_linear_cross_entropy():
    torch.manual_seed(1)
    hidden = torch.randn(6, 5)
    weight = torch.randn(9, 5)
    target = torch.randint(0, 9, (6,))
    target[1] = -100  # a dropped row
    kept = target != -100
    v = torch.randn(6, 5)

    def reference(h):
        return reference_loss(h[kept] @ weight.double().T, target[kept], 0.1)

    with backends.use("torch"):
        got = hessian_vector_product(
            lambda h: xloss.linear_cross_entropy(h, weight, target, label_smoothing=0.1),
            hidden,
            v,
        )
        per_row = xloss.linear_cross_entropy(
            hidden, weight, target, label_smoothing=0.1, reduction="none"
        )
    want = hessian_vector_product(reference, hidden.double(), v.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(per_row[kept].mean().double(), reference(hidden.double()))
    assert per_row[1] == 0


def test_choice_is_a_constant_under_torch_compile():
    """No graph break from the backend choice, in automatic and forced mode."""
    x = torch.randn(4, 6)
    target = torch.tensor([0, 5, 2, 1])

    def loss_fn(logits, labels):
        return xloss.cross_entropy(logits, labels, label_smoothing=0.1, validate_args=False)

    for forced in (None, "torch"):
        torch._dynamo.reset()
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        if forced is None:
            out = compiled(x, target)
        else:
            with backends.use(forced):
                out = compiled(x, target)
        torch.testing.assert_close(out.double(), reference_loss(x, target, 0.1))
