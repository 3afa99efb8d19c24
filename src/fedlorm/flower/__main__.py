"""``python -m fedlorm.flower ...`` is ``fedlorm flower ...``: the same options, errors and exit codes."""

import sys

from fedlorm.cli import main

raise SystemExit(main(["flower", *sys.argv[1:]]))
