"""The ``polyvisor`` command: parses arguments, calls the library, prints.

Errors polyvisor raises on purpose (:class:`~polyvisor.errors.PolyvisorError`)
become one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from polyvisor import __version__
from polyvisor.cli import demo, disk, v2v, vm
from polyvisor.errors import PolyvisorError

#: Exit status for a PolyvisorError (``disk compare`` and ``disk check`` have their own, as qemu-img).
EXIT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line grammar."""
    parser = argparse.ArgumentParser(
        prog="polyvisor",
        description="Make virtual machines portable between hypervisors.",
    )
    parser.add_argument("--version", action="version", version=f"polyvisor {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    disk.register(commands)
    vm.register(commands)
    v2v.register(commands)
    demo.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except PolyvisorError as exc:
        print(f"polyvisor: {exc}", file=sys.stderr)
        return getattr(args, "error_status", EXIT_ERROR)
    except KeyboardInterrupt:
        print("polyvisor: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    return status
