"""Printing helpers shared by the CLI commands."""

from __future__ import annotations

import sys
from typing import Any

_UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]


def human_size(value: int) -> str:
    """``1.5 GiB`` style, as qemu-img prints sizes."""
    size = float(value)
    for unit in _UNITS:
        if size < 1024 or unit == _UNITS[-1]:
            if unit == "bytes":
                return f"{value} bytes"
            return f"{size:.3g} {unit}"
        size /= 1024
    return f"{value} bytes"


def print_json(value: Any) -> None:
    """Pretty JSON on stdout."""
    import json  # only the --json commands pay for it

    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
