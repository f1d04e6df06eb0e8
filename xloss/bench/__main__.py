import sys

from xloss.bench import run

sys.exit(run())
