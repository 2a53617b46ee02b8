"""VMware .vmx configuration files and the .vmdk files they name.

A .vmx is ``key = "value"`` lines (keys case-insensitive, ``|XX`` hex escapes
in values).  Mapped keys: ``displayName``, ``memsize`` (MiB), ``numvcpus``,
``cpuid.coresPerSocket``, ``firmware``, ``uefi.secureBoot.enabled``,
``guestOS``, ``uuid.bios``, controllers ``scsiN`` (``virtualDev``),
``sataN``, ``nvmeN``, ``ideN``, devices ``<ctrl>N:M.{present,fileName,
deviceType}`` and ``floppyN``, NICs ``ethernetN.{virtualDev,address,
generatedAddress,networkName,connectionType}``, ``serialN``, and
``RemoteDisplay.vnc.enabled``.

Every other key is kept in ``vendor["vmx"]`` and written back; so is any
mapped key whose value a plain write would not reproduce (a guestOS spelling
the table maps to a broader OS, an unusual deviceType…), which makes a .vmx
round trip lose nothing but comments and key order.  Not kept through the
neutral model (``lossy``): the chipset (VMware's is always 440BX-based),
SPICE, per-device boot order (``bios.bootOrder``/``bios.hddOrder`` stay
vendor keys) and SMT threads (folded into cores).

Each .vmdk a disk names is checked: a text descriptor's extents must stay
inside the package; capacity and subformat (createType) are read from the
descriptor or the sparse header.
"""

from __future__ import annotations

import re
import struct
import uuid as uuid_module
from collections.abc import Mapping
from pathlib import Path

from polyvisor.errors import PackageError, UnmappableModel
from polyvisor.vm.codecs import register_codec
from polyvisor.vm.codecs.codec import Codec, DiskSource, OutputFiles, ReadOptions, VmPackage
from polyvisor.vm.mapping import devices as dev
from polyvisor.vm.mapping import guestos
from polyvisor.vm.model import (
    Bus,
    Controller,
    ControllerModel,
    Cpu,
    DeviceKind,
    Disk,
    Firmware,
    Graphics,
    MiB,
    Nic,
    NicModel,
    Serial,
    VmModel,
)
from polyvisor.vm.safety import read_limited, resolve_in_package, single_descriptor

CODEC = "vmx"
HEADER = {".encoding": "UTF-8", "config.version": "8", "virtualHW.version": "19"}
_LINE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*"(.*)"\s*$')
_DEVICE = re.compile(r"^(ide|scsi|sata|nvme)(\d+):(\d+)\.(.+)$", re.IGNORECASE)
_PREFIXED = re.compile(r"^(ide|scsi|sata|nvme|ethernet|serial|floppy)(\d+)([.:])", re.IGNORECASE)
_BUS = {"ide": Bus.IDE, "scsi": Bus.SCSI, "sata": Bus.SATA, "nvme": Bus.NVME}
_CDROM_TYPES = {"cdrom-image", "cdrom-raw", "atapi-cdrom"}
_DISK_TYPES = {"disk", "scsi-harddisk", "ata-harddisk", "rawdisk", "plainDisk".lower()}


def _unescape(value: str) -> str:
    return re.sub(r"\|([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _escape(value: str) -> str:
    return "".join(f"|{ord(c):02X}" if c in '"|#' or ord(c) < 0x20 else c for c in value)


def parse_vmx(text: str, source: Path) -> dict[str, tuple[str, str]]:
    """lower-cased key -> (key as written, value)."""
    entries: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise PackageError(f"line {number} is not key = \"value\": {stripped[:80]!r}", path=source)
        key, value = match.groups()
        entries[key.lower()] = (key, _unescape(value))
    return entries


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


def _uuid_from_vmx(value: str) -> str | None:
    hexits = re.sub(r"[\s\-]", "", value)
    try:
        return str(uuid_module.UUID(hex=hexits))
    except ValueError:
        return None


def _uuid_to_vmx(value: str) -> str:
    raw = uuid_module.UUID(value).hex
    pairs = [raw[i:i + 2] for i in range(0, 32, 2)]
    return " ".join(pairs[:8]) + "-" + " ".join(pairs[8:])


# ------------------------------------------------------------------ vmdk descriptors


def inspect_vmdk(path: Path, home: Path, options: ReadOptions, source: Path) -> tuple[int | None, str | None,
                                                                                    list[Path]]:
    """(capacity in bytes, createType, extent files) of a .vmdk, checking its extents stay in the package."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
            if head[:4] == b"KDMV":
                capacity_sectors, _grain, desc_offset, desc_size = struct.unpack_from("<QQQQ", head, 12)
                text = ""
                if 0 < desc_size <= 2048:
                    handle.seek(desc_offset * 512)
                    text = handle.read(desc_size * 512).split(b"\0", 1)[0].decode("utf-8", "replace")
                match = re.search(r'createType\s*=\s*"([^"]+)"', text)
                return capacity_sectors * 512, match.group(1) if match else None, []
    except OSError as exc:
        raise PackageError(f"cannot read {path.name}: {exc.strerror or exc}", path=source) from None
    if not head.startswith(b"# Disk DescriptorFile"):
        return None, None, []
    text = read_limited(path, 1 << 20, what="VMDK descriptor").decode("utf-8", "replace")
    match = re.search(r'createType\s*=\s*"([^"]+)"', text)
    sectors = 0
    extents: list[Path] = []
    for line in text.splitlines():
        ext = re.match(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)")?', line)
        if ext is None:
            continue
        sectors += int(ext.group(2))
        if ext.group(4):
            extents.append(resolve_in_package(path.parent if path.parent.is_relative_to(home) else home,
                                              ext.group(4), source=path, what="VMDK extent",
                                              policy=options.policy, must_exist=options.require_disks))
    return sectors * 512, match.group(1) if match else None, extents


@register_codec
class VmxCodec(Codec):
    """A VMware Workstation / ESXi .vmx file and its .vmdk disks."""

    name = CODEC
    description = "VMware .vmx configuration and the .vmdk files it names"
    suffixes = (".vmx",)
    disk_formats = (("vmdk", "monolithicSparse"), ("vmdk", "streamOptimized"))
    lossy = frozenset({"machine", "graphics", "disks.boot_order", "cpu.threads", "disks.capacity", "disks.subformat"})
    target = "vmware"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if path.is_dir():
            return 60 if len(list(path.glob("*.vmx"))) == 1 else 0
        lowered = head[:16384].lower()
        score = 40 if path.suffix.lower() == ".vmx" else 0
        if re.search(rb'^\s*(config\.version|virtualhw\.version|displayname|guestos)\s*=\s*"', lowered, re.M):
            score += 50
        return score

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = single_descriptor(path, ".vmx")
        raw = read_limited(path, options.max_descriptor, what=".vmx file")
        entries = parse_vmx(raw.decode("utf-8", "replace"), path)
        reader = _VmxReader(path, entries, options)
        model = reader.model()
        return VmPackage(model=model.validate(source=str(path)), codec=CODEC, source=path, disks=reader.sources)

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        for disk in model.disks:
            if disk.device == DeviceKind.DISK and disk.format not in (None, "vmdk"):
                raise UnmappableModel(f"a .vmx names .vmdk disks, not {disk.format} ({disk.path}); convert it first")
            if disk.path is not None and disk.path not in disk_paths:
                raise PackageError(f"no file given for image {disk.path!r}")
        text = render_vmx(model)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.name).lstrip(".") or "vm"
        with OutputFiles(Path(outdir)) as files:
            for name in sorted({d.path for d in model.disks if d.path}):
                files.copy(name, disk_paths[name])
            files.write_bytes(f"{stem}.vmx", text.encode("utf-8"))
        return files.names


class _VmxReader:
    def __init__(self, path: Path, entries: dict[str, tuple[str, str]], options: ReadOptions) -> None:
        self.path = path
        self.entries = entries
        self.options = options
        self.sources: dict[str, DiskSource] = {}

    def get(self, key: str, default: str | None = None) -> str | None:
        found = self.entries.get(key.lower())
        return found[1] if found else default

    def fail(self, message: str) -> PackageError:
        return PackageError(message, path=self.path)

    def model(self) -> VmModel:
        name = self.get("displayName") or self.path.stem
        try:
            memory = int(self.get("memsize", "0") or "0") * MiB
            count = int(self.get("numvcpus", "1") or "1")
            cores = int(self.get("cpuid.coresPerSocket", "1") or "1")
        except ValueError:
            raise self.fail("memsize, numvcpus or cpuid.coresPerSocket is not a number") from None
        if memory <= 0:
            raise self.fail("memsize is missing or zero")
        if cores < 1 or count < 1 or count % cores:
            raise self.fail(f"numvcpus {count} is not a multiple of cpuid.coresPerSocket {cores}")
        firmware = Firmware.UEFI if (self.get("firmware") or "").lower() == "efi" else Firmware.BIOS
        secure_boot = _true(self.get("uefi.secureBoot.enabled"))
        os = guestos.os_from_vmx(self.get("guestOS") or "other")
        uuid_text = self.get("uuid.bios")
        uuid = _uuid_from_vmx(uuid_text) if uuid_text else None
        controllers, disks = self.storage()
        nics = self.nics()
        serials = tuple(Serial(int(m.group(1))) for key in sorted(self.entries)
                        if (m := re.fullmatch(r"serial(\d+)\.present", key)) and _true(self.entries[key][1]))
        graphics = Graphics.VNC if _true(self.get("RemoteDisplay.vnc.enabled")) else Graphics.NONE
        model = VmModel(name=name, memory=memory, cpu=Cpu(count // cores, cores), uuid=uuid, firmware=firmware,
                        secure_boot=secure_boot, os=os, controllers=controllers, disks=disks, nics=nics,
                        serials=tuple(sorted(serials, key=lambda s: s.port)), graphics=graphics)
        written = {k.lower(): v for k, v in _render_pairs(model, {})}
        vendor = {key: value for lower, (key, value) in self.entries.items()
                  if written.get(lower) != value and not (lower in {k.lower() for k in HEADER}
                                                          and HEADER.get(key) == value)}
        return model.with_vendor(CODEC, vendor)

    def storage(self) -> tuple[tuple[Controller, ...], tuple[Disk, ...]]:
        controllers: dict[tuple[Bus, int], Controller] = {}
        for lower in self.entries:
            match = re.fullmatch(r"(scsi|sata|nvme)(\d+)\.present", lower)
            if match is None or not _true(self.entries[lower][1]):
                continue
            prefix, index = match.group(1), int(match.group(2))
            if prefix == "scsi":
                virtual_dev = (self.get(f"scsi{index}.virtualDev") or "lsilogic").lower()
                model = next((m for m, (p, v) in dev.VMX_CONTROLLER.items() if p == "scsi" and v == virtual_dev), None)
                if model is None:
                    raise self.fail(f"scsi{index}.virtualDev {virtual_dev!r} is not one polyvisor maps")
            else:
                model = ControllerModel.AHCI if prefix == "sata" else ControllerModel.NVME
            controllers[(_BUS[prefix], index)] = Controller(model, index)
        disks: list[Disk] = []
        home = self.path.parent.resolve()
        for lower in sorted(self.entries):
            match = _DEVICE.fullmatch(lower)
            if match is None or match.group(4) != "present" or not _true(self.entries[lower][1]):
                continue
            prefix, ctrl_index, slot = match.group(1), int(match.group(2)), int(match.group(3))
            bus = _BUS[prefix]
            base = f"{prefix}{ctrl_index}:{slot}"
            if bus == Bus.IDE:
                if ctrl_index > 1 or slot > 1:
                    raise self.fail(f"{base}: IDE has channels 0-1 with units 0-1")
                controllers.setdefault((Bus.IDE, 0), Controller(ControllerModel.IDE, 0))
                ctrl_index, unit = 0, int(match.group(2)) * 2 + slot
            else:
                unit = slot
                if (bus, ctrl_index) not in controllers:
                    raise self.fail(f"{base} is present but {prefix}{ctrl_index} is not")
            device_type = (self.get(f"{base}.deviceType") or "disk").lower()
            file_name = self.get(f"{base}.fileName")
            if device_type in _CDROM_TYPES:
                device = DeviceKind.CDROM
                path = self.image(file_name, f"{base}.fileName") if device_type == "cdrom-image" and file_name \
                    else None
                disks.append(Disk(device, bus, ctrl_index, unit, path, "raw" if path else None))
            elif device_type in _DISK_TYPES:
                if not file_name:
                    raise self.fail(f"{base} is a disk without a fileName")
                path = self.image(file_name, f"{base}.fileName")
                capacity, create_type, extents = inspect_vmdk(self.sources[path].path, home, self.options,
                                                              self.path) if self.sources[path].path.exists() \
                    else (None, None, [])
                for extent in extents:
                    try:
                        rel = extent.relative_to(home).as_posix()
                    except ValueError:
                        rel = extent.name
                    self.sources.setdefault(rel, DiskSource(extent))
                subformat = create_type if create_type in ("monolithicSparse", "streamOptimized", "monolithicFlat",
                                                           "twoGbMaxExtentSparse", "twoGbMaxExtentFlat") else None
                disks.append(Disk(DeviceKind.DISK, bus, ctrl_index, unit, path, "vmdk", subformat, capacity))
            else:
                raise self.fail(f"{base}.deviceType {device_type!r} is not supported")
        for lower in sorted(self.entries):
            match = re.fullmatch(r"floppy(\d+)\.present", lower)
            if match is None or not _true(self.entries[lower][1]):
                continue
            index = int(match.group(1))
            file_name = self.get(f"floppy{index}.fileName")
            path = None
            if file_name and (self.get(f"floppy{index}.fileType") or "file").lower() == "file":
                path = self.image(file_name, f"floppy{index}.fileName")
            controllers.setdefault((Bus.FDC, 0), Controller(ControllerModel.FDC, 0))
            disks.append(Disk(DeviceKind.FLOPPY, Bus.FDC, 0, index, path, "raw" if path else None))
        ordered = tuple(sorted(controllers.values(), key=lambda c: (c.bus, c.index)))
        return ordered, tuple(sorted(disks, key=lambda d: (d.bus, d.controller, d.unit)))

    def image(self, reference: str, what: str) -> str:
        home = self.path.parent.resolve()
        target = resolve_in_package(home, reference, source=self.path, what=what, policy=self.options.policy,
                                    must_exist=self.options.require_disks)
        try:
            name = target.relative_to(home).as_posix()
        except ValueError:
            name = target.name
        if name in self.sources and self.sources[name].path != target:
            raise self.fail(f"{what}: two images are both called {name!r}; rename one")
        self.sources[name] = DiskSource(target)
        return name

    def nics(self) -> tuple[Nic, ...]:
        nics: list[Nic] = []
        for lower in sorted(self.entries, key=lambda k: (len(k), k)):
            match = re.fullmatch(r"ethernet(\d+)\.present", lower)
            if match is None or not _true(self.entries[lower][1]):
                continue
            n = match.group(1)
            virtual_dev = (self.get(f"ethernet{n}.virtualDev") or "e1000").lower()
            model = next((m for m, v in dev.VMX_NIC.items() if v == virtual_dev), None)
            if virtual_dev == "vmxnet":
                model = NicModel.VMXNET3
            if model is None:
                raise self.fail(f"ethernet{n}.virtualDev {virtual_dev!r} is not one polyvisor maps")
            address_type = (self.get(f"ethernet{n}.addressType") or "").lower()
            mac = self.get(f"ethernet{n}.address") if address_type == "static" else \
                self.get(f"ethernet{n}.generatedAddress") or self.get(f"ethernet{n}.address")
            network = self.get(f"ethernet{n}.networkName") or self.get(f"ethernet{n}.connectionType")
            nics.append(Nic(model, mac.lower() if mac else None, network))
        return tuple(nics)


def _render_pairs(model: VmModel, vendor: Mapping[str, str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = list(HEADER.items())
    pairs.append(("displayName", model.name))
    guest = guestos.vmx_guest_os(model.os)
    kept = vendor.get("guestOS")
    if kept is not None and guestos.os_from_vmx(kept) == model.os:
        guest = kept
    pairs.append(("guestOS", guest))
    if model.firmware == Firmware.UEFI:
        pairs.append(("firmware", "efi"))
        if model.secure_boot:
            pairs.append(("uefi.secureBoot.enabled", "TRUE"))
    pairs.append(("memsize", str(model.memory // MiB)))
    pairs.append(("numvcpus", str(model.cpu.count)))
    pairs.append(("cpuid.coresPerSocket", str(model.cpu.cores * model.cpu.threads)))
    if model.uuid:
        pairs.append(("uuid.bios", _uuid_to_vmx(model.uuid)))
    for ctrl in model.controllers:
        if ctrl.model in (ControllerModel.IDE, ControllerModel.FDC):
            continue
        if ctrl.model not in dev.VMX_CONTROLLER:
            raise UnmappableModel(f"VMware has no {ctrl.model} controller")
        prefix, virtual_dev = dev.VMX_CONTROLLER[ctrl.model]
        pairs.append((f"{prefix}{ctrl.index}.present", "TRUE"))
        if virtual_dev is not None:
            pairs.append((f"{prefix}{ctrl.index}.virtualDev", virtual_dev))
    for disk in model.disks:
        if disk.bus == Bus.FDC:
            base = f"floppy{disk.unit}"
            pairs.append((f"{base}.present", "TRUE"))
            if disk.path:
                pairs += [(f"{base}.fileType", "file"), (f"{base}.fileName", disk.path)]
            continue
        if disk.bus not in (Bus.IDE, Bus.SCSI, Bus.SATA, Bus.NVME):
            raise UnmappableModel(f"VMware has no {disk.bus} bus")
        base = (f"ide{disk.unit // 2}:{disk.unit % 2}" if disk.bus == Bus.IDE
                else f"{disk.bus.value}{disk.controller}:{disk.unit}")
        pairs.append((f"{base}.present", "TRUE"))
        if disk.device == DeviceKind.DISK:
            assert disk.path is not None
            pairs.append((f"{base}.fileName", disk.path))
        elif disk.path:
            pairs += [(f"{base}.deviceType", "cdrom-image"), (f"{base}.fileName", disk.path)]
        else:
            pairs += [(f"{base}.deviceType", "cdrom-raw"), (f"{base}.fileName", "auto detect"),
                      (f"{base}.startConnected", "FALSE")]
    for n, nic in enumerate(model.nics):
        if nic.model not in dev.VMX_NIC:
            raise UnmappableModel(f"VMware has no {nic.model} network adapter")
        base = f"ethernet{n}"
        pairs += [(f"{base}.present", "TRUE"), (f"{base}.virtualDev", dev.VMX_NIC[nic.model])]
        if nic.network in ("nat", "bridged", "hostonly", "custom"):
            pairs.append((f"{base}.connectionType", nic.network))
        elif nic.network:
            pairs.append((f"{base}.networkName", nic.network))
        if nic.mac:
            if vendor.get(f"{base}.addressType", "").lower() == "generated":
                pairs.append((f"{base}.generatedAddress", nic.mac))
            else:
                pairs += [(f"{base}.addressType", "static"), (f"{base}.address", nic.mac)]
        else:
            pairs.append((f"{base}.addressType", "generated"))
    for serial in model.serials:
        pairs.append((f"serial{serial.port}.present", "TRUE"))
    if model.graphics == Graphics.VNC:
        pairs.append(("RemoteDisplay.vnc.enabled", "TRUE"))
    elif model.graphics == Graphics.SPICE:
        pass  # VMware has no SPICE server; lossy
    return pairs


def _device_exists(model: VmModel, key: str) -> bool:
    """Whether a vendor key's device prefix (``scsi0:1.``, ``ethernet2.``) still names something in the model."""
    match = _PREFIXED.match(key)
    if match is None:
        return True
    kind, number = match.group(1).lower(), int(match.group(2))
    if kind == "ethernet":
        return number < len(model.nics)
    if kind == "serial":
        return any(s.port == number for s in model.serials)
    if kind == "floppy":
        return any(d.bus == Bus.FDC and d.unit == number for d in model.disks)
    if kind == "ide":
        return any(c.bus == Bus.IDE for c in model.controllers)
    return any(c.bus == _BUS[kind] and c.index == number for c in model.controllers)


def render_vmx(model: VmModel) -> str:
    """The .vmx text for *model*: mapped keys, then vendor keys (vendor values win for keys both have)."""
    vendor = {k: v for k, v in model.vendor_keys(CODEC).items()
              if _device_exists(model, k) or (k.lower().endswith(".present") and not _true(v))}
    pairs = _render_pairs(model, vendor)
    index = {k.lower(): i for i, (k, _) in enumerate(pairs)}
    for key, value in vendor.items():
        if key.lower() == "guestos":
            continue
        if key.lower() in index:
            pairs[index[key.lower()]] = (pairs[index[key.lower()]][0], value)
        else:
            index[key.lower()] = len(pairs)
            pairs.append((key, value))
    return "".join(f'{key} = "{_escape(value)}"\n' for key, value in pairs)

