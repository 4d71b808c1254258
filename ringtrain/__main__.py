"""``python -m ringtrain``: the same as the ``ringtrain`` command."""

from .cli import main

raise SystemExit(main())
