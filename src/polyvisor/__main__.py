"""``python -m polyvisor``."""

from polyvisor.cli import main

raise SystemExit(main())
