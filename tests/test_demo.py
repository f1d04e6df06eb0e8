"""The demo: its metric helpers against hand-computed values, its data pieces, and one
end-to-end run on a tiny configuration (files written, metrics finite and sensible)."""

import json
import math

import pytest
import torch

from xloss.demo import DemoConfig, run_demo
from xloss.demo.lm import BOS, EOS, PAD, LMConfig, pad_batch, split_into_pieces
from xloss.demo.metrics import (
    average_precision,
    expected_calibration_error,
    f1_scores,
    mean_average_precision,
    reliability_bins,
)
from xloss.demo.multilabel import SEGMENTS, MultiLabelConfig

# ---------------------------------------------------------------- calibration error


def test_ece_hand_computed():
    # Bins of width 0.1: 0.9 -> (0.8, 0.9], 0.6 -> (0.5, 0.6], 0.2 -> (0.1, 0.2].
    confidence = torch.tensor([0.9, 0.9, 0.6, 0.6, 0.2])
    correct = torch.tensor([True, False, True, True, False])
    # 2/5 |0.5 - 0.9| + 2/5 |1 - 0.6| + 1/5 |0 - 0.2|
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(0.36)


def test_ece_zero_when_calibrated_and_one_when_confidently_wrong():
    confidence = torch.full((4,), 0.75)
    assert expected_calibration_error(confidence, torch.tensor([1, 1, 1, 0]).bool()) == 0.0
    wrong = torch.zeros(3, dtype=torch.bool)
    assert expected_calibration_error(torch.ones(3), wrong) == pytest.approx(1.0)


def test_reliability_bins_edges_are_right_closed():
    confidence = torch.tensor([0.0, 0.5, 0.5001, 1.0])
    stats = reliability_bins(confidence, torch.tensor([True, False, True, True]), bins=2)
    # 0 joins the first bin, 0.5 closes the first bin, 1.0 closes the last.
    assert stats.count.tolist() == [2, 2]
    assert stats.accuracy.tolist() == [0.5, 1.0]
    assert stats.confidence[0].item() == pytest.approx(0.25)
    assert stats.lower.tolist() == [0.0, 0.5] and stats.upper.tolist() == [0.5, 1.0]


def test_reliability_bins_errors():
    with pytest.raises(ValueError, match="same length"):
        reliability_bins(torch.ones(3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="`bins` must be >= 1, got 0"):
        reliability_bins(torch.ones(3), torch.ones(3, dtype=torch.bool), bins=0)


# ---------------------------------------------------------------- average precision, F1


def test_average_precision_hand_computed():
    # Thresholds 0.9, 0.8, 0.7, 0.1: (P, R) = (1, .5), (.5, .5), (2/3, 1), (.5, 1).
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    assert average_precision(scores, torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5 + 1 / 3)


def test_average_precision_ties_enter_together():
    # One threshold at 0.5 holds both tied scores: P = 1/2, R = 1/2; then P = 2/3, R = 1.
    scores = torch.tensor([0.5, 0.5, 0.2])
    assert average_precision(scores, torch.tensor([1, 0, 1])) == pytest.approx(0.25 + 1 / 3)
    # The order of tied items must not matter.
    assert average_precision(scores, torch.tensor([0, 1, 1])) == pytest.approx(0.25 + 1 / 3)


def test_average_precision_perfect_and_no_positive():
    assert average_precision(torch.tensor([0.1, 0.9, 0.8]), torch.tensor([0, 1, 1])) == 1.0
    assert math.isnan(average_precision(torch.tensor([0.1, 0.9]), torch.tensor([0, 0])))
    with pytest.raises(ValueError, match="same length"):
        average_precision(torch.ones(3), torch.ones(4))


def test_average_precision_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    labels = torch.rand(200, 5, generator=generator) < 0.3
    # Rounded scores make ties, the case where AP definitions differ.
    scores = labels.double() * 0.3 + torch.rand(200, 5, generator=generator, dtype=torch.float64)
    scores = (scores * 10).round() / 10
    for c in range(5):
        expected = metrics.average_precision_score(labels[:, c].numpy(), scores[:, c].numpy())
        assert average_precision(scores[:, c], labels[:, c]) == pytest.approx(expected, abs=1e-12)


def test_mean_average_precision_skips_labels_without_positives():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 0]])
    assert mean_average_precision(scores, labels) == 1.0


def test_f1_hand_computed():
    scores = torch.tensor([[0.9, 0.1], [0.6, 0.7], [0.2, 0.4]])
    labels = torch.tensor([[1, 0], [0, 1], [1, 1]])
    micro, macro = f1_scores(scores, labels, threshold=0.5)
    # label 0: tp 1, fp 1, fn 1 -> 1/2; label 1: tp 1, fp 0, fn 1 -> 2/3.
    assert macro == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert micro == pytest.approx(4 / 7)  # pooled: tp 2, fp 1, fn 2
    # A label with no positive and no prediction counts as 0 in the macro mean.
    assert f1_scores(torch.zeros(2, 1), torch.zeros(2, 1)) == (0.0, 0.0)


# ---------------------------------------------------------------- data


def test_split_into_pieces_keeps_whole_lines():
    text = "ab\ncd  \nefghij\n\nk\nlongerline"
    assert split_into_pieces(text, max_chars=6) == ["ab\ncd", "efghij", "k", "longer"]


def test_pad_batch_targets_and_mask():
    pieces = [torch.tensor([BOS, 5, 6, EOS]), torch.tensor([BOS, 7, EOS])]
    inputs, targets, mask = pad_batch(pieces)
    assert inputs.tolist() == [[BOS, 5, 6], [BOS, 7, PAD]]
    assert targets.tolist() == [[5, 6, EOS], [7, EOS, PAD]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]


def test_seven_segment_labels():
    # Lit segments per digit on a seven-segment display.
    assert SEGMENTS.sum(1).tolist() == [6, 2, 5, 5, 4, 5, 6, 3, 7, 6]
    assert SEGMENTS[8].tolist() == [1.0] * 7


# ---------------------------------------------------------------- end to end


def test_demo_end_to_end_tiny(tmp_path, capsys):
    config = DemoConfig(
        lm=LMConfig(
            dim=32, heads=2, layers=1, steps=40, batch_size=16, eval_every=20, max_eval_pieces=48
        ),
        multilabel=MultiLabelConfig(epochs=40),
        bench_repeats=1,
        bench_large_vocab=1024,
    )
    results = run_demo(tmp_path, config=config, progress=False)
    printed = capsys.readouterr().out
    assert "validation perplexity" in printed and "mAP" in printed
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    written = json.loads((tmp_path / "demo.json").read_text())
    assert written["lm"]["vocab"] == results["lm"]["vocab"]

    lm = written["lm"]
    for run in lm["runs"]:
        assert 1.0 < run["perplexity"] < lm["vocab"]  # beats the uniform guess
        assert 0.0 <= run["ece"] <= 1.0
        assert 0.0 < run["accuracy"] < 1.0
        assert all(math.isfinite(v) for v in run["train_loss"])
        assert sum(run["reliability"]["count"]) == lm["valid_chars"]
    assert [r["label_smoothing"] for r in lm["runs"]] == [0.0, 0.1]

    small, large = written["loss_step"]
    for bench in (small, large):
        assert bench["xloss"]["loss"] == pytest.approx(bench["torch"]["loss"], rel=1e-4)
        for path in ("torch", "xloss"):
            assert bench[path]["seconds"] > 0
            peak = bench[path]["peak_rss_increase"]
            assert peak is None or peak >= 0
    # torch keeps the (positions x V) logits for backward, xloss does not.
    assert large["torch"]["held_for_backward"] >= large["logits_bytes"]
    assert large["xloss"]["held_for_backward"] < large["logits_bytes"] / 4

    for run in written["multilabel"]["runs"]:
        assert 0.5 < run["mean_ap"] <= 1.0
        assert 0.0 <= run["f1_micro"] <= 1.0 and 0.0 <= run["f1_macro"] <= 1.0
        assert 0.0 <= run["ece"] <= 1.0


def test_demo_uses_torch_default_threads(monkeypatch):
    """The demo no longer pins torch to one thread: `xloss demo` keeps torch's default
    (numba's kernels run on torch's own OpenMP team, or sleep between launches on the
    workqueue layer, instead of spinning against torch's pool)."""
    import argparse

    import xloss.demo as demo
    from xloss.cli import add_demo_arguments

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    assert parser.parse_args([]).threads is None
    seen = {}

    def fake_run(config, seed, threads, progress):
        seen["threads"] = threads
        seen["torch"] = torch.get_num_threads()
        raise RuntimeError("stop after the thread setup")

    monkeypatch.setattr(demo, "_run", fake_run)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="stop after"):
        run_demo(config=DemoConfig.quick(), progress=False)
    assert seen == {"threads": before, "torch": before}
    assert torch.get_num_threads() == before
