"""One (table, case, variant) measurement in a fresh process; prints a JSON line.

Steps: 1. create the inputs (the variant's setup); 2. warm up (compilation, caches) and
drop cached buffers; 3. measure the STREAM triad (tables with a bandwidth column) and the
copy floor (tables with ``copy_floor_bytes``) now, since other processes sharing the
machine change the bandwidth from minute to minute; 4. record the resident set size and
reset the kernel's peak RSS counter (Linux ``/proc/self/clear_refs``); 5. time
``repeats`` steps and read the peak RSS; 6. measure the triad and the copy again;
7. report the median time, every time, the means of the two triads and copies and the
peak RSS above step 4.
"""

from __future__ import annotations

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


def measure(table: str, variant: str, case: dict, repeats: int, warmup: int) -> dict:
    from xloss.bench.registry import load_tables
    from xloss.bench.stream import copy_seconds, triad_bandwidth
    from xloss.ops import kernel

    spec = load_tables()[table]
    step = spec.variants[variant](case)
    for _ in range(warmup):
        step()
    kernel.release_buffers()  # the timed steps pay for (and count) their own buffers

    def floors() -> tuple[float | None, float | None]:
        triad = triad_bandwidth(1 << 24, repeats=5) if spec.bandwidth else None
        floor_bytes = spec.copy_floor_bytes and spec.copy_floor_bytes(case)
        return triad, (copy_seconds(floor_bytes) if floor_bytes else None)

    before = floors()
    gc.collect()
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_kib = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    after = floors()
    triad, copy = ((a + b) / 2 if a else None for a, b in zip(before, after, strict=True))
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
