"""The ``polyvisor`` command: parses arguments, calls the library, prints.

Errors polyvisor raises on purpose (:class:`~polyvisor.errors.PolyvisorError`)
become one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NoReturn

from polyvisor import __version__
from polyvisor.cli import demo, disk, hypervisors, v2v, vm
from polyvisor.cli.dispatch import command_word
from polyvisor.errors import PolyvisorError

#: Exit status for a PolyvisorError (``disk compare`` and ``disk check`` have their own, as qemu-img).
EXIT_ERROR = 1

#: Modules contributing ``polyvisor vm`` subcommands; each has ``register_vm(vm_commands, only)``.
VM_COMMAND_MODULES: tuple[ModuleType, ...] = (vm, hypervisors)

#: Top-level options that take a value (the word after them is not the command).
OPTIONS_WITH_VALUE = ("-c", "--connect")


def _terminal_columns() -> int:
    """The terminal's width as :func:`shutil.get_terminal_size` reports it (importing shutil costs 4 ms)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, told the width so that it does not import shutil to find it out."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_columns() - 2)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through ``add_subparsers``, every sub-parser) using :class:`_HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _register_vm(commands: Any, only: str | None) -> None:
    vm_parser = commands.add_parser(
        "vm", help="inspect VM packages; manage the VMs of a hypervisor (-c URI)")
    vm_commands = vm_parser.add_subparsers(dest="vm_command", metavar="SUBCOMMAND", required=True)
    if only is not None and not any(only in module.VM_COMMANDS for module in VM_COMMAND_MODULES):
        only = None  # an unknown subcommand: the error lists them all
    for module in VM_COMMAND_MODULES:
        module.register_vm(vm_commands, only)


#: Each command, in help order, and what adds it to the parser given the word after it (its subcommand).
COMMANDS: dict[str, Callable[[Any, str | None], None]] = {
    "disk": disk.register,
    "vm": _register_vm,
    "v2v": v2v.register,
    "drivers": hypervisors.register_drivers,
    "migrate": hypervisors.register_migrate,
    "demo": demo.register,
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command-line grammar: all of it, or given *argv* only the command it names.

    Building every command's parser costs more than a short conversion saves, so ``polyvisor disk
    convert`` builds only ``disk convert``.  Parsing *argv* gives the same result either way; help and
    errors for an unknown or missing command come from the whole grammar.
    """
    parser = _Parser(
        prog="polyvisor",
        description="Make virtual machines portable between hypervisors.",
    )
    parser.add_argument("--version", action="version", version=f"polyvisor {__version__}")
    parser.add_argument("-c", "--connect", metavar="URI", default=os.environ.get("POLYVISOR_URI"),
                        help=hypervisors.URI_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    found = command_word(argv, OPTIONS_WITH_VALUE) if argv is not None else None
    if found is not None and found[0] in COMMANDS:
        word, rest = found
        subcommand = command_word(rest)
        COMMANDS[word](commands, subcommand[0] if subcommand else None)
    else:
        for register in COMMANDS.values():
            register(commands, None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    return _run_command(argv)[0]


def run() -> NoReturn:
    """The ``polyvisor`` console command: :func:`main`, then the process ends.

    After a command that says so (``set_defaults(exit_without_teardown=True)``: the ``disk`` commands,
    whose files are plain descriptors, closed when they return), the interpreter is not torn down:
    clearing every module and collecting their objects took 12-15 ms after a ``disk convert`` on the
    benchmark VM, while qemu-img starts and exits in about 10 ms.  Standard output and error are flushed
    and exit handlers run first; while another thread still runs, the exit is the normal one.
    """
    status, args = _run_command(None)
    if getattr(args, "exit_without_teardown", False):
        _exit_without_teardown(status)
    sys.exit(status)


def _exit_without_teardown(status: int) -> None:
    """End the process with *status* once output is flushed and exit handlers ran, if no other thread runs."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (BrokenPipeError, ValueError):  # a reader that went away; a stream that was closed
        status = status or EXIT_ERROR
    atexit._run_exitfuncs()
    threading = sys.modules.get("threading")  # not imported: no other thread
    if threading is None or threading.active_count() == 1:
        os._exit(status)


def _run_command(argv: Sequence[str] | None) -> tuple[int, argparse.Namespace | None]:
    """Parse *argv* (default ``sys.argv``) and run its command: (exit status, the parsed arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except PolyvisorError as exc:
        print(f"polyvisor: {exc}", file=sys.stderr)
        return getattr(args, "error_status", EXIT_ERROR), args
    except KeyboardInterrupt:
        print("polyvisor: interrupted", file=sys.stderr)
        return 130, args
    except BrokenPipeError:
        return EXIT_ERROR, args
    return status, args
