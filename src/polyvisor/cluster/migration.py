"""Moving a VM between two hypervisor connections: live where the driver can, cold otherwise.

Live: both URIs name the same driver, it declares ``migrate-live``, the
caller asked for ``live`` and the VM runs — the driver moves it while it runs.

Cold (different hypervisors, or not live): the source's definition and disk
files are exported, the VM is stopped (a graceful shutdown, falling back to
destroy after a timeout), each disk is converted with
:func:`polyvisor.disk.convert.convert` into the destination driver's
``preferred_disk_format``, devices the destination's guests could not use are
replaced (:func:`polyvisor.vm.mapping.drivers.choose_devices` for the
destination's ``device_target``) and the VM is defined and started on the
destination and checked to reach *running*.  The source is left defined and
shut off (or undefined, when asked).  On failure the destination's copy is
removed and the source restarted if it was running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from polyvisor.disk import registered_formats
from polyvisor.disk.convert import convert
from polyvisor.errors import (
    HypervisorError,
    InvalidState,
    MigrationFailed,
    OperationTimeout,
    PolyvisorError,
    UnsupportedOperation,
    VmNotFound,
)
from polyvisor.hypervisors import (
    Capability,
    Driver,
    MigrationOptions,
    MigrationReport,
    VmState,
    connect,
)
from polyvisor.vm.mapping.drivers import choose_devices
from polyvisor.vm.model import DeviceKind, Disk

Say = Callable[[str], None]

#: Seconds between state polls.
POLL = 0.2


def migrate(name: str, source_uri: str, destination_uri: str, options: MigrationOptions | None = None, *,
            disk_dir: Path | None = None, shutdown_timeout: float = 60.0, undefine_source: bool = False,
            say: Say | None = None) -> MigrationReport:
    """Move VM *name* from *source_uri* to *destination_uri* (see the module docstring)."""
    with connect(source_uri) as source, connect(destination_uri) as destination:
        return migrate_between(source, destination, name, options, disk_dir=disk_dir,
                               shutdown_timeout=shutdown_timeout, undefine_source=undefine_source, say=say)


def migrate_between(source: Driver, destination: Driver, name: str, options: MigrationOptions | None = None, *,
                    disk_dir: Path | None = None, shutdown_timeout: float = 60.0, undefine_source: bool = False,
                    say: Say | None = None) -> MigrationReport:
    """:func:`migrate` on open connections."""
    options = options or MigrationOptions()
    tell = say or (lambda _message: None)
    why_not_live = _why_not_live(source, destination, name, options)
    if why_not_live is None:
        tell(f"live migration of {name} with the {source.name} driver")
        return source.migrate(name, destination, options)
    tell(f"cold migration of {name}: {why_not_live}")
    return _cold(source, destination, name, options, why_not_live, disk_dir=disk_dir,
                 shutdown_timeout=shutdown_timeout, undefine_source=undefine_source, tell=tell)


def _why_not_live(source: Driver, destination: Driver, name: str, options: MigrationOptions) -> str | None:
    """Why the migration cannot be live (None: it can)."""
    if not options.live:
        return "live migration was not asked for"
    if type(source) is not type(destination):
        return f"live migration needs the same hypervisor at both ends ({source.name} -> {destination.name})"
    if not source.supports(Capability.MIGRATE_LIVE):
        return f"the {source.name} driver cannot migrate live"
    if source.supports(Capability.GET) and source.get(name).state not in (VmState.RUNNING, VmState.PAUSED):
        return "the VM is not running"
    return None


def _require(driver: Driver, capability: Capability, name: str) -> None:
    if not driver.supports(capability):
        raise UnsupportedOperation(driver.name, capability.value, vm=name)


def _wait_state(driver: Driver, name: str, wanted: tuple[VmState, ...], timeout: float) -> VmState:
    deadline = time.monotonic() + timeout
    while True:
        state = driver.get(name).state
        if state in wanted or time.monotonic() >= deadline:
            return state
        time.sleep(POLL)


def _target_format(destination: Driver, notes: list[str]) -> str:
    wanted = destination.preferred_disk_format
    if wanted in registered_formats():
        return wanted
    notes.append(f"the {destination.name} driver prefers {wanted} disks, which polyvisor cannot write yet: raw used")
    return "raw"


def _free_path(directory: Path, stem: str, fmt: str, taken: set[str]) -> Path:
    """A new file in *directory* whose name no file there and no other disk of the VM has."""
    candidate = directory / f"{stem}.{fmt}"
    counter = 2
    while candidate.exists() or candidate.name in taken:
        candidate = directory / f"{stem}-{counter}.{fmt}"
        counter += 1
    taken.add(candidate.name)
    return candidate


def _stop(source: Driver, name: str, shutdown_timeout: float, notes: list[str], tell: Say) -> None:
    """Shut the VM down gracefully; destroy it if that fails or times out."""
    state = source.get(name).state
    if state is VmState.PAUSED and source.supports(Capability.RESUME):
        source.resume(name)  # a paused guest cannot answer the power button
    if source.supports(Capability.SHUTDOWN):
        tell(f"shutting {name} down (up to {shutdown_timeout:g} s)")
        try:
            source.shutdown(name, timeout=shutdown_timeout)
            if _wait_state(source, name, (VmState.SHUT_OFF,), shutdown_timeout) is VmState.SHUT_OFF:
                notes.append("the source VM was shut down by its guest")
                return
        except (OperationTimeout, InvalidState) as exc:
            tell(f"graceful shutdown failed ({exc.reason})")
    _require(source, Capability.DESTROY, name)
    tell(f"destroying {name}")
    with contextlib.suppress(InvalidState):  # it may have powered off in the meantime
        source.destroy(name)
    if _wait_state(source, name, (VmState.SHUT_OFF,), 60.0) is not VmState.SHUT_OFF:
        raise OperationTimeout(source.name, "did not stop", vm=name)
    notes.append(f"the source VM did not shut down within {shutdown_timeout:g} s and was destroyed (powered off)")


def _cold(source: Driver, destination: Driver, name: str, options: MigrationOptions, why: str, *,
          disk_dir: Path | None, shutdown_timeout: float, undefine_source: bool, tell: Say) -> MigrationReport:
    started = time.monotonic()
    for driver, capability in ((source, Capability.EXPORT), (source, Capability.GET),
                               (destination, Capability.DEFINE), (destination, Capability.START),
                               (destination, Capability.GET)):
        _require(driver, capability, name)
    notes = [f"COLD migration ({why}): the VM was stopped, its disks converted, and it was started again on "
             f"{destination.name}"]
    with contextlib.suppress(VmNotFound):
        destination.get(name)
        raise MigrationFailed(source.name, f"the destination already has a VM called {name!r}", vm=name)
    exported = source.export(name)
    model = exported.model
    if destination.device_target is not None and type(destination) is not type(source):
        choice = choose_devices(model, destination.device_target)
        model = choice.model
        notes += [f"device changed for {destination.name}: {change}" for change in choice.changes]
    fmt = _target_format(destination, notes)
    was_running = source.get(name).state in (VmState.RUNNING, VmState.PAUSED)

    stopped_at = time.monotonic()
    if was_running:
        _stop(source, name, shutdown_timeout, notes, tell)
    written: list[Path] = []
    defined = False
    try:
        disks: dict[str, Path] = {}
        new_disks: list[Disk] = []
        transferred = 0
        taken: set[str] = set()
        for disk in model.disks:
            if disk.path is None:
                new_disks.append(disk)
                continue
            host = exported.disks[disk.path]
            if disk.device is not DeviceKind.DISK:  # CD-ROM and floppy images are used as they are
                disks[disk.path] = host
                new_disks.append(disk)
                continue
            out = _free_path(disk_dir or host.parent, f"{host.stem}.{destination.name}", fmt, taken)
            tell(f"converting {host} -> {out} ({fmt})")
            written.append(out)
            result = convert(host, out, fmt, source_format=disk.format, progress=options.progress)
            transferred += result.data_bytes_written
            relative = out.name
            disks[relative] = out
            new_disks.append(dataclasses.replace(disk, path=relative, format=fmt, subformat=None))
        model = dataclasses.replace(model, disks=tuple(new_disks)).validate()
        tell(f"defining {name} on {destination.name}")
        destination.define(model, disks)
        defined = True
        tell(f"starting {name} on {destination.name}")
        destination.start(name)
        state = _wait_state(destination, name, (VmState.RUNNING,), options.timeout)
        if state is not VmState.RUNNING:
            raise OperationTimeout(destination.name, f"is {state.value}, not running, after {options.timeout:g} s",
                                   vm=name)
        downtime = time.monotonic() - stopped_at
    except (PolyvisorError, OSError) as exc:
        undone = _undo(source, destination, name, defined=defined, written=written, was_running=was_running)
        reason = exc.reason if isinstance(exc, HypervisorError) else str(exc)
        raise MigrationFailed(source.name, f"cold migration to {destination.name} failed: {reason}; {undone}",
                              vm=name) from exc
    if undefine_source and source.supports(Capability.UNDEFINE):
        source.undefine(name)
        notes.append("the source VM was undefined (its disk files are kept)")
    else:
        notes.append("the source VM is left defined and shut off; its disks are untouched")
    notes.append(f"disks written as {fmt}: " + ", ".join(str(p) for p in written) if written else "no disks")
    return MigrationReport(vm=name, kind="cold", source=source.uri, destination=destination.uri,
                           total_seconds=time.monotonic() - started,
                           downtime_ms=downtime * 1000 if was_running else None,
                           transferred_bytes=transferred, notes=tuple(notes))


def _undo(source: Driver, destination: Driver, name: str, *, defined: bool, written: list[Path],
          was_running: bool) -> str:
    """Remove the destination's copy and restart the source; says what it did."""
    done: list[str] = []
    if defined:
        with contextlib.suppress(PolyvisorError):
            if destination.get(name).state is not VmState.SHUT_OFF and destination.supports(Capability.DESTROY):
                destination.destroy(name)
        with contextlib.suppress(PolyvisorError):
            if destination.supports(Capability.UNDEFINE):
                destination.undefine(name)
                done.append("destination definition removed")
    for path in written:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    if written:
        done.append("converted disks removed")
    if was_running:
        try:
            source.start(name)
            done.append("source restarted")
        except PolyvisorError as exc:
            done.append(f"source NOT restarted ({exc})")
    return f"rolled back ({', '.join(done) or 'nothing to undo'})"
