import sys

from xloss.cli import main

sys.exit(main())
