"""``xloss bench --device cuda``: forward + backward time and peak GPU memory on one GPU.

Two tables, bf16 as language models train:

- cross-entropy of (N, V) = (16384, 131072) logits: torch eager ``F.cross_entropy``,
  ``torch.compile`` of it, Liger-Kernel's ``LigerCrossEntropyLoss`` (when installed),
  ``xloss.cross_entropy`` and its ``inplace_backward=True``. Floor: one read and one write
  of the logits at the copy bandwidth measured on the device in the same run.
- linear cross-entropy of (N, H, V) = (16384, 4096, 131072): torch eager
  ``F.cross_entropy(x @ W.T, y)``, ``torch.compile`` of it, torch 2.13's chunked
  ``F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions())``, Liger's
  ``LigerFusedLinearCrossEntropyLoss`` and ``xloss.linear_cross_entropy``. Floor: the
  three bare GEMMs (logits, grad_x, grad_W) in bf16.

Steps per variant: 1. make the inputs; 2. ``warmup`` untimed steps (compilation,
autotuning, allocator); 3. reset the peak-memory counter and record the memory in use;
4. time ``repeats`` steps with CUDA events; 5. report the median time, the range, and the
peak ``torch.cuda.max_memory_allocated`` above step 3 (the gradients included).
``--quick`` runs (4096, 32768) and (4096, 2048, 32768). The same code runs on CPU tensors
(``device="cpu"``, no memory column) for the tests.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

CE_CASES = [dict(n=16384, v=131072)]
CE_QUICK = [dict(n=4096, v=32768)]
LINEAR_CASES = [dict(n=16384, h=4096, v=131072)]
LINEAR_QUICK = [dict(n=4096, h=2048, v=32768)]


def _torch():
    import torch

    return torch


# ------------------------------------------------------------------ cross-entropy


def _ce_inputs(case: dict, device: str):
    torch = _torch()
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(case["n"], case["v"], generator=generator, device=device)
    logits = logits.to(torch.bfloat16).requires_grad_()  # N x V
    target = torch.randint(0, case["v"], (case["n"],), generator=generator, device=device)
    return logits, target


def _ce_step(loss_fn, case: dict, device: str, non_leaf: bool = False):
    logits, target = _ce_inputs(case, device)

    def step():
        work = logits * 1 if non_leaf else logits  # in place needs a non-leaf
        loss = loss_fn(work, target)
        loss.backward()
        logits.grad = None
        return loss

    return step


def ce_torch(case, device):
    import torch.nn.functional as F

    return _ce_step(F.cross_entropy, case, device)


def ce_compile(case, device):
    import torch.nn.functional as F

    return _ce_step(_torch().compile(F.cross_entropy), case, device)


def ce_liger(case, device):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return _ce_step(LigerCrossEntropyLoss(), case, device)


def ce_xloss(case, device):
    import xloss

    return _ce_step(xloss.cross_entropy, case, device)


def ce_xloss_inplace(case, device):
    import xloss

    def loss_fn(logits, target):
        return xloss.cross_entropy(logits, target, inplace_backward=True)

    return _ce_step(loss_fn, case, device, non_leaf=True)


# ------------------------------------------------------------ linear cross-entropy


def _linear_inputs(case: dict, device: str):
    torch = _torch()
    generator = torch.Generator(device=device).manual_seed(0)
    n, h, v = case["n"], case["h"], case["v"]
    x = torch.randn(n, h, generator=generator, device=device).to(torch.bfloat16)  # N x H
    w = torch.randn(v, h, generator=generator, device=device) / h**0.5  # V x H
    y = torch.randint(0, v, (n,), generator=generator, device=device)
    return x.requires_grad_(), w.to(torch.bfloat16).requires_grad_(), y


def _linear_step(loss_fn, case: dict, device: str):
    x, w, y = _linear_inputs(case, device)

    def step():
        loss = loss_fn(x, w, y)
        loss.backward()
        x.grad = w.grad = None
        return loss

    return step


def linear_gemms(case, device):
    torch = _torch()
    x, w, _ = _linear_inputs(case, device)
    x, w = x.detach(), w.detach()
    logits = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=device)  # N x V
    grad_x, grad_w = torch.empty_like(x), torch.empty_like(w)

    def step():
        torch.mm(x, w.T, out=logits)
        torch.mm(logits, w, out=grad_x)
        torch.mm(logits.T, x, out=grad_w)

    return step


def _matmul_ce(x, w, y):
    import torch.nn.functional as F

    return F.cross_entropy(x @ w.T, y)


def linear_torch(case, device):
    return _linear_step(_matmul_ce, case, device)


def linear_compile(case, device):
    return _linear_step(_torch().compile(_matmul_ce), case, device)


def linear_torch_chunked(case, device):
    torch = _torch()

    def loss_fn(x, w, y):
        options = torch.nn.LinearCrossEntropyOptions()
        return torch.nn.functional.linear_cross_entropy(x, w, y, options=options)

    return _linear_step(loss_fn, case, device)


def linear_liger(case, device):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return _linear_step(lambda x, w, y: loss(w, x, y), case, device)


def linear_xloss(case, device):
    import xloss

    return _linear_step(xloss.linear_cross_entropy, case, device)


TABLES: dict[str, dict] = {
    "cross_entropy": dict(
        title="cross-entropy forward + backward, bf16 logits",
        cases=CE_CASES,
        quick=CE_QUICK,
        variants={
            "torch eager": ce_torch,
            "torch.compile": ce_compile,
            "liger": ce_liger,
            "xloss": ce_xloss,
            "xloss in place": ce_xloss_inplace,
        },
        label=lambda c: f"N={c['n']} V={c['v']}",
    ),
    "linear_cross_entropy": dict(
        title="linear cross-entropy forward + backward, bf16",
        cases=LINEAR_CASES,
        quick=LINEAR_QUICK,
        variants={
            "3 bare GEMMs": linear_gemms,
            "torch eager": linear_torch,
            "torch.compile": linear_compile,
            "torch chunked": linear_torch_chunked,
            "liger": linear_liger,
            "xloss": linear_xloss,
        },
        label=lambda c: f"N={c['n']} H={c['h']} V={c['v']}",
    ),
}


def logits_bytes(case: dict) -> int:
    """Bytes of the bf16 N x V logits."""
    return 2 * case["n"] * case["v"]


def copy_seconds(nbytes: int, device: str, repeats: int = 5) -> float:
    """Median time of one device copy of ``nbytes`` (a read and a write of each byte)."""
    torch = _torch()
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dest = torch.empty_like(source)
    return measure(lambda: dest.copy_(source), device, repeats=repeats, warmup=1)["seconds"]


def measure(step: Callable, device: str, repeats: int = 5, warmup: int = 2) -> dict:
    """Steps 2-5 of the module docstring for one prepared ``step``."""
    torch = _torch()
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        in_use = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated(device) - in_use if cuda else None
    return dict(seconds=statistics.median(times), all_seconds=times, peak_extra_bytes=peak)


def run_table(name: str, *, quick: bool, device: str, repeats: int, warmup: int) -> list[dict]:
    """Every (case, variant) of table ``name``; a failing variant (Liger missing, out of
    memory) becomes a row with its error."""
    torch = _torch()
    table = TABLES[name]
    results = []
    for case in table["quick"] if quick else table["cases"]:
        floor = copy_seconds(logits_bytes(case), device) if name == "cross_entropy" else None
        for variant, setup in table["variants"].items():
            row = dict(table=name, variant=variant, case=case, floor_seconds=floor)
            try:
                row.update(measure(setup(case, device), device, repeats, warmup))
            except Exception as error:  # noqa: BLE001 (reported in the table)
                row.update(seconds=None, error=f"{type(error).__name__}: {error}"[:120])
            results.append(row)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return results


def format_table(name: str, results: list[dict]) -> str:
    """Median ms, range, ratio to the floor (copy of the logits, or the bare GEMMs) and
    peak extra GiB."""
    table = TABLES[name]
    header = f"{'case':<26} {'variant':<15} {'ms':>8} {'range ms':>15}"
    header += f" {'floor/time':>10} {'peak GiB':>9}"
    lines = [table["title"], header, "-" * len(header)]
    for row in results:
        start = f"{table['label'](row['case']):<26} {row['variant']:<15}"
        if row.get("seconds") is None:
            lines.append(f"{start} failed: {row.get('error')}")
            continue
        floor = row.get("floor_seconds")
        if floor is None:  # linear CE: the bare GEMMs of the same case
            floor = next((r["seconds"] for r in results if r["variant"] == "3 bare GEMMs"
                          and r["case"] == row["case"] and r.get("seconds")), None)  # fmt: skip
        span = f"{1e3 * min(row['all_seconds']):.1f}-{1e3 * max(row['all_seconds']):.1f}"
        share = f"{100 * floor / row['seconds']:.0f}%" if floor else "-"
        peak = row.get("peak_extra_bytes")
        memory = f"{peak / 2**30:.2f}" if peak is not None else "-"
        lines.append(f"{start} {1e3 * row['seconds']:8.2f} {span:>15} {share:>10} {memory:>9}")
    if name == "cross_entropy":
        lines.append("floor: one read + one write of the bf16 logits at the copy bandwidth "
                     "measured here")  # fmt: skip
    return "\n".join(lines)


def run_cuda(args) -> int:
    """Entry point of ``xloss bench --device cuda``."""
    torch = _torch()
    if not torch.cuda.is_available():
        raise SystemExit(
            "xloss bench --device cuda needs a CUDA GPU, and torch.cuda.is_available() is "
            "False here; run it on a GPU machine (the CPU tables: xloss bench)"
        )
    from xloss.bench import check_table_names

    check_table_names(args.tables, list(TABLES))
    names = args.tables or list(TABLES)
    repeats = args.repeats or 5
    report = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        tables={},
    )
    for name in names:
        results = run_table(name, quick=args.quick, device="cuda", repeats=repeats,
                            warmup=args.warmup)  # fmt: skip
        report["tables"][name] = results
        print()
        print(format_table(name, results))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_cuda.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out_dir / 'bench_cuda.json'}")
    return 0
