"""``python -m fedlorm.flower ...`` is ``fedlorm flower ...`` (until the main CLI carries it)."""

from fedlorm.flower.cli import main

raise SystemExit(main())
