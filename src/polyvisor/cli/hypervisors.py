"""``polyvisor drivers``, ``polyvisor -c URI vm …`` and ``polyvisor migrate``: one management interface.

The ``vm`` command's subcommands come from several modules: each exposes
``VM_COMMANDS`` and ``register_vm(vm_commands, only)``, and
:func:`polyvisor.cli.build_parser` calls them all (see ``VM_COMMAND_MODULES`` there).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from polyvisor.cli.dispatch import lazy

#: Where the handlers live (imported when a command runs).
COMMANDS = "polyvisor.cli.hypervisors_commands"

URI_HELP = "hypervisor connection URI (default: $POLYVISOR_URI), e.g. qemu:///session?root=DIR"


def register_drivers(commands: Any, only: str | None = None) -> None:
    """Add ``drivers`` to the top-level parser."""
    p = commands.add_parser("drivers", help="the hypervisor drivers and what each can do (capability matrix)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=lazy(COMMANDS, "cmd_drivers"))


def register_migrate(commands: Any, only: str | None = None) -> None:
    """Add ``migrate`` to the top-level parser."""
    p = commands.add_parser("migrate", help="move a VM to another hypervisor connection (live or cold)")
    p.add_argument("name", help="the VM")
    p.add_argument("--from", dest="source", metavar="URI", help="source connection (default: -c URI)")
    p.add_argument("--to", dest="destination", metavar="URI", required=True, help="destination connection")
    p.add_argument("--live", action="store_true",
                   help="migrate while the VM runs (same driver at both ends; otherwise a cold migration is done)")
    p.add_argument("--downtime-ms", type=int, metavar="N", help="longest pause the guest may see (live)")
    p.add_argument("--bandwidth", type=int, metavar="MIB", help="cap the migration stream at MIB MiB/s (live)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="give up and roll back after S seconds (default 600)")
    p.add_argument("--shutdown-timeout", type=float, default=60.0, metavar="S",
                   help="cold: wait S seconds for a graceful shutdown before destroying (default 60)")
    p.add_argument("--disk-dir", type=Path, metavar="DIR",
                   help="cold: write converted disks into DIR (default: next to the source disks)")
    p.add_argument("--undefine-source", action="store_true", help="cold: undefine the source VM once moved")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=lazy(COMMANDS, "cmd_migrate"))


#: The power actions: subcommand and help.
POWER_ACTIONS = (("start", "power on"), ("destroy", "power off at once (pull the plug)"),
                 ("pause", "stop the vCPUs, keeping memory"), ("resume", "continue a paused VM"),
                 ("reboot", "restart the guest"), ("undefine", "remove a stopped VM's definition"))
#: The ``vm`` subcommands this module adds, in help order.
VM_COMMANDS = ("list", "info", *(action for action, _ in POWER_ACTIONS), "shutdown", "define", "snapshot", "stats",
               "console")


def register_vm(vm_commands: Any, only: str | None = None) -> None:
    """Add the management subcommands (or only the subcommand *only*) to ``polyvisor vm``."""
    for name in VM_COMMANDS:
        if only in (None, name):
            _ADD_VM_COMMAND.get(name, _add_power_action)(vm_commands, name)


def _add_named(vm_commands: Any, name: str, text: str, *, json_flag: bool = False) -> argparse.ArgumentParser:
    """A subcommand taking the VM's name, handled by ``cmd_<name>`` (and ``--json`` if asked)."""
    p: argparse.ArgumentParser = vm_commands.add_parser(name, help=text)
    p.add_argument("name")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=lazy(COMMANDS, f"cmd_{name}"))
    return p


def _add_power_action(vm_commands: Any, name: str) -> None:
    p = _add_named(vm_commands, name, dict(POWER_ACTIONS)[name])
    p.set_defaults(handler=lazy(COMMANDS, "cmd_action"), action=name)


def _add_list(vm_commands: Any, name: str) -> None:
    p = vm_commands.add_parser(name, help="every VM: name, state, vCPUs, memory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=lazy(COMMANDS, "cmd_list"))


def _add_info(vm_commands: Any, name: str) -> None:
    _add_named(vm_commands, name, "one VM's details", json_flag=True)


def _add_stats(vm_commands: Any, name: str) -> None:
    _add_named(vm_commands, name, "a running VM's CPU time, memory, disk and network counters", json_flag=True)


def _add_shutdown(vm_commands: Any, name: str) -> None:
    p = _add_named(vm_commands, name, "ask the guest to power off (ACPI), waiting for it")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds to wait (default 60)")


def _add_console(vm_commands: Any, name: str) -> None:
    p = _add_named(vm_commands, name, "print the serial console's output so far")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new output until the VM stops")


def _add_define(vm_commands: Any, name: str) -> None:
    p = vm_commands.add_parser(name, help="create a VM from a VM package or a polyvisor model JSON")
    p.add_argument("file", type=Path, help="OVF/OVA, .vmx, libvirt domain XML… or a model JSON")
    p.add_argument("--codec", help="the package's codec (probed if omitted)")
    p.add_argument("--disk-dir", type=Path, metavar="DIR",
                   help="where to extract disks packed inside the package (OVA; default: FILE-disks/)")
    p.set_defaults(handler=lazy(COMMANDS, "cmd_define"))


def _add_snapshot(vm_commands: Any, name: str) -> None:
    p = vm_commands.add_parser(name, help="create, list, revert to or delete snapshots")
    p.add_argument("snapshot_action", choices=("create", "list", "revert", "delete"), metavar="ACTION",
                   help="create, list, revert or delete")
    p.add_argument("name")
    p.add_argument("snapshot", nargs="?", help="the snapshot's name (not for list)")
    p.add_argument("--description", default="", help="create: a description")
    p.add_argument("--json", action="store_true", help="list: print JSON")
    p.set_defaults(handler=lazy(COMMANDS, "cmd_snapshot"))


#: How each subcommand other than the power actions is added.
_ADD_VM_COMMAND = {"list": _add_list, "info": _add_info, "shutdown": _add_shutdown, "define": _add_define,
                   "snapshot": _add_snapshot, "stats": _add_stats, "console": _add_console}


# ------------------------------------------------------------------------------------- helpers
