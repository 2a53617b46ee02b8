"""``polyvisor vm …``: look inside VM packages (``vm inspect``) and list the codecs (``vm codecs``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from polyvisor.cli.disk import _policy, _policy_flags
from polyvisor.cli.output import human_size, print_json

#: The ``vm`` subcommands this module adds.
VM_COMMANDS = ("inspect", "codecs")


def register_vm(sub: Any, only: str | None = None) -> None:
    """Add ``inspect`` and ``codecs`` (or only *only*) to ``polyvisor vm`` (whose parser :mod:`polyvisor.cli` makes)."""
    if only in (None, "inspect"):
        _add_inspect(sub)
    if only in (None, "codecs"):
        p = sub.add_parser("codecs", help="list the VM package codecs")
        p.set_defaults(handler=cmd_codecs)


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show the VM a package describes, its codec and its disks")
    p.add_argument("--json", action="store_true", help="print JSON: the codec, the disks and the model")
    p.add_argument("--codec", metavar="NAME", help="the package's codec (probed if omitted)")
    p.add_argument("--no-disks", action="store_true", help="read the descriptor even if disk files are missing")
    _policy_flags(p)
    p.add_argument("source", type=Path, metavar="SRC")
    p.set_defaults(handler=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``vm inspect``."""
    from polyvisor.vm.codecs import ReadOptions, read_package  # the VM layer, only for this command
    from polyvisor.vm.model import disk_label

    package = read_package(args.source, args.codec,
                           ReadOptions(policy=_policy(args), require_disks=not args.no_disks))
    model = package.model
    disks = [{"path": name, "file": str(src.path), "offset": src.offset, "size": src.size,
              "pieces": len(src.pieces) if src.pieces is not None else None,
              "digest": list(src.digest) if src.digest else None} for name, src in sorted(package.disks.items())]
    if args.json:
        print_json({"source": str(package.source), "codec": package.codec, "disks": disks,
                    "model": model.to_dict()})
        return 0
    print(f"package: {package.source}")
    print(f"codec: {package.codec}")
    print(f"name: {model.name}")
    if model.uuid:
        print(f"uuid: {model.uuid}")
    os = model.os
    print(f"guest OS: {' '.join(p for p in (os.family.value, os.distribution, os.version) if p)} ({os.arch})"
          + (f" [{os.osinfo}]" if os.osinfo else ""))
    print(f"firmware: {model.firmware}{' with Secure Boot' if model.secure_boot else ''}; chipset {model.machine}")
    print(f"vCPUs: {model.cpu.count} ({model.cpu.sockets} socket(s) x {model.cpu.cores} core(s) x "
          f"{model.cpu.threads} thread(s))")
    print(f"memory: {human_size(model.memory)}")
    for ctrl in model.controllers:
        print(f"controller {ctrl.bus}{ctrl.index}: {ctrl.model}")
    for disk in model.disks:
        what = f"{disk.path} ({disk.format or 'format unknown'}{'/' + disk.subformat if disk.subformat else ''}"
        what += f", {human_size(disk.capacity)})" if disk.capacity is not None else ")"
        print(f"{disk.device} {disk_label(disk)}: {what if disk.path else '(empty)'}"
              + (f", boot order {disk.boot_order}" if disk.boot_order else ""))
    for i, nic in enumerate(model.nics):
        print(f"nic {i}: {nic.model} {nic.mac or '(MAC assigned by the host)'} on {nic.network or '-'}")
    for serial in model.serials:
        print(f"serial port {serial.port} (COM{serial.port + 1})")
    print(f"display: {model.graphics}")
    for codec, keys in sorted(model.vendor.items()):
        print(f"vendor keys ({codec}): {len(keys)}")
    for disk_info in disks:
        where = disk_info["file"] if disk_info["size"] is None else \
            f"{disk_info['file']} ({disk_info['size']} bytes inside the archive)"
        print(f"image {disk_info['path']}: {where}")
    return 0


def cmd_codecs(args: argparse.Namespace) -> int:
    """``vm codecs``."""
    from polyvisor.vm.codecs import registered_codecs

    for name, codec in registered_codecs().items():
        formats = ", ".join(f"{f}{'/' + s if s else ''}" for f, s in codec.disk_formats)
        print(f"{name:8} {codec.description}")
        print(f"{'':8} suffixes {' '.join(codec.suffixes)}; disks {formats}; devices for {codec.target}")
    return 0
