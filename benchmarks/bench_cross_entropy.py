"""Cross-entropy benchmark; same as ``xloss bench --tables cross_entropy [--quick]``."""

import sys

from xloss.bench import run

if __name__ == "__main__":
    sys.exit(run(["--tables", "cross_entropy", *sys.argv[1:]]))
