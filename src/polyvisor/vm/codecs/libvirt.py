"""libvirt domain XML (KVM/QEMU, and the Xen flavour with ``<domain type="xen">``).

Reads what virt-install and virt-manager write (q35 or pc, virtio, UEFI with
``<os firmware="efi">`` or a pflash ``<loader>``, libosinfo metadata) and
writes XML that passes ``virt-xml-validate FILE domain``.

Mapping (model <-> XML):

* ``name``, ``uuid``; ``memory`` <-> ``<memory unit="KiB">`` (and
  ``<currentMemory>``); ``cpu`` <-> ``<vcpu>`` and ``<cpu><topology>``;
* ``firmware``/``secure_boot`` <-> ``<os firmware="efi">`` and its
  ``<firmware><feature name="secure-boot">``; ``machine`` and ``os.arch``
  <-> ``<os><type machine arch>``;
* ``os`` <-> ``<metadata><libosinfo:os id=...>``, plus a ``polyvisor:os``
  metadata element when the libosinfo id alone does not say all of it;
* disks <-> ``<disk>`` (file sources only) with explicit ``<address
  type="drive">``, storage controllers <-> ``<controller>``;
  ``boot_order`` <-> per-device ``<boot order>`` (``<os><boot dev>`` is read);
* NICs <-> ``<interface>``; serial ports <-> ``<serial>``/``<console>``;
  ``graphics`` <-> ``<graphics type>``.

Everything else — ``<features>``, ``<clock>``, ``<cpu mode>``, USB/PCI
controllers, channels, RNG, TPM, video, sound… — is kept verbatim in
``vendor["libvirt"]`` and written back, so a libvirt round trip loses nothing
but formatting.  Disk capacity is not part of domain XML (``disks.capacity``
is lossy).  Disk sources must lie inside the XML file's directory unless the
read policy allows more; the model names such disks by their file name.
"""

from __future__ import annotations

import dataclasses
import string
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from polyvisor.errors import PackageError, UnmappableModel
from polyvisor.vm.codecs import register_codec
from polyvisor.vm.codecs._xmlvendor import element_from_text, element_text
from polyvisor.vm.codecs.codec import Codec, DiskSource, OutputFiles, ReadOptions, VmPackage
from polyvisor.vm.mapping import devices as dev
from polyvisor.vm.mapping import guestos
from polyvisor.vm.model import (
    Arch,
    Bus,
    Controller,
    ControllerModel,
    Cpu,
    DeviceKind,
    Disk,
    Firmware,
    Graphics,
    GuestOS,
    Machine,
    MiB,
    Nic,
    NicModel,
    OsFamily,
    Serial,
    VmModel,
)
from polyvisor.vm.safety import parse_xml, read_limited, resolve_in_package, xml_bytes

LIBOSINFO_NS = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
POLYVISOR_NS = "https://polyvisor.invalid/xmlns/libvirt/domain/1"
ET.register_namespace("libosinfo", LIBOSINFO_NS)
ET.register_namespace("polyvisor", POLYVISOR_NS)

_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": MiB, "mib": MiB, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}
#: qemu driver type -> polyvisor disk format
_QEMU_FORMAT = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vpc": "vhd", "vhdx": "vhdx", "vdi": "vdi"}
_FORMAT_QEMU = {v: k for k, v in _QEMU_FORMAT.items()}
_DEV_PREFIX = {Bus.IDE: "hd", Bus.SATA: "sd", Bus.SCSI: "sd", Bus.VIRTIO: "vd", Bus.XEN: "xvd", Bus.FDC: "fd"}
#: libvirt's default units per controller when a disk has no <address> (virDomainDiskDefAssignAddress)
_UNITS_PER_CONTROLLER = {Bus.IDE: 4, Bus.SATA: 6, Bus.SCSI: 7, Bus.FDC: 2}
_HANDLED_DOMAIN = {"name", "uuid", "memory", "currentMemory", "vcpu", "os", "cpu", "devices", "metadata"}
_HANDLED_DEVICES = {"disk", "interface", "serial", "console", "graphics"}
_STORAGE_CONTROLLERS = {"ide", "sata", "scsi", "fdc"}

CODEC = "libvirt"


def _dev_name(prefix: str, index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = string.ascii_lowercase[rem] + letters
    return prefix + letters


def _dev_index(name: str, prefix: str) -> int:
    letters = name[len(prefix):]
    if not letters or not all(c in string.ascii_lowercase for c in letters):
        raise ValueError(name)
    index = 0
    for c in letters:
        index = index * 26 + (ord(c) - ord("a") + 1)
    return index - 1


@register_codec
class LibvirtCodec(Codec):
    """libvirt domain XML."""

    name = CODEC
    description = "libvirt domain XML (KVM/QEMU; Xen with <domain type='xen'>)"
    suffixes = (".xml",)
    disk_formats = (("qcow2", None), ("raw", None), ("vmdk", None), ("vhd", None), ("vhdx", None), ("vdi", None))
    lossy = frozenset({"disks.capacity", "disks.subformat"})
    target = "kvm"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if not head:
            return 0
        text = head.lstrip()[:4096]
        return 90 if b"<domain" in text and b"type=" in text and (b"<devices" in head or b"<name" in head) else 0

    # ------------------------------------------------------------------ read

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = Path(path)
        root = parse_xml(read_limited(path, options.max_descriptor, what="domain XML"), source=path)
        if root.tag != "domain":
            raise PackageError(f"root element is <{root.tag}>, not <domain>", path=path)
        reader = _Reader(path, root, options)
        model = reader.model()
        return VmPackage(model=model.validate(source=str(path)), codec=CODEC, source=path, disks=reader.sources)

    # ----------------------------------------------------------------- write

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        cls.check_disks(model, disk_paths)
        outdir = Path(outdir).resolve()
        ET.register_namespace("polyvisor", POLYVISOR_NS)  # the OVF codec uses the same prefix for its own
        root = _write_domain(model, outdir)
        with OutputFiles(outdir) as files:
            for disk in model.disks:
                if disk.path is not None:
                    files.copy(disk.path, disk_paths[disk.path])
            files.write_bytes(f"{_file_stem(model.name)}.xml", xml_bytes(root))
        return files.names


def _file_stem(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    return safe or "vm"


class _Reader:
    def __init__(self, path: Path, root: ET.Element, options: ReadOptions) -> None:
        self.path = path
        self.root = root
        self.options = options
        self.vendor: dict[str, str] = {}
        self.sources: dict[str, DiskSource] = {}

    def fail(self, message: str) -> PackageError:
        return PackageError(message, path=self.path)

    def keep(self, key: str, element: ET.Element) -> None:
        n = 0
        while f"{key}#{n}" in self.vendor:
            n += 1
        self.vendor[f"{key}#{n}"] = element_text(element)

    def model(self) -> VmModel:
        root = self.root
        domain_type = root.get("type", "kvm")
        if domain_type != "kvm":
            self.vendor["domain@type"] = domain_type
        name = (root.findtext("name") or "").strip()
        if not name:
            raise self.fail("<name> is missing")
        uuid_text = root.findtext("uuid")
        uuid = str(_uuid(uuid_text, self)) if uuid_text else None
        memory = self.memory()
        cpu = self.cpu()
        firmware, secure_boot, machine, arch, boot_devs = self.os_element()
        os = self.guest_os(arch)
        controllers, disks = self.storage(boot_devs)
        nics, serials, graphics = self.other_devices()
        for child in root:
            if child.tag == "features" and element_text(child) == _default_features(secure_boot):
                continue
            if child.tag not in _HANDLED_DOMAIN:
                self.keep(f"domain/{child.tag}", child)
        model = VmModel(name=name, memory=memory, cpu=cpu, uuid=uuid, firmware=firmware, secure_boot=secure_boot,
                        machine=machine, os=os, controllers=controllers, disks=disks, nics=nics, serials=serials,
                        graphics=graphics)
        return model.with_vendor(CODEC, self.vendor)

    def memory(self) -> int:
        element = self.root.find("memory")
        if element is None or not (element.text or "").strip():
            raise self.fail("<memory> is missing")
        size = _size(element, self)
        current = self.root.find("currentMemory")
        if current is not None and _size(current, self) != size:
            self.vendor["currentMemory"] = str(_size(current, self))
        rounded = -(-size // MiB) * MiB
        if rounded != size:
            self.vendor["memory"] = str(size)
        return rounded

    def cpu(self) -> Cpu:
        vcpu_text = (self.root.findtext("vcpu") or "1").strip()
        try:
            count = int(vcpu_text)
        except ValueError:
            raise self.fail(f"<vcpu> {vcpu_text!r} is not a number") from None
        cpu_el = self.root.find("cpu")
        topology = cpu_el.find("topology") if cpu_el is not None else None
        result = Cpu(sockets=count)
        if topology is not None:
            try:
                result = Cpu(int(topology.get("sockets", "1")) * int(topology.get("dies", "1")),
                             int(topology.get("cores", "1")), int(topology.get("threads", "1")))
            except ValueError:
                raise self.fail("<cpu><topology> has a non-numeric value") from None
            if result.count != count:
                raise self.fail(f"<cpu><topology> gives {result.count} vCPUs but <vcpu> says {count}")
        if cpu_el is not None:
            rest = ET.Element(cpu_el.tag, cpu_el.attrib)
            rest.extend(c for c in cpu_el if c.tag != "topology")
            if rest.attrib or len(rest):
                self.vendor["cpu"] = element_text(rest)
        return result

    def os_element(self) -> tuple[Firmware, bool, Machine, Arch, list[str]]:
        os_el = self.root.find("os")
        if os_el is None:
            raise self.fail("<os> is missing")
        type_el = os_el.find("type")
        machine = Machine.I440FX
        arch = Arch.X86_64
        if type_el is not None:
            if (type_el.text or "hvm").strip() != "hvm":
                self.vendor["os/type"] = (type_el.text or "").strip()
            machine_name = type_el.get("machine")
            if machine_name:
                found = dev.libvirt_machine_from(machine_name)
                if found is None:
                    raise self.fail(f"machine type {machine_name!r} is not an x86 PC (pc/q35) machine")
                machine = found
                if machine_name != dev.LIBVIRT_MACHINE[machine]:
                    self.vendor["os/type@machine"] = machine_name
            arch_name = type_el.get("arch", "x86_64")
            try:
                arch = Arch(arch_name)
            except ValueError:
                raise self.fail(f"architecture {arch_name!r} is not supported") from None
        firmware = Firmware.BIOS
        secure_boot = False
        if os_el.get("firmware") == "efi":
            firmware = Firmware.UEFI
        loader = os_el.find("loader")
        if loader is not None:
            if loader.get("type") == "pflash" or "OVMF" in (loader.text or "") or "edk2" in (loader.text or ""):
                firmware = Firmware.UEFI
            if loader.get("secure") == "yes":
                secure_boot = True
        fw_el = os_el.find("firmware")
        if fw_el is not None:
            features = {f.get("name"): f.get("enabled", "") for f in fw_el.findall("feature")}
            if "secure-boot" in features:
                secure_boot = features["secure-boot"] == "yes"
            enrolled = features.get("enrolled-keys")
            if enrolled is not None and enrolled != ("yes" if secure_boot else "no"):
                self.vendor["os/firmware/enrolled-keys"] = enrolled
        boot_devs = [b.get("dev", "") for b in os_el.findall("boot")]
        for child in os_el:
            if child.tag not in ("type", "boot", "firmware") and not (child.tag == "loader" and not loader_extra(
                    child)):
                self.keep(f"os/{child.tag}", child)
        return firmware, secure_boot, machine, arch, boot_devs

    def guest_os(self, arch: Arch) -> GuestOS:
        metadata = self.root.find("metadata")
        os = GuestOS(arch=arch)
        if metadata is None:
            return os
        for child in metadata:
            if child.tag == f"{{{LIBOSINFO_NS}}}libosinfo":
                os_el = child.find(f"{{{LIBOSINFO_NS}}}os")
                url = os_el.get("id") if os_el is not None else None
                if url:
                    os = guestos.os_from_osinfo_url(url, arch)
                    if guestos.osinfo_url(os) != url:
                        self.vendor["libosinfo"] = url
            elif child.tag == f"{{{POLYVISOR_NS}}}os":
                pass
            else:
                self.keep("metadata", child)
        own = metadata.find(f"{{{POLYVISOR_NS}}}os")
        if own is not None:
            try:
                os = GuestOS(family=OsFamily(own.get("family", os.family.value)),
                             distribution=own.get("distribution", os.distribution),
                             version=own.get("version", os.version), arch=arch,
                             osinfo=own.get("osinfo", os.osinfo))
            except ValueError:
                raise self.fail(f"polyvisor:os family {own.get('family')!r} unknown") from None
        return os

    def storage(self, boot_devs: list[str]) -> tuple[tuple[Controller, ...], tuple[Disk, ...]]:
        devices = self.root.find("devices")
        if devices is None:
            return (), ()
        controllers: dict[tuple[Bus, int], Controller] = {}
        for element in devices.findall("controller"):
            ctype = element.get("type", "")
            if ctype not in _STORAGE_CONTROLLERS:
                self.keep("devices/controller", element)
                continue
            try:
                index = int(element.get("index", "0"))
            except ValueError:
                raise self.fail(f"controller index {element.get('index')!r} is not a number") from None
            model = self.controller_model(ctype, element.get("model"))
            controllers[(model_bus(model), index)] = Controller(model, index)
        disks: list[Disk] = []
        counters: dict[str, int] = {}
        explicit_boot = False
        for n, element in enumerate(devices.findall("disk")):
            disk, has_boot = self.disk(element, n, counters)
            explicit_boot = explicit_boot or has_boot
            key = (disk.bus, disk.controller)
            if key not in controllers:
                implicit = {Bus.IDE: ControllerModel.IDE, Bus.SATA: ControllerModel.AHCI,
                            Bus.SCSI: ControllerModel.LSILOGIC, Bus.VIRTIO: ControllerModel.VIRTIO_BLK,
                            Bus.XEN: ControllerModel.XEN_BLKFRONT, Bus.FDC: ControllerModel.FDC}[disk.bus]
                controllers[key] = Controller(implicit, disk.controller)
                if disk.bus in (Bus.IDE, Bus.SATA, Bus.SCSI, Bus.FDC):
                    self.vendor[f"controller/{disk.bus}{disk.controller}"] = "implicit"
            disks.append(disk)
        if not explicit_boot and boot_devs:
            disks = _apply_boot_devs(disks, boot_devs)
            if "network" in boot_devs:
                self.vendor["os/boot"] = ",".join(boot_devs)
        ordered = tuple(sorted(controllers.values(), key=lambda c: (c.bus, c.index)))
        return ordered, tuple(disks)

    def controller_model(self, ctype: str, model: str | None) -> ControllerModel:
        if ctype == "scsi":
            wanted = model or "lsilogic"
            for neutral, (kind, native) in dev.LIBVIRT_CONTROLLER.items():
                if kind == "scsi" and native == wanted:
                    return neutral
            if wanted in dev.LIBVIRT_SCSI_READ_ALIASES:
                self.vendor[f"controller/scsi@model={wanted}"] = "alias"
                return dev.LIBVIRT_SCSI_READ_ALIASES[wanted]
            raise self.fail(f"SCSI controller model {wanted!r} is not one polyvisor maps")
        return {"ide": ControllerModel.IDE, "sata": ControllerModel.AHCI, "fdc": ControllerModel.FDC}[ctype]

    def disk(self, element: ET.Element, n: int, counters: dict[str, int]) -> tuple[Disk, bool]:
        where = f"disk {n + 1}"
        kind_name = element.get("device", "disk")
        try:
            device = {"disk": DeviceKind.DISK, "cdrom": DeviceKind.CDROM, "floppy": DeviceKind.FLOPPY}[kind_name]
        except KeyError:
            raise self.fail(f"{where}: device {kind_name!r} is not supported (disk, cdrom, floppy)") from None
        disk_type = element.get("type", "file")
        source = element.find("source")
        if disk_type != "file" and source is not None and len(source.attrib):
            raise self.fail(f"{where}: only file-backed disks can be part of a package (type={disk_type!r})")
        target = element.find("target")
        if target is None or not target.get("dev"):
            raise self.fail(f"{where}: <target dev=...> is missing")
        dev_name = target.get("dev", "")
        bus_name = target.get("bus") or {"hd": "ide", "sd": "scsi", "vd": "virtio", "xv": "xen",
                                         "fd": "fdc"}.get(dev_name[:2], "")
        try:
            bus = Bus(bus_name)
        except ValueError:
            raise self.fail(f"{where}: bus {bus_name!r} is not supported") from None
        controller, unit = self.address(element, bus, dev_name, where)
        driver = element.find("driver")
        fmt = None
        if driver is not None:
            qemu_type = driver.get("type")
            if qemu_type is not None:
                fmt = _QEMU_FORMAT.get(qemu_type)
                if fmt is None:
                    raise self.fail(f"{where}: image format {qemu_type!r} is not one polyvisor handles")
            extra = {k: v for k, v in driver.attrib.items() if k not in ("name", "type")}
            if extra:
                self.vendor[f"disk/{dev_name}/driver"] = ";".join(f"{k}={v}" for k, v in sorted(extra.items()))
        path = None
        file_ref = source.get("file") if source is not None else None
        if file_ref:
            path = self.disk_source(file_ref, where)
        boot = element.find("boot")
        boot_order = None
        if boot is not None:
            try:
                boot_order = int(boot.get("order", ""))
            except ValueError:
                raise self.fail(f"{where}: <boot order> is not a number") from None
        if path is None:
            fmt = None
        for child in element:
            if child.tag not in ("driver", "source", "target", "address", "boot", "readonly"):
                self.keep(f"disk/{dev_name}/{child.tag}", child)
        return Disk(device=device, bus=bus, controller=controller, unit=unit, path=path, format=fmt,
                    boot_order=boot_order), boot is not None

    def address(self, element: ET.Element, bus: Bus, dev_name: str, where: str) -> tuple[int, int]:
        address = element.find("address")
        if bus in (Bus.VIRTIO, Bus.XEN):
            try:
                return 0, _dev_index(dev_name, _DEV_PREFIX[bus])
            except ValueError:
                raise self.fail(f"{where}: target {dev_name!r} is not a {_DEV_PREFIX[bus]}X name") from None
        if address is not None and address.get("type") == "drive":
            try:
                controller = int(address.get("controller", "0"))
                sub_bus = int(address.get("bus", "0"))
                target = int(address.get("target", "0"))
                unit = int(address.get("unit", "0"))
            except ValueError:
                raise self.fail(f"{where}: drive address has a non-numeric value") from None
            if bus == Bus.IDE:
                return controller, sub_bus * 2 + unit
            if sub_bus != 0 or target != 0:
                raise self.fail(f"{where}: drive address bus/target other than 0 is not supported")
            return controller, unit
        try:
            index = _dev_index(dev_name, _DEV_PREFIX[bus])
        except ValueError:
            raise self.fail(f"{where}: target {dev_name!r} does not match bus {bus}") from None
        per = _UNITS_PER_CONTROLLER[bus]
        return index // per, index % per

    def disk_source(self, reference: str, where: str) -> str:
        home = self.path.parent.resolve()
        target = resolve_in_package(home, reference, source=self.path, what=f"{where} source",
                                    policy=self.options.policy, must_exist=self.options.require_disks)
        try:
            name = target.relative_to(home).as_posix()
        except ValueError:
            name = target.name  # allowed by the policy but outside the package: named by its file name
        if name in self.sources and self.sources[name].path != target:
            raise self.fail(f"{where}: two disks are both called {name!r}; rename one")
        self.sources[name] = DiskSource(target)
        return name

    def other_devices(self) -> tuple[tuple[Nic, ...], tuple[Serial, ...], Graphics]:
        devices = self.root.find("devices")
        if devices is None:
            return (), (), Graphics.NONE
        nics: list[Nic] = []
        for i, element in enumerate(devices.findall("interface")):
            model_el = element.find("model")
            model_name = model_el.get("type", "") if model_el is not None else ""
            nic_model = _nic_model(model_name or "rtl8139")
            if nic_model is None:
                raise self.fail(f"interface {i + 1}: model {model_name!r} is not one polyvisor maps")
            if not model_name:
                self.vendor[f"interface/{i}/model"] = "default"
            mac_el = element.find("mac")
            mac = mac_el.get("address", "").lower() if mac_el is not None else None
            itype = element.get("type", "network")
            source = element.find("source")
            network = None
            if source is not None:
                network = source.get("network") or source.get("bridge") or source.get("dev")
            if itype != "network":
                self.vendor[f"interface/{i}/type"] = itype
            for child in element:
                if child.tag not in ("mac", "source", "model"):
                    self.keep(f"interface/{i}/{child.tag}", child)
            nics.append(Nic(nic_model, mac or None, network))
        serials: list[Serial] = []
        for element in devices.findall("serial"):
            target = element.find("target")
            port = int(target.get("port", "0")) if target is not None and target.get("port", "").isdigit() else 0
            serials.append(Serial(port))
            if element.get("type", "pty") != "pty" or [c for c in element if c.tag != "target"]:
                self.keep(f"serial/{port}", element)
        for element in devices.findall("console"):
            target = element.find("target")
            ttype = target.get("type", "serial") if target is not None else "serial"
            if ttype != "serial":
                self.keep("devices/console", element)
            elif not serials:
                serials.append(Serial(0))
        graphics = Graphics.NONE
        for element in devices.findall("graphics"):
            gtype = element.get("type", "")
            if gtype in ("vnc", "spice") and graphics == Graphics.NONE:
                graphics = Graphics(gtype)
                if element_text(element) != f'<graphics type="{gtype}" autoport="yes" />':
                    self.vendor["graphics"] = element_text(element)
            else:
                self.keep("devices/graphics", element)
        for child in devices:
            if child.tag not in _HANDLED_DEVICES and child.tag != "controller":
                self.keep(f"devices/{child.tag}", child)
        return tuple(nics), tuple(sorted(serials, key=lambda s: s.port)), graphics


def _default_features(secure_boot: bool) -> str:
    """The <features> polyvisor writes when the model carries none: ACPI, APIC, and SMM for Secure Boot."""
    return "<features><acpi /><apic />" + ('<smm state="on" />' if secure_boot else "") + "</features>"


def loader_extra(loader: ET.Element) -> bool:
    """Whether a <loader> says more than "UEFI": a firmware path, readonly or secure flags."""
    return bool((loader.text or "").strip()) or bool(set(loader.attrib) - {"type"})


def model_bus(model: ControllerModel) -> Bus:
    return Controller(model).bus


def _nic_model(name: str) -> NicModel | None:
    for neutral, native in dev.LIBVIRT_NIC.items():
        if native == name:
            return neutral
    return dev.LIBVIRT_NIC_READ_ALIASES.get(name)


def _uuid(text: str, reader: _Reader) -> object:
    import uuid as uuid_module

    try:
        return uuid_module.UUID(text.strip())
    except ValueError:
        raise reader.fail(f"<uuid> {text.strip()!r} is not a UUID") from None


def _size(element: ET.Element, reader: _Reader) -> int:
    unit = element.get("unit", "KiB").lower()
    if unit not in _UNITS:
        raise reader.fail(f"<{element.tag}> unit {unit!r} unknown")
    try:
        return int((element.text or "").strip()) * _UNITS[unit]
    except ValueError:
        raise reader.fail(f"<{element.tag}> {element.text!r} is not a number") from None


def _apply_boot_devs(disks: list[Disk], boot_devs: list[str]) -> list[Disk]:
    """Turn ``<os><boot dev=...>`` into per-device boot orders: the first device of each kind, in turn."""
    kinds = {"hd": DeviceKind.DISK, "cdrom": DeviceKind.CDROM, "fd": DeviceKind.FLOPPY}
    order = 1
    result = list(disks)
    for name in boot_devs:
        kind = kinds.get(name)
        for i, disk in enumerate(result):
            if kind is not None and disk.device == kind:
                result[i] = dataclasses.replace(disk, boot_order=order)
                order += 1
                break
    return result


# ------------------------------------------------------------------ writing


def _vendor_element(vendor: Mapping[str, str], key: str) -> ET.Element | None:
    text = vendor.get(key)
    return element_from_text(text, key=key) if text is not None else None


def _kept(vendor: Mapping[str, str], prefix: str) -> list[ET.Element]:
    keys = sorted((k for k in vendor if k.startswith(prefix + "#")), key=lambda k: int(k.rsplit("#", 1)[1]))
    return [element_from_text(vendor[k], key=k) for k in keys]


def _write_domain(model: VmModel, outdir: Path) -> ET.Element:
    vendor = model.vendor_keys(CODEC)
    domain_type = vendor.get("domain@type", "kvm")
    root = ET.Element("domain", {"type": domain_type})
    ET.SubElement(root, "name").text = model.name
    if model.uuid:
        ET.SubElement(root, "uuid").text = model.uuid
    for element in _kept(vendor, "domain/title") + _kept(vendor, "domain/description"):
        root.append(element)
    metadata = ET.SubElement(root, "metadata")
    url = guestos.osinfo_url(model.os)
    kept_url = vendor.get("libosinfo")
    if kept_url and guestos.os_from_osinfo_url(kept_url, model.os.arch) == model.os:
        url = kept_url
    if url:
        lo = ET.SubElement(metadata, f"{{{LIBOSINFO_NS}}}libosinfo")
        ET.SubElement(lo, f"{{{LIBOSINFO_NS}}}os", {"id": url})
    described = guestos.os_from_osinfo_url(url, model.os.arch) if url else GuestOS(arch=model.os.arch)
    if described != model.os:
        attrs = {"family": model.os.family.value}
        for name in ("distribution", "version", "osinfo"):
            value = getattr(model.os, name)
            if value is not None:
                attrs[name] = value
        ET.SubElement(metadata, f"{{{POLYVISOR_NS}}}os", attrs)
    metadata.extend(_kept(vendor, "metadata"))
    if not len(metadata):
        root.remove(metadata)
    memory_bytes = int(vendor["memory"]) if "memory" in vendor and -(-int(vendor["memory"]) // MiB) * MiB == \
        model.memory else model.memory
    ET.SubElement(root, "memory", {"unit": "KiB"}).text = str(memory_bytes // 1024)
    current = int(vendor.get("currentMemory", memory_bytes))
    ET.SubElement(root, "currentMemory", {"unit": "KiB"}).text = str(min(current, memory_bytes) // 1024)
    ET.SubElement(root, "vcpu", {"placement": "static"}).text = str(model.cpu.count)
    root.append(_write_os(model, vendor))
    for element in _kept(vendor, "domain/features"):
        root.append(element)
    if not any(k.startswith("domain/features#") for k in vendor):
        root.append(element_from_text(_default_features(model.secure_boot), key="features"))
    cpu = _vendor_element(vendor, "cpu")
    if model.cpu.cores > 1 or model.cpu.threads > 1:
        cpu = cpu if cpu is not None else ET.Element("cpu")
        ET.SubElement(cpu, "topology", {"sockets": str(model.cpu.sockets), "dies": "1",
                                        "cores": str(model.cpu.cores), "threads": str(model.cpu.threads)})
    if cpu is not None:
        root.append(cpu)
    for key in sorted({k.rsplit("#", 1)[0] for k in vendor if k.startswith("domain/")}):
        if key not in ("domain/title", "domain/description", "domain/features"):
            root.extend(_kept(vendor, key))
    root.append(_write_devices(model, vendor, outdir))
    return root


def _write_os(model: VmModel, vendor: Mapping[str, str]) -> ET.Element:
    os_el = ET.Element("os")
    if model.firmware == Firmware.UEFI:
        os_el.set("firmware", "efi")
    machine = vendor.get("os/type@machine")
    if machine is None or dev.libvirt_machine_from(machine) != model.machine:
        machine = dev.LIBVIRT_MACHINE[model.machine]
    type_el = ET.SubElement(os_el, "type", {"arch": model.os.arch.value, "machine": machine})
    type_el.text = vendor.get("os/type", "hvm")
    if model.firmware == Firmware.UEFI:
        fw = ET.SubElement(os_el, "firmware")
        enrolled = vendor.get("os/firmware/enrolled-keys", "yes" if model.secure_boot else "no")
        ET.SubElement(fw, "feature", {"enabled": enrolled, "name": "enrolled-keys"})
        ET.SubElement(fw, "feature", {"enabled": "yes" if model.secure_boot else "no", "name": "secure-boot"})
    for key in sorted({k.rsplit("#", 1)[0] for k in vendor if k.startswith("os/") and "#" in k}):
        kept = _kept(vendor, key)
        if key == "os/loader" and model.firmware != Firmware.UEFI:
            continue
        os_el.extend(kept)
    if "os/boot" in vendor:
        for name in vendor["os/boot"].split(","):
            ET.SubElement(os_el, "boot", {"dev": name})
    return os_el


def _write_devices(model: VmModel, vendor: Mapping[str, str], outdir: Path) -> ET.Element:
    devices = ET.Element("devices")
    devices.extend(_kept(vendor, "devices/emulator"))
    use_os_boot = "os/boot" in vendor
    # disks, named per libvirt prefix in address order
    by_prefix: dict[str, list[Disk]] = {}
    for disk in sorted(model.disks, key=lambda d: (d.bus != Bus.VIRTIO, d.bus, d.controller, d.unit)):
        by_prefix.setdefault(_DEV_PREFIX[disk.bus], []).append(disk)
    for prefix, disks in by_prefix.items():
        for index, disk in enumerate(disks):
            if disk.bus in (Bus.VIRTIO, Bus.XEN) and disk.unit != index:
                index = disk.unit
            name = _dev_name(prefix, index)
            devices.append(_write_disk(model, disk, name, vendor=vendor, outdir=outdir, use_os_boot=use_os_boot))
    for ctrl in model.controllers:
        if ctrl.model in (ControllerModel.VIRTIO_BLK, ControllerModel.XEN_BLKFRONT):
            continue
        if ctrl.model not in dev.LIBVIRT_CONTROLLER:
            raise UnmappableModel(f"libvirt has no {ctrl.model} controller")
        if vendor.get(f"controller/{ctrl.bus}{ctrl.index}") == "implicit":
            continue
        kind, native = dev.LIBVIRT_CONTROLLER[ctrl.model]
        attrs = {"type": kind, "index": str(ctrl.index)}
        if native is not None:
            alias = next((k.split("=", 1)[1] for k in vendor if k.startswith("controller/scsi@model=")), None)
            attrs["model"] = alias if alias and ctrl.model == dev.LIBVIRT_SCSI_READ_ALIASES.get(alias) else native
        ET.SubElement(devices, "controller", attrs)
    devices.extend(_kept(vendor, "devices/controller"))
    for i, nic in enumerate(model.nics):
        if nic.model not in dev.LIBVIRT_NIC:
            raise UnmappableModel(f"libvirt has no {nic.model} network adapter")
        itype = vendor.get(f"interface/{i}/type", "network")
        element = ET.SubElement(devices, "interface", {"type": itype})
        if nic.mac:
            ET.SubElement(element, "mac", {"address": nic.mac})
        if nic.network is not None:
            attr = {"network": "network", "bridge": "bridge", "direct": "dev"}.get(itype)
            if attr is not None:
                ET.SubElement(element, "source", {attr: nic.network})
        if vendor.get(f"interface/{i}/model") != "default" or nic.model != NicModel.RTL8139:
            ET.SubElement(element, "model", {"type": dev.LIBVIRT_NIC[nic.model]})
        for key in sorted({k.rsplit("#", 1)[0] for k in vendor if k.startswith(f"interface/{i}/") and "#" in k}):
            element.extend(_kept(vendor, key))
    for serial in model.serials:
        kept = _kept(vendor, f"serial/{serial.port}")
        if kept:
            devices.append(kept[0])
        else:
            element = ET.SubElement(devices, "serial", {"type": "pty"})
            ET.SubElement(element, "target", {"port": str(serial.port)})
    if model.serials:
        console = ET.SubElement(devices, "console", {"type": "pty"})
        ET.SubElement(console, "target", {"type": "serial", "port": str(model.serials[0].port)})
    devices.extend(_kept(vendor, "devices/console"))
    if model.graphics != Graphics.NONE:
        kept_graphics = _vendor_element(vendor, "graphics")
        if kept_graphics is not None and kept_graphics.get("type") == model.graphics.value:
            devices.append(kept_graphics)
        else:
            ET.SubElement(devices, "graphics", {"type": model.graphics.value, "autoport": "yes"})
    devices.extend(_kept(vendor, "devices/graphics"))
    for key in sorted({k.rsplit("#", 1)[0] for k in vendor if k.startswith("devices/")}):
        if key not in ("devices/emulator", "devices/controller", "devices/console", "devices/graphics"):
            devices.extend(_kept(vendor, key))
    return devices


def _write_disk(model: VmModel, disk: Disk, dev_name: str, *, vendor: Mapping[str, str], outdir: Path,
                use_os_boot: bool) -> ET.Element:
    element = ET.Element("disk", {"type": "file", "device": disk.device.value})
    driver = {"name": "qemu"}
    if disk.format is not None:
        driver["type"] = _FORMAT_QEMU[disk.format]
    extra = vendor.get(f"disk/{dev_name}/driver")
    if extra:
        for pair in extra.split(";"):
            key, _, value = pair.partition("=")
            driver[key] = value
    ET.SubElement(element, "driver", driver)
    if disk.path is not None:
        ET.SubElement(element, "source", {"file": str(outdir / disk.path)})
    ET.SubElement(element, "target", {"dev": dev_name, "bus": dev.LIBVIRT_DISK_BUS[disk.bus.value]})
    if disk.device == DeviceKind.CDROM:
        ET.SubElement(element, "readonly")
    if disk.boot_order is not None and not use_os_boot:
        ET.SubElement(element, "boot", {"order": str(disk.boot_order)})
    if disk.bus not in (Bus.VIRTIO, Bus.XEN):
        if disk.bus == Bus.IDE:
            address = {"controller": disk.controller, "bus": disk.unit // 2, "unit": disk.unit % 2}
        else:
            address = {"controller": disk.controller, "bus": 0, "unit": disk.unit}
        ET.SubElement(element, "address", {"type": "drive", "controller": str(address["controller"]),
                                           "bus": str(address["bus"]), "target": "0", "unit": str(address["unit"])})
    for key in sorted({k.rsplit("#", 1)[0] for k in vendor if k.startswith(f"disk/{dev_name}/") and "#" in k}):
        element.extend(_kept(vendor, key))
    return element
