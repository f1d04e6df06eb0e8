"""xloss bench --device cuda: its variants run (on CPU tensors at tiny sizes, here) and
agree with each other; without a GPU the command says so."""

import argparse

import pytest
import torch

from xloss.bench import cuda

TINY = {"cross_entropy": dict(n=8, v=33), "linear_cross_entropy": dict(n=8, h=6, v=33)}
SKIPPED = {"torch.compile", "liger", "3 bare GEMMs"}  # compile: minutes; liger: not installed


@pytest.mark.parametrize("name", list(cuda.TABLES))
def test_every_variant_computes_the_same_loss(name):
    losses = {}
    for variant, setup in cuda.TABLES[name]["variants"].items():
        if variant in SKIPPED:
            continue
        losses[variant] = setup(TINY[name], "cpu")().float()
    reference = losses.pop("torch eager")
    for variant, loss in losses.items():
        torch.testing.assert_close(loss, reference, rtol=2e-2, atol=2e-2, msg=variant)


def test_measure_and_the_table_text(monkeypatch):
    monkeypatch.setitem(
        cuda.TABLES["linear_cross_entropy"], "quick", [TINY["linear_cross_entropy"]]
    )
    variants = cuda.TABLES["linear_cross_entropy"]["variants"]
    monkeypatch.setitem(
        cuda.TABLES["linear_cross_entropy"],
        "variants",
        {k: v for k, v in variants.items() if k in ("3 bare GEMMs", "xloss", "liger")},
    )
    results = cuda.run_table("linear_cross_entropy", quick=True, device="cpu", repeats=3, warmup=1)
    assert [r["variant"] for r in results] == ["3 bare GEMMs", "liger", "xloss"]
    assert all(len(r["all_seconds"]) == 3 for r in results if r["seconds"] is not None)
    text = cuda.format_table("linear_cross_entropy", results)
    assert "N=8 H=6 V=33" in text and "xloss" in text
    if results[1]["seconds"] is None:  # liger is not installed: the row says why
        assert "failed: ModuleNotFoundError" in text


def test_without_a_gpu_the_command_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(tables=None, repeats=None, quick=True, warmup=1, out_dir="x")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        cuda.run_cuda(args)
