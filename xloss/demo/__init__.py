"""``xloss demo``: train two small models with xloss and report what it changes.

1. A character-level transformer language model on the pydoc topics (text that ships with
   Python), trained on padded variable-length batches with
   :class:`xloss.LinearCrossEntropyLoss` (hidden states + output embedding, a padding mask,
   label smoothing), once with eps=0 and once with eps=0.1: validation perplexity and
   expected calibration error.
2. The loss step of that model, xloss against the plain PyTorch path on the same batch,
   and on the same hidden states with a large vocabulary: time and memory.
3. A multi-label classifier of the seven display segments of scikit-learn's digits with
   :func:`xloss.binary_cross_entropy_with_logits`, label smoothing and
   :func:`xloss.multilabel_balance_weights`: mAP and F1.

Everything is seeded and offline. matplotlib, tqdm and scikit-learn (the ``demo`` extra)
are imported only here, so ``import xloss`` does not need them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xloss.demo.lm import LMConfig
from xloss.demo.multilabel import MultiLabelConfig


@dataclass
class DemoConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    multilabel: MultiLabelConfig = field(default_factory=MultiLabelConfig)
    label_smoothing: tuple[float, ...] = (0.0, 0.1)
    bench_repeats: int = 5
    bench_large_vocab: int | None = 16384  # None skips the large-vocabulary comparison
    measure_rss: bool = True

    @classmethod
    def quick(cls) -> DemoConfig:
        """A configuration that runs in seconds (tests, a first look)."""
        return cls(
            lm=LMConfig(
                dim=32, heads=2, steps=60, batch_size=16, eval_every=30, max_eval_pieces=64
            ),
            multilabel=MultiLabelConfig(epochs=60),
            bench_repeats=2,
            bench_large_vocab=2048,
        )


def _bench_batch(model, corpus, config: DemoConfig, seed: int) -> dict:
    """One training batch through the trained model: the hidden states the loss sees."""
    import random

    from xloss.demo.lm import pad_batch

    pieces = random.Random(seed + 1).sample(corpus.train, config.lm.batch_size)
    inputs, targets, mask = pad_batch(pieces)
    with torch.no_grad():
        hidden = model(inputs)  # B x T x dim
    eps = max(config.label_smoothing)
    return {
        "hidden": hidden,
        "weight": model.output_embedding.detach().clone(),
        "target": targets,
        "mask": mask,
        "eps": eps,
    }


def _large_vocab_batch(batch: dict, vocab: int, seed: int) -> dict:
    """The same hidden states and mask with a random output embedding of ``vocab`` rows."""
    generator = torch.Generator().manual_seed(seed)
    dim = batch["hidden"].shape[-1]
    return {
        **batch,
        "weight": torch.randn(vocab, dim, generator=generator) * dim**-0.5,
        "target": torch.randint(0, vocab, batch["target"].shape, generator=generator),
    }


def set_threads(torch_threads: int, numba_threads: int | None = None) -> tuple[int, int | None]:
    """Set the torch and numba thread counts (numba's to ``torch_threads`` by default).

    xloss's kernels size numba's pool like torch's on every launch anyway (on torch's own
    OpenMP team where numba's ``omp`` layer shares it, else on numba's workqueue layer,
    whose idle threads sleep instead of spinning against torch's pool); this sets both
    explicitly, e.g. for the peak-memory child process.
    Returns the previous counts.
    """
    previous = (torch.get_num_threads(), None)
    torch.set_num_threads(torch_threads)
    try:
        import numba
    except ImportError:
        return previous
    previous = (previous[0], numba.get_num_threads())
    numba.set_num_threads(min(numba_threads or torch_threads, numba.config.NUMBA_NUM_THREADS))
    return previous


def run_demo(
    out: str | os.PathLike = ".",
    *,
    config: DemoConfig | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the whole demo; print the table, write demo.json and demo.png into ``out``.

    ``threads`` is the number of torch threads while the demo runs (restored afterwards);
    None keeps torch's default.
    Returns everything that goes into demo.json.
    """
    threads = torch.get_num_threads() if threads is None else threads
    previous_threads = set_threads(threads)
    try:
        results = _run(config or DemoConfig(), seed, threads, progress)
    finally:
        set_threads(*previous_threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    from xloss.demo import report

    print(report.summary_table(results))
    report.write_json(results, out / "demo.json")
    report.write_figure(results, out / "demo.png")
    print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'} in {results['seconds']:.0f} s")
    return results


def _run(config: DemoConfig, seed: int, threads: int, progress: bool) -> dict:
    from xloss.demo import lm, lossbench, multilabel

    started = time.perf_counter()
    corpus = lm.load_corpus(config.lm, seed)
    valid = corpus.valid[: config.lm.max_eval_pieces]
    lm_runs, model = [], None
    for eps in config.label_smoothing:
        model, result = lm.train_lm(corpus, config.lm, eps, seed=seed, progress=progress)
        bins = result.reliability
        lm_runs.append(
            {
                **dataclasses.asdict(dataclasses.replace(result, reliability=None)),
                "reliability": {k: v.tolist() for k, v in bins._asdict().items()},
            }
        )

    # The loss step, measured on hidden states of the last model trained.
    batch = _bench_batch(model, corpus, config, seed)
    batches = [("one batch of the LM above", batch)]
    if config.bench_large_vocab:
        title = "the same hidden states, a random output layer"
        batches.append((title, _large_vocab_batch(batch, config.bench_large_vocab, seed)))
    measured = lossbench.compare(
        [b for _, b in batches],
        repeats=config.bench_repeats,
        threads=threads,
        measure_rss=config.measure_rss,
        progress=progress,
    )
    loss_step = [
        {"title": title, "label_smoothing": b["eps"], **m}
        for (title, b), m in zip(batches, measured, strict=True)
    ]

    data = multilabel.load_digit_segments(config.multilabel, seed)
    ml_runs = [
        dataclasses.asdict(
            multilabel.train_multilabel(data, config.multilabel, eps, seed=seed, progress=progress)
        )
        for eps in config.label_smoothing
    ]

    return {
        "seed": seed,
        "threads": threads,
        "lm": {
            "config": dataclasses.asdict(config.lm),
            "vocab": corpus.vocab_size,
            "train_pieces": len(corpus.train),
            "valid_pieces": len(valid),
            "valid_chars": sum(len(p) - 1 for p in valid),
            "unigram_perplexity": lm.unigram_perplexity(corpus, valid),
            "runs": lm_runs,
        },
        "loss_step": loss_step,
        "multilabel": {
            "config": dataclasses.asdict(config.multilabel),
            "labels": list(multilabel.SEGMENT_NAMES),
            "train_images": len(data.train_x),
            "test_images": len(data.test_x),
            "runs": ml_runs,
        },
        "seconds": time.perf_counter() - started,
    }


__all__ = ["DemoConfig", "run_demo"]
