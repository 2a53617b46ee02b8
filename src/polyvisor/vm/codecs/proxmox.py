"""Proxmox VE qemu-server configuration files (``/etc/pve/qemu-server/VMID.conf``).

Format (Proxmox VE administration guide, "qm.conf" and ``qm(1)``): ``#``
comment lines (the VM description) first, then ``key: value`` lines; a
``[name]`` line starts a snapshot or pending section.  Mapped keys:

* ``name``, ``memory`` (MiB), ``sockets``/``cores``, ``smbios1: uuid=``;
* ``bios: ovmf`` (UEFI; ``efidisk0``'s ``pre-enrolled-keys=1`` means Secure
  Boot is enforced), ``machine`` (``q35``/``pc``/``pc-q35-X.Y``…),
  ``ostype`` (``l26``, ``win10``…);
* ``scsihw`` (``lsi``, ``lsi53c810``, ``virtio-scsi-pci``,
  ``virtio-scsi-single``, ``pvscsi``; ``megasas`` has no polyvisor model and
  is refused), disks ``ideN``/``sataN``/``scsiN``/``virtioN`` =
  ``VOLUME,opt=value…`` with ``media=cdrom`` and ``size=``;
* ``netN: MODEL=MAC,bridge=…``, ``serialN: socket``, ``vga`` (``qxl`` is
  SPICE, ``none``/``serialN`` no display, otherwise Proxmox's VNC console),
  ``boot: order=scsi0;ide2;net0`` (legacy ``bootdisk`` is read).

Volumes (``STORAGE:VOLNAME`` or an absolute path) are looked up inside the
package directory: the volume name, its file name, or its file name with
``.qcow2``/``.raw``/``.vmdk``/``.img``; absolute paths must lie inside the
package (read policy).  polyvisor writes absolute paths of the disks it puts
beside the .conf.  Other keys are kept in ``vendor["proxmox"]`` and written
back; ``unusedN`` volumes and snapshot sections are not carried.

Not kept (``lossy``): the guest OS beyond its ``ostype`` family row, SMT
threads, Secure Boot (writing an ``efidisk0`` needs a storage volume polyvisor
cannot create; Proxmox uses temporary EFI variables without one), disk
subformat details.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from polyvisor.errors import PackageError, UnmappableModel, UnsafePackage
from polyvisor.vm.codecs import register_codec
from polyvisor.vm.codecs._common import ImageFinder, disk_files, file_stem, truthy
from polyvisor.vm.codecs.codec import Codec, OutputFiles, ReadOptions, VmPackage
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
    Machine,
    MiB,
    Nic,
    NicModel,
    Serial,
    VmModel,
    check_package_path,
)
from polyvisor.vm.safety import read_limited, single_descriptor

CODEC = "proxmox"
_LINE = re.compile(r"^([a-z][a-z0-9_-]*)\s*:\s?(.*)$")
_DISK_KEY = re.compile(r"^(ide|sata|scsi|virtio)(\d+)$")
_LIMITS = {"ide": 3, "sata": 5, "scsi": 30, "virtio": 15}
_BUS = {"ide": Bus.IDE, "sata": Bus.SATA, "scsi": Bus.SCSI, "virtio": Bus.VIRTIO}
_BUS_PREFIX = {v: k for k, v in _BUS.items()}
_IMPLICIT = {Bus.IDE: ControllerModel.IDE, Bus.SATA: ControllerModel.AHCI, Bus.VIRTIO: ControllerModel.VIRTIO_BLK}
#: scsihw values (qm.conf) -> controller model; the first spelling of a model is the one written.
_SCSIHW = {"virtio-scsi-single": ControllerModel.VIRTIO_SCSI, "virtio-scsi-pci": ControllerModel.VIRTIO_SCSI,
           "lsi": ControllerModel.LSILOGIC, "lsi53c810": ControllerModel.LSILOGIC, "pvscsi": ControllerModel.PVSCSI}
_SCSIHW_WRITE = {ControllerModel.VIRTIO_SCSI: "virtio-scsi-single", ControllerModel.LSILOGIC: "lsi",
                 ControllerModel.PVSCSI: "pvscsi"}
#: netN models (qm.conf "net[n]": e1000, e1000e, rtl8139, virtio, vmxnet3, pcnet…)
_NIC = {"virtio": NicModel.VIRTIO_NET, "e1000": NicModel.E1000, "e1000e": NicModel.E1000E,
        "vmxnet3": NicModel.VMXNET3, "rtl8139": NicModel.RTL8139, "pcnet": NicModel.PCNET}
_NIC_READ = {**_NIC, "e1000-82540em": NicModel.E1000, "e1000-82545em": NicModel.E1000}
_NIC_WRITE = {v: k for k, v in _NIC.items()}
_FORMAT_SUFFIX = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw", ".iso": "raw", ".vmdk": "vmdk"}
_MAPPED = {"name", "memory", "sockets", "cores", "smbios1", "bios", "efidisk0", "machine", "ostype", "scsihw",
           "boot", "bootdisk", "vga", "vcpus"}
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_conf(text: str, source: Path) -> tuple[list[str], dict[str, str]]:
    """(description comment lines, key -> value) of the current configuration (sections are skipped)."""
    comments: list[str] = []
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("["):
            break  # snapshot / pending sections: not the current configuration
        if stripped.startswith("#"):
            comments.append(line[1:])
            continue
        match = _LINE.match(stripped)
        if match is None:
            raise PackageError(f"line {number} is not 'key: value': {stripped[:80]!r}", path=source)
        key, value = match.group(1), match.group(2).strip()
        if key in entries:
            raise PackageError(f"line {number}: key {key!r} given twice", path=source)
        entries[key] = value
    return comments, entries


def _options(value: str) -> tuple[str, dict[str, str]]:
    """``VOLUME,k=v,k2=v2`` -> (VOLUME, {k: v}); a first item with '=' is an option too (``file=``)."""
    items = value.split(",")
    head = items[0]
    options: dict[str, str] = {}
    for item in items[1:]:
        key, sep, val = item.partition("=")
        options[key.strip()] = val.strip() if sep else ""
    if "=" in head and not head.startswith("/"):
        key, _, val = head.partition("=")
        if key == "file":
            head = val
    return head, options


def _size(text: str) -> int | None:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", text.strip())
    if match is None:
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _size_text(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


@register_codec
class ProxmoxCodec(Codec):
    """A Proxmox VE qemu-server ``.conf`` and the disk volumes beside it."""

    name = CODEC
    description = "Proxmox VE qemu-server .conf (qm.conf) and the volumes beside it"
    suffixes = (".conf",)
    disk_formats = (("qcow2", None), ("raw", None), ("vmdk", None))
    lossy = frozenset({"os.distribution", "os.version", "os.osinfo", "cpu.threads", "secure_boot",
                       "disks.subformat"})
    target = "kvm"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if path.is_dir():
            return 55 if len(list(path.glob("*.conf"))) == 1 else 0
        score = 30 if path.suffix.lower() == ".conf" else 0
        keys = set(re.findall(rb"^([a-z][a-z0-9]*):", head[:16384], re.M))
        if b"memory" in keys and (keys & {b"scsihw", b"ostype", b"net0", b"scsi0", b"virtio0", b"ide0", b"sata0",
                                          b"smbios1", b"vmgenid", b"boot", b"cores"}):
            score += 55
        return score

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = single_descriptor(path, ".conf")
        text = read_limited(path, options.max_descriptor, what="qemu-server configuration").decode("utf-8",
                                                                                                   "replace")
        comments, entries = parse_conf(text, path)
        reader = _Reader(path, entries, options)
        model = reader.model()
        vendor = reader.vendor
        if comments:
            vendor["description"] = "\n".join(comments)
        model = model.with_vendor(CODEC, vendor)
        return VmPackage(model=model.validate(source=str(path)), codec=CODEC, source=path,
                         disks=reader.finder.sources)

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        for disk in model.disks:
            if disk.device == DeviceKind.DISK and disk.format not in (None, "qcow2", "raw", "vmdk"):
                raise UnmappableModel(f"Proxmox disks are qcow2, raw or vmdk, not {disk.format} ({disk.path}); "
                                      "convert it first")
        names = disk_files(model, disk_paths)
        outdir = Path(outdir).resolve()
        text = render_conf(model, outdir)
        with OutputFiles(outdir) as files:
            for name in names:
                files.copy(name, disk_paths[name])
            files.write_bytes(f"{file_stem(model.name)}.conf", text.encode("utf-8"))
        return files.names


class _Reader:
    def __init__(self, path: Path, entries: dict[str, str], options: ReadOptions) -> None:
        self.path = path
        self.entries = entries
        self.options = options
        self.finder = ImageFinder(path.parent, path, options)
        self.vendor: dict[str, str] = {}

    def fail(self, message: str) -> PackageError:
        return PackageError(message, path=self.path)

    def number(self, key: str, default: int) -> int:
        text = self.entries.get(key)
        if text is None:
            return default
        if not text.isdigit() or int(text) < 1:
            raise self.fail(f"{key}: {text!r} is not a positive number")
        return int(text)

    def model(self) -> VmModel:
        e = self.entries
        name = e.get("name") or self.path.stem
        memory = self.number("memory", 512) * MiB
        cpu = Cpu(self.number("sockets", 1), self.number("cores", 1))
        if "vcpus" in e:
            self.vendor["vcpus"] = e["vcpus"]
        uuid = None
        if "smbios1" in e:
            fields = dict(item.partition("=")[::2] for item in e["smbios1"].split(","))
            uuid = fields.pop("uuid", None)
            if uuid is not None:
                uuid = uuid.lower()
            if fields:
                self.vendor["smbios1"] = ",".join(f"{k}={v}" for k, v in fields.items())
        firmware = Firmware.UEFI if e.get("bios", "seabios") == "ovmf" else Firmware.BIOS
        if e.get("bios", "seabios") not in ("seabios", "ovmf"):
            raise self.fail(f"bios: {e['bios']!r} is neither seabios nor ovmf")
        secure_boot = False
        if "efidisk0" in e:
            _, efi = _options(e["efidisk0"])
            secure_boot = firmware == Firmware.UEFI and truthy(efi.get("pre-enrolled-keys"))
        machine_name = e.get("machine", "pc")
        machine_type = machine_name.split(",", 1)[0]
        if machine_type == "q35" or machine_type.startswith("pc-q35"):
            machine = Machine.Q35
        elif machine_type == "pc" or machine_type.startswith("pc-i440fx"):
            machine = Machine.I440FX
        else:
            raise self.fail(f"machine: {machine_name!r} is not a PC (pc/q35) machine type")
        if machine_name not in ("pc", "q35"):
            self.vendor["machine"] = machine_name
        ostype = e.get("ostype", "other")
        os = guestos.os_from_native("proxmox", ostype) or guestos.guess_os(ostype)
        controllers, disks = self.storage()
        nics = self.nics()
        serials = tuple(Serial(int(m.group(1))) for key in sorted(e)
                        if (m := re.fullmatch(r"serial(\d)", key)))
        graphics = _graphics(e.get("vga"))
        if "vga" in e and e["vga"] != _vga(graphics, serials, None):
            self.vendor["vga"] = e["vga"]
        for key, value in e.items():
            if key in _MAPPED or _DISK_KEY.match(key) or re.fullmatch(r"(net|serial)\d+", key):
                continue
            if re.fullmatch(r"unused\d+", key):
                continue  # detached volumes of the source host: not carried
            self.vendor[key] = value
        return VmModel(name=name, memory=memory, cpu=cpu, uuid=uuid, firmware=firmware, secure_boot=secure_boot,
                       machine=machine, os=os, controllers=controllers, disks=disks, nics=nics, serials=serials,
                       graphics=graphics)

    def storage(self) -> tuple[tuple[Controller, ...], tuple[Disk, ...]]:
        e = self.entries
        scsihw = e.get("scsihw", "lsi")
        if scsihw not in _SCSIHW:
            raise self.fail(f"scsihw: {scsihw!r} has no polyvisor controller model "
                            f"(known: {', '.join(_SCSIHW)})")
        if "scsihw" in e and scsihw != _SCSIHW_WRITE[_SCSIHW[scsihw]]:
            self.vendor["scsihw"] = scsihw
        boot = self.boot_order()
        controllers: dict[Bus, Controller] = {}
        disks: list[Disk] = []
        for key in sorted(e, key=lambda k: (len(k), k)):
            match = _DISK_KEY.fullmatch(key)
            if match is None:
                continue
            prefix, unit = match.group(1), int(match.group(2))
            if unit > _LIMITS[prefix]:
                raise self.fail(f"{key}: {prefix} devices are numbered 0-{_LIMITS[prefix]}")
            bus = _BUS[prefix]
            volume, opts = _options(e[key])
            device = DeviceKind.CDROM if opts.pop("media", "disk") == "cdrom" else DeviceKind.DISK
            capacity = _size(opts.pop("size", "")) if "size" in opts else None
            if device != DeviceKind.DISK:
                capacity = None  # qm records an ISO's size; a drive has no capacity of its own
            fmt = opts.pop("format", None)
            path: str | None = None
            if volume not in ("none", "cdrom"):
                path = self.volume(volume, key)
                fmt = fmt or _FORMAT_SUFFIX.get(Path(path).suffix.lower(), "raw")
            elif device == DeviceKind.DISK:
                raise self.fail(f"{key}: a disk needs a volume")
            else:
                fmt = None
                capacity = None
                if volume == "cdrom":
                    self.vendor[f"{key}.volume"] = "cdrom"
            if opts:
                self.vendor[f"{key}.options"] = ",".join(f"{k}={v}" if v else k for k, v in opts.items())
            if bus == Bus.SCSI:
                controllers.setdefault(bus, Controller(_SCSIHW[scsihw], 0))
            else:
                controllers.setdefault(bus, Controller(_IMPLICIT[bus], 0))
            disks.append(Disk(device, bus, 0, unit, path, fmt, None, capacity, boot.get(key)))
        return tuple(controllers.values()), tuple(disks)

    def boot_order(self) -> dict[str, int]:
        boot = self.entries.get("boot", "")
        order: dict[str, int] = {}
        if boot.startswith("order="):
            devices = [d for d in boot[len("order="):].split(";") if _DISK_KEY.fullmatch(d)]
            order = {name: i for i, name in enumerate(devices, 1)}
            rest = [d for d in boot[len("order="):].split(";") if not _DISK_KEY.fullmatch(d)]
            if rest:
                self.vendor["boot.other"] = ";".join(rest)
        elif boot:
            self.vendor["boot"] = boot  # legacy "cdn" form
            if "bootdisk" in self.entries:
                order = {self.entries["bootdisk"]: 1}
        return order

    def volume(self, volume: str, key: str) -> str:
        what = f"{key} volume"
        if volume.startswith("/"):
            return self.finder.add(volume, what)
        storage, sep, volname = volume.partition(":")
        reference = volname if sep else storage
        why = check_package_path(reference)
        if why is not None:
            raise UnsafePackage(f"{what} {volume!r} {why}", path=self.path)
        home = self.finder.home
        name = Path(reference).name
        candidates = [reference, name] + ([name + s for s in (".qcow2", ".raw", ".vmdk", ".img")]
                                          if not Path(name).suffix else [])
        for candidate in candidates:
            if (home / candidate).is_file():
                return self.finder.add(candidate, what)
        if self.options.require_disks:
            raise self.fail(f"{what} {volume!r}: no file {' or '.join(candidates)} in the package directory")
        return self.finder.add(name, what, must_exist=False)

    def nics(self) -> tuple[Nic, ...]:
        nics: list[Nic] = []
        keys = sorted((k for k in self.entries if re.fullmatch(r"net\d+", k)), key=lambda k: int(k[3:]))
        for position, key in enumerate(keys):
            items = self.entries[key].split(",")
            model: NicModel | None = None
            mac = network = None
            rest: list[str] = []
            for item in items:
                k, sep, v = item.partition("=")
                if model is None and k in _NIC_READ:
                    model = _NIC_READ[k]
                    mac = v.lower() if sep and v else None
                    if k not in _NIC:
                        rest.append(f"model={k}")
                elif k == "bridge":
                    network = v
                else:
                    rest.append(item)
            if model is None:
                raise self.fail(f"{key}: no network adapter model polyvisor maps in {self.entries[key]!r}")
            if rest:
                self.vendor[f"net{position}.options"] = ",".join(rest)
            nics.append(Nic(model, mac, network))
        return tuple(nics)


def _graphics(vga: str | None) -> Graphics:
    """qm.conf ``vga``: qxl* is SPICE; none and serialN show no display; anything else is Proxmox's VNC console."""
    kind = (vga or "std").split(",", 1)[0].split("=", 1)[-1]
    if kind.startswith("qxl"):
        return Graphics.SPICE
    if kind == "none" or kind.startswith("serial"):
        return Graphics.NONE
    return Graphics.VNC


def _vga(graphics: Graphics, serials: tuple[Serial, ...], kept: str | None) -> str | None:
    if kept is not None and _graphics(kept) == graphics:
        return kept
    if graphics == Graphics.SPICE:
        return "qxl"
    if graphics == Graphics.NONE:
        return f"serial{serials[0].port}" if serials else "none"
    return None


def render_conf(model: VmModel, outdir: Path) -> str:
    """The .conf text for *model*, its disks referenced by absolute paths inside *outdir*."""
    vendor = dict(model.vendor_keys(CODEC))
    entries: dict[str, str] = {}
    entries["name"] = model.name
    entries["memory"] = str(model.memory // MiB)
    entries["sockets"] = str(model.cpu.sockets)
    entries["cores"] = str(model.cpu.cores * model.cpu.threads)
    if "vcpus" in vendor and vendor["vcpus"].isdigit() and int(vendor["vcpus"]) <= model.cpu.count:
        entries["vcpus"] = vendor["vcpus"]
    smbios = [f"uuid={model.uuid}"] if model.uuid else []
    if vendor.get("smbios1"):
        smbios.append(vendor["smbios1"])
    if smbios:
        entries["smbios1"] = ",".join(smbios)
    if model.firmware == Firmware.UEFI:
        entries["bios"] = "ovmf"
    machine = vendor.get("machine")
    base = "q35" if model.machine == Machine.Q35 else "pc"
    if machine is None or (("q35" in machine.split(",", 1)[0]) != (model.machine == Machine.Q35)):
        machine = base
    if machine != "pc":
        entries["machine"] = machine
    ostype = guestos.lookup(model.os, "proxmox")
    entries["ostype"] = str(ostype or "other")
    scsi = [c for c in model.controllers if c.bus == Bus.SCSI]
    for bus in (Bus.SCSI, Bus.IDE, Bus.SATA, Bus.VIRTIO):
        if len([c for c in model.controllers if c.bus == bus]) > 1:
            raise UnmappableModel(f"Proxmox numbers {bus} devices on one controller; the model has several")
    for ctrl in model.controllers:
        if ctrl.bus not in _BUS_PREFIX:
            raise UnmappableModel(f"Proxmox has no {ctrl.model} controller")
        if ctrl.bus in _IMPLICIT and ctrl.model != _IMPLICIT[ctrl.bus]:
            raise UnmappableModel(f"Proxmox has no {ctrl.model} controller")
    if scsi:
        if scsi[0].model not in _SCSIHW_WRITE:
            raise UnmappableModel(f"Proxmox has no {scsi[0].model} SCSI controller (scsihw)")
        kept = vendor.get("scsihw")
        entries["scsihw"] = kept if kept and _SCSIHW.get(kept) == scsi[0].model else _SCSIHW_WRITE[scsi[0].model]
    boot: list[tuple[int, str]] = []
    for disk in model.disks:
        prefix = _BUS_PREFIX.get(disk.bus)
        if prefix is None:
            raise UnmappableModel(f"Proxmox has no {disk.bus} bus")
        if disk.unit > _LIMITS[prefix]:
            raise UnmappableModel(f"Proxmox numbers {prefix} devices 0-{_LIMITS[prefix]} (unit {disk.unit})")
        key = f"{prefix}{disk.unit}"
        if disk.path is None:
            value = vendor.get(f"{key}.volume", "none")
        else:
            value = str(outdir / disk.path)
            if _FORMAT_SUFFIX.get(Path(disk.path).suffix.lower(), "raw") != (disk.format or "raw"):
                value += f",format={disk.format}"
        if disk.device == DeviceKind.CDROM:
            value += ",media=cdrom"
        if disk.capacity is not None and disk.device == DeviceKind.DISK:
            value += f",size={_size_text(disk.capacity)}"
        if vendor.get(f"{key}.options"):
            value += "," + vendor[f"{key}.options"]
        entries[key] = value
        if disk.boot_order is not None:
            boot.append((disk.boot_order, key))
    order = [key for _, key in sorted(boot)]
    if vendor.get("boot.other"):
        order += vendor["boot.other"].split(";")
    if order:
        entries["boot"] = "order=" + ";".join(order)
    elif "boot" in vendor:
        entries["boot"] = vendor["boot"]
    for n, nic in enumerate(model.nics):
        if nic.model not in _NIC_WRITE:
            raise UnmappableModel(f"Proxmox has no {nic.model} network adapter")
        model_name = _NIC_WRITE[nic.model]
        extra = vendor.get(f"net{n}.options", "")
        parts = [item for item in extra.split(",") if item]
        alias = next((p.split("=", 1)[1] for p in parts if p.startswith("model=")), None)
        if alias is not None and _NIC_READ.get(alias) == nic.model:
            model_name = alias
        parts = [p for p in parts if not p.startswith("model=")]
        value = f"{model_name}={nic.mac.upper()}" if nic.mac else model_name
        if nic.network:
            value += f",bridge={nic.network}"
        entries[f"net{n}"] = ",".join([value, *parts])
    for serial in model.serials:
        if serial.port > 3:
            raise UnmappableModel(f"Proxmox has serial0-serial3, not serial{serial.port}")
        entries[f"serial{serial.port}"] = "socket"
    vga = _vga(model.graphics, model.serials, vendor.get("vga"))
    if vga is not None:
        entries["vga"] = vga
    skip = {"description", "scsihw", "machine", "smbios1", "vcpus", "vga", "boot", "boot.other"}
    for key, value in vendor.items():
        if key in skip or "." in key or key in entries:
            continue
        if re.fullmatch(r"(ide|sata|scsi|virtio|net|serial|unused)\d+|efidisk0|bootdisk", key):
            continue
        entries[key] = value
    head = "".join(f"#{line}\n" for line in vendor.get("description", "").split("\n")) if "description" in vendor \
        else ""
    return head + "".join(f"{key}: {entries[key]}\n" for key in sorted(entries))


__all__ = ["ProxmoxCodec", "parse_conf", "render_conf"]
