"""``python -m fedlorm`` is the ``fedlorm`` command."""

from fedlorm.cli import main

raise SystemExit(main())
