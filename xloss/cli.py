"""Command line: ``xloss demo`` and ``xloss bench`` (also ``python -m xloss ...``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

DEMO_PACKAGES = {"matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}


def at_least(low: int):
    """An argparse type: an int of at least ``low`` (a usage error names the value)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse's "invalid int value" for text that is no int
    return parse


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", default=".", help="folder for demo.json and demo.png (default .)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--threads",
        type=at_least(1),
        default=None,
        help="torch threads (default: torch's own default; numba's kernels use as many)",
    )
    demo.add_argument("--quick", action="store_true", help="a tiny configuration, seconds")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run_demo_from_args(args: argparse.Namespace) -> int:
    missing = [
        name for module, name in DEMO_PACKAGES.items() if not importlib.util.find_spec(module)
    ]
    if missing:
        print(f"xloss demo needs {', '.join(missing)}: pip install 'xloss[demo]'", file=sys.stderr)
        return 1
    from xloss.demo import DemoConfig, run_demo

    run_demo(
        args.out,
        config=DemoConfig.quick() if args.quick else DemoConfig(),
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xloss", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_arguments(
        commands.add_parser(
            "demo",
            help="train a character LM and a multi-label classifier with xloss (~1-2 min on CPU)",
            description="Train a small character-level transformer LM on Python's pydoc topics "
            "with xloss.LinearCrossEntropyLoss and a multi-label digit classifier with "
            "xloss.binary_cross_entropy_with_logits, each with and without label smoothing; "
            "compare the loss step with plain PyTorch. Prints a table and writes demo.json "
            "and demo.png.",
        )
    )
    from xloss.bench import add_arguments, run_from_args

    add_arguments(commands.add_parser("bench", help="time and memory of the losses"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo_from_args(args)
    if args.command == "bench":
        return run_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
