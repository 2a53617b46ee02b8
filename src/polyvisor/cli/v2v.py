"""``polyvisor v2v SRC --to TARGET -o OUTDIR``: convert a VM package for another hypervisor."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from polyvisor.cli.disk import _policy, _policy_flags, _progress_bar

#: The targets of :data:`polyvisor.vm.v2v.PRESETS`, named here so that building the parser imports no VM code
#: (tests/cli check the two agree).
TARGETS = ("ova", "ovf", "vmx", "libvirt", "xl", "vbox", "proxmox", "xva", "hyperv", "ec2")


def register(commands: Any, only: str | None = None) -> None:
    """Add ``v2v`` to the top-level parser."""
    p = commands.add_parser("v2v", help="convert a VM package (descriptor and disks) for another hypervisor")
    p.add_argument("source", type=Path, metavar="SRC", help="the source package (.ova, .ovf, .vmx, .xml, ...)")
    p.add_argument("--to", dest="target", required=True, choices=TARGETS, metavar="TARGET",
                   help=f"the target: {', '.join(TARGETS)}")
    p.add_argument("-o", "--output", dest="outdir", required=True, type=Path, metavar="OUTDIR",
                   help="the directory to write the package and report.json/report.txt into")
    p.add_argument("--disk-format", metavar="FMT[/SUB]",
                   help="disk format instead of the target's native one (e.g. raw, vmdk/monolithicSparse)")
    p.add_argument("--driver", action="append", default=[], metavar="NAME",
                   help="driver package installed in the guest (virtio-win, vmware-tools, xen-pv); repeatable")
    p.add_argument("--codec", metavar="NAME", help="the source package's codec (probed if omitted)")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar on stderr")
    _policy_flags(p)
    p.set_defaults(handler=cmd_v2v)


def cmd_v2v(args: argparse.Namespace) -> int:
    """``v2v``: print the conversion report."""
    from polyvisor.vm.v2v import v2v

    with _progress_bar(args.progress, f"{args.source.name} -> {args.target}") as progress:
        report = v2v(args.source, args.target, args.outdir, args.disk_format, progress, _policy(args),
                     drivers=args.driver, source_codec=args.codec)
    print(report.to_text(), end="")
    return 0
