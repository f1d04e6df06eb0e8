"""Benchmark: one training step of a tiny Llama, patched by xloss.integrations.transformers
or not, at a 32k vocabulary on CPU.

The model (hidden 64, 2 layers, V = 32000, fp32, random weights from a config) is small
so that the output layer and the loss dominate, as they do for the loss step of a large
model. A step is forward with labels + backward on a (B, T) = (4, 512) batch.

Each measurement runs in a fresh subprocess: build the model, one warm-up step (JIT,
gradients allocated), then reset the RSS high-water mark (/proc/self/clear_refs) and time
one more step. Peak memory is the high-water mark minus the RSS just before that step.
Variants alternate (plain, xloss, plain, ...) for ``--runs`` runs each; the table shows
the median and the range.

Run: ``python benchmarks/hf_llama.py`` (under ``flock -x /tmp/xloss-cpu.lock`` here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VOCAB, HIDDEN, BATCH, STEPS = 32000, 64, 4, 512


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(variant: str) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).float().train()
    if variant == "xloss":
        from xloss.integrations import transformers as xloss_hf

        xloss_hf.apply(model)
    ids = torch.randint(0, VOCAB, (BATCH, STEPS))

    def step():
        model.zero_grad(set_to_none=False)
        model(input_ids=ids, labels=ids).loss.backward()

    step()  # warm-up
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, peak_mib=(_status_kib("VmHWM") - before) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", choices=("plain", "xloss"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker)))
        return
    results = {"plain": [], "xloss": []}
    for _ in range(args.runs):
        for variant in results:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", variant],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    logits_mib = BATCH * STEPS * VOCAB * 4 / 2**20
    print(f"tiny Llama, V={VOCAB}, H={HIDDEN}, (B, T)=({BATCH}, {STEPS}), fp32 logits "
          f"{logits_mib:.0f} MiB; median [min, max] of {args.runs} runs")  # fmt: skip
    print(f"{'variant':8} {'step time (s)':>24} {'peak extra memory (MiB)':>28}")
    for variant, runs in results.items():
        times = [r["seconds"] for r in runs]
        peaks = [r["peak_mib"] for r in runs]
        print(
            f"{variant:8} {statistics.median(times):10.3f} [{min(times):.3f}, {max(times):.3f}]"
            f" {statistics.median(peaks):14.0f} [{min(peaks):.0f}, {max(peaks):.0f}]"
        )
    for key in ("seconds", "peak_mib"):
        ratios = [x[key] / p[key] for x, p in zip(results["xloss"], results["plain"], strict=True)]
        print(f"xloss / plain {key}: median {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}]")  # fmt: skip


if __name__ == "__main__":
    main()
