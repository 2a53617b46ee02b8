"""``polyvisor disk …``: info, create, convert, check, compare, map — qemu-img's vocabulary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyvisor.cli.output import human_size, print_json
from polyvisor.disk.image import ExtentKind
from polyvisor.disk.paths import ReferencePolicy
from polyvisor.disk.registry import CreateOptions, create_image, open_image, parse_size

if TYPE_CHECKING:
    from polyvisor.disk.convert import Progress

# check, compare and convert are imported by their commands: each command loads only what it uses.

FORMAT_HELP = "raw, qcow2, vmdk, vhd, vhdx or vdi"
OPTIONS_HELP = (
    "comma-separated key=value: subformat=, compat=0.10|1.1, cluster_size=, compression_type=zlib|zstd, "
    "block_size=, logical_sector_size=512|4096, backing_file=, backing_fmt=, adapter_type="
)


def register(commands: Any, only: str | None = None) -> None:
    """Add ``disk`` and its subcommands (or only the subcommand *only*, if it is one) to the top-level parser."""
    disk = commands.add_parser("disk", help="read, write, convert, check and compare disk images")
    # Their files are descriptors that are closed when the command returns: nothing is left for the
    # interpreter's teardown to flush (see polyvisor.cli.run).
    disk.set_defaults(exit_without_teardown=True)
    sub = disk.add_subparsers(dest="disk_command", metavar="SUBCOMMAND", required=True)
    for name in DISK_COMMANDS if only not in DISK_COMMANDS else (only,):
        _ADD_SUBCOMMAND[name](sub)


def _add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="describe an image and its backing chain")
    _common(p, json_flag=True)
    p.add_argument("image", type=Path)
    p.set_defaults(handler=cmd_info)


def _add_create(sub: Any) -> None:
    p = sub.add_parser("create", help="create an empty image")
    p.add_argument("-O", "-f", dest="out_format", required=True, metavar="FMT", help=FORMAT_HELP)
    p.add_argument("-o", dest="options", metavar="OPTS", help=OPTIONS_HELP)
    _policy_flags(p)
    p.add_argument("image", type=Path)
    p.add_argument("size", nargs="?", help="virtual size (K, M, G, T suffixes); optional with backing_file")
    p.set_defaults(handler=cmd_create)


def _add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert an image to another format")
    p.add_argument("-f", dest="format", metavar="FMT", help="source format (probed if omitted)")
    p.add_argument("-O", dest="out_format", required=True, metavar="FMT", help=FORMAT_HELP)
    p.add_argument("-o", dest="options", metavar="OPTS", help=OPTIONS_HELP)
    p.add_argument("-c", dest="compress", action="store_true", help="compress (qcow2, vmdk streamOptimized)")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar on stderr")
    p.add_argument(
        "--no-sync", dest="durable", action="store_false",
        help="rename the output into place without waiting for it to reach the disk (faster, as qemu-img; "
             "a power failure may then leave a damaged file under the final name)",
    )
    _policy_flags(p)
    p.add_argument("source", type=Path)
    p.add_argument("destination", type=Path)
    p.set_defaults(handler=cmd_convert)


def _add_check(sub: Any) -> None:
    p = sub.add_parser("check", help="check an image's metadata for corruption and leaks")
    _common(p, json_flag=True)
    p.add_argument("image", type=Path)
    p.set_defaults(handler=cmd_check, error_status=1)


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare the guest-visible contents of two images (exit 0 same, 1 not)")
    p.add_argument("-f", dest="format_a", metavar="FMT", help="format of the first image")
    p.add_argument("-F", dest="format_b", metavar="FMT", help="format of the second image")
    _policy_flags(p)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.set_defaults(handler=cmd_compare, error_status=2)


def _add_map(sub: Any) -> None:
    p = sub.add_parser("map", help="show which layer holds each range of the disk")
    _common(p, json_flag=True)
    p.add_argument("image", type=Path)
    p.set_defaults(handler=cmd_map)


#: What adds each ``disk`` subcommand to the parser, in help order.
_ADD_SUBCOMMAND = {"info": _add_info, "create": _add_create, "convert": _add_convert, "check": _add_check,
                   "compare": _add_compare, "map": _add_map}
#: The ``disk`` subcommands, in help order.
DISK_COMMANDS = tuple(_ADD_SUBCOMMAND)


def _common(p: argparse.ArgumentParser, *, json_flag: bool) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-f", dest="format", metavar="FMT", help="image format (probed if omitted)")
    _policy_flags(p)


def _policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-dir", action="append", type=Path, default=[], metavar="DIR",
        help="also follow backing files, extents and parents into DIR (repeatable)",
    )
    p.add_argument(
        "--allow-any-path", action="store_true",
        help="follow backing files, extents and parents anywhere (unsafe on untrusted images)",
    )


def _policy(args: argparse.Namespace) -> ReferencePolicy:
    return ReferencePolicy(allow_anywhere=args.allow_any_path, allowed_dirs=tuple(args.allow_dir))


# ------------------------------------------------------------------ commands


def cmd_info(args: argparse.Namespace) -> int:
    """``disk info``."""
    with open_image(args.image, args.format, policy=_policy(args)) as image:
        info = image.info()
    if args.json:
        print_json(info.as_dict())
        return 0
    print(f"image: {info.filename}")
    print(f"file format: {info.format}")
    print(f"subformat: {info.subformat}")
    print(f"virtual size: {human_size(info.virtual_size)} ({info.virtual_size} bytes)")
    print(f"disk size: {human_size(info.actual_size)}")
    for depth, layer in enumerate(info.backing, start=1):
        print(f"backing file{'' if depth == 1 else f' ({depth})'}: {layer['filename']} (format {layer['format']})")
    if len(info.files) > 1:
        print("files:")
        for name in info.files:
            print(f"    {name}")
    for key, value in info.details.items():
        print(f"{key.replace('_', ' ')}: {value}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    """``disk create``."""
    options = CreateOptions.parse(args.options)
    size = parse_size(args.size) if args.size is not None else None
    image = create_image(args.image, args.out_format, size, options, policy=_policy(args))
    with image:
        description = f"{image.format_name} ({image.subformat}), {human_size(image.virtual_size)}"
    print(f"Formatting '{args.image}', {description}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """``disk convert``."""
    from polyvisor.disk.convert import convert

    options = CreateOptions.parse(args.options, compress=args.compress)
    with _progress_bar(args.progress, f"{args.source.name} -> {args.destination.name}") as progress:
        convert(args.source, args.destination, args.out_format, options,
                source_format=args.format, policy=_policy(args), progress=progress, durable=args.durable)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """``disk check``: exit 0 clean, 2 corruptions, 3 leaks only, 1 the check could not run."""
    from polyvisor.disk.check import check_image

    result = check_image(args.image, args.format)
    if args.json:
        print_json(result.as_dict())
        return result.exit_code
    for problem in result.problems:
        print(problem)
    if result.corruptions + result.leaks > len(result.problems):
        print(f"... and {result.corruptions + result.leaks - len(result.problems)} more")
    if result.clean:
        print("No errors were found on the image.")
    else:
        if result.corruptions:
            print(f"\n{result.corruptions} errors were found on the image.")
        if result.leaks:
            print(f"{result.leaks} leaked clusters were found on the image.")
    if result.allocated_units is not None and result.total_units:
        share = 100.0 * result.allocated_units / result.total_units
        print(f"{result.allocated_units}/{result.total_units} = {share:.2f}% allocated")
    if result.image_end_offset is not None:
        print(f"Image end offset: {result.image_end_offset}")
    return result.exit_code


def cmd_compare(args: argparse.Namespace) -> int:
    """``disk compare``: exit 0 identical, 1 different, 2 error."""
    from polyvisor.disk.compare import compare

    result = compare(args.a, args.b, args.format_a, args.format_b, policy=_policy(args))
    print(result)
    return 0 if result.identical else 1


def cmd_map(args: argparse.Namespace) -> int:
    """``disk map``: which layer (depth) holds each range; data or zero."""
    with open_image(args.image, args.format, policy=_policy(args)) as image:
        chain = image.chain()
        rows = []
        for ext in image.map():
            present = ext.kind is not ExtentKind.UNALLOCATED
            rows.append({
                "start": ext.offset,
                "length": ext.length,
                "depth": ext.depth,
                "present": present,
                "zero": ext.kind is not ExtentKind.DATA,
                "data": ext.kind is ExtentKind.DATA,
                "file": str(chain[ext.depth].path) if present and ext.depth < len(chain) else None,
            })
    if args.json:
        print_json(rows)
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Kind':<8}{'Depth':<7}File")
    for row in rows:
        kind = "data" if row["data"] else "zero"
        print(f"{row['start']:<#20x}{row['length']:<#20x}{kind:<8}{row['depth']:<7}{row['file'] or '-'}")
    return 0


@contextmanager
def _progress_bar(enabled: bool, label: str) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, TaskProgressColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    with RichProgress(
        "[progress.description]{task.description}", BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
        console=Console(file=sys.stderr), transient=False,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
