"""Start-up: a warm first call loads the cached kernels without numba's full refresh and
without torch._dynamo; a cold cache says once that it compiles. Each case runs in a fresh
process, since both effects happen once per process."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=600,
    )


def test_first_call_imports_no_dynamo_and_matches_the_reference(tmp_path):
    """The warm first call pulls in no module it does not use, and is right."""
    code = """
        import sys, torch, xloss
        x = torch.randn(37, 211, dtype=torch.float64)
        y = torch.randint(0, 211, (37,))
        logits = x.float().requires_grad_()
        loss = xloss.cross_entropy(logits, y, label_smoothing=0.1)
        loss.backward()
        assert "torch._dynamo" not in sys.modules, "the first call imported torch._dynamo"
        # nor numpy.ma (numba's typeof of an ndarray), nor xloss.distributed (lazy)
        assert "numpy.ma" not in sys.modules and "xloss.distributed" not in sys.modules
        p = x.softmax(1)
        want = -((0.9 * torch.nn.functional.one_hot(y, 211) + 0.1 / 211) * x.log_softmax(1))
        assert abs(loss.item() - want.sum(1).mean().item()) < 1e-5
        grad = (p - 0.9 * torch.nn.functional.one_hot(y, 211) - 0.1 / 211) / 37
        assert (logits.grad.double() - grad).abs().max() < 1e-6
        import torch._dynamo  # from now on torch's own dynamo-disabled wrapper serves
        in_place = x.float().requires_grad_().clone()
        again = xloss.cross_entropy(in_place, y, label_smoothing=0.1, inplace_backward=True)
        assert abs(again.item() - loss.item()) < 1e-6
        print("ok")
    """
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_cache_hits_skip_the_refresh_and_a_miss_says_it_compiles(tmp_path):
    """On a tiny kernel of its own, with its own cache folder: the first process compiles
    (one notice line, numba's implementations loaded), the second loads from the cache
    without loading them; a later compile in that process still works."""
    module = tmp_path / "tiny_kernel.py"
    module.write_text(
        textwrap.dedent(
            """
            from numba import njit

            @njit(cache=True)
            def double_sum(values):
                total = 0.0
                for v in values:
                    total += 2.0 * v
                return total
            """
        )
    )
    code = f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import numpy as np
        from xloss.ops import _numba_rows
        import tiny_kernel
        _numba_rows._load_cache_without_refresh(tiny_kernel.double_sum)
        assert tiny_kernel.double_sum(np.arange(4.0)) == 12.0
        print("arraymath" if "numba.np.arraymath" in sys.modules else "no arraymath")
        from numba import njit
        assert njit(lambda a: a.sum())(np.ones(3)) == 3.0  # a compile refreshes as always
    """
    cache = dict(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    cold = _run(code, tmp_path, **cache)
    warm = _run(code, tmp_path, **cache)
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr + warm.stderr
    from xloss.ops._numba_rows import COLD_COMPILE_NOTICE

    assert cold.stderr.count(COLD_COMPILE_NOTICE) == 1
    assert COLD_COMPILE_NOTICE not in warm.stderr
    assert cold.stdout.strip() == "arraymath"
    assert warm.stdout.strip() == "no arraymath"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_kernels_load_from_the_cache_too(dtype, tmp_path):
    code = f"""
        import torch, xloss
        x = torch.randn(9, 50).to(torch.{dtype}).requires_grad_()
        y = torch.randint(0, 50, (9,))
        loss = xloss.cross_entropy(x, y)
        loss.backward()
        want = torch.nn.functional.cross_entropy(x.detach().double(), y)
        assert abs(loss.item() - want.item()) < 2e-2 * want.item(), (loss, want)  # bf16 output
        print("ok")
    """
    for _ in range(2):  # the second process loads what the first may have compiled
        done = _run(code, tmp_path)
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_numbas_pedantic_ir_warning_is_silenced_once_the_kernels_load():
    """numba's "internal pedantic check" (NumbaIRAssumptionWarning) fires a dozen times
    while the fp16/bf16 binary kernels compile; loading the kernels silences it."""
    import warnings

    from numba.core.errors import NumbaIRAssumptionWarning

    from xloss.ops import kernel

    with warnings.catch_warnings():
        warnings.resetwarnings()
        kernel._import_kernels()
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("variable 'x' is not in scope.", NumbaIRAssumptionWarning, stacklevel=1)
    assert caught == []


def test_a_cache_hit_imports_no_numba_module_for_inlined_functions(tmp_path):
    """A cached kernel that inlines np.empty (from numba.np.arrayobj) loads without
    importing that module (its runtime environment is rebuilt without it); the kernel
    runs, raises its own errors, and a later compile in the same process gets the real
    environment and works."""
    module = tmp_path / "scratch_kernel.py"
    module.write_text(
        textwrap.dedent(
            """
            import numpy as np
            from numba import njit

            @njit(cache=True)
            def scaled_copy(values, factor):
                if factor < 0:
                    raise ValueError("negative factor")
                out = np.empty(values.shape[0], dtype=np.float32)
                for i in range(values.shape[0]):
                    out[i] = values[i] * factor
                return out
            """
        )
    )
    code = f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import numpy as np
        from xloss.ops import _numba_rows
        import scratch_kernel
        _numba_rows._load_cache_without_refresh(scratch_kernel.scaled_copy)
        values = np.arange(5, dtype=np.float32)
        assert (scratch_kernel.scaled_copy(values, np.float32(2.0)) == 2 * values).all()
        try:
            scratch_kernel.scaled_copy(values, np.float32(-1.0))
        except ValueError as error:
            assert "negative factor" in str(error)
        else:
            raise AssertionError("no error")
        print("arrayobj" if "numba.np.arrayobj" in sys.modules else "no arrayobj")
        from numba import njit
        from numba.core.environment import Environment

        @njit
        def sorted_copy(a):
            out = np.empty_like(a)
            out[:] = np.sort(a)
            return out

        assert (sorted_copy(values[::-1].copy()) == values).all()
        envs = [e for e in list(Environment._memo.values()) if e.globals.get("__name__")
                == "numba.np.arrayobj"]
        assert envs and all(len(e.globals) > 1 for e in envs)  # real module globals
        print("ok")
    """
    cache = dict(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    cold = _run(code, tmp_path, **cache)
    warm = _run(code, tmp_path, **cache)
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr + warm.stderr
    assert cold.stdout.splitlines() == ["arrayobj", "ok"]
    assert warm.stdout.splitlines() == ["no arrayobj", "ok"]


def test_binary_kernels_load_from_the_cache_without_the_refresh():
    """Every binary-family kernel, parallel and serial, has the loader that skips numba's
    target refresh on a cache hit (the first BCE of a process took 0.74-0.90 s without
    it), as the row kernels have."""
    from xloss.ops import _numba_rows, fused_binary

    kernels = fused_binary._binary_kernels()
    dispatchers = (*kernels.KERNELS, *kernels.SERIAL_KERNELS)
    rows = (_numba_rows.rows_f32, _numba_rows.rows_f32_serial, _numba_rows.rows_half)
    for dispatcher in dispatchers + rows:
        assert "load_overload" in vars(dispatcher._cache), dispatcher.__name__
