"""Time and memory of one loss step: plain PyTorch against xloss's linear cross-entropy.

Both paths get the same hidden states (B, T, d), output embedding (V, d), targets and
padding mask, and compute the same number: the label-smoothed CE averaged over the
valid positions, followed by its backward pass to the hidden states and the weight.

- torch: ``logits = hidden @ weight.T``, ``F.cross_entropy(..., reduction="none")``,
  then the mask applied after the reduction ``(loss * mask).sum() / mask.sum()``.
- xloss: ``xloss.linear_cross_entropy(hidden, weight, target, mask=mask, ...)``.

What is measured, and how:

- time: the median wall time of forward + backward over ``repeats`` runs, the two paths
  alternating so that a busy machine slows both alike.
- held for backward: the bytes of the tensors that autograd saves between the forward
  and the backward pass (seen with ``torch.autograd.graph.saved_tensors_hooks``), not
  counting the inputs themselves, which the model holds anyway. This is what a loss adds
  to a training step's activation memory.
- peak RSS increase: in a fresh Python process per path, the increase of the process's
  resident memory high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
  over one forward + backward, after one warm-up step (which compiles any kernel). The
  two processes run side by side, before the timing. ``MALLOC_MMAP_THRESHOLD_`` is fixed
  so that freed buffers go back to the system and the measured step has to fault its
  memory in again. Linux only; None elsewhere.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import xloss

PATHS = ("torch", "xloss")


def torch_loss(hidden: Tensor, weight: Tensor, target: Tensor, mask: Tensor, eps: float) -> Tensor:
    """The plain PyTorch way: materialise the logits, reduce with 'none', then mask."""
    logits = hidden @ weight.T  # B x T x V
    loss = F.cross_entropy(
        logits.flatten(0, 1), target.flatten(), reduction="none", label_smoothing=eps
    )
    keep = mask.flatten().to(loss.dtype)
    return (loss * keep).sum() / keep.sum()


def xloss_loss(hidden: Tensor, weight: Tensor, target: Tensor, mask: Tensor, eps: float) -> Tensor:
    """xloss: the same number without the logits in memory."""
    return xloss.linear_cross_entropy(hidden, weight, target, mask=mask, label_smoothing=eps)


LOSSES = {"torch": torch_loss, "xloss": xloss_loss}


def _leaves(batch: dict) -> tuple[Tensor, Tensor]:
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    weight = batch["weight"].detach().clone().requires_grad_(True)
    return hidden, weight


def step(path: str, batch: dict) -> Tensor:
    """One forward + backward of ``path`` on fresh leaf copies; returns the loss."""
    hidden, weight = _leaves(batch)
    loss = LOSSES[path](hidden, weight, batch["target"], batch["mask"], batch["eps"])
    loss.backward()
    return loss.detach()


def held_for_backward(path: str, batch: dict) -> int:
    """Bytes autograd saves for the backward pass, inputs excluded (storages counted once)."""
    hidden, weight = _leaves(batch)
    inputs = {
        t.untyped_storage().data_ptr() for t in (hidden, weight, batch["target"], batch["mask"])
    }
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = LOSSES[path](hidden, weight, batch["target"], batch["mask"], batch["eps"])
    loss.backward()
    return sum(saved.values())


def median_seconds(batch: dict, repeats: int) -> dict[str, float]:
    """Median forward + backward time per path, the paths alternating."""
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for path in PATHS:  # warm-up: first-call costs (kernel compilation) are not timed
        step(path, batch)
    for _ in range(repeats):
        for path in PATHS:
            started = time.perf_counter()
            step(path, batch)
            times[path].append(time.perf_counter() - started)
    return {path: statistics.median(values) for path, values in times.items()}


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _measure_peaks_in_this_process(path: str, batch_files: list[str]) -> list[int]:
    """Entry point of the child process: peak RSS increase of one step per batch, bytes."""
    from xloss.demo import set_threads

    set_threads(int(os.environ.get("XLOSS_DEMO_THREADS", torch.get_num_threads())))
    peaks = []
    for batch_file in batch_files:
        batch = torch.load(batch_file)
        step(path, batch)  # warm-up: kernel compilation and first-call allocations
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _read_status_kib("VmRSS")
        step(path, batch)
        peaks.append((_read_status_kib("VmHWM") - before) * 1024)
        del batch
        gc.collect()
    return peaks


def peak_rss_increase(batches: list[dict], threads: int) -> dict[str, list[int | None]]:
    """Per path, the peak RSS increase of one step on each batch, measured in a fresh
    process per path (the two run side by side); None where /proc is not available."""
    if not Path("/proc/self/clear_refs").exists():
        return {path: [None] * len(batches) for path in PATHS}
    with tempfile.TemporaryDirectory() as folder:
        batch_files = []
        for i, batch in enumerate(batches):
            batch_files.append(str(Path(folder) / f"batch{i}.pt"))
            torch.save(batch, batch_files[-1])
        # Fixing the mmap threshold stops glibc from keeping freed buffers for reuse.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", XLOSS_DEMO_THREADS=str(threads))
        children = {
            path: subprocess.Popen(
                [sys.executable, "-m", "xloss.demo.lossbench", path, *batch_files],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for path in PATHS
        }
        result: dict[str, list[int | None]] = {}
        for path, child in children.items():
            stdout, stderr = child.communicate()
            if child.returncode != 0:
                print(f"memory measurement of {path} failed:\n{stderr}", file=sys.stderr)
                result[path] = [None] * len(batches)
            else:
                result[path] = json.loads(stdout.strip().splitlines()[-1])
    return result


def compare(
    batches: list[dict],
    *,
    repeats: int,
    threads: int,
    measure_rss: bool = True,
    progress: bool = False,
) -> list[dict]:
    """All measurements per batch: shapes, loss values, time, saved and peak memory."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(batches) + measure_rss, desc="loss step", disable=not progress, leave=False
    )
    if measure_rss:
        bar.set_postfix_str("peak memory, one process per path")
        peaks = peak_rss_increase(batches, threads)
        bar.update()
    else:
        peaks = {path: [None] * len(batches) for path in PATHS}
    results = []
    for i, batch in enumerate(batches):
        bar.set_postfix_str(f"time, V={batch['weight'].shape[0]}")
        losses = {path: float(step(path, batch)) for path in PATHS}
        seconds = median_seconds(batch, repeats)
        held = {path: held_for_backward(path, batch) for path in PATHS}
        positions, vocab = batch["target"].numel(), batch["weight"].shape[0]
        results.append(
            {
                "positions": positions,
                "valid_positions": int(batch["mask"].sum()),
                "hidden_dim": batch["weight"].shape[1],
                "vocab": vocab,
                "logits_bytes": positions * vocab * batch["hidden"].element_size(),
                "repeats": repeats,
                **{
                    path: {
                        "loss": losses[path],
                        "seconds": seconds[path],
                        "held_for_backward": held[path],
                        "peak_rss_increase": peaks[path][i],
                    }
                    for path in PATHS
                },
            }
        )
        bar.update()
    bar.close()
    return results


if __name__ == "__main__":
    print(json.dumps(_measure_peaks_in_this_process(sys.argv[1], sys.argv[2:])))
