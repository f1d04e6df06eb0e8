"""The demo's outputs: a text table, ``demo.json`` and ``demo.png``."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

PATHS = ("torch", "xloss")


def _bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]


def summary_table(results: dict) -> str:
    """The printed summary: the LM, the loss step comparison, the multi-label classifier."""
    lm, lines = results["lm"], []
    runs = lm["runs"]
    lines.append(
        f"Character LM on the pydoc topics: vocabulary {lm['vocab']}, "
        f"{lm['config']['layers']} layers x {lm['config']['dim']} dims, "
        f"{lm['config']['steps']} steps of {lm['config']['batch_size']} padded pieces, "
        f"{lm['valid_chars']:,} validation characters"
    )
    header = ["", *[f"eps={r['label_smoothing']:g}" for r in runs]]
    lines += _rows(
        header,
        [
            ["validation perplexity", *[f"{r['perplexity']:.2f}" for r in runs]],
            ["top-1 accuracy", *[f"{r['accuracy']:.1%}" for r in runs]],
            ["ECE (15 bins, top-1)", *[f"{r['ece']:.4f}" for r in runs]],
            ["training time", *[f"{r['seconds']:.1f} s" for r in runs]],
        ],
    )
    lines.append(
        f"baselines: uniform perplexity {lm['vocab']}, "
        f"unigram (train character frequencies) {lm['unigram_perplexity']:.2f}"
    )

    for bench in results["loss_step"]:
        lines.append("")
        lines.append(
            f"Loss step, forward + backward, {bench['title']}: {bench['positions']:,} positions "
            f"({bench['valid_positions']:,} valid) x vocabulary {bench['vocab']:,}, "
            f"logits would be {_bytes(bench['logits_bytes'])}"
        )
        rows = []
        for path, name in (
            ("torch", "torch matmul + F.cross_entropy + mask"),
            ("xloss", "xloss.linear_cross_entropy"),
        ):
            r = bench[path]
            rows.append(
                [
                    name,
                    f"{r['seconds'] * 1e3:.1f} ms",
                    _bytes(r["held_for_backward"]),
                    _bytes(r["peak_rss_increase"]),
                    f"{r['loss']:.5f}",
                ]
            )
        lines += _rows(
            [
                "",
                f"time (median of {bench['repeats']})",
                "held for backward",
                "peak RSS increase",
                "loss",
            ],
            rows,
        )

    ml = results["multilabel"]
    lines.append("")
    lines.append(
        f"Multi-label: 7-segment labels of sklearn digits, MLP, {ml['train_images']} train / "
        f"{ml['test_images']} test images, balance weights from the positive rates"
    )
    runs = ml["runs"]
    lines += _rows(
        ["", *[f"eps={r['label_smoothing']:g}" for r in runs]],
        [
            ["mAP", *[f"{r['mean_ap']:.4f}" for r in runs]],
            ["F1 micro @0.5", *[f"{r['f1_micro']:.4f}" for r in runs]],
            ["F1 macro @0.5", *[f"{r['f1_macro']:.4f}" for r in runs]],
            ["ECE (label decisions)", *[f"{r['ece']:.4f}" for r in runs]],
        ],
    )
    lines.append("")
    lines.append(
        textwrap.fill(
            "time: median wall time of forward + backward in this process, the two paths "
            "alternating (noisy on a busy machine). held for backward: bytes autograd keeps "
            "between forward and backward, the inputs excluded. peak RSS increase: growth of "
            "the resident-memory high-water mark over one step, in a fresh process per path, "
            "after a warm-up step.",
            width=100,
        )
    )
    return "\n".join(lines)


def _finite(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(_finite(results), indent=1) + "\n")


def _moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def write_figure(results: dict, path: Path) -> None:
    """Four panels: LM loss curves, LM reliability, multi-label loss, loss-step memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")

    ax = axes[0, 0]
    for colour, run in zip(colours, results["lm"]["runs"], strict=False):
        eps = run["label_smoothing"]
        steps = range(1, len(run["train_loss"]) + 1)
        ax.plot(
            steps,
            _moving_average(run["train_loss"], 20),
            color=colour,
            alpha=0.6,
            label=f"train loss as optimised, eps={eps:g}",
        )
        ax.plot(
            run["valid_steps"],
            run["valid_ce"],
            "o-",
            color=colour,
            label=f"validation CE (unsmoothed), eps={eps:g}",
        )
    ax.axhline(
        math.log(results["lm"]["unigram_perplexity"]),
        color="grey",
        ls=":",
        label="unigram baseline",
    )
    ax.set(title="Character LM: loss (nats / character)", xlabel="step", ylabel="loss")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    for colour, run in zip(colours, results["lm"]["runs"], strict=False):
        bins = run["reliability"]
        kept = [i for i, n in enumerate(bins["count"]) if n > 0]
        ax.plot(
            [bins["confidence"][i] for i in kept],
            [bins["accuracy"][i] for i in kept],
            "o-",
            color=colour,
            label=f"eps={run['label_smoothing']:g}, ECE {run['ece']:.3f}",
        )
    ax.set(
        title="Character LM: reliability (top-1, 15 bins)",
        xlabel="mean confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for colour, run in zip(colours, results["multilabel"]["runs"], strict=False):
        ax.plot(
            run["train_loss"],
            color=colour,
            label=f"eps={run['label_smoothing']:g}: mAP {run['mean_ap']:.4f}",
        )
    ax.set(
        title="Multi-label digits: weighted BCE (train)", xlabel="step", ylabel="loss", yscale="log"
    )
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    benches = results["loss_step"]
    has_peak = all(b[name]["peak_rss_increase"] is not None for b in benches for name in PATHS)
    measure = "peak_rss_increase" if has_peak else "held_for_backward"
    width = 0.38
    for offset, name, colour in (
        (-width / 2, "torch", "tab:grey"),
        (width / 2, "xloss", "tab:green"),
    ):
        values = [b[name][measure] / 2**20 for b in benches]
        ax.bar([i + offset for i in range(len(benches))], values, width, color=colour, label=name)
        for i, b in enumerate(benches):
            ax.annotate(
                f"{b[name]['seconds'] * 1e3:.0f} ms",
                (i + offset, values[i]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(benches)), [f"V={b['vocab']:,}" for b in benches])
    what = "peak RSS increase" if has_peak else "memory held for backward"
    ax.set(title=f"Loss step: {what} (labels: median time)", ylabel="MiB", yscale="log")
    ax.legend(fontsize=8)

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
