"""One (table, case, variant) measurement in a fresh process; prints a JSON line.

Steps: 1. create the inputs (the variant's setup); 2. measure the STREAM triad (tables
with a bandwidth column) and the copy floor (tables with ``copy_floor_bytes``), since
other processes sharing the machine change the bandwidth from minute to minute; 3. warm
up (compilation, caches, pooled buffers) for at least ``warmup`` steps and
``WARMUP_SECONDS``; 4. time ``repeats`` steps; 5. measure the triad and the copy again;
6. drop cached buffers, make the heap return freed memory (see
:func:`_heap_follows_live_memory`), record the resident set size, reset the kernel's peak
RSS counter (Linux ``/proc/self/clear_refs``) and run ``MEMORY_STEPS`` more steps (fewer
once ``MEMORY_SECONDS`` have passed), which pay for (and count) their own buffers;
7. report the median time, every time, the means of the two triads and copies and the
peak RSS of step 6 above its start. The process ends there: step 6 leaves the heap's
settings changed.

The timed steps are steady-state steps, as in a training loop. They used to follow the
triad (three 128 MiB arrays) and two warm-up steps right away, with the kernel's pooled
buffer dropped: the first steps then ran slow for a while (xloss BCE at 4096 x 1000: 3.7,
3.0, 2.4, 2.0 ms, then 1.7-2.0; torch's BCE likewise), and a median of 5 reported the
tail of that ramp.
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import statistics
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


WARMUP_SECONDS = 0.3  # untimed steps last at least this long (and number at least `warmup`)
# steps whose peak RSS is read: torch's BCE peaked at 2.9-5.0x its input from one step to
# the next (12 single steps in one process), so one step was a draw
MEMORY_STEPS = 3
MEMORY_SECONDS = 1.0  # no further memory step once this much time has passed


def _heap_follows_live_memory() -> None:
    """From now on, let the resident set follow what is allocated (glibc; elsewhere a
    no-op): give freed heap memory back to the system and serve every block of 64 KiB or
    more by a mapping of its own. Without this, glibc raises its mapping threshold to the
    size of each large block freed (up to 32 MiB); later blocks of that size come from the
    heap and stay resident once freed, so a step after the floors' copies reused them and
    its peak RSS did not grow (torch's BCE and xloss's gradient both read 0.00x)."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, no longer raised
    except (AttributeError, OSError):
        pass


def measure(table: str, variant: str, case: dict, repeats: int, warmup: int) -> dict:
    from xloss.bench.registry import load_tables
    from xloss.bench.stream import copy_seconds, triad_bandwidth
    from xloss.ops import kernel

    spec = load_tables()[table]
    step = spec.variants[variant](case)

    def floors() -> tuple[float | None, float | None]:
        triad = triad_bandwidth(1 << 24, repeats=5) if spec.bandwidth else None
        floor_bytes = spec.copy_floor_bytes and spec.copy_floor_bytes(case)
        return triad, (copy_seconds(floor_bytes) if floor_bytes else None)

    before = floors()
    warm_until = time.perf_counter() + WARMUP_SECONDS
    done = 0
    while done < warmup or time.perf_counter() < warm_until:
        step()
        done += 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = floors()
    triad, copy = ((a + b) / 2 if a else None for a, b in zip(before, after, strict=True))

    kernel.release_buffers()  # the measured steps pay for (and count) their own buffers
    gc.collect()
    _heap_follows_live_memory()
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    memory_until = time.perf_counter() + MEMORY_SECONDS
    for _ in range(MEMORY_STEPS):
        step()
        if time.perf_counter() > memory_until:  # a long step (linear CE: seconds) is enough
            break
    peak_kib = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "table": table,
        "variant": variant,
        "case": case,
        "seconds": statistics.median(times),
        "all_seconds": times,
        "peak_extra_bytes": max(0, peak_kib - baseline_kib) * 1024,
        "triad_bytes_per_second": triad,
        "triad_before_after": [before[0], after[0]],
        "copy_seconds": copy,
        "copy_before_after": [before[1], after[1]],
    }


def main() -> None:
    request = json.loads(sys.argv[1])
    print(json.dumps(measure(**request)))


if __name__ == "__main__":
    main()
