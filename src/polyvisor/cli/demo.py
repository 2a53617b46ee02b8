"""``polyvisor demo``: the main job on its embedded default."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(commands: Any, only: str | None = None) -> None:
    """Add ``demo`` to the top-level parser."""
    p = commands.add_parser(
        "demo",
        help="build a bootable disk, convert it through every format, verify each step, boot the result",
    )
    p.add_argument("--workdir", type=Path, help="keep the images here (default: a temporary directory)")
    p.add_argument("--no-boot", action="store_true", help="skip booting the final image under QEMU")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when every step verified."""
    import tempfile

    from polyvisor.demo.disk_demo import run_demo  # its imports are only needed here

    if args.workdir is not None:
        return 0 if run_demo(args.workdir, boot=not args.no_boot).ok else 1
    with tempfile.TemporaryDirectory(prefix="polyvisor-demo-") as tmp:
        return 0 if run_demo(Path(tmp), boot=not args.no_boot).ok else 1
