"""The direct QEMU driver: ``qemu:///session?root=DIR``, QEMU processes driven over QMP with ``qemu.qmp``.

Each VM is a folder under DIR (see :class:`VmPaths`): its definition
(``vm.json``: the neutral model and the host files of its disks), and while
it runs the QEMU process's pid file, QMP socket, serial console log and a
small state file.  QEMU runs daemonised (``-daemonize``), so a VM started by
one polyvisor process keeps running after it exits, and any other process
connecting to the same root sees it.

The model becomes a QEMU command line (:func:`command_line`, tables
:data:`QEMU_CONTROLLERS`, :data:`QEMU_NICS`, :data:`QEMU_DISK_FORMATS`);
once QEMU runs, everything goes through QMP (QEMU QMP Reference Manual,
``qapi/*.json`` of QEMU 7.2): ``query-status`` (mapped through
:data:`QemuDriver.STATE_MAP`), ``stop``/``cont``, ``system_powerdown``,
``system_reset``, ``quit``, the ``snapshot-save``/``snapshot-load``/
``snapshot-delete`` jobs (QEMU 6.0+) for internal qcow2 snapshots,
``query-cpus-fast``/``query-blockstats``/``query-memory-size-summary`` for
statistics, and ``migrate``/``migrate-incoming``/``query-migrate`` for live
migration to another root.

URI parameters: ``root`` (required), ``accel`` (``tcg``, the default, or
``kvm``), ``migration_port`` (the TCP port on 127.0.0.1 a VM migrating *into*
this root listens on; default 0: any free port), ``binary`` (the QEMU
system emulator; default ``qemu-system-x86_64``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from polyvisor.errors import (
    ConnectionFailed,
    HypervisorError,
    InvalidState,
    MigrationFailed,
    OperationTimeout,
    SnapshotNotFound,
    UnmappableModel,
    UsageError,
    VmExists,
    VmNotFound,
)
from polyvisor.hypervisors.driver import (
    Capability,
    DiskStats,
    Driver,
    ExportedVm,
    MigrationOptions,
    MigrationReport,
    Snapshot,
    VmInfo,
    VmState,
    VmStats,
)
from polyvisor.hypervisors.registry import register_driver
from polyvisor.vm.model import (
    Arch,
    Bus,
    ControllerModel,
    DeviceKind,
    Disk,
    Firmware,
    Graphics,
    Machine,
    NicModel,
    VmModel,
    disk_label,
)

T = TypeVar("T")

DEFAULT_BINARY = "qemu-system-x86_64"
ACCELERATORS = ("tcg", "kvm")

#: polyvisor disk format name -> QEMU block driver (QEMU "Disk Images" documentation).
QEMU_DISK_FORMATS: dict[str, str] = {
    "raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi",
}

#: Storage controller -> QEMU device (``qemu-system-x86_64 -device help``; libvirt's qemu driver uses the
#: same pairs: lsilogic -> lsi53c895a, lsisas1068 -> mptsas1068, vmpvscsi -> pvscsi).  IDE is the
#: i440FX's built-in PIIX3 IDE; AHCI controller 0 of a q35 is the ICH9's built-in one.
QEMU_CONTROLLERS: dict[ControllerModel, str] = {
    ControllerModel.IDE: "piix3-ide",
    ControllerModel.AHCI: "ich9-ahci",
    ControllerModel.LSILOGIC: "lsi53c895a",
    ControllerModel.LSISAS: "mptsas1068",
    ControllerModel.PVSCSI: "pvscsi",
    ControllerModel.VIRTIO_SCSI: "virtio-scsi-pci",
    ControllerModel.NVME: "nvme",
    ControllerModel.VIRTIO_BLK: "virtio-blk-pci",
    ControllerModel.FDC: "isa-fdc",
}

#: Highest SCSI target id per SCSI controller (QEMU hw/scsi: LSI_MAX_DEVS 7 with id 7 the HBA's own,
#: MPTSAS_NUM_PORTS 8, PVSCSI_MAX_DEVS 64, virtio-scsi VIRTIO_SCSI_MAX_TARGET 255 capped by the model).
SCSI_MAX_TARGET: dict[ControllerModel, int] = {
    ControllerModel.LSILOGIC: 6,
    ControllerModel.LSISAS: 7,
    ControllerModel.PVSCSI: 63,
    ControllerModel.VIRTIO_SCSI: 63,
}

#: Ports per AHCI controller (QEMU hw/ide/ich.c: ICH9 AHCI has 6 ports).
AHCI_PORTS = 6

#: Network adapter -> QEMU device (``-device help``, "Network devices").
QEMU_NICS: dict[NicModel, str] = {
    NicModel.E1000: "e1000",
    NicModel.E1000E: "e1000e",
    NicModel.VIRTIO_NET: "virtio-net-pci",
    NicModel.RTL8139: "rtl8139",
    NicModel.VMXNET3: "vmxnet3",
    NicModel.PCNET: "pcnet",
}

#: Chipset -> QEMU machine type (``-machine help``).
QEMU_MACHINES: dict[Machine, str] = {Machine.I440FX: "pc", Machine.Q35: "q35"}
#: A concrete machine type name per chipset, for matching firmware descriptors' ``machines`` globs.
MACHINE_GLOB_SAMPLE: dict[Machine, str] = {Machine.I440FX: "pc-i440fx-7.2", Machine.Q35: "pc-q35-7.2"}

#: ISA serial ports QEMU offers (hw/char/serial-isa.c: MAX_ISA_SERIAL_PORTS).
ISA_SERIAL_PORTS = 4

#: Where QEMU firmware descriptors live (QEMU docs/interop/firmware.json, "Search locations").
FIRMWARE_DESCRIPTOR_DIRS = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))
#: Debian's ovmf package, when no descriptor matches: (code, vars template) per secure boot.
OVMF_FALLBACK: dict[bool, tuple[Path, Path]] = {
    False: (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    True: (Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")),
}

#: Seconds to wait for QMP's greeting (another client may hold the monitor: QEMU serves one at a time).
QMP_CONNECT_TIMEOUT = 10.0
#: Seconds a QMP command may take.
QMP_COMMAND_TIMEOUT = 60.0
#: Seconds QEMU may take to exit after ``quit`` before it is killed.
QUIT_TIMEOUT = 10.0
#: Polling interval for state changes, jobs and migration progress.
POLL = 0.1

DEFINITION_FORMAT = "polyvisor-qemu-vm"
DEFINITION_VERSION = 1


# ------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class VmPaths:
    """The files of one VM under the root."""

    dir: Path

    @property
    def definition(self) -> Path:
        """The model and disk files (``vm.json``); present once the VM is defined."""
        return self.dir / "vm.json"

    @property
    def incoming(self) -> Path:
        """The definition of a VM still migrating into this root (renamed to ``vm.json`` when done)."""
        return self.dir / "incoming.json"

    @property
    def state(self) -> Path:
        """What polyvisor recorded about the running process (accelerator, outgoing migration)."""
        return self.dir / "state.json"

    @property
    def pidfile(self) -> Path:
        """QEMU's ``-pidfile``."""
        return self.dir / "qemu.pid"

    @property
    def qmp_name(self) -> str:
        """The QMP socket's name in :attr:`dir` (reached through the directory, so its length never matters)."""
        return "qmp.sock"

    @property
    def console(self) -> Path:
        """The serial port 0 log of the current QEMU process."""
        return self.dir / "console.log"

    @property
    def console_history(self) -> Path:
        """Serial output of this run from before a live migration (on the root it came from)."""
        return self.dir / "console-history.log"

    def serial_log(self, port: int) -> Path:
        """The log of serial port *port* (port 0 is :attr:`console`)."""
        return self.console if port == 0 else self.dir / f"serial{port}.log"

    @property
    def nvram(self) -> Path:
        """This VM's copy of the UEFI variable store."""
        return self.dir / "nvram.fd"

    @property
    def qemu_log(self) -> Path:
        """QEMU's stderr until it daemonises (its start-up errors)."""
        return self.dir / "qemu.log"

    @property
    def snapshots(self) -> Path:
        """Snapshot descriptions (qcow2 snapshots have none of their own)."""
        return self.dir / "snapshots.json"


@dataclass(frozen=True)
class DiskFile:
    """The host file behind one model disk and its format (polyvisor's name)."""

    file: Path
    format: str


@dataclass(frozen=True)
class Definition:
    """What ``vm.json`` holds."""

    model: VmModel
    disks: Mapping[str, DiskFile]  #: model disk path -> host file

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps({
            "format": DEFINITION_FORMAT,
            "version": DEFINITION_VERSION,
            "model": self.model.to_dict(),
            "disks": {k: {"file": str(v.file), "format": v.format} for k, v in sorted(self.disks.items())},
        }, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> Definition:
        """Parse ``vm.json``."""
        try:
            data = json.loads(text)
            if data.get("format") != DEFINITION_FORMAT or data.get("version") != DEFINITION_VERSION:
                raise ValueError(f"not a {DEFINITION_FORMAT} version {DEFINITION_VERSION} file")
            model = VmModel.from_dict(data["model"], source=str(source))
            disks = {k: DiskFile(Path(v["file"]), str(v["format"])) for k, v in data["disks"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HypervisorError("qemu", f"{source}: unreadable VM definition: {exc}") from None
        return cls(model, disks)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _folder_name(name: str) -> str:
    """The VM's folder name: its name with anything but letters, digits and ``-_.`` percent-encoded."""
    encoded = urllib.parse.quote(name, safe="-_.")
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    return encoded


# ------------------------------------------------------------------------------------- processes


def process_alive(pid: int, marker: str) -> bool:
    """Whether *pid* is a live (not zombie) process whose command line contains *marker*."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and marker.encode() in cmdline.split(b"\0")


def _pid_alive(pid: object) -> bool:
    """Whether *pid* (as recorded in a state file) is a live process."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_exit(pid: int, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid, marker):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def _thread_cpu_ns(pid: int, tid: int) -> int | None:
    """User + system CPU time of thread *tid* of *pid* (proc(5): fields 14 utime and 15 stime, in ticks)."""
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15, counted after "pid (comm)"
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------- QMP


class QmpSession:
    """A synchronous facade over ``qemu.qmp``'s asyncio :class:`QMPClient`, on a private event loop.

    The socket is reached through ``/proc/self/fd/N/qmp.sock`` with N an open
    descriptor of the VM's folder, so the folder's path length never meets
    the 108-byte limit of Unix socket addresses.
    """

    def __init__(self, vm_dir: Path, socket_name: str, vm: str, *, timeout: float = QMP_CONNECT_TIMEOUT) -> None:
        self.vm = vm
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"polyvisor-{vm}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dirfd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(f"/proc/self/fd/{dirfd}/{socket_name}")
            sock.setblocking(False)
            self._run(self._client.connect(sock), timeout)
        except (OSError, QMPError, TimeoutError) as exc:
            sock.close()
            self.close()
            raise ConnectionFailed("qemu", f"QMP monitor not reachable: {exc or type(exc).__name__}",
                                   vm=vm) from None
        finally:
            os.close(dirfd)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                *, timeout: float = QMP_COMMAND_TIMEOUT) -> Any:
        """Run one QMP command and return its ``return`` value; QMP errors become HypervisorError."""
        try:
            return self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise HypervisorError("qemu", f"QMP {command}: {exc.error.error.desc}", vm=self.vm) from None
        except TimeoutError:
            raise OperationTimeout("qemu", f"QMP {command} did not answer within {timeout:.0f} s",
                                   vm=self.vm) from None
        except (QMPError, OSError, EOFError) as exc:
            raise HypervisorError("qemu", f"QMP {command}: connection lost ({exc})", vm=self.vm) from None

    def quit(self) -> None:
        """``quit``: QEMU exits; the connection may drop before the answer arrives."""
        with contextlib.suppress(HypervisorError):
            self.execute("quit", timeout=QUIT_TIMEOUT)

    def close(self) -> None:
        """Disconnect and close the private event loop."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError, asyncio.CancelledError):
            self._run(self._client.disconnect(), QMP_CONNECT_TIMEOUT)
        self._loop.close()


# ---------------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class FirmwareFiles:
    """UEFI code and variable-store template, and whether the firmware needs SMM (secure boot)."""

    code: Path
    vars_template: Path
    requires_smm: bool


def find_uefi_firmware(machine: Machine, secure_boot: bool,
                       descriptor_dirs: Sequence[Path] = FIRMWARE_DESCRIPTOR_DIRS) -> FirmwareFiles:
    """OVMF files for *machine* from QEMU's firmware descriptors (QEMU docs/interop/firmware.json).

    Secure boot wants a descriptor with the ``secure-boot`` and ``enrolled-keys`` features; without
    secure boot one without ``secure-boot`` and ``requires-smm``.  Falls back to Debian's ovmf paths.
    """
    seen: set[str] = set()
    paths: list[Path] = []
    for directory in descriptor_dirs:  # earlier directories override later ones by file name
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            if path.name not in seen:
                seen.add(path.name)
                paths.append(path)
    for path in sorted(paths, key=lambda p: p.name):
        try:
            desc = json.loads(path.read_text())
            mapping = desc["mapping"]
            features = set(desc.get("features", ()))
            machines = [m for t in desc.get("targets", ()) if t.get("architecture") == "x86_64"
                        for m in t.get("machines", ())]
            if "uefi" not in desc.get("interface-types", ()) or mapping.get("device") != "flash":
                continue
            code = Path(mapping["executable"]["filename"])
            template = Path(mapping["nvram-template"]["filename"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not any(fnmatch.fnmatch(MACHINE_GLOB_SAMPLE[machine], m) for m in machines):
            continue
        if secure_boot != ({"secure-boot", "enrolled-keys"} <= features):
            continue
        if not secure_boot and "requires-smm" in features:
            continue
        if code.is_file() and template.is_file():
            return FirmwareFiles(code, template, "requires-smm" in features)
    code, template = OVMF_FALLBACK[secure_boot]
    if not (code.is_file() and template.is_file()):
        raise HypervisorError("qemu", f"UEFI firmware not found ({code}): install the Debian package ovmf")
    return FirmwareFiles(code, template, secure_boot)


def _opt(value: str | Path) -> str:
    """A value inside a QEMU ``key=value,…`` option string (commas are doubled)."""
    return str(value).replace(",", ",,")


def _json_arg(value: Mapping[str, object]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _node(index: int) -> str:
    return f"drive{index}"


def _device_id(disk: Disk) -> str:
    return f"{disk.bus}{disk.controller}-{disk.unit}"


def _controller_id(bus: Bus, index: int) -> str:
    return f"{bus}{index}"


def _unmappable(message: str) -> UnmappableModel:
    return UnmappableModel(f"the qemu driver cannot express this: {message}")


def check_model(model: VmModel) -> None:
    """Raise UnmappableModel for anything :func:`command_line` cannot express."""
    if model.os.arch not in (Arch.X86_64, Arch.I686):
        raise _unmappable(f"{model.os.arch} guests (this driver runs x86 guests)")
    if model.graphics is Graphics.SPICE:
        raise _unmappable("SPICE graphics (use vnc or none)")
    if model.secure_boot and model.machine is not Machine.Q35:
        raise _unmappable("secure boot needs the q35 chipset (OVMF's SMM build)")
    for controller in model.controllers:
        if controller.model not in QEMU_CONTROLLERS:
            raise _unmappable(f"{controller.model} storage controllers (QEMU has no such device)")
        if controller.model is ControllerModel.IDE and (model.machine is Machine.Q35 or controller.index):
            raise _unmappable("IDE controllers other than the i440FX's built-in one")
        if controller.model is ControllerModel.FDC and controller.index:
            raise _unmappable("more than one floppy controller")
    for disk in model.disks:
        controller = model.controller_for(disk)
        where = f"disk {disk_label(disk)}"
        if disk.format is not None and disk.format not in QEMU_DISK_FORMATS:
            raise _unmappable(f"{where}: format {disk.format}")
        if disk.device is DeviceKind.CDROM and controller.model in (ControllerModel.VIRTIO_BLK, ControllerModel.NVME):
            raise _unmappable(f"{where}: a CD-ROM on {controller.model}")
        if controller.model is ControllerModel.AHCI and disk.unit >= AHCI_PORTS:
            raise _unmappable(f"{where}: AHCI controllers have {AHCI_PORTS} ports")
        limit = SCSI_MAX_TARGET.get(controller.model)
        if limit is not None and disk.unit > limit:
            raise _unmappable(f"{where}: {QEMU_CONTROLLERS[controller.model]} has targets 0-{limit}")
    for nic in model.nics:
        if nic.model not in QEMU_NICS:
            raise _unmappable(f"{nic.model} network adapters (QEMU has no such device)")
    for serial in model.serials:
        if serial.port >= ISA_SERIAL_PORTS:
            raise _unmappable(f"serial port {serial.port} (QEMU offers COM1-COM{ISA_SERIAL_PORTS})")


def command_line(definition: Definition, paths: VmPaths, *, binary: str, accel: str, qmp_fd: int,
                 firmware: FirmwareFiles | None, incoming: bool = False) -> list[str]:
    """The QEMU command line for a defined VM (QEMU System Emulation User's Guide, "Invocation").

    ``-blockdev`` and ``-device`` take JSON (QEMU 6.2+), so file names need no escaping there.
    """
    model = definition.model
    check_model(model)
    machine = [QEMU_MACHINES[model.machine]]
    argv = [binary, "-name", f"guest={_opt(model.name)},debug-threads=on", "-nodefaults", "-no-user-config",
            "-accel", accel, "-m", f"{model.memory >> 20}M",
            "-smp", f"sockets={model.cpu.sockets},cores={model.cpu.cores},threads={model.cpu.threads}"]
    if model.uuid:
        argv += ["-uuid", model.uuid]
    if model.firmware is Firmware.UEFI:
        assert firmware is not None
        for node, file, read_only in (("pflash0", firmware.code, True), ("pflash1", paths.nvram, False)):
            argv += ["-blockdev", _json_arg({"driver": "raw", "node-name": node, "read-only": read_only,
                                             "file": {"driver": "file", "filename": str(file),
                                                      "read-only": read_only}})]
        machine += ["pflash0=pflash0", "pflash1=pflash1"]
        if firmware.requires_smm:
            machine.append("smm=on")
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    argv += ["-machine", ",".join(machine)]
    argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
             "-pidfile", str(paths.pidfile), "-daemonize", "-display", "none", "-device", "VGA"]
    if model.graphics is Graphics.VNC:
        argv += ["-vnc", "127.0.0.1:0,to=99"]
    for serial in model.serials:
        chardev = f"serial{serial.port}"
        argv += ["-chardev", f"file,id={chardev},path={_opt(paths.serial_log(serial.port))}",
                 "-device", _json_arg({"driver": "isa-serial", "chardev": chardev, "index": serial.port})]
    argv += _storage_args(model, definition.disks)
    for i, nic in enumerate(model.nics):
        device: dict[str, object] = {"driver": QEMU_NICS[nic.model], "netdev": f"net{i}", "id": f"nic{i}"}
        if nic.mac:
            device["mac"] = nic.mac
        argv += ["-netdev", f"user,id=net{i}", "-device", _json_arg(device)]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def _storage_args(model: VmModel, disks: Mapping[str, DiskFile]) -> list[str]:
    argv: list[str] = []
    for controller in model.controllers:
        cid = _controller_id(controller.bus, controller.index)
        kind = controller.model
        if kind in (ControllerModel.LSILOGIC, ControllerModel.LSISAS, ControllerModel.PVSCSI,
                    ControllerModel.VIRTIO_SCSI):
            argv += ["-device", _json_arg({"driver": QEMU_CONTROLLERS[kind], "id": cid})]
        elif kind is ControllerModel.AHCI and not (model.machine is Machine.Q35 and controller.index == 0):
            argv += ["-device", _json_arg({"driver": "ich9-ahci", "id": cid})]
        elif kind is ControllerModel.NVME:
            argv += ["-device", _json_arg({"driver": "nvme", "id": cid, "serial": f"polyvisor-{cid}"})]
        elif kind is ControllerModel.FDC and model.machine is Machine.Q35:
            argv += ["-device", _json_arg({"driver": "isa-fdc", "id": cid})]
    for index, disk in enumerate(model.disks):
        controller = model.controller_for(disk)
        node = _node(index) if disk.path is not None else None
        if disk.path is not None:
            host = disks[disk.path]
            read_only = disk.device is DeviceKind.CDROM
            argv += ["-blockdev", _json_arg({
                "driver": QEMU_DISK_FORMATS[host.format], "node-name": node, "read-only": read_only,
                "file": {"driver": "file", "filename": str(host.file), "read-only": read_only},
            })]
        device = _disk_device(model, controller.model, disk)
        device["id"] = _device_id(disk)
        if node is not None:
            device["drive"] = node
        if disk.boot_order is not None and controller.model is ControllerModel.FDC:
            # Floppy drives boot through their controller's bootindexA/B (QEMU hw/block/fdc.c).
            argv += ["-global", f"isa-fdc.bootindex{'AB'[disk.unit]}={disk.boot_order}"]
        elif disk.boot_order is not None:
            device["bootindex"] = disk.boot_order
        argv += ["-device", _json_arg(device)]
    return argv


def _disk_device(model: VmModel, kind: ControllerModel, disk: Disk) -> dict[str, object]:
    """The ``-device`` of one disk, CD-ROM or floppy on its controller (without id and drive)."""
    cdrom = disk.device is DeviceKind.CDROM
    cid = _controller_id(disk.bus, disk.controller)
    if kind is ControllerModel.IDE:
        return {"driver": "ide-cd" if cdrom else "ide-hd", "bus": f"ide.{disk.unit // 2}", "unit": disk.unit % 2}
    if kind is ControllerModel.AHCI:
        bus = "ide" if model.machine is Machine.Q35 and disk.controller == 0 else cid
        return {"driver": "ide-cd" if cdrom else "ide-hd", "bus": f"{bus}.{disk.unit}"}
    if kind is ControllerModel.VIRTIO_BLK:
        return {"driver": "virtio-blk-pci"}
    if kind is ControllerModel.NVME:
        return {"driver": "nvme-ns", "bus": cid, "nsid": disk.unit + 1}
    if kind is ControllerModel.FDC:
        return {"driver": "floppy", "unit": disk.unit}
    return {"driver": "scsi-cd" if cdrom else "scsi-hd", "bus": f"{cid}.0", "scsi-id": disk.unit}


# ------------------------------------------------------------------------------------------ driver


@dataclass(frozen=True)
class _Uri:
    root: Path
    accel: str
    migration_port: int
    binary: str


def _parse_uri(uri: str) -> _Uri:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "qemu" or parts.netloc or parts.path != "/session":
        raise ConnectionFailed("qemu", f"{uri!r}: expected qemu:///session?root=DIR")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    known = {"root", "accel", "migration_port", "binary"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ConnectionFailed("qemu", f"{uri!r}: unknown parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if any(len(values) != 1 for values in query.values()):
        raise ConnectionFailed("qemu", f"{uri!r}: a parameter is given twice")
    values = {k: v[0] for k, v in query.items()}
    if not values.get("root"):
        raise ConnectionFailed("qemu", f"{uri!r}: the root=DIR parameter is required")
    accel = values.get("accel", "tcg")
    if accel not in ACCELERATORS:
        raise ConnectionFailed("qemu", f"{uri!r}: accel must be one of {', '.join(ACCELERATORS)}")
    try:
        port = int(values.get("migration_port", "0"))
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConnectionFailed("qemu", f"{uri!r}: migration_port must be a TCP port number") from None
    return _Uri(Path(values["root"]).expanduser().resolve(), accel, port, values.get("binary", DEFAULT_BINARY))


def _probe_format(path: Path) -> str:
    """The format of a disk file whose model does not say (polyvisor.disk's probe)."""
    from polyvisor.disk import probe_format

    return probe_format(path)


@register_driver
class QemuDriver(Driver):
    """QEMU processes under a root directory, driven over QMP."""

    name = "qemu"
    schemes = ("qemu",)
    description = "QEMU directly over QMP (qemu:///session?root=DIR[&accel=tcg|kvm])"
    preferred_disk_format = "qcow2"
    device_target = "kvm"
    capabilities = frozenset({
        Capability.LIST, Capability.GET, Capability.DEFINE, Capability.UNDEFINE, Capability.START,
        Capability.SHUTDOWN, Capability.DESTROY, Capability.REBOOT, Capability.PAUSE, Capability.RESUME,
        Capability.SNAPSHOT_CREATE, Capability.SNAPSHOT_LIST, Capability.SNAPSHOT_REVERT,
        Capability.SNAPSHOT_DELETE, Capability.STATS, Capability.CONSOLE, Capability.MIGRATE_LIVE,
        Capability.EXPORT,
    })
    #: QMP ``RunState`` (qapi/run-state.json) -> common state.
    STATE_MAP: ClassVar[Mapping[str, VmState]] = {
        "running": VmState.RUNNING,
        "colo": VmState.RUNNING,
        "paused": VmState.PAUSED,
        "debug": VmState.PAUSED,
        "io-error": VmState.PAUSED,  # stopped on a disk error (werror/rerror=stop)
        "watchdog": VmState.PAUSED,  # stopped by a watchdog action
        "save-vm": VmState.PAUSED,  # stopped while an internal snapshot is saved
        "restore-vm": VmState.PAUSED,  # stopped while an internal snapshot is loaded
        "postmigrate": VmState.PAUSED,  # migrated away, vCPUs stopped
        "prelaunch": VmState.PENDING,  # created with -S, not started yet
        "inmigrate": VmState.MIGRATING,  # waiting for or receiving an incoming migration
        "finish-migrate": VmState.MIGRATING,  # stopped for the migration's final pass
        "suspended": VmState.SUSPENDED,  # guest ACPI S3
        "shutdown": VmState.STOPPING,  # the guest powered off; QEMU is exiting
        "guest-panicked": VmState.CRASHED,
        "internal-error": VmState.CRASHED,
    }

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        parsed = _parse_uri(uri)
        self.root = parsed.root
        self.accel = parsed.accel
        self.migration_port = parsed.migration_port
        self.binary = parsed.binary
        self._sessions: dict[str, tuple[QmpSession, int]] = {}

    @classmethod
    def accepts(cls, uri: str) -> bool:
        """Only ``qemu:///session?root=…``: every other ``qemu:`` URI is libvirt's."""
        parts = urllib.parse.urlsplit(uri)
        return (parts.scheme == "qemu" and not parts.netloc and parts.path == "/session"
                and "root" in urllib.parse.parse_qs(parts.query))

    @classmethod
    def connect(cls, uri: str) -> Self:
        """Check the URI and the QEMU binary; create the root directory if needed."""
        driver = cls(uri)
        if shutil.which(driver.binary) is None:
            raise ConnectionFailed(cls.name, f"{driver.binary} not found: install the Debian package "
                                             "qemu-system-x86")
        try:
            driver.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConnectionFailed(cls.name, f"cannot create root {driver.root}: {exc.strerror}") from None
        return driver

    def close(self) -> None:
        """Drop any QMP session still open."""
        for session, _ in self._sessions.values():
            session.close()
        self._sessions.clear()

    # ------------------------------------------------------------------------------ plumbing

    def _paths(self, name: str) -> VmPaths:
        return VmPaths(self.root / _folder_name(name))

    def _defined(self, name: str) -> tuple[VmPaths, Definition]:
        paths = self._paths(name)
        try:
            text = paths.definition.read_text()
        except FileNotFoundError:
            raise VmNotFound(self.name, f"no VM called {name!r} under {self.root}", vm=name) from None
        return paths, Definition.from_json(text, paths.definition)

    @contextlib.contextmanager
    def _root_lock(self) -> Iterator[None]:
        """Serialise define/undefine/start/migrate-in between processes sharing the root."""
        with open(self.root / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _pid(paths: VmPaths) -> int | None:
        """The pid of the VM's live QEMU process (None when it does not run)."""
        try:
            pid = int(paths.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid, str(paths.pidfile)) else None

    @staticmethod
    def _read_state(paths: VmPaths) -> dict[str, Any]:
        try:
            data = json.loads(paths.state.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _update_state(self, paths: VmPaths, **values: Any) -> None:
        state = self._read_state(paths)
        state.update(values)
        _write_atomic(paths.state, json.dumps({k: v for k, v in state.items() if v is not None}) + "\n")

    @contextlib.contextmanager
    def _qmp(self, name: str, paths: VmPaths | None = None) -> Iterator[QmpSession]:
        """A QMP session to a running VM, shared by nested uses within this connection."""
        if name in self._sessions:
            session, users = self._sessions[name]
            self._sessions[name] = (session, users + 1)
        else:
            paths = paths or self._paths(name)
            if self._pid(paths) is None:
                raise InvalidState(self.name, "not running", vm=name)
            session = QmpSession(paths.dir, paths.qmp_name, name)
            self._sessions[name] = (session, 1)
        try:
            yield session
        finally:
            session, users = self._sessions[name]
            if users == 1:
                del self._sessions[name]
                session.close()
            else:
                self._sessions[name] = (session, users - 1)

    def _status(self, name: str, paths: VmPaths) -> tuple[VmState, str]:
        """The common and native state of a defined VM."""
        if self._pid(paths) is None:
            return VmState.SHUT_OFF, "not running"
        recorded = self._read_state(paths)
        if recorded.get("migrating_to") and _pid_alive(recorded.get("migrating_pid")):
            return VmState.MIGRATING, f"migrating to {recorded['migrating_to']}"
        try:
            with self._qmp(name, paths) as qmp:
                status = str(qmp.execute("query-status")["status"])
        except ConnectionFailed:
            if self._pid(paths) is None:
                return VmState.SHUT_OFF, "not running"
            return VmState.UNKNOWN, "QMP busy (another client holds the monitor)"
        except InvalidState:
            return VmState.SHUT_OFF, "not running"
        return self.map_state(status), status

    def _require_running(self, name: str, *states: VmState) -> tuple[VmPaths, Definition]:
        paths, definition = self._defined(name)
        state, native = self._status(name, paths)
        if state not in states:
            wanted = " or ".join(s.value for s in states)
            raise InvalidState(self.name, f"is {state.value} ({native}); this needs it {wanted}", vm=name)
        return paths, definition

    def _firmware(self, model: VmModel) -> FirmwareFiles | None:
        if model.firmware is not Firmware.UEFI:
            return None
        return find_uefi_firmware(model.machine, model.secure_boot)

    def _launch(self, definition: Definition, paths: VmPaths, *, incoming: bool = False) -> int:
        """Start QEMU daemonised for *definition* in *paths*; returns its pid."""
        name = definition.model.name
        firmware = self._firmware(definition.model)
        if firmware is not None and not paths.nvram.exists():
            shutil.copyfile(firmware.vars_template, paths.nvram)
        for stale in (paths.dir / paths.qmp_name, paths.pidfile):
            stale.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dirfd = os.open(paths.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            listener.bind(f"/proc/self/fd/{dirfd}/{paths.qmp_name}")
            listener.listen(8)
            argv = command_line(definition, paths, binary=self.binary, accel=self.accel,
                                qmp_fd=listener.fileno(), firmware=firmware, incoming=incoming)
            with open(paths.qemu_log, "wb") as log:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=False,
                                      pass_fds=(listener.fileno(),), timeout=120)
        except subprocess.TimeoutExpired:
            raise OperationTimeout(self.name, "QEMU did not finish starting within 120 s", vm=name) from None
        finally:
            listener.close()
            os.close(dirfd)
        if proc.returncode != 0:
            output = paths.qemu_log.read_text(errors="replace").strip()
            raise HypervisorError(self.name, f"QEMU failed to start (exit {proc.returncode}): {output}", vm=name)
        pid = self._pid(paths)
        if pid is None:
            raise HypervisorError(self.name, "QEMU started but is not running", vm=name)
        _write_atomic(paths.state, json.dumps({"pid": pid, "accel": self.accel, "started": time.time()}) + "\n")
        return pid

    def _kill(self, name: str, paths: VmPaths) -> None:
        """``quit`` over QMP, then SIGKILL if QEMU is still there."""
        pid = self._pid(paths)
        if pid is None:
            return
        if name in self._sessions:
            self._sessions[name][0].quit()
        else:
            with contextlib.suppress(ConnectionFailed):
                session = QmpSession(paths.dir, paths.qmp_name, name, timeout=2.0)
                try:
                    session.quit()
                finally:
                    session.close()
        if not _wait_exit(pid, str(paths.pidfile), QUIT_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, str(paths.pidfile), QUIT_TIMEOUT)

    # ----------------------------------------------------------------------------- inventory

    def _info(self, paths: VmPaths, definition: Definition) -> VmInfo:
        model = definition.model
        state, native = self._status(model.name, paths)
        extra: dict[str, Any] = {"root": str(self.root), "accel": self.accel}
        pid = self._pid(paths)
        if pid is not None:
            extra["pid"] = pid
            recorded = self._read_state(paths)
            if recorded.get("vnc"):
                extra["vnc"] = recorded["vnc"]
        return VmInfo(name=model.name, state=state, vcpus=model.cpu.count, memory=model.memory, uuid=model.uuid,
                      native_state=native, extra=extra)

    def list_vms(self) -> list[VmInfo]:
        """Every VM defined under the root (folders with a ``vm.json``)."""
        out: list[VmInfo] = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            paths = VmPaths(folder)
            try:
                definition = Definition.from_json(paths.definition.read_text(), paths.definition)
            except (FileNotFoundError, NotADirectoryError):
                continue
            out.append(self._info(paths, definition))
        return sorted(out, key=lambda vm: vm.name)

    def get(self, name: str) -> VmInfo:
        """One VM by name."""
        paths, definition = self._defined(name)
        return self._info(paths, definition)

    def define(self, model: VmModel, disks: Mapping[str, Path]) -> VmInfo:
        """Write the VM's folder; each disk's format is the model's, or probed from the file."""
        model.validate()
        check_model(model)
        files: dict[str, DiskFile] = {}
        for disk in model.disks:
            if disk.path is None:
                continue
            if disk.path not in disks:
                raise UsageError(f"define {model.name}: no host file given for disk {disk.path!r}")
            host = Path(disks[disk.path]).expanduser().resolve()
            if not host.is_file():
                raise UsageError(f"define {model.name}: disk file {host} does not exist")
            fmt = disk.format or _probe_format(host)
            if fmt not in QEMU_DISK_FORMATS:
                raise _unmappable(f"disk {disk.path}: format {fmt}")
            files[disk.path] = DiskFile(host, fmt)
        definition = Definition(model, files)
        with self._root_lock():
            paths = self._paths(model.name)
            if paths.definition.exists() or (paths.dir.exists() and self._pid(paths) is not None):
                raise VmExists(self.name, f"a VM called {model.name!r} already exists under {self.root}",
                               vm=model.name)
            if paths.incoming.exists() and self._pid(paths) is not None:
                raise VmExists(self.name, "a VM of that name is migrating into this root", vm=model.name)
            paths.incoming.unlink(missing_ok=True)  # left by a migration whose process died
            paths.dir.mkdir(exist_ok=True)
            firmware = self._firmware(model)
            if firmware is not None:
                shutil.copyfile(firmware.vars_template, paths.nvram)
            _write_atomic(paths.definition, definition.to_json())
        return self._info(paths, definition)

    def undefine(self, name: str) -> None:
        """Remove the VM's folder (not its disks); it must be shut off."""
        with self._root_lock():
            paths, _ = self._defined(name)
            if self._pid(paths) is not None:
                raise InvalidState(self.name, "is running; destroy or shut it down first", vm=name)
            shutil.rmtree(paths.dir)

    # ----------------------------------------------------------------------------- lifecycle

    def start(self, name: str) -> None:
        """Launch QEMU (daemonised) for the VM; the serial logs start empty."""
        with self._root_lock():
            paths, definition = self._defined(name)
            if self._pid(paths) is not None:
                raise InvalidState(self.name, "is already running", vm=name)
            paths.console_history.unlink(missing_ok=True)
            self._launch(definition, paths)
            if definition.model.graphics is Graphics.VNC:
                with self._qmp(name, paths) as qmp:
                    vnc = qmp.execute("query-vnc")
                self._update_state(paths, vnc=f"{vnc.get('host')}:{vnc.get('service')}")

    def shutdown(self, name: str, timeout: float = 60.0) -> None:
        """``system_powerdown`` (ACPI power button), then wait for QEMU to exit (OperationTimeout if not)."""
        paths, _ = self._require_running(name, VmState.RUNNING, VmState.PAUSED)
        pid = self._pid(paths)
        with self._qmp(name, paths) as qmp:
            qmp.execute("system_powerdown")
        if pid is not None and not _wait_exit(pid, str(paths.pidfile), timeout):
            raise OperationTimeout(self.name, f"the guest did not power off within {timeout:g} s "
                                              "(it may ignore ACPI power-button events); it is still running",
                                   vm=name)

    def destroy(self, name: str) -> None:
        """``quit``: QEMU exits at once (SIGKILL if it does not)."""
        paths, _ = self._defined(name)
        if self._pid(paths) is None:
            raise InvalidState(self.name, "is not running", vm=name)
        self._kill(name, paths)

    def reboot(self, name: str) -> None:
        """``system_reset``: a hard reset of the machine (QEMU offers no ACPI reboot)."""
        paths, _ = self._require_running(name, VmState.RUNNING, VmState.PAUSED)
        with self._qmp(name, paths) as qmp:
            qmp.execute("system_reset")

    def pause(self, name: str) -> None:
        """``stop``."""
        paths, _ = self._require_running(name, VmState.RUNNING)
        with self._qmp(name, paths) as qmp:
            qmp.execute("stop")

    def resume(self, name: str) -> None:
        """``cont``."""
        paths, _ = self._require_running(name, VmState.PAUSED)
        with self._qmp(name, paths) as qmp:
            qmp.execute("cont")

    # ----------------------------------------------------------------------------- snapshots

    def _snapshot_disks(self, name: str, definition: Definition) -> list[tuple[str, DiskFile]]:
        """(node name, file) of every writable disk; InvalidState unless all are qcow2."""
        out: list[tuple[str, DiskFile]] = []
        for index, disk in enumerate(definition.model.disks):
            if disk.path is None or disk.device is DeviceKind.CDROM:
                continue
            host = definition.disks[disk.path]
            if host.format != "qcow2":
                raise InvalidState(self.name, f"disk {disk_label(disk)} ({host.file.name}) is {host.format}: "
                                              "internal snapshots need qcow2 disks", vm=name)
            out.append((_node(index), host))
        if not out:
            raise InvalidState(self.name, "has no writable disk to hold snapshots", vm=name)
        return out

    def _descriptions(self, paths: VmPaths) -> dict[str, str]:
        try:
            data = json.loads(paths.snapshots.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _set_description(self, paths: VmPaths, snapshot: str, description: str | None) -> None:
        descriptions = self._descriptions(paths)
        if description is None:
            descriptions.pop(snapshot, None)
        else:
            descriptions[snapshot] = description
        _write_atomic(paths.snapshots, json.dumps(descriptions, indent=2) + "\n")

    def _qcow2_snapshots(self, name: str, paths: VmPaths, definition: Definition) -> list[dict[str, Any]]:
        """The snapshot table of the first snapshot disk: QMP ``query-named-block-nodes`` while QEMU runs
        (qapi/block-core.json ImageInfo.snapshots), ``qemu-img info`` otherwise."""
        node, host = self._snapshot_disks(name, definition)[0]
        if self._pid(paths) is not None:
            with self._qmp(name, paths) as qmp:
                for info in qmp.execute("query-named-block-nodes", {"flat": True}):
                    if info.get("node-name") == node:
                        return list(info.get("image", {}).get("snapshots", []))
            raise HypervisorError(self.name, f"block node {node} not found", vm=name)
        info = json.loads(self._qemu_img("info", "--output=json", "-f", "qcow2", str(host.file)))
        return list(info.get("snapshots", []))

    def _qemu_img(self, *args: str) -> str:
        qemu_img = shutil.which("qemu-img")
        if qemu_img is None:
            raise HypervisorError(self.name, "qemu-img not found: install the Debian package qemu-utils")
        proc = subprocess.run([qemu_img, *args], capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode != 0:
            raise HypervisorError(self.name, f"qemu-img {args[0]}: {proc.stderr.strip()}")
        return proc.stdout

    def _run_job(self, name: str, qmp: QmpSession, command: str, arguments: dict[str, object]) -> None:
        """Run a snapshot job (qapi/migration.json snapshot-*) and wait for it to conclude."""
        job = f"polyvisor-{command}-{time.monotonic_ns()}"
        qmp.execute(command, {"job-id": job, **arguments})
        deadline = time.monotonic() + QMP_COMMAND_TIMEOUT * 5
        while True:
            jobs = {j["id"]: j for j in qmp.execute("query-jobs")}
            info = jobs.get(job)
            if info is None or info["status"] == "concluded":
                break
            if time.monotonic() > deadline:
                raise OperationTimeout(self.name, f"{command} did not finish", vm=name)
            time.sleep(POLL)
        if info is not None:
            qmp.execute("job-dismiss", {"id": job})
            if info.get("error"):
                raise HypervisorError(self.name, f"{command}: {info['error']}", vm=name)

    def _snapshot(self, info: Mapping[str, Any], description: str) -> Snapshot:
        created = datetime.fromtimestamp(int(info.get("date-sec", 0)), UTC) if "date-sec" in info else None
        return Snapshot(name=str(info["name"]), created=created, description=description,
                        includes_memory=int(info.get("vm-state-size", 0)) > 0)

    def snapshot_create(self, name: str, snapshot: str, description: str = "") -> Snapshot:
        """``snapshot-save`` (disks and memory) while QEMU runs; ``qemu-img snapshot -c`` (disks) when off."""
        paths, definition = self._defined(name)
        nodes = self._snapshot_disks(name, definition)
        if any(s["name"] == snapshot for s in self._qcow2_snapshots(name, paths, definition)):
            raise InvalidState(self.name, f"a snapshot called {snapshot!r} exists", vm=name)
        if self._pid(paths) is not None:
            with self._qmp(name, paths) as qmp:
                self._run_job(name, qmp, "snapshot-save", {"tag": snapshot, "vmstate": nodes[0][0],
                                                           "devices": [node for node, _ in nodes]})
        else:
            for _, host in nodes:
                self._qemu_img("snapshot", "--image-opts", "-c", snapshot, _qcow2_opts(host.file))
        self._set_description(paths, snapshot, description)
        for info in self._qcow2_snapshots(name, paths, definition):
            if info["name"] == snapshot:
                return self._snapshot(info, description)
        raise HypervisorError(self.name, f"snapshot {snapshot!r} was not recorded", vm=name)

    def snapshot_list(self, name: str) -> list[Snapshot]:
        """The qcow2 internal snapshots of the VM's first disk, oldest first."""
        paths, definition = self._defined(name)
        descriptions = self._descriptions(paths)
        return [self._snapshot(info, descriptions.get(str(info["name"]), ""))
                for info in self._qcow2_snapshots(name, paths, definition)]

    def _find_snapshot(self, name: str, snapshot: str) -> tuple[VmPaths, Definition, Snapshot]:
        paths, definition = self._defined(name)
        for info in self._qcow2_snapshots(name, paths, definition):
            if info["name"] == snapshot:
                return paths, definition, self._snapshot(info, "")
        raise SnapshotNotFound(self.name, f"no snapshot called {snapshot!r}", vm=name)

    def snapshot_revert(self, name: str, snapshot: str) -> None:
        """``snapshot-load`` (disks and memory) while QEMU runs; ``qemu-img snapshot -a`` (disks) when off."""
        paths, definition, found = self._find_snapshot(name, snapshot)
        nodes = self._snapshot_disks(name, definition)
        if self._pid(paths) is not None:
            if not found.includes_memory:
                raise InvalidState(self.name, f"snapshot {snapshot!r} holds no memory state: shut the VM off "
                                              "to revert its disks to it", vm=name)
            with self._qmp(name, paths) as qmp:
                running = qmp.execute("query-status")["status"] == "running"
                self._run_job(name, qmp, "snapshot-load", {"tag": snapshot, "vmstate": nodes[0][0],
                                                           "devices": [node for node, _ in nodes]})
                if running and qmp.execute("query-status")["status"] != "running":
                    qmp.execute("cont")
        else:
            for _, host in nodes:
                self._qemu_img("snapshot", "--image-opts", "-a", snapshot, _qcow2_opts(host.file))

    def snapshot_delete(self, name: str, snapshot: str) -> None:
        """``snapshot-delete`` while QEMU runs; ``qemu-img snapshot -d`` when off."""
        paths, definition, _ = self._find_snapshot(name, snapshot)
        nodes = self._snapshot_disks(name, definition)
        if self._pid(paths) is not None:
            with self._qmp(name, paths) as qmp:
                self._run_job(name, qmp, "snapshot-delete", {"tag": snapshot,
                                                             "devices": [node for node, _ in nodes]})
        else:
            for _, host in nodes:
                self._qemu_img("snapshot", "--image-opts", "-d", snapshot, _qcow2_opts(host.file))
        self._set_description(paths, snapshot, None)

    # --------------------------------------------------------------------------- observation

    def stats(self, name: str) -> VmStats:
        """vCPU threads' CPU time (``query-cpus-fast`` thread ids, /proc), ``query-memory-size-summary``,
        ``query-blockstats`` per disk.  NIC counters are not offered: QEMU 7.2's user networking has no
        QMP counters (``query-stats`` has no net provider), so ``nics`` stays empty."""
        paths, definition = self._require_running(name, VmState.RUNNING, VmState.PAUSED)
        pid = self._pid(paths)
        assert pid is not None
        labels = {_node(i): disk_label(d) for i, d in enumerate(definition.model.disks)
                  if d.path is not None and d.device is not DeviceKind.CDROM}
        with self._qmp(name, paths) as qmp:
            cpus = qmp.execute("query-cpus-fast")
            memory = qmp.execute("query-memory-size-summary")
            blockstats = qmp.execute("query-blockstats")
        times = [_thread_cpu_ns(pid, int(cpu["thread-id"])) for cpu in cpus]
        cpu_ns = sum(t for t in times if t is not None) if any(t is not None for t in times) else None
        disks: dict[str, DiskStats] = {}
        for entry in blockstats:  # qapi/block-core.json BlockStats: by the root node's name
            label = labels.get(str(entry.get("node-name", "")))
            if label is None:
                continue
            counters = entry.get("stats", {})
            disks[label] = DiskStats(read_bytes=int(counters.get("rd_bytes", 0)),
                                     write_bytes=int(counters.get("wr_bytes", 0)),
                                     read_ops=int(counters.get("rd_operations", 0)),
                                     write_ops=int(counters.get("wr_operations", 0)))
        mem = int(memory.get("base-memory", 0)) + int(memory.get("plugged-memory", 0))
        return VmStats(cpu_time_ns=cpu_ns, memory_bytes=mem or definition.model.memory, disks=disks)

    def console(self, name: str, *, follow: bool = False) -> Iterator[str]:
        """The serial port 0 log of this run (including output from before a live migration); with
        *follow*, keep yielding new output until QEMU exits or the VM migrates away."""
        paths, definition = self._defined(name)
        if not any(s.port == 0 for s in definition.model.serials):
            raise InvalidState(self.name, "has no serial port 0 (COM1) to read a console from", vm=name)
        return self._read_console(paths, follow)

    def _read_console(self, paths: VmPaths, follow: bool) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with contextlib.suppress(FileNotFoundError):
            yield decoder.decode(paths.console_history.read_bytes())
        try:
            handle = open(paths.console, "rb")  # noqa: SIM115 - kept open across yields
        except FileNotFoundError:
            yield ""
            return
        with handle:
            yield decoder.decode(handle.read())
            while follow:
                chunk = handle.read()
                if chunk:
                    yield decoder.decode(chunk)
                    continue
                if self._pid(paths) is None or not paths.definition.exists():
                    rest = decoder.decode(handle.read(), final=True)
                    if rest:
                        yield rest
                    return
                time.sleep(POLL * 2)

    def export(self, name: str) -> ExportedVm:
        """The model and the host files of its disks."""
        _, definition = self._defined(name)
        return ExportedVm(definition.model, {k: v.file for k, v in definition.disks.items()})

    def ex_command_line(self, name: str) -> list[str]:
        """The QEMU command line the VM runs (or would run) with (the QMP descriptor shown as ``fd=N``)."""
        paths, definition = self._defined(name)
        argv = command_line(definition, paths, binary=self.binary, accel=self.accel, qmp_fd=-1,
                            firmware=self._firmware(definition.model))
        return [a.replace("fd=-1", "fd=N") for a in argv]

    # ----------------------------------------------------------------------------- migration

    def migrate(self, name: str, destination: Driver, options: MigrationOptions) -> MigrationReport:
        """Live migration to another root on this host over TCP on 127.0.0.1 (disks are shared storage).

        The destination QEMU starts with the same command line and ``-incoming defer``; ``migrate-incoming``
        opens its listener, ``migrate-set-parameters`` applies the downtime limit and bandwidth, ``migrate``
        starts the stream and ``query-migrate`` is polled for progress (qapi/migration.json).  On failure or
        timeout: ``migrate_cancel``, the destination QEMU is killed, the source keeps (or resumes) running.
        """
        options = options or MigrationOptions()
        if not isinstance(destination, QemuDriver):
            raise MigrationFailed(self.name, f"live migration needs another qemu:///session root, not "
                                             f"{destination.name}", vm=name)
        if destination.root == self.root:
            raise MigrationFailed(self.name, "source and destination are the same root", vm=name)
        if destination.accel != self.accel:
            raise MigrationFailed(self.name, f"accelerators differ ({self.accel} -> {destination.accel})", vm=name)
        paths, definition = self._require_running(name, VmState.RUNNING, VmState.PAUSED)
        started = time.monotonic()
        dst_paths = destination._reserve_incoming(definition)
        notes: list[str] = []
        previous: dict[str, Any] = {}
        try:
            if paths.nvram.exists():
                shutil.copyfile(paths.nvram, dst_paths.nvram)
            destination._launch(definition, dst_paths, incoming=True)
            with destination._qmp(name, dst_paths) as dst_qmp:
                dst_qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{destination.migration_port}"})
                port = _incoming_port(dst_qmp.execute("query-migrate"), destination.migration_port)
            with self._qmp(name, paths) as qmp:
                previous = qmp.execute("query-migrate-parameters")
                parameters: dict[str, object] = {}
                if options.downtime_ms is not None:
                    parameters["downtime-limit"] = int(options.downtime_ms)
                if options.bandwidth_mib is not None:
                    parameters["max-bandwidth"] = int(options.bandwidth_mib) << 20
                if parameters:
                    qmp.execute("migrate-set-parameters", parameters)
                self._update_state(paths, migrating_to=str(destination.root), migrating_pid=os.getpid())
                qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
                result = self._watch_migration(name, qmp, options, started)
            status = destination._confirm_incoming(name, dst_paths, deadline=time.monotonic() + 120)
        except BaseException as exc:
            reason = str(exc.reason) if isinstance(exc, HypervisorError) else repr(exc)
            rolled_back = self._roll_back(name, paths, destination, dst_paths, previous)
            raise MigrationFailed(self.name, f"live migration to {destination.root} failed: {reason}; "
                                             f"{rolled_back}", vm=name) from exc
        # Hand the VM over: the destination's definition, console history; the source QEMU quits.
        history = b""
        with contextlib.suppress(FileNotFoundError):
            history += paths.console_history.read_bytes()
        with contextlib.suppress(FileNotFoundError):
            history += paths.console.read_bytes()
        dst_paths.console_history.write_bytes(history)
        if paths.snapshots.exists():
            shutil.copyfile(paths.snapshots, dst_paths.snapshots)
        os.replace(dst_paths.incoming, dst_paths.definition)
        self._kill(name, paths)
        shutil.rmtree(paths.dir, ignore_errors=True)
        ram = result.get("ram", {})
        notes.append(f"QEMU: migration stream {result.get('total-time', 0)} ms, setup {result.get('setup-time', 0)}"
                     f" ms, {ram.get('dirty-sync-count', 0)} dirty-memory passes, destination {status}")
        notes.append("disks are shared storage: both roots use the same files")
        return MigrationReport(vm=name, kind="live", source=self.uri, destination=destination.uri,
                               total_seconds=time.monotonic() - started,
                               downtime_ms=float(result["downtime"]) if "downtime" in result else None,
                               transferred_bytes=int(ram.get("transferred", 0)), notes=tuple(notes))

    def _reserve_incoming(self, definition: Definition) -> VmPaths:
        """Create the folder of a VM migrating into this root (its definition as ``incoming.json``)."""
        name = definition.model.name
        with self._root_lock():
            paths = self._paths(name)
            if paths.incoming.exists() and self._pid(paths) is None and not paths.definition.exists():
                shutil.rmtree(paths.dir)  # left by a migration whose process died
            if paths.definition.exists() or paths.incoming.exists():
                raise MigrationFailed(self.name, f"{self.root} already has a VM called {name!r}", vm=name)
            paths.dir.mkdir(exist_ok=True)
            _write_atomic(paths.incoming, definition.to_json())
        return paths

    def _watch_migration(self, name: str, qmp: QmpSession, options: MigrationOptions,
                         started: float) -> dict[str, Any]:
        deadline = started + options.timeout
        while True:
            info: dict[str, Any] = qmp.execute("query-migrate")
            status = info.get("status")
            ram = info.get("ram", {})
            if options.progress is not None and ram:
                options.progress(int(ram.get("transferred", 0)), int(ram.get("total", 0)))
            if status == "completed":
                return info
            if status in ("failed", "cancelled", "cancelling"):
                raise MigrationFailed(self.name, f"QEMU reports {status}: {info.get('error-desc', 'no reason')}",
                                      vm=name)
            if time.monotonic() > deadline:
                raise OperationTimeout(self.name, f"not complete after {options.timeout:g} s "
                                                  f"({ram.get('remaining', '?')} bytes of memory left)", vm=name)
            time.sleep(POLL)

    def _confirm_incoming(self, name: str, paths: VmPaths, *, deadline: float) -> str:
        """Wait for the destination QEMU to leave ``inmigrate`` (running, or paused if the source was)."""
        while True:
            if self._pid(paths) is None:
                log = paths.qemu_log.read_text(errors="replace").strip() if paths.qemu_log.exists() else ""
                raise MigrationFailed(self.name, f"the destination QEMU exited{': ' + log if log else ''}", vm=name)
            try:
                with self._qmp(name, paths) as qmp:
                    return _wait_status(qmp, ("running", "paused"), deadline=deadline)
            except ConnectionFailed:
                if time.monotonic() > deadline:
                    raise
            time.sleep(POLL)

    def _roll_back(self, name: str, paths: VmPaths, destination: QemuDriver, dst_paths: VmPaths,
                   previous: Mapping[str, Any]) -> str:
        """Cancel the migration, kill the destination, keep the source running; says what it did.

        The destination goes first: once it has taken over the disks' write locks, the source can only
        resume after it is gone.
        """
        done: list[str] = []
        try:
            with self._qmp(name, paths) as qmp:
                status = qmp.execute("query-migrate").get("status")
                if status in ("setup", "active", "pre-switchover", "device", "postcopy-active", "wait-unplug"):
                    qmp.execute("migrate_cancel")
                    _wait_migration_end(qmp)
                    done.append("migration cancelled")
        except HypervisorError as exc:
            done.append(f"source not reachable to cancel ({exc.reason})")
        destination._kill(name, dst_paths)
        shutil.rmtree(dst_paths.dir, ignore_errors=True)
        done.append("destination QEMU killed")
        source_status = "NOT running"
        try:
            with self._qmp(name, paths) as qmp:
                restore = {k: previous[k] for k in ("downtime-limit", "max-bandwidth") if k in previous}
                if restore:
                    qmp.execute("migrate-set-parameters", restore)
                if qmp.execute("query-status")["status"] in ("postmigrate", "finish-migrate"):
                    qmp.execute("cont")
                    done.append("source resumed")
                source_status = str(qmp.execute("query-status")["status"])
        except HypervisorError as exc:
            done.append(f"source not reachable to resume ({exc.reason})")
        with contextlib.suppress(OSError):
            self._update_state(paths, migrating_to=None, migrating_pid=None)
        state = "still running" if source_status == "running" else source_status
        return f"rolled back ({', '.join(done)}); the source is {state}"


def _qcow2_opts(file: Path) -> str:
    """``qemu-img --image-opts`` for a qcow2 file (the format is stated, never probed)."""
    return f"driver=qcow2,file.driver=file,file.filename={_opt(file)}"


def _incoming_port(info: Mapping[str, Any], requested: int) -> int:
    """The port the destination listens on (``socket-address`` of query-migrate, QEMU 4.0+)."""
    for address in info.get("socket-address", ()):
        if address.get("type") == "inet" and address.get("port"):
            return int(address["port"])
    if requested:
        return requested
    raise MigrationFailed("qemu", "the destination did not report its migration port")


def _wait_status(qmp: QmpSession, wanted: Sequence[str], *, deadline: float) -> str:
    while True:
        status = str(qmp.execute("query-status")["status"])
        if status in wanted:
            return status
        if time.monotonic() > deadline:
            raise OperationTimeout("qemu", f"the destination is {status}, not {' or '.join(wanted)}", vm=qmp.vm)
        time.sleep(POLL)


def _wait_migration_end(qmp: QmpSession, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while qmp.execute("query-migrate").get("status") in ("cancelling", "active", "setup", "device",
                                                          "pre-switchover"):
        if time.monotonic() > deadline:
            raise OperationTimeout("qemu", "migrate_cancel did not finish", vm=qmp.vm)
        time.sleep(POLL)


__all__ = [
    "QEMU_CONTROLLERS",
    "QEMU_DISK_FORMATS",
    "QEMU_NICS",
    "Definition",
    "DiskFile",
    "QemuDriver",
    "QmpSession",
    "VmPaths",
    "check_model",
    "command_line",
    "find_uefi_firmware",
]
