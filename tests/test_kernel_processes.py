"""The numba kernel across processes and threads (cross_entropy's host call and
linear_cross_entropy's small-call route): fork after use, 4 Python threads at once, an
unwritable disk cache, and the pooled gradient buffer (xloss/ops/kernel.py).

Each scenario runs in a fresh interpreter, so the threading layer and the fork state are
those a user's process would have, whatever other tests did in this one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import xloss
from xloss.ops import kernel

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not kernel.kernel_available(), reason="numba unavailable")

SCENARIO = textwrap.dedent(
    """
    import multiprocessing as mp
    import threading
    import warnings

    import torch

    import xloss
    from xloss.ops import kernel

    def inputs(seed, dtype):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1100, 517, generator=g).to(dtype)  # > SERIAL_ELEMENTS
        y = torch.randint(0, 517, (1100,), generator=g)
        hidden = torch.randn(300, 64, generator=g).to(dtype)
        weight = (torch.randn(256, 64, generator=g) / 8).to(dtype)
        tokens = torch.randint(0, 256, (300,), generator=g)
        leaves = [t.requires_grad_() for t in (x, hidden, weight)]
        return leaves, y, tokens

    def loss_and_grad(seed):
        # cross_entropy's host call, and linear_cross_entropy's small-call route
        (x, hidden, weight), y, tokens = inputs(seed, torch.float32)
        loss = xloss.cross_entropy(x, y, label_smoothing=0.1)
        linear = xloss.linear_cross_entropy(hidden, weight, tokens, label_smoothing=0.1)
        (loss + linear).backward()
        return loss.detach(), x.grad, linear.detach(), hidden.grad, weight.grad

    def reference(seed):  # float64, independent of xloss
        (x, hidden, weight), y, tokens = inputs(seed, torch.float64)
        cross_entropy = torch.nn.functional.cross_entropy
        loss = cross_entropy(x, y, label_smoothing=0.1)
        linear = cross_entropy(hidden @ weight.T, tokens, label_smoothing=0.1)
        (loss + linear).backward()
        results = loss.detach(), x.grad, linear.detach(), hidden.grad, weight.grad
        return tuple(t.float() for t in results)

    def check(seed, got):
        want = reference(seed)
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            is_loss = index in (0, 2)  # else a gradient
            rtol, atol = (1e-5, 1e-6) if is_loss else (1e-4, 1e-7)
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)

    def child(queue):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = loss_and_grad(1)
        arrays = tuple(t.numpy() for t in result)  # plain pickles: no shared-memory handoff
        queue.put((arrays, kernel.kernel_available(), [str(w.message) for w in caught]))

    class Losses(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return loss_and_grad(10 + index)

    if __name__ == "__main__":
        check(0, loss_and_grad(0))  # the parent uses the kernel first
        assert kernel.kernel_available()
        context = mp.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue,))
        process.start()
        result, available, messages = queue.get(timeout=120)
        process.join(60)
        assert process.exitcode == 0, process.exitcode
        check(1, tuple(torch.from_numpy(a) for a in result))
        loader = torch.utils.data.DataLoader(
            Losses(), batch_size=None, num_workers=1, multiprocessing_context="fork"
        )
        for index, item in enumerate(loader):
            check(10 + index, item)
        # four Python threads at once, each checked against the reference
        errors = []

        def work(seed):
            try:
                for _ in range(15):
                    check(seed, loss_and_grad(seed))
            except BaseException as error:  # report, do not die silently
                errors.append(repr(error))

        threads = [threading.Thread(target=work, args=(20 + i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not errors, errors
        import numba

        print("LAYER", numba.threading_layer(), "CHILD_KERNEL", available, "MESSAGES", messages)
    """
)


def run_scenario(tmp_path, env_extra=None, timeout=600):
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_fork_after_use_and_four_threads_default_layer(tmp_path):
    """Regression: a child forked after the parent ran the kernel aborted ("fork() called
    from a process already using GNU OpenMP"); the workqueue layer alone aborted with 4
    threads. xloss serialises its launches, and picks the omp layer only where it runs on
    torch's own OpenMP runtime (else workqueue); a child forked after the omp layer ran
    keeps the kernel through its serial twins, without a warning."""
    layer = "omp" if kernel._shares_torch_openmp() else "workqueue"
    out = run_scenario(tmp_path)
    assert f"LAYER {layer} CHILD_KERNEL True MESSAGES []" in out, out


def test_fork_after_omp_layer_keeps_the_kernel_in_the_child(tmp_path):
    """A user who forces the omp layer: the forked child runs torch single-threaded and
    the kernels' serial twins (checked against float64 in the child) instead of aborting
    (it used to take the portable path with a warning); threads still work."""
    out = run_scenario(tmp_path, {"NUMBA_THREADING_LAYER": "omp"})
    assert "LAYER omp CHILD_KERNEL True MESSAGES []" in out, out


def test_omp_layer_leaves_torch_thread_count_alone(tmp_path):
    """Regression: starting numba's omp layer (forced by the user) set OpenMP's thread
    count to NUMBA_NUM_THREADS, and torch followed: torch.get_num_threads() read 4 after
    the first kernel launch where the user had set 2. Now it stays 2. Its start also
    enables nested regions (omp_set_nested: max active levels 1 -> 255); where the
    runtime is in the global scope, the depth set before stays."""
    code = textwrap.dedent(
        """
        import ctypes
        import torch
        torch.set_num_threads(2)
        try:
            runtime = ctypes.CDLL(None)
            runtime.omp_set_max_active_levels(1)
            read_depth = runtime.omp_get_max_active_levels
        except AttributeError:  # no OpenMP runtime in the global scope
            read_depth = lambda: 1
        import xloss
        x = torch.randn(1100, 517, requires_grad=True)  # > SERIAL_ELEMENTS: the pool starts
        y = torch.randint(0, 517, (1100,))
        xloss.cross_entropy(x, y).backward()
        want = torch.nn.functional.cross_entropy(x.detach().double(), y)
        torch.testing.assert_close(xloss.cross_entropy(x, y).double(), want)
        import numba
        print("LAYER", numba.threading_layer(), "TORCH_THREADS", torch.get_num_threads(),
              "DEPTH", read_depth())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_THREADING_LAYER": "omp",
           "NUMBA_NUM_THREADS": "4"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "LAYER omp TORCH_THREADS 2 DEPTH 1" in done.stdout, done.stdout


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run as an unprivileged user",
)
def test_unwritable_cache_compiles_without_it(tmp_path):
    """Regression: a read-only package directory and an unwritable HOME disabled the
    kernel ("numba is unavailable (cannot cache function ...)"), 6x slower. Now: compiled
    in the process, one warning, kernel on. Runs as `nobody`, for whom the checkout,
    its __pycache__ and HOME=/nonexistent are all read-only."""
    code = textwrap.dedent(
        """
        import warnings
        import torch
        import xloss
        from xloss.ops import kernel
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = torch.randn(64, 33).requires_grad_(True)
            y = torch.randint(0, 33, (64,))
            loss = xloss.cross_entropy(x, y)
            loss.backward()
            xloss.cross_entropy(x.half(), y)
        ref = torch.nn.functional.cross_entropy(x.double(), y)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        messages = [str(w.message) for w in caught if "xloss" in str(w.message)]
        print("AVAILABLE", kernel.kernel_available(), "WARNINGS", len(messages))
        print(messages)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    env.pop("NUMBA_CACHE_DIR", None)
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    done = subprocess.run(
        [*command, sys.executable, "-c", code], env=env, capture_output=True, text=True,
        timeout=600, cwd="/",
    )  # fmt: skip
    if "Permission denied" in done.stderr and "python" in done.stderr.lower():
        pytest.skip("the interpreter is not readable by an unprivileged user here")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AVAILABLE True WARNINGS 1" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "numba cannot write its disk cache" in done.stdout
    assert "not cached" in done.stdout and "NUMBA_CACHE_DIR" in done.stdout


def test_release_buffers_is_public_and_frees_the_pooled_buffer():
    """(B, C, T) logits (class_dim 1) take the general path, whose gradient goes to the
    pooled buffer; a small call on the host path ((N, C), or (B, T, C) flattened) gets a
    fresh gradient (see _host_call) and leaves the pool alone."""
    xloss.release_buffers()
    x = torch.randn(64, 100, requires_grad=True)
    y = torch.randint(0, 100, (64,))
    xloss.cross_entropy(x, y).backward()
    xloss.cross_entropy(x.reshape(8, 8, 100), y.reshape(8, 8), class_dim=-1).backward()
    assert kernel._buffer_pool == []
    x.grad = None

    def by_class_dim_1():  # (8, 100, 8) with the classes on axis 1
        logits = x.reshape(8, 8, 100).transpose(1, 2)
        return xloss.cross_entropy(logits, y.reshape(8, 8))

    by_class_dim_1().backward()
    assert kernel._buffer_pool and kernel._buffer_pool[0].nbytes == 64 * 100 * 4
    xloss.release_buffers()
    assert kernel._buffer_pool == []
    # still correct after a release: a fresh buffer is taken
    x.grad = None
    by_class_dim_1().backward()
    probs = torch.softmax(x.detach().double(), 1)
    expected = (probs - torch.nn.functional.one_hot(y, 100)) / 64
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-4, atol=1e-7)


BINARY_FORK = textwrap.dedent(
    """
    import multiprocessing as mp
    import threading

    import torch

    import xloss

    def loss_and_grad(seed):  # the plain binary kernel (no weight, no mask), > SERIAL_ELEMENTS
        g = torch.Generator().manual_seed(seed)
        x = (4 * torch.randn(1100, 517, generator=g)).requires_grad_(True)
        y = (torch.rand(1100, 517, generator=g) < 0.1).float()
        pos_weight = torch.linspace(0.5, 2.0, 517)
        loss = xloss.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight)
        loss.backward()
        return loss.detach(), x.grad

    def check(seed, got):  # float64 torch, independent of xloss
        g = torch.Generator().manual_seed(seed)
        x = (4 * torch.randn(1100, 517, generator=g)).double().requires_grad_(True)
        y = (torch.rand(1100, 517, generator=g) < 0.1).double()
        want = torch.nn.functional.binary_cross_entropy_with_logits(
            x, y, pos_weight=torch.linspace(0.5, 2.0, 517).double())
        want.backward()
        torch.testing.assert_close(got[0].double(), want.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[1].double(), x.grad, rtol=1e-4, atol=1e-9)

    def child(queue):
        queue.put(tuple(t.numpy() for t in loss_and_grad(1)))

    if __name__ == "__main__":
        check(0, loss_and_grad(0))  # the parent runs the parallel kernel first
        context = mp.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue,))
        process.start()
        result = queue.get(timeout=120)
        process.join(60)
        assert process.exitcode == 0, process.exitcode
        check(1, tuple(torch.from_numpy(a) for a in result))
        errors = []

        def work(seed):
            try:
                for _ in range(10):
                    check(seed, loss_and_grad(seed))
            except BaseException as error:
                errors.append(repr(error))

        threads = [threading.Thread(target=work, args=(20 + i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not errors, errors
        print("BINARY FORK AND THREADS OK")
    """
)


def test_binary_kernel_after_fork_and_in_four_threads(tmp_path):
    """The binary family's plain kernel (no weight, no mask) in a child forked after the
    parent ran it in parallel, and in four Python threads at once: each result checked
    against float64 torch."""
    script = tmp_path / "binary_fork.py"
    script.write_text(BINARY_FORK)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env.update(PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "BINARY FORK AND THREADS OK" in done.stdout
