"""``python -m polyvisor``."""

from polyvisor.cli import run

run()
