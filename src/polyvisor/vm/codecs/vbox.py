"""VirtualBox machine settings (``.vbox``) and the images its media registry names.

The settings file is XML in the ``http://www.virtualbox.org/`` namespace
(VirtualBox SDK reference, "VirtualBox settings file format", and the
``VirtualBox-settings.xsd`` schema shipped with VirtualBox): ``<VirtualBox>
<Machine uuid name OSType>`` holding ``<MediaRegistry>`` (``<HardDisks>
<HardDisk uuid location format>``, ``<DVDImages>``, ``<FloppyImages>``),
``<Hardware>`` (``<CPU count>``, ``<Memory RAMSize>`` in MiB, ``<Firmware
type>``, ``<Chipset type>``, ``<Boot><Order>``, ``<Network><Adapter slot
enabled MACAddress type>`` with its attachment element, ``<UART><Port slot
enabled>``) and ``<StorageControllers>`` with ``<AttachedDevice type port
device><Image uuid>``.  VirtualBox 7.1's ``<Platform>`` wrapper (chipset and
firmware) is read too.

Read with defusedxml (no DTD, no entities).  Image locations are relative
to the .vbox directory; ``..`` and absolute paths outside the package are
refused unless the read policy allows them.  Differencing images (children
in the media registry) are refused: merge snapshots first.

Mapping: ``Machine@uuid`` is the model UUID (VirtualBox derives the SMBIOS
UUID from it); a model without one gets a UUID derived from its name, which
reads back as none.  Elements and attributes not mapped are kept in
``vendor["vbox"]`` and written back.  Not kept (``lossy``): the vCPU topology
(VirtualBox has a count only), Secure Boot (kept in the NVRAM file, not the
XML), the display protocol (VirtualBox's remote display is RDP), disk
capacity and subformat (properties of the image files).
"""

from __future__ import annotations

import dataclasses
import re
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from polyvisor.errors import PackageError, UnmappableModel
from polyvisor.vm.codecs import register_codec
from polyvisor.vm.codecs._common import ImageFinder, derived_uuid, disk_files, file_stem, truthy
from polyvisor.vm.codecs._xmlvendor import element_from_text, element_text, local
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
    Machine,
    MiB,
    Nic,
    NicModel,
    Serial,
    VmModel,
)
from polyvisor.vm.safety import parse_xml, read_limited, single_descriptor, xml_bytes

NS = "http://www.virtualbox.org/"
ET.register_namespace("", NS)
CODEC = "vbox"
SETTINGS_VERSION = "1.16-linux"
C = ControllerModel

#: StorageController@type -> model, and the (name, type) written per model.
_CONTROLLER_READ = {"piix3": C.IDE, "piix4": C.IDE, "ich6": C.IDE, "ahci": C.AHCI, "lsilogic": C.LSILOGIC,
                    "lsilogicsas": C.LSISAS, "buslogic": C.BUSLOGIC, "nvme": C.NVME, "virtioscsi": C.VIRTIO_SCSI,
                    "i82078": C.FDC}
_CONTROLLER_WRITE = {C.IDE: ("IDE", "PIIX4"), C.AHCI: ("SATA", "AHCI"), C.LSILOGIC: ("SCSI", "LsiLogic"),
                     C.LSISAS: ("SAS", "LsiLogicSas"), C.BUSLOGIC: ("BusLogic", "BusLogic"),
                     C.NVME: ("NVMe", "NVMe"), C.VIRTIO_SCSI: ("VirtIO", "VirtioSCSI"), C.FDC: ("Floppy", "I82078")}
_PORTS = {C.IDE: 2, C.AHCI: 30, C.LSILOGIC: 16, C.LSISAS: 8, C.BUSLOGIC: 16, C.NVME: 255, C.VIRTIO_SCSI: 255,
          C.FDC: 1}
#: Adapter@type (VirtualBox NetworkAdapterType) per NIC model.
_NIC_WRITE = {NicModel.E1000: "82540EM", NicModel.PCNET: "Am79C973", NicModel.VIRTIO_NET: "virtio"}
_NIC_READ = {"am79c970a": NicModel.PCNET, "am79c973": NicModel.PCNET, "am79c960": NicModel.PCNET,
             "82540em": NicModel.E1000, "82543gc": NicModel.E1000, "82545em": NicModel.E1000,
             "virtio": NicModel.VIRTIO_NET}
_ATTACHMENTS = ("NAT", "BridgedInterface", "InternalNetwork", "HostOnlyInterface", "GenericInterface",
                "NATNetwork", "CloudNetwork")
_DEVICE_TYPES = {"HardDisk": DeviceKind.DISK, "DVD": DeviceKind.CDROM, "Floppy": DeviceKind.FLOPPY}
_HANDLED_HARDWARE = {"CPU", "Memory", "Firmware", "Chipset", "Boot", "Network", "UART", "StorageControllers",
                     "Platform"}


def q(name: str) -> str:
    """A tag in the VirtualBox namespace."""
    return f"{{{NS}}}{name}"


@register_codec
class VboxCodec(Codec):
    """A VirtualBox ``.vbox`` machine and its images."""

    name = CODEC
    description = "VirtualBox machine settings (.vbox XML) and the images its media registry names"
    suffixes = (".vbox",)
    disk_formats = (("vdi", None), ("vmdk", None), ("vhd", None))
    lossy = frozenset({"cpu.topology", "secure_boot", "graphics", "disks.capacity", "disks.subformat", "os.version",
                       "os.osinfo",
                       "disks.boot_order"})
    target = "virtualbox"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if path.is_dir():
            return 60 if len(list(path.glob("*.vbox"))) == 1 else 0
        return 95 if b"<VirtualBox" in head[:4096] and NS.encode() in head[:4096] else 0

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = single_descriptor(path, ".vbox")
        root = parse_xml(read_limited(path, options.max_descriptor, what=".vbox settings"), source=path)
        if root.tag != q("VirtualBox"):
            raise PackageError(f"root element is {root.tag}, not VirtualBox settings", path=path)
        machine = root.find(q("Machine"))
        if machine is None:
            raise PackageError("<Machine> is missing", path=path)
        reader = _Reader(path, machine, options)
        model = reader.model()
        return VmPackage(model=model.validate(source=str(path)), codec=CODEC, source=path,
                         disks=reader.finder.sources)

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        names = disk_files(model, disk_paths)
        for disk in model.disks:
            if disk.device == DeviceKind.DISK and disk.format not in (None, "vdi", "vmdk", "vhd"):
                raise UnmappableModel(f"VirtualBox disks are VDI, VMDK or VHD, not {disk.format} ({disk.path})")
        root = build_vbox(model)
        with OutputFiles(Path(outdir)) as files:
            for name in names:
                files.copy(name, disk_paths[name])
            files.write_bytes(f"{file_stem(model.name)}.vbox", xml_bytes(root))
        return files.names


class _Reader:
    def __init__(self, path: Path, machine: ET.Element, options: ReadOptions) -> None:
        self.path = path
        self.machine = machine
        self.options = options
        self.finder = ImageFinder(path.parent, path, options)
        self.vendor: dict[str, str] = {}

    def fail(self, message: str) -> PackageError:
        return PackageError(message, path=self.path)

    def model(self) -> VmModel:
        m = self.machine
        name = m.get("name") or self.path.stem
        uuid = _uuid(m.get("uuid"))
        if uuid == derived_uuid("vbox", name):
            uuid = None
        ostype = m.get("OSType", "Other")
        os = guestos.os_from_native("vbox", ostype) or guestos.guess_os(ostype)
        if guestos.lookup(os, "vbox") != ostype:
            self.vendor["OSType"] = ostype
        for attr, value in m.attrib.items():
            if attr not in ("uuid", "name", "OSType", "currentSnapshot", "snapshotFolder", "lastStateChange",
                            "stateFile"):
                self.vendor[f"Machine@{attr}"] = value
        if m.get("currentSnapshot"):
            raise self.fail("the machine has snapshots; delete or merge them in VirtualBox first")
        hardware = m.find(q("Hardware"))
        if hardware is None:
            raise self.fail("<Hardware> is missing")
        cpu_el = hardware.find(q("CPU"))
        memory_el = hardware.find(q("Memory"))
        try:
            count = int(cpu_el.get("count", "1")) if cpu_el is not None else 1
            memory = int(memory_el.get("RAMSize", "0")) * MiB if memory_el is not None else 0
        except ValueError:
            raise self.fail("CPU@count or Memory@RAMSize is not a number") from None
        if memory <= 0:
            raise self.fail("Memory@RAMSize is missing or zero")
        if cpu_el is not None and (cpu_el.attrib.keys() - {"count"} or len(cpu_el)):
            rest = ET.Element(cpu_el.tag, {k: v for k, v in cpu_el.attrib.items() if k != "count"})
            rest.extend(cpu_el)
            self.vendor["CPU"] = element_text(rest)
        platform = hardware.find(q("Platform"))
        holder = platform if platform is not None else hardware
        fw_el = holder.find(q("Firmware"))
        firmware = Firmware.UEFI if fw_el is not None and fw_el.get("type", "BIOS").upper().startswith("EFI") \
            else Firmware.BIOS
        if fw_el is not None and fw_el.get("type", "BIOS") not in ("BIOS", "EFI"):
            self.vendor["Firmware@type"] = fw_el.get("type", "")
        chipset_el = holder.find(q("Chipset"))
        chipset = chipset_el.get("type", "PIIX3") if chipset_el is not None else "PIIX3"
        machine = Machine.Q35 if chipset.upper() == "ICH9" else Machine.I440FX
        for child in hardware:
            tag = local(child.tag)
            if tag not in _HANDLED_HARDWARE:
                self.vendor[f"Hardware/{tag}"] = element_text(child)
        for child in m:
            tag = local(child.tag)
            if tag not in ("MediaRegistry", "Hardware", "StorageControllers", "Snapshot"):
                self.vendor[f"Machine/{tag}"] = element_text(child)
        media = self.media()
        controllers, disks = self.storage(media, hardware)
        nics = self.nics(hardware)
        uart = hardware.find(q("UART"))
        serials = tuple(Serial(int(port.get("slot", "0"))) for port in (uart if uart is not None else [])
                        if truthy(port.get("enabled")) and port.get("slot", "0").isdigit())
        model = VmModel(name=name, memory=memory, cpu=Cpu(1, count, 1), uuid=uuid, firmware=firmware,
                        machine=machine, os=os, controllers=controllers, disks=disks, nics=nics, serials=serials)
        return model.with_vendor(CODEC, self.vendor)

    def media(self) -> dict[str, tuple[str, str | None]]:
        """Image UUID -> (package path, format)."""
        registry = self.machine.find(q("MediaRegistry"))
        found: dict[str, tuple[str, str | None]] = {}
        if registry is None:
            return found
        for group, kind in (("HardDisks", "HardDisk"), ("DVDImages", "Image"), ("FloppyImages", "Image")):
            holder = registry.find(q(group))
            for image in holder.findall(q(kind)) if holder is not None else []:
                if len(image.findall(q(kind))):
                    raise self.fail(f"image {image.get('location')!r} has differencing children (snapshots); "
                                    "merge them first")
                location = image.get("location", "")
                image_id = _uuid(image.get("uuid"))
                if image_id is None:
                    raise self.fail(f"image {location!r} has no valid uuid")
                name = self.finder.add(location, f"{group} location")
                fmt = (image.get("format") or ("RAW" if group != "HardDisks" else "VDI")).lower()
                found[image_id] = (name, {"vdi": "vdi", "vmdk": "vmdk", "vhd": "vhd", "raw": "raw",
                                          "iso": "raw"}.get(fmt))
        return found

    def storage(self, media: dict[str, tuple[str, str | None]],
                hardware: ET.Element) -> tuple[tuple[Controller, ...], tuple[Disk, ...]]:
        holder = self.machine.find(q("StorageControllers"))
        if holder is None:
            holder = hardware.find(q("StorageControllers"))
        controllers: list[Controller] = []
        disks: list[Disk] = []
        counts: dict[Bus, int] = {}
        boot_kinds = self.boot_kinds(hardware)
        for element in holder if holder is not None else []:
            ctype = element.get("type", "")
            model = _CONTROLLER_READ.get(ctype.lower())
            if model is None:
                raise self.fail(f"storage controller type {ctype!r} is not one polyvisor maps")
            bus = Controller(model).bus
            index = counts.get(bus, 0)
            counts[bus] = index + 1
            controllers.append(Controller(model, index))
            label = f"{bus}{index}"
            expected_name, expected_type = _CONTROLLER_WRITE[model]
            if element.get("name") != expected_name:
                self.vendor[f"controller/{label}@name"] = element.get("name", "")
            if ctype != expected_type:
                self.vendor[f"controller/{label}@type"] = ctype
            for attached in element.findall(q("AttachedDevice")):
                kind = _DEVICE_TYPES.get(attached.get("type", ""))
                if kind is None:
                    raise self.fail(f"attached device type {attached.get('type')!r} unknown")
                try:
                    port, device = int(attached.get("port", "0")), int(attached.get("device", "0"))
                except ValueError:
                    raise self.fail("AttachedDevice port/device is not a number") from None
                unit = port * 2 + device if bus == Bus.IDE else port
                image = attached.find(q("Image"))
                path = fmt = None
                if image is not None:
                    image_id = _uuid(image.get("uuid"))
                    if image_id not in media:
                        raise self.fail(f"attached image {image.get('uuid')!r} is not in the media registry")
                    path, fmt = media[image_id]
                elif kind == DeviceKind.DISK:
                    raise self.fail(f"{label} port {port}: a hard disk without an image")
                disks.append(Disk(kind, bus, index, unit, path, fmt))
        ordered: list[Disk] = []
        position = 1
        for kind in boot_kinds:
            for disk in disks:
                if disk.device == kind and all(d is not disk for d in ordered):
                    ordered.append(disk)
                    break
        with_order = {id(d): i for i, d in enumerate(ordered, position)}
        disks = [dataclasses.replace(d, boot_order=with_order.get(id(d))) for d in disks]
        return tuple(controllers), tuple(disks)

    def boot_kinds(self, hardware: ET.Element) -> list[DeviceKind]:
        boot = hardware.find(q("Boot"))
        kinds: list[DeviceKind] = []
        if boot is None:
            return [DeviceKind.FLOPPY, DeviceKind.CDROM, DeviceKind.DISK]  # VirtualBox's default order
        for order in sorted(boot.findall(q("Order")), key=lambda o: int(o.get("position", "0") or "0")):
            kind = _DEVICE_TYPES.get(order.get("device", "None"))
            if kind is not None and kind not in kinds:
                kinds.append(kind)
            elif order.get("device") == "Network":
                self.vendor["Boot/Network"] = order.get("position", "")
        return kinds

    def nics(self, hardware: ET.Element) -> tuple[Nic, ...]:
        network = hardware.find(q("Network"))
        nics: list[Nic] = []
        for adapter in sorted(network.findall(q("Adapter")) if network is not None else [],
                              key=lambda a: int(a.get("slot", "0") or "0")):
            if not truthy(adapter.get("enabled")):
                continue
            n = len(nics)
            model = _NIC_READ.get(adapter.get("type", "Am79C973").lower())
            if model is None:
                raise self.fail(f"network adapter type {adapter.get('type')!r} is not one polyvisor maps")
            if adapter.get("type", "Am79C973") != _NIC_WRITE[model]:
                self.vendor[f"Adapter/{n}@type"] = adapter.get("type", "Am79C973")
            mac_text = adapter.get("MACAddress", "")
            mac = ":".join(mac_text[i:i + 2] for i in range(0, 12, 2)).lower() \
                if re.fullmatch(r"[0-9A-Fa-f]{12}", mac_text) else None
            network_name: str | None = None
            for child in adapter:
                tag = local(child.tag)
                if tag == "NAT":
                    network_name = "nat"
                    if len(child) or child.attrib:
                        self.vendor[f"Adapter/{n}/NAT"] = element_text(child)
                elif tag in _ATTACHMENTS:
                    network_name = child.get("name")
                    if tag != "BridgedInterface":
                        self.vendor[f"Adapter/{n}/attachment"] = tag
                else:
                    self.vendor[f"Adapter/{n}/{tag}"] = element_text(child)
            nics.append(Nic(model, mac, network_name))
        return tuple(nics)


def _uuid(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return str(uuid_module.UUID(text.strip("{}")))
    except ValueError:
        return None


def build_vbox(model: VmModel) -> ET.Element:
    """The settings tree for *model* (images referenced by their package paths)."""
    vendor = model.vendor_keys(CODEC)
    root = ET.Element(q("VirtualBox"), {"version": SETTINGS_VERSION})
    ostype = vendor.get("OSType")
    if ostype is None or (guestos.os_from_native("vbox", ostype) or guestos.guess_os(ostype)) != model.os:
        ostype = str(guestos.lookup(model.os, "vbox") or "Other")
    attrs = {"uuid": "{" + (model.uuid or derived_uuid("vbox", model.name)) + "}", "name": model.name,
             "OSType": ostype}
    attrs.update({k.split("@", 1)[1]: v for k, v in vendor.items() if k.startswith("Machine@")})
    machine = ET.SubElement(root, q("Machine"), attrs)
    registry = ET.SubElement(machine, q("MediaRegistry"))
    image_ids: dict[str, str] = {}
    groups: dict[str, ET.Element] = {}
    for disk in model.disks:
        if disk.path is None or disk.path in image_ids:
            continue
        image_ids[disk.path] = str(uuid_module.uuid5(uuid_module.NAMESPACE_URL, f"polyvisor:{model.name}/"
                                                                                 f"{disk.path}"))
        group, kind = {DeviceKind.DISK: ("HardDisks", "HardDisk"), DeviceKind.CDROM: ("DVDImages", "Image"),
                       DeviceKind.FLOPPY: ("FloppyImages", "Image")}[disk.device]
        if group not in groups:
            groups[group] = ET.SubElement(registry, q(group))
        image_attrs = {"uuid": "{" + image_ids[disk.path] + "}", "location": disk.path}
        if disk.device == DeviceKind.DISK:
            image_attrs.update({"format": (disk.format or "vdi").upper(), "type": "Normal"})
        ET.SubElement(groups[group], q(kind), image_attrs)
    for key in sorted(k for k in vendor if k.startswith("Machine/")):
        machine.append(element_from_text(vendor[key], key=key))
    hardware = ET.SubElement(machine, q("Hardware"))
    cpu = element_from_text(vendor["CPU"], key="CPU") if "CPU" in vendor else ET.Element(q("CPU"))
    cpu.set("count", str(model.cpu.count))
    hardware.append(cpu)
    ET.SubElement(hardware, q("Memory"), {"RAMSize": str(model.memory // MiB)})
    fw_type = vendor.get("Firmware@type") if model.firmware == Firmware.UEFI and \
        vendor.get("Firmware@type", "").upper().startswith("EFI") else None
    ET.SubElement(hardware, q("Firmware"), {"type": fw_type or ("EFI" if model.firmware == Firmware.UEFI
                                                                 else "BIOS")})
    if model.machine == Machine.Q35:
        ET.SubElement(hardware, q("Chipset"), {"type": "ICH9"})
    boot = ET.SubElement(hardware, q("Boot"))
    kinds = {DeviceKind.DISK: "HardDisk", DeviceKind.CDROM: "DVD", DeviceKind.FLOPPY: "Floppy"}
    order = list(dict.fromkeys(kinds[d.device] for d in sorted(
        (d for d in model.disks if d.boot_order is not None), key=lambda d: d.boot_order or 0)))
    network_position = vendor.get("Boot/Network")
    slots: list[str] = order[:4]
    if network_position and network_position.isdigit() and len(slots) < 4:
        slots.insert(min(int(network_position) - 1, len(slots)), "Network")
    while len(slots) < 4:
        slots.append("None")
    for position, slot in enumerate(slots, 1):
        ET.SubElement(boot, q("Order"), {"position": str(position), "device": slot})
    network = ET.SubElement(hardware, q("Network"))
    for n, nic in enumerate(model.nics):
        if nic.model not in _NIC_WRITE:
            raise UnmappableModel(f"VirtualBox has no {nic.model} network adapter")
        nic_type = vendor.get(f"Adapter/{n}@type")
        if nic_type is None or _NIC_READ.get(nic_type.lower()) != nic.model:
            nic_type = _NIC_WRITE[nic.model]
        adapter_attrs = {"slot": str(n), "enabled": "true", "type": nic_type}
        if nic.mac:
            adapter_attrs["MACAddress"] = nic.mac.replace(":", "").upper()
        adapter = ET.SubElement(network, q("Adapter"), adapter_attrs)
        attachment = vendor.get(f"Adapter/{n}/attachment")
        if nic.network == "nat" and attachment is None:
            kept = vendor.get(f"Adapter/{n}/NAT")
            adapter.append(element_from_text(kept, key="NAT") if kept else ET.Element(q("NAT")))
        elif nic.network is not None:
            ET.SubElement(adapter, q(attachment or "BridgedInterface"), {"name": nic.network})
        for key in sorted(k for k in vendor if k.startswith(f"Adapter/{n}/") and k.count("/") == 2
                          and k.rsplit("/", 1)[1] not in ("NAT", "attachment")):
            adapter.append(element_from_text(vendor[key], key=key))
    uart = ET.SubElement(hardware, q("UART"))
    for serial in model.serials:
        if serial.port > 3:
            raise UnmappableModel(f"VirtualBox has UARTs 0-3, not {serial.port}")
        io_base = ("0x3f8", "0x2f8", "0x3e8", "0x2e8")[serial.port]
        ET.SubElement(uart, q("Port"), {"slot": str(serial.port), "enabled": "true", "IOBase": io_base,
                                        "IRQ": "4" if serial.port % 2 == 0 else "3", "hostMode": "Disconnected"})
    for key in sorted(k for k in vendor if k.startswith("Hardware/")):
        hardware.append(element_from_text(vendor[key], key=key))
    storage = ET.SubElement(machine, q("StorageControllers"))
    for ctrl in model.controllers:
        if ctrl.model not in _CONTROLLER_WRITE:
            raise UnmappableModel(f"VirtualBox has no {ctrl.model} controller")
        label = f"{ctrl.bus}{ctrl.index}"
        name, ctype = _CONTROLLER_WRITE[ctrl.model]
        name = vendor.get(f"controller/{label}@name", name if ctrl.index == 0 else f"{name} {ctrl.index}")
        kept_type = vendor.get(f"controller/{label}@type")
        if kept_type is not None and _CONTROLLER_READ.get(kept_type.lower()) == ctrl.model:
            ctype = kept_type
        attached = [d for d in model.disks if d.bus == ctrl.bus and d.controller == ctrl.index]
        ports = max([_PORTS[ctrl.model] if ctrl.bus == Bus.IDE else 1] +
                    [d.unit // 2 + 1 if ctrl.bus == Bus.IDE else d.unit + 1 for d in attached])
        element = ET.SubElement(storage, q("StorageController"), {
            "name": name, "type": ctype, "PortCount": str(ports), "useHostIOCache": "false",
            "Bootable": "true"})
        for disk in attached:
            port, device = (disk.unit // 2, disk.unit % 2) if disk.bus == Bus.IDE else (disk.unit, 0)
            dev_attrs = {"type": {DeviceKind.DISK: "HardDisk", DeviceKind.CDROM: "DVD",
                                  DeviceKind.FLOPPY: "Floppy"}[disk.device],
                         "hotpluggable": "false", "port": str(port), "device": str(device)}
            if disk.device == DeviceKind.CDROM:
                dev_attrs["passthrough"] = "false"
            dev_el = ET.SubElement(element, q("AttachedDevice"), dev_attrs)
            if disk.path is not None:
                ET.SubElement(dev_el, q("Image"), {"uuid": "{" + image_ids[disk.path] + "}"})
    return root


__all__ = ["VboxCodec", "build_vbox"]
