"""The ``Driver`` protocol: one ops table for every hypervisor, with declared capabilities.

As paravirt_ops gives Linux one interface any hypervisor plugs into, a
:class:`Driver` gives polyvisor's management layer one interface any
hypervisor's API maps onto.  A driver module subclasses :class:`Driver`,
declares the :class:`Capability` values it implements in ``capabilities``,
overrides exactly the methods those capabilities name, maps its native states
onto :class:`VmState` with a ``STATE_MAP`` table, and registers itself with
:func:`polyvisor.hypervisors.registry.register_driver`.  Vendor extras are
methods named ``ex_…`` (as in apache libcloud).

Calling an operation a driver does not declare raises
:class:`~polyvisor.errors.UnsupportedOperation` naming the driver and the
operation; ``Driver.__init_subclass__`` refuses, at import time, a driver
whose declarations and overridden methods disagree.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from polyvisor.errors import UnsupportedOperation
from polyvisor.vm.model import VmModel


class VmState(enum.StrEnum):
    """The common state set every native state maps onto (virsh's vocabulary where it has a word)."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUT_OFF = "shut off"
    PENDING = "pending"  #: starting: being created, powering on, booting (EC2 pending)
    STOPPING = "stopping"  #: shutting down
    SUSPENDED = "suspended"  #: saved to disk / hibernated
    CRASHED = "crashed"
    MIGRATING = "migrating"
    TERMINATED = "terminated"  #: gone for good (EC2 terminated): cannot be started again
    UNKNOWN = "unknown"


class Capability(enum.StrEnum):
    """One operation of the ops table; a driver declares the ones it implements."""

    LIST = "list"
    GET = "get"
    DEFINE = "define"
    UNDEFINE = "undefine"
    START = "start"
    SHUTDOWN = "shutdown"
    DESTROY = "destroy"
    REBOOT = "reboot"
    PAUSE = "pause"
    RESUME = "resume"
    SNAPSHOT_CREATE = "snapshot-create"
    SNAPSHOT_LIST = "snapshot-list"
    SNAPSHOT_REVERT = "snapshot-revert"
    SNAPSHOT_DELETE = "snapshot-delete"
    STATS = "stats"
    CONSOLE = "console"
    MIGRATE_LIVE = "migrate-live"  #: live migration to another connection of the same driver
    EXPORT = "export"  #: the VM's definition and disk files, for a cold migration to another hypervisor
    IMPORT_IMAGE = "import-image"  #: turn a disk image into a bootable image/template (EC2 ImportImage)


#: Which method implements each capability.
CAPABILITY_METHODS: dict[Capability, str] = {
    Capability.LIST: "list_vms",
    Capability.GET: "get",
    Capability.DEFINE: "define",
    Capability.UNDEFINE: "undefine",
    Capability.START: "start",
    Capability.SHUTDOWN: "shutdown",
    Capability.DESTROY: "destroy",
    Capability.REBOOT: "reboot",
    Capability.PAUSE: "pause",
    Capability.RESUME: "resume",
    Capability.SNAPSHOT_CREATE: "snapshot_create",
    Capability.SNAPSHOT_LIST: "snapshot_list",
    Capability.SNAPSHOT_REVERT: "snapshot_revert",
    Capability.SNAPSHOT_DELETE: "snapshot_delete",
    Capability.STATS: "stats",
    Capability.CONSOLE: "console",
    Capability.MIGRATE_LIVE: "migrate",
    Capability.EXPORT: "export",
    Capability.IMPORT_IMAGE: "import_image",
}


@dataclass(frozen=True)
class VmInfo:
    """One VM as a hypervisor reports it."""

    name: str
    state: VmState
    vcpus: int
    memory: int  #: bytes
    uuid: str | None = None
    native_state: str = ""  #: the hypervisor's own word for the state, for diagnostics
    extra: Mapping[str, Any] = field(default_factory=dict)  #: vendor fields (host, instance type…)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "state": self.state.value, "vcpus": self.vcpus, "memory": self.memory,
                "uuid": self.uuid, "native_state": self.native_state, "extra": dict(self.extra)}


@dataclass(frozen=True)
class Snapshot:
    """A point-in-time copy of a VM's disks (and memory, where the hypervisor keeps it)."""

    name: str
    created: datetime | None = None
    description: str = ""
    parent: str | None = None
    includes_memory: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "created": self.created.isoformat() if self.created else None,
                "description": self.description, "parent": self.parent, "includes_memory": self.includes_memory}


@dataclass(frozen=True)
class DiskStats:
    """Counters of one virtual disk since the VM started."""

    read_bytes: int = 0
    write_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0


@dataclass(frozen=True)
class NicStats:
    """Counters of one virtual NIC since the VM started."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0


@dataclass(frozen=True)
class VmStats:
    """Resource counters of a running VM."""

    cpu_time_ns: int | None = None  #: guest CPU time consumed, all vCPUs
    memory_bytes: int | None = None  #: memory the guest currently has
    disks: Mapping[str, DiskStats] = field(default_factory=dict)  #: by device name (virtio0, sda…)
    nics: Mapping[str, NicStats] = field(default_factory=dict)  #: by device name or MAC

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "cpu_time_ns": self.cpu_time_ns,
            "memory_bytes": self.memory_bytes,
            "disks": {k: vars(v) for k, v in self.disks.items()},
            "nics": {k: vars(v) for k, v in self.nics.items()},
        }


@dataclass(frozen=True)
class MigrationOptions:
    """How to migrate."""

    live: bool = True
    downtime_ms: int | None = None  #: longest pause the guest may see at the switch-over
    bandwidth_mib: int | None = None  #: MiB/s cap on the migration stream
    timeout: float = 600.0  #: seconds before the migration is cancelled and rolled back
    progress: Callable[[int, int], None] | None = None  #: (bytes transferred, bytes total) during a migration


@dataclass(frozen=True)
class MigrationReport:
    """What a migration did (printed by ``polyvisor migrate``)."""

    vm: str
    kind: str  #: "live" or "cold"
    source: str
    destination: str
    total_seconds: float
    downtime_ms: float | None
    transferred_bytes: int
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"vm": self.vm, "kind": self.kind, "source": self.source, "destination": self.destination,
                "total_seconds": self.total_seconds, "downtime_ms": self.downtime_ms,
                "transferred_bytes": self.transferred_bytes, "notes": list(self.notes)}


@dataclass(frozen=True)
class ExportedVm:
    """A VM's definition and the host paths of its disks (for a cold migration)."""

    model: VmModel
    disks: Mapping[str, Path]  #: model disk path -> file on this host


class Driver:
    """The ops table.  Subclasses declare ``capabilities`` and override the matching methods."""

    #: Driver name (``qemu``, ``libvirt``, ``vsphere``, ``ec2``).
    name: ClassVar[str]
    #: URI schemes this driver may handle (the registry also asks :meth:`accepts`).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: What the driver implements.
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    #: One line describing the driver, for ``polyvisor drivers``.
    description: ClassVar[str] = ""
    #: Native state name -> common state.
    STATE_MAP: ClassVar[Mapping[str, VmState]] = {}
    #: The disk format (a :mod:`polyvisor.disk` format name) a cold migration converts disks into for this driver.
    preferred_disk_format: ClassVar[str] = "raw"
    #: The :data:`polyvisor.vm.mapping.drivers.TARGETS` entry whose devices a VM coming from another hypervisor
    #: is adapted to (None: keep the model's devices).
    device_target: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for capability, method in CAPABILITY_METHODS.items():
            overridden = getattr(cls, method) is not getattr(Driver, method)
            declared = capability in cls.capabilities
            if declared and not overridden:
                raise TypeError(f"{cls.__name__} declares {capability.value!r} but does not implement {method}()")
            if overridden and not declared:
                raise TypeError(f"{cls.__name__} implements {method}() but does not declare {capability.value!r}")

    def __init__(self, uri: str) -> None:
        self.uri = uri

    # --------------------------------------------------------------- plumbing

    @classmethod
    def accepts(cls, uri: str) -> bool:
        """Whether this driver handles *uri* (default: its scheme is one of :attr:`schemes`)."""
        return uri.split(":", 1)[0] in cls.schemes

    @classmethod
    def connect(cls, uri: str) -> Self:
        """Open a connection (subclasses override to validate the URI and reach the hypervisor)."""
        return cls(uri)

    def close(self) -> None:
        """Release the connection."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @classmethod
    def supports(cls, capability: Capability) -> bool:
        """Whether the driver declares *capability*."""
        return capability in cls.capabilities

    def _unsupported(self, capability: Capability, vm: str | None = None) -> UnsupportedOperation:
        return UnsupportedOperation(self.name, capability.value, vm=vm)

    @classmethod
    def map_state(cls, native: str) -> VmState:
        """The common state for a native state name (UNKNOWN for names the table lacks)."""
        return cls.STATE_MAP.get(native, VmState.UNKNOWN)

    # ------------------------------------------------------------- inventory

    def list_vms(self) -> list[VmInfo]:
        """Every VM the connection sees."""
        raise self._unsupported(Capability.LIST)

    def get(self, name: str) -> VmInfo:
        """One VM by name (VmNotFound if there is none)."""
        raise self._unsupported(Capability.GET, name)

    def define(self, model: VmModel, disks: Mapping[str, Path]) -> VmInfo:
        """Create a (stopped) VM from the neutral model; *disks* maps each model disk path to a host file."""
        raise self._unsupported(Capability.DEFINE, model.name)

    def undefine(self, name: str) -> None:
        """Remove a stopped VM's definition (its disk files are left alone)."""
        raise self._unsupported(Capability.UNDEFINE, name)

    # -------------------------------------------------------------- lifecycle

    def start(self, name: str) -> None:
        """Power on."""
        raise self._unsupported(Capability.START, name)

    def shutdown(self, name: str, timeout: float = 60.0) -> None:
        """Ask the guest to power off (ACPI); OperationTimeout if it is not off within *timeout* seconds."""
        raise self._unsupported(Capability.SHUTDOWN, name)

    def destroy(self, name: str) -> None:
        """Power off at once (pull the plug)."""
        raise self._unsupported(Capability.DESTROY, name)

    def reboot(self, name: str) -> None:
        """Restart the guest."""
        raise self._unsupported(Capability.REBOOT, name)

    def pause(self, name: str) -> None:
        """Stop the vCPUs, keeping memory."""
        raise self._unsupported(Capability.PAUSE, name)

    def resume(self, name: str) -> None:
        """Continue a paused VM."""
        raise self._unsupported(Capability.RESUME, name)

    # -------------------------------------------------------------- snapshots

    def snapshot_create(self, name: str, snapshot: str, description: str = "") -> Snapshot:
        """Take a snapshot called *snapshot*."""
        raise self._unsupported(Capability.SNAPSHOT_CREATE, name)

    def snapshot_list(self, name: str) -> list[Snapshot]:
        """The VM's snapshots, oldest first."""
        raise self._unsupported(Capability.SNAPSHOT_LIST, name)

    def snapshot_revert(self, name: str, snapshot: str) -> None:
        """Return the VM to a snapshot."""
        raise self._unsupported(Capability.SNAPSHOT_REVERT, name)

    def snapshot_delete(self, name: str, snapshot: str) -> None:
        """Delete a snapshot (the VM's current state is kept)."""
        raise self._unsupported(Capability.SNAPSHOT_DELETE, name)

    # ------------------------------------------------------------ observation

    def stats(self, name: str) -> VmStats:
        """CPU, memory, disk and network counters of a running VM."""
        raise self._unsupported(Capability.STATS, name)

    def console(self, name: str, *, follow: bool = False) -> Iterator[str]:
        """The serial console's output so far; with *follow*, keep yielding new output as it comes."""
        raise self._unsupported(Capability.CONSOLE, name)

    # -------------------------------------------------------------- migration

    def migrate(self, name: str, destination: Driver, options: MigrationOptions) -> MigrationReport:
        """Move a running VM to *destination* (a connection of the same driver) while it runs."""
        raise self._unsupported(Capability.MIGRATE_LIVE, name)

    def export(self, name: str) -> ExportedVm:
        """The VM's neutral definition and its disk files on this host."""
        raise self._unsupported(Capability.EXPORT, name)

    def import_image(self, disk: Path, description: str = "") -> str:
        """Turn a disk image into something VMs can be created from; returns its identifier."""
        raise self._unsupported(Capability.IMPORT_IMAGE)
