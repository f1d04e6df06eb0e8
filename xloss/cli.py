"""Command line: ``xloss demo`` (also ``python -m xloss demo``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

DEMO_PACKAGES = {"matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xloss", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a character LM and a multi-label classifier with xloss (~1-2 min on CPU)",
        description="Train a small character-level transformer LM on Python's pydoc topics "
        "with xloss.LinearCrossEntropyLoss and a multi-label digit classifier with "
        "xloss.binary_cross_entropy_with_logits, each with and without label smoothing; "
        "compare the loss step with plain PyTorch. Prints a table and writes demo.json "
        "and demo.png.",
    )
    demo.add_argument("--out", default=".", help="folder for demo.json and demo.png (default .)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the models are tiny, and more threads only help on "
        "an otherwise idle machine)",
    )
    demo.add_argument("--quick", action="store_true", help="a tiny configuration, seconds")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        missing = [
            name for module, name in DEMO_PACKAGES.items() if not importlib.util.find_spec(module)
        ]
        if missing:
            print(
                f"xloss demo needs {', '.join(missing)}: pip install 'xloss[demo]'",
                file=sys.stderr,
            )
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


if __name__ == "__main__":
    sys.exit(main())
