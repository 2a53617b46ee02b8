"""The neutral VM description every codec reads into and writes from.

One :class:`VmModel` says what a guest sees — firmware, chipset, CPUs,
memory, controllers, disks, NICs, serial ports, display — and nothing about
where a hypervisor keeps it.  Every field means one thing and carries its
unit in its name or its docstring:

* sizes are **bytes** (``memory``, ``Disk.capacity``);
* indexes and units count from **0**; boot order counts from **1**;
* disk paths are **relative POSIX paths inside the package** (never absolute,
  never ``..``);
* identifiers come from the fixed vocabularies below (:class:`ControllerModel`,
  :class:`NicModel`, …); codecs translate them with :mod:`polyvisor.vm.mapping`.

What a codec reads but cannot map goes into :attr:`VmModel.vendor`, a
``{codec: {key: value}}`` dictionary of strings, so that a round trip through
the same codec loses nothing.  Other codecs ignore other codecs' keys.

The JSON form (:meth:`VmModel.to_json` / :meth:`VmModel.from_json`) is what
``polyvisor vm define FILE`` accepts: an object with ``"format":
"polyvisor-vm"``, ``"version": 1`` and the fields below, every problem
reported with its JSON path.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
import uuid as uuid_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Self

from polyvisor.errors import InvalidModel

JSON_FORMAT = "polyvisor-vm"
JSON_VERSION = 1

MiB = 1 << 20

#: Disk formats a model may name: the names of :mod:`polyvisor.disk`'s formats.
DISK_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi"})


class Firmware(enum.StrEnum):
    """What the guest boots from."""

    BIOS = "bios"  #: legacy PC BIOS (SeaBIOS, VMware/VirtualBox BIOS, Hyper-V generation 1)
    UEFI = "uefi"  #: UEFI (OVMF, VMware/VirtualBox EFI, Hyper-V generation 2)


class Machine(enum.StrEnum):
    """The chipset the guest sees, named vendor-neutrally."""

    I440FX = "i440fx"  #: the legacy PCI chipset family (QEMU pc, VMware 440BX, VirtualBox PIIX3, Hyper-V gen 1)
    Q35 = "q35"  #: the PCIe chipset family (QEMU q35, VirtualBox ICH9)


class Arch(enum.StrEnum):
    """The guest's CPU architecture (libosinfo / libvirt spelling)."""

    X86_64 = "x86_64"
    I686 = "i686"
    AARCH64 = "aarch64"


class OsFamily(enum.StrEnum):
    """The broad kind of guest operating system, which decides driver support."""

    LINUX = "linux"
    WINDOWS = "windows"
    FREEBSD = "freebsd"
    SOLARIS = "solaris"
    OTHER = "other"


class Bus(enum.StrEnum):
    """The kind of bus a storage device sits on."""

    IDE = "ide"
    SATA = "sata"
    SCSI = "scsi"
    NVME = "nvme"
    VIRTIO = "virtio"  #: virtio-blk: each disk is its own PCI device; the "controller" is implicit
    XEN = "xen"  #: Xen PV block (blkfront); implicit controller
    FDC = "fdc"  #: floppy controller


class ControllerModel(enum.StrEnum):
    """Storage controllers polyvisor knows, one name per guest-visible device model."""

    IDE = "ide"  #: PIIX3/PIIX4 IDE (also ICH6 IDE)
    AHCI = "ahci"  #: SATA AHCI (ICH9, VMware/VirtualBox AHCI)
    LSILOGIC = "lsilogic"  #: LSI Logic 53C1030 parallel SCSI
    LSISAS = "lsisas1068"  #: LSI Logic SAS 1068
    BUSLOGIC = "buslogic"  #: BusLogic BT-958 parallel SCSI
    PVSCSI = "pvscsi"  #: VMware paravirtual SCSI
    NVME = "nvme"  #: NVM Express
    VIRTIO_BLK = "virtio-blk"  #: virtio block (one PCI function per disk)
    VIRTIO_SCSI = "virtio-scsi"  #: virtio SCSI host adapter
    STORVSC = "storvsc"  #: Hyper-V synthetic SCSI (VMBus storvsc)
    XEN_BLKFRONT = "xen-blkfront"  #: Xen PV block frontend
    FDC = "fdc"  #: i82078 floppy controller


#: Which bus each controller model drives.
CONTROLLER_BUS: dict[ControllerModel, Bus] = {
    ControllerModel.IDE: Bus.IDE,
    ControllerModel.AHCI: Bus.SATA,
    ControllerModel.LSILOGIC: Bus.SCSI,
    ControllerModel.LSISAS: Bus.SCSI,
    ControllerModel.BUSLOGIC: Bus.SCSI,
    ControllerModel.PVSCSI: Bus.SCSI,
    ControllerModel.VIRTIO_SCSI: Bus.SCSI,
    ControllerModel.STORVSC: Bus.SCSI,
    ControllerModel.NVME: Bus.NVME,
    ControllerModel.VIRTIO_BLK: Bus.VIRTIO,
    ControllerModel.XEN_BLKFRONT: Bus.XEN,
    ControllerModel.FDC: Bus.FDC,
}

#: Highest unit number per bus (inclusive).  IDE: unit = channel * 2 + (0 master, 1 slave).
#: SCSI: the target id (16 on wide SCSI, 256 on virtio-scsi and storvsc are capped to 64 here).
MAX_UNIT: dict[Bus, int] = {
    Bus.IDE: 3,
    Bus.SATA: 29,
    Bus.SCSI: 63,
    Bus.NVME: 63,
    Bus.VIRTIO: 63,
    Bus.XEN: 63,
    Bus.FDC: 1,
}


class DeviceKind(enum.StrEnum):
    """What a storage device presents to the guest."""

    DISK = "disk"
    CDROM = "cdrom"
    FLOPPY = "floppy"


class NicModel(enum.StrEnum):
    """Network adapters polyvisor knows, one name per guest-visible device model."""

    E1000 = "e1000"  #: Intel 82540EM / 82545EM
    E1000E = "e1000e"  #: Intel 82574L
    VMXNET3 = "vmxnet3"  #: VMware VMXNET3
    VIRTIO_NET = "virtio-net"  #: virtio network
    NETVSC = "netvsc"  #: Hyper-V synthetic network adapter
    NETFRONT = "netfront"  #: Xen PV network frontend
    RTL8139 = "rtl8139"  #: Realtek RTL8139
    PCNET = "pcnet"  #: AMD PCnet-PCI II / PCnet-FAST III


class Graphics(enum.StrEnum):
    """The remote-display protocol the host exports the guest's screen with."""

    NONE = "none"  #: no remote-display protocol configured (a hypervisor's own console may still show it)
    VNC = "vnc"
    SPICE = "spice"


@dataclass(frozen=True)
class GuestOS:
    """The installed guest operating system.

    ``distribution`` uses libosinfo's distro names for Linux (``debian``,
    ``ubuntu``, ``rhel``, ``centos``, ``fedora``, ``sles``, ``opensuse``…)
    and ``windows`` / ``windows-server`` for Windows.  ``version`` is the
    release as its vendor names it (``12``, ``22.04``, ``11``, ``2019``).
    ``osinfo`` is the libosinfo short id (``debian12``, ``win2k19``).
    """

    family: OsFamily = OsFamily.OTHER
    distribution: str | None = None
    version: str | None = None
    arch: Arch = Arch.X86_64
    osinfo: str | None = None


@dataclass(frozen=True)
class Cpu:
    """vCPU topology; the guest sees ``sockets * cores * threads`` vCPUs."""

    sockets: int = 1
    cores: int = 1  #: cores per socket
    threads: int = 1  #: threads per core

    @property
    def count(self) -> int:
        """Total vCPUs."""
        return self.sockets * self.cores * self.threads


@dataclass(frozen=True)
class Controller:
    """A storage controller; ``index`` counts controllers of the same bus from 0 (``scsi1`` is index 1)."""

    model: ControllerModel
    index: int = 0

    @property
    def bus(self) -> Bus:
        """The bus this controller drives."""
        return CONTROLLER_BUS[self.model]


@dataclass(frozen=True)
class Disk:
    """A storage device and the image behind it.

    The address is (``bus``, ``controller``, ``unit``): the controller is the
    :class:`Controller` of that bus with that index.  ``path`` is the image
    file, relative to the package (None: an empty CD-ROM or floppy drive).
    ``format``/``subformat`` name the image's disk format as
    :mod:`polyvisor.disk` does (``vmdk``/``streamOptimized``); ``capacity`` is
    the guest-visible size in bytes when the package states it.
    """

    device: DeviceKind
    bus: Bus
    controller: int
    unit: int
    path: str | None = None
    format: str | None = None
    subformat: str | None = None
    capacity: int | None = None
    boot_order: int | None = None  #: 1 boots first; None: not in the boot order


@dataclass(frozen=True)
class Nic:
    """A network adapter; ``mac`` is lower-case ``aa:bb:cc:dd:ee:ff`` (None: the host assigns one)."""

    model: NicModel
    mac: str | None = None
    network: str | None = None  #: the name of the network (or switch / port group) it connects to


@dataclass(frozen=True)
class Serial:
    """A guest serial port; ``port`` 0 is COM1 / ttyS0.  How the host connects to it is host-specific."""

    port: int = 0


@dataclass(frozen=True)
class VmModel:
    """One virtual machine, hypervisor-neutral."""

    name: str
    memory: int  #: guest RAM in bytes, a whole number of MiB
    cpu: Cpu = field(default_factory=Cpu)
    uuid: str | None = None  #: the SMBIOS/BIOS UUID, lower-case canonical form
    firmware: Firmware = Firmware.BIOS
    secure_boot: bool = False  #: UEFI Secure Boot enforced (only with UEFI)
    machine: Machine = Machine.I440FX
    os: GuestOS = field(default_factory=GuestOS)
    controllers: tuple[Controller, ...] = ()
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    serials: tuple[Serial, ...] = ()
    graphics: Graphics = Graphics.NONE
    vendor: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Addresses, not list positions, identify controllers, disks and serial ports: keep one canonical order
        # so that equal machines compare equal.  NIC order is meaningful (it is the guest's enumeration order).
        object.__setattr__(self, "controllers", tuple(sorted(self.controllers, key=lambda c: (c.bus, c.index))))
        object.__setattr__(self, "disks", tuple(sorted(self.disks, key=lambda d: (d.bus, d.controller, d.unit))))
        object.__setattr__(self, "serials", tuple(sorted(self.serials, key=lambda s: s.port)))

    # ------------------------------------------------------------- queries

    def controller_for(self, disk: Disk) -> Controller:
        """The controller *disk* is attached to."""
        for controller in self.controllers:
            if controller.bus == disk.bus and controller.index == disk.controller:
                return controller
        raise InvalidModel(f"no {disk.bus} controller {disk.controller} for disk {disk_label(disk)}")

    def vendor_keys(self, codec: str) -> Mapping[str, str]:
        """The vendor keys of *codec* (empty when none)."""
        return self.vendor.get(codec, {})

    def with_vendor(self, codec: str, values: Mapping[str, str]) -> VmModel:
        """A copy whose vendor keys for *codec* are *values* (dropped when empty)."""
        vendor = {k: dict(v) for k, v in self.vendor.items() if k != codec}
        if values:
            vendor[codec] = dict(values)
        return dataclasses.replace(self, vendor=dict(sorted(vendor.items())))

    # ---------------------------------------------------------- validation

    def validate(self, *, source: str | None = None) -> Self:
        """Check every rule; raise :class:`InvalidModel` listing all problems.  Returns self."""
        problems = list(_problems(self))
        if problems:
            raise InvalidModel("invalid VM model:\n  " + "\n  ".join(problems), path=source)
        return self

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dictionary (with the format header)."""
        body = _encode(self)
        assert isinstance(body, dict)
        return {"format": JSON_FORMAT, "version": JSON_VERSION, **body}

    def to_json(self) -> str:
        """The model as JSON text (2-space indent, trailing newline)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> VmModel:
        """Build and validate a model from decoded JSON; errors name the JSON path."""
        if not isinstance(data, dict):
            raise InvalidModel(f"expected a JSON object, got {_json_type(data)}", path=source)
        body = dict(data)
        fmt = body.pop("format", None)
        version = body.pop("version", None)
        if fmt != JSON_FORMAT:
            raise InvalidModel(f'"format" must be "{JSON_FORMAT}" (got {fmt!r})', path=source)
        if version != JSON_VERSION:
            raise InvalidModel(f'"version" must be {JSON_VERSION} (got {version!r})', path=source)
        try:
            model = _decode(VmModel, body, "$")
        except _DecodeError as exc:
            raise InvalidModel(str(exc), path=source, where=exc.where) from None
        assert isinstance(model, VmModel)
        return model.validate(source=source)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str | None = None) -> VmModel:
        """Parse and validate JSON text."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidModel(f"not valid JSON: {exc}", path=source) from None
        return cls.from_dict(data, source=source)


def disk_label(disk: Disk) -> str:
    """A short human name for a disk's address, e.g. ``scsi0:1``."""
    return f"{disk.bus}{disk.controller}:{disk.unit}"


# ------------------------------------------------------------------ validation rules

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_OSINFO = re.compile(r"^[a-z0-9][a-z0-9.+_-]*$")
_DISTRO = re.compile(r"^[a-z0-9][a-z0-9.+_-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_package_path(path: str) -> str | None:
    """Why *path* is not a safe relative package path (None when it is)."""
    if not path:
        return "is empty"
    if _CONTROL.search(path):
        return "contains control characters"
    if "\\" in path:
        return "contains a backslash (paths use '/')"
    pure = PurePosixPath(path)
    if pure.is_absolute():
        return "is absolute (must be relative to the package)"
    if any(part == ".." for part in pure.parts):
        return "contains '..'"
    if re.match(r"^[A-Za-z]:", path):
        return "has a drive letter"
    return None


def _problems(model: VmModel) -> typing.Iterator[str]:
    if not model.name or _CONTROL.search(model.name) or len(model.name) > 255:
        yield "name: must be 1-255 characters without control characters"
    if model.uuid is not None:
        try:
            if str(uuid_module.UUID(model.uuid)) != model.uuid:
                yield f"uuid: {model.uuid!r} is not in lower-case canonical form"
        except ValueError:
            yield f"uuid: {model.uuid!r} is not a UUID"
    if model.secure_boot and model.firmware != Firmware.UEFI:
        yield "secure_boot: needs firmware uefi"
    for name in ("sockets", "cores", "threads"):
        if getattr(model.cpu, name) < 1:
            yield f"cpu.{name}: must be at least 1"
    if model.memory <= 0 or model.memory % MiB:
        yield f"memory: must be a positive whole number of MiB in bytes (got {model.memory})"
    os = model.os
    if os.osinfo is not None and not _OSINFO.match(os.osinfo):
        yield f"os.osinfo: {os.osinfo!r} is not a libosinfo short id"
    if os.distribution is not None and not _DISTRO.match(os.distribution):
        yield f"os.distribution: {os.distribution!r} must be a lower-case identifier"
    if os.version is not None and (not os.version or _CONTROL.search(os.version)):
        yield "os.version: must be non-empty without control characters"
    seen_controllers: set[tuple[Bus, int]] = set()
    for i, controller in enumerate(model.controllers):
        key = (controller.bus, controller.index)
        if controller.index < 0:
            yield f"controllers[{i}].index: must not be negative"
        if key in seen_controllers:
            yield f"controllers[{i}]: a second {controller.bus} controller with index {controller.index}"
        seen_controllers.add(key)
    seen_units: set[tuple[Bus, int, int]] = set()
    boot_orders: set[int] = set()
    for i, disk in enumerate(model.disks):
        where = f"disks[{i}]"
        if (disk.bus, disk.controller) not in seen_controllers:
            yield f"{where}: no {disk.bus} controller with index {disk.controller}"
        if not 0 <= disk.unit <= MAX_UNIT[disk.bus]:
            yield f"{where}.unit: {disk.unit} out of range 0-{MAX_UNIT[disk.bus]} for {disk.bus}"
        address = (disk.bus, disk.controller, disk.unit)
        if address in seen_units:
            yield f"{where}: address {disk_label(disk)} used twice"
        seen_units.add(address)
        if (disk.device == DeviceKind.FLOPPY) != (disk.bus == Bus.FDC):
            yield f"{where}: floppy drives (and only they) sit on the fdc bus"
        if disk.device == DeviceKind.DISK and disk.path is None:
            yield f"{where}.path: a disk needs an image"
        if disk.path is not None and (why := check_package_path(disk.path)):
            yield f"{where}.path: {disk.path!r} {why}"
        if disk.format is not None and disk.format not in DISK_FORMATS:
            yield f"{where}.format: {disk.format!r} unknown (known: {', '.join(sorted(DISK_FORMATS))})"
        if disk.subformat is not None and disk.format is None:
            yield f"{where}.subformat: given without a format"
        if disk.path is None and (disk.format or disk.capacity is not None):
            yield f"{where}: an empty drive has no format or capacity"
        if disk.capacity is not None and disk.capacity < 0:
            yield f"{where}.capacity: must not be negative"
        if disk.boot_order is not None:
            if disk.boot_order < 1:
                yield f"{where}.boot_order: counts from 1"
            if disk.boot_order in boot_orders:
                yield f"{where}.boot_order: {disk.boot_order} used twice"
            boot_orders.add(disk.boot_order)
    for i, nic in enumerate(model.nics):
        if nic.mac is not None and not _MAC.match(nic.mac):
            yield f"nics[{i}].mac: {nic.mac!r} is not a lower-case colon-separated MAC address"
        if nic.network is not None and (not nic.network or _CONTROL.search(nic.network)):
            yield f"nics[{i}].network: must be non-empty without control characters"
    ports: set[int] = set()
    for i, serial in enumerate(model.serials):
        if not 0 <= serial.port <= 31:
            yield f"serials[{i}].port: must be 0-31"
        if serial.port in ports:
            yield f"serials[{i}].port: {serial.port} used twice"
        ports.add(serial.port)
    for codec, values in model.vendor.items():
        if not isinstance(values, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()
        ):
            yield f"vendor.{codec}: must map strings to strings"


# ------------------------------------------------------------------ JSON <-> dataclasses


class _DecodeError(Exception):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise _DecodeError(where, f"expected an object, got {_json_type(value)}")
        hints = typing.get_type_hints(hint)
        known = {f.name: f for f in dataclasses.fields(hint)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise _DecodeError(where, f"unknown field {unknown[0]!r} (known: {', '.join(known)})")
        kwargs: dict[str, Any] = {}
        for name, f in known.items():
            if name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise _DecodeError(where, f"missing required field {name!r}")
                continue
            kwargs[name] = _decode(hints[name], value[name], f"{where}.{name}")
        return hint(**kwargs)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if value not in allowed:
            raise _DecodeError(where, f"{value!r} is not one of {', '.join(map(str, allowed))}")
        return hint(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise _DecodeError(where, f"expected an array, got {_json_type(value)}")
        return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise _DecodeError(where, f"expected an object, got {_json_type(value)}")
        return {k: _decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise _DecodeError(where, f"expected true or false, got {_json_type(value)}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _DecodeError(where, f"expected an integer, got {_json_type(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _DecodeError(where, f"expected a string, got {_json_type(value)}")
        return value
    raise TypeError(f"model field type {hint!r} has no JSON decoding")  # a bug, not bad input
