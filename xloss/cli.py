"""Command line: ``xloss demo`` and ``xloss bench`` (also ``python -m xloss ...``)."""

from __future__ import annotations

import argparse
import sys


def run_worked_example() -> None:
    """A short worked example on random logits: xloss next to F.cross_entropy."""
    import torch
    import torch.nn.functional as F

    import xloss

    torch.manual_seed(0)
    batch, steps, vocab = 4, 6, 11
    logits = torch.randn(batch, steps, vocab, requires_grad=True)
    target = torch.randint(0, vocab, (batch, steps))
    lengths = torch.tensor([6, 4, 2, 5])
    ours = xloss.cross_entropy(logits, target, class_dim=-1, lengths=lengths, label_smoothing=0.1)
    keep = torch.arange(steps) < lengths[:, None]
    theirs = F.cross_entropy(logits[keep], target[keep], label_smoothing=0.1)
    print(f"padded (B, T, V) batch, lengths {lengths.tolist()}, label smoothing 0.1")
    print(f"  xloss.cross_entropy(..., class_dim=-1, lengths=...) = {ours.item():.6f}")
    print(f"  F.cross_entropy on the kept positions only        = {theirs.item():.6f}")
    per_sample = xloss.cross_entropy(
        logits, target, class_dim=-1, lengths=lengths, reduction="sample"
    )
    print(f"  per-sample means (reduction='sample'): {[round(v, 4) for v in per_sample.tolist()]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xloss", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the demo")
    from xloss.bench import add_arguments, run_from_args

    add_arguments(commands.add_parser("bench", help="time and memory of the losses"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_worked_example()
    if args.command == "bench":
        return run_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
