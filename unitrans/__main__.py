"""``python -m unitrans``: the command line (see :mod:`unitrans.cli`)."""

from unitrans.cli import main

raise SystemExit(main())
