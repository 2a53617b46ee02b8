"""The handlers of ``polyvisor drivers``, ``polyvisor -c URI vm …`` and ``polyvisor migrate``.

Their parsers are in :mod:`polyvisor.cli.hypervisors`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polyvisor.cli.output import human_size, print_json
from polyvisor.errors import UsageError
from polyvisor.hypervisors import Capability, Driver, MigrationOptions, MigrationReport, connect, driver_classes
from polyvisor.hypervisors.registry import DRIVER_MODULES, UNAVAILABLE
from polyvisor.vm.model import VmModel


def _uri(args: argparse.Namespace) -> str:
    uri: str | None = args.connect
    if not uri:
        raise UsageError("no hypervisor given: use -c URI or set POLYVISOR_URI")
    return uri


def _connect(args: argparse.Namespace) -> Driver:
    return connect(_uri(args))


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# ------------------------------------------------------------------------------------ commands


def cmd_drivers(args: argparse.Namespace) -> int:
    """``drivers``: the capability matrix, from each driver's declarations."""
    classes = driver_classes()
    schemes = {name: sorted(s for s, modules in DRIVER_MODULES.items() if cls.__module__ in modules)
               for name, cls in classes.items()}
    if args.json:
        print_json({
            "capabilities": [c.value for c in Capability],
            "drivers": {name: {"description": cls.description, "schemes": schemes[name],
                               "capabilities": sorted(c.value for c in cls.capabilities),
                               "preferred_disk_format": cls.preferred_disk_format}
                        for name, cls in classes.items()},
            "unavailable": dict(sorted(UNAVAILABLE.items())),
        })
        return 0
    names = list(classes)
    rows = [["CAPABILITY", *names]]
    rows += [[c.value, *("yes" if c in classes[n].capabilities else "-" for n in names)] for c in Capability]
    _table(rows)
    print()
    for name, cls in classes.items():
        print(f"{name}: {cls.description} (URI schemes: {', '.join(schemes[name])})")
    for module, reason in sorted(UNAVAILABLE.items()):
        print(f"unavailable: {module}: {reason}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``vm list``."""
    with _connect(args) as driver:
        vms = driver.list_vms()
    if args.json:
        print_json([vm.as_dict() for vm in vms])
        return 0
    rows = [["NAME", "STATE", "VCPUS", "MEMORY"]]
    rows += [[vm.name, vm.state.value, str(vm.vcpus), human_size(vm.memory)] for vm in vms]
    _table(rows)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``vm info``."""
    with _connect(args) as driver:
        info = driver.get(args.name)
    if args.json:
        print_json(info.as_dict())
        return 0
    print(f"name: {info.name}")
    print(f"state: {info.state.value} ({info.native_state})" if info.native_state else f"state: {info.state.value}")
    print(f"vcpus: {info.vcpus}")
    print(f"memory: {human_size(info.memory)} ({info.memory} bytes)")
    if info.uuid:
        print(f"uuid: {info.uuid}")
    for key, value in info.extra.items():
        print(f"{key}: {value}")
    return 0


def cmd_action(args: argparse.Namespace) -> int:
    """``vm start|destroy|pause|resume|reboot|undefine``."""
    with _connect(args) as driver:
        getattr(driver, args.action)(args.name)
    past = {"start": "started", "destroy": "destroyed", "pause": "paused", "resume": "resumed",
            "reboot": "rebooted", "undefine": "undefined"}[args.action]
    print(f"{args.name} {past}")
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    """``vm shutdown``."""
    with _connect(args) as driver:
        driver.shutdown(args.name, timeout=args.timeout)
    print(f"{args.name} shut down")
    return 0


def _read_definition(args: argparse.Namespace) -> tuple[VmModel, dict[str, Path]]:
    """A model and its disks' host files from a model JSON or any package polyvisor.vm reads."""
    path: Path = args.file
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except IsADirectoryError:
        head = b""
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    if head.lstrip().startswith(b"{") and args.codec is None:
        model = VmModel.from_json(path.read_bytes(), source=str(path))
        return model, {d.path: path.parent / d.path for d in model.disks if d.path is not None}
    from polyvisor.vm.codecs import read_package

    package = read_package(path, args.codec)
    if any(source.is_member for source in package.disks.values()):
        target = args.disk_dir or path.with_name(f"{path.stem}-disks")
        return package.model, package.extract(target)
    return package.model, {name: source.path for name, source in package.disks.items()}


def cmd_define(args: argparse.Namespace) -> int:
    """``vm define FILE``."""
    model, disks = _read_definition(args)
    with _connect(args) as driver:
        info = driver.define(model, disks)
    print(f"{info.name} defined ({info.state.value})")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    """``vm snapshot create|list|revert|delete NAME [SNAP]``."""
    action = args.snapshot_action
    if action != "list" and not args.snapshot:
        raise UsageError(f"vm snapshot {action} needs a snapshot name")
    with _connect(args) as driver:
        if action == "list":
            snapshots = driver.snapshot_list(args.name)
            if args.json:
                print_json([s.as_dict() for s in snapshots])
                return 0
            rows = [["NAME", "CREATED", "MEMORY", "DESCRIPTION"]]
            rows += [[s.name, s.created.isoformat(timespec="seconds") if s.created else "-",
                      "yes" if s.includes_memory else "no", s.description] for s in snapshots]
            _table(rows)
            return 0
        if action == "create":
            driver.snapshot_create(args.name, args.snapshot, args.description)
            print(f"snapshot {args.snapshot} of {args.name} created")
        elif action == "revert":
            driver.snapshot_revert(args.name, args.snapshot)
            print(f"{args.name} reverted to snapshot {args.snapshot}")
        else:
            driver.snapshot_delete(args.name, args.snapshot)
            print(f"snapshot {args.snapshot} of {args.name} deleted")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """``vm stats NAME``."""
    with _connect(args) as driver:
        stats = driver.stats(args.name)
    if args.json:
        print_json(stats.as_dict())
        return 0
    cpu = "-" if stats.cpu_time_ns is None else f"{stats.cpu_time_ns / 1e9:.2f} s"
    print(f"cpu time: {cpu}")
    print(f"memory: {'-' if stats.memory_bytes is None else human_size(stats.memory_bytes)}")
    for disk, counters in stats.disks.items():
        print(f"disk {disk}: read {human_size(counters.read_bytes)} in {counters.read_ops} requests, "
              f"wrote {human_size(counters.write_bytes)} in {counters.write_ops} requests")
    for nic, traffic in stats.nics.items():
        print(f"nic {nic}: received {human_size(traffic.rx_bytes)}, sent {human_size(traffic.tx_bytes)}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """``vm console NAME [--follow]``."""
    with _connect(args) as driver:
        for chunk in driver.console(args.name, follow=args.follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    return 0


def print_report(report: MigrationReport) -> None:
    """A migration report as lines of text."""
    print(f"migration of {report.vm}: {report.kind.upper()}")
    print(f"  from: {report.source}")
    print(f"  to: {report.destination}")
    print(f"  total time: {report.total_seconds:.2f} s")
    print(f"  downtime: {'-' if report.downtime_ms is None else f'{report.downtime_ms:.0f} ms'}")
    print(f"  transferred: {human_size(report.transferred_bytes)} ({report.transferred_bytes} bytes)")
    for note in report.notes:
        print(f"  note: {note}")


def cmd_migrate(args: argparse.Namespace) -> int:
    """``migrate NAME --from URI --to URI``."""
    from polyvisor.cluster import migrate

    source = args.source or args.connect
    if not source:
        raise UsageError("migrate needs --from URI (or -c URI)")
    last = [-1]

    def progress(done: int, total: int) -> None:
        if total and not args.json and sys.stderr.isatty():
            percent = 100 * done // total
            if percent != last[0]:
                last[0] = percent
                print(f"\r{percent:3d}% ({human_size(done)} of {human_size(total)})", end="", file=sys.stderr)

    options = MigrationOptions(live=args.live, downtime_ms=args.downtime_ms, bandwidth_mib=args.bandwidth,
                               timeout=args.timeout, progress=progress)
    say = None if args.json else (lambda message: print(f"polyvisor: {message}", file=sys.stderr))
    report = migrate(args.name, source, args.destination, options, disk_dir=args.disk_dir,
                     shutdown_timeout=args.shutdown_timeout, undefine_source=args.undefine_source, say=say)
    if last[0] >= 0:
        print(file=sys.stderr)
    if args.json:
        print_json(report.as_dict())
    else:
        print_report(report)
    return 0
