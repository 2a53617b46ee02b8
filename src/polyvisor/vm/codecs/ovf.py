"""OVF 1.x/2.x descriptors (``ovf``) and OVA archives (``ova``).

Reading understands the DMTF form and the VMware (``vmw:osType``,
``vmw:Config firmware=efi``, ``vmw:CoresPerSocket``, ``vmw:ExtraConfig``)
and VirtualBox (``vbox:OSType``, ``vbox:Machine`` firmware/chipset/UUID/MACs,
OVF 2.0 ``StorageItem``/``EthernetPortItem``) dialects.  Writing produces DMTF
OVF 1.0 that validates against DSP8023 1.0.0, with the ``vmw:`` extensions
VMware importers need, and a SHA256 manifest.

An OVA is a ustar archive: the ``.ovf`` first, then the ``.mf``, then the
disks.  Reading an OVA extracts nothing: members are checked (regular files
with safe names only), the descriptor and manifest are read under a size
limit, and disk members are hashed by streaming; the package's disks are
slices of the archive (:meth:`VmPackage.extract` copies them out).

Not kept by a round trip (``lossy``): the BIOS UUID, the chipset, the
display protocol and boot order (OVF 1.0 has no element for them; VMware's
``vmw:BootOrderSection`` is rejected by the DMTF schema), SMT threads (folded
into cores, as VMware does), disk subformat details beyond the format URI;
``vbox:Machine`` is read but not written back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from polyvisor.errors import ManifestMismatch, PackageError, UnmappableModel, UnsafePackage
from polyvisor.vm.codecs import register_codec
from polyvisor.vm.codecs._xmlvendor import element_from_text, element_text, local
from polyvisor.vm.codecs.codec import COPY_CHUNK, Codec, DiskSource, OutputFiles, ReadOptions, VmPackage
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
    GuestOS,
    MiB,
    Nic,
    OsFamily,
    Serial,
    VmModel,
    check_package_path,
)
from polyvisor.vm.safety import parse_xml, read_limited, resolve_in_package, single_descriptor, tar_members, xml_bytes

OVF1 = "http://schemas.dmtf.org/ovf/envelope/1"
OVF2 = "http://schemas.dmtf.org/ovf/envelope/2"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW = "http://www.vmware.com/schema/ovf"
VBOX = "http://www.virtualbox.org/ovf/machine"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
CIM = "http://schemas.dmtf.org/wbem/wscim/1/common"
PV = "https://polyvisor.invalid/xmlns/ovf/1"
for _prefix, _uri in (("ovf", OVF1), ("rasd", RASD), ("vssd", VSSD), ("vmw", VMW), ("vbox", VBOX), ("xsi", XSI),
                      ("cim", CIM), ("polyvisor", PV)):
    ET.register_namespace(_prefix, _uri)

#: OVF disk format URIs (VMware's vmdk specification anchors; VirtualBox's VHD link; virt-v2v's qcow2 link).
FORMAT_URI: dict[tuple[str, str | None], str] = {
    ("vmdk", "streamOptimized"): "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized",
    ("vmdk", "monolithicSparse"): "http://www.vmware.com/interfaces/specifications/vmdk.html#sparse",
    ("vhd", None): "http://go.microsoft.com/fwlink/?LinkId=137171",
    ("qcow2", None): "http://www.gnome.org/~markmc/qcow-image-format.html",
}
_URI_FORMAT: dict[str, tuple[str, str | None]] = {uri.lower(): key for key, uri in FORMAT_URI.items()}
_URI_FORMAT.update({
    "http://www.vmware.com/specifications/vmdk.html#sparse": ("vmdk", "monolithicSparse"),
    "http://www.vmware.com/interfaces/specifications/vmdk.html#compressed": ("vmdk", "streamOptimized"),
    "http://www.vmware.com/specifications/vmdk.html#compressed": ("vmdk", "streamOptimized"),
})

#: Written when the model says nothing else (VirtualSystemType: ESXi 6.7 hardware).
DEFAULT_SYSTEM_TYPE = "vmx-14"
MANIFEST_RE = re.compile(r"^\s*(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")
MAX_MEMBERS = 4096
CODEC = "ovf"
_OVF_VENDOR_SECTIONS = {"AnnotationSection", "ProductSection", "EulaSection"}


# ======================================================================== reading


@dataclass
class _Item:
    kind: str  # local tag: Item, StorageItem, EthernetPortItem
    values: dict[str, list[str]]
    extra: list[ET.Element]  # vendor children (vmw:Config…)
    element: ET.Element

    def get(self, name: str) -> str | None:
        found = self.values.get(name)
        return found[0] if found else None

    def int(self, name: str, default: int | None = None) -> int | None:
        text = self.get(name)
        if text is None or not text.strip().lstrip("-").isdigit():
            return default
        return int(text)


@dataclass
class _Parsed:
    """What reading an OVF descriptor produced."""

    model: VmModel
    files: dict[str, str]  # model disk path -> href (same thing)
    hrefs: list[str] = field(default_factory=list)  # every File href in References


def _parse_ovf(data: bytes, source: Path) -> _Parsed:
    root = parse_xml(data, source=source)
    ns = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    if local(root.tag) != "Envelope" or ns not in (OVF1, OVF2):
        raise PackageError(f"root element {root.tag} is not an OVF 1.x/2.x Envelope", path=source)
    return _OvfReader(root, ns, source).parse()


class _OvfReader:
    def __init__(self, root: ET.Element, ns: str, source: Path) -> None:
        self.root = root
        self.ns = ns
        self.source = source
        self.vendor: dict[str, str] = {}

    def q(self, name: str) -> str:
        return f"{{{self.ns}}}{name}"

    def attr(self, element: ET.Element, name: str) -> str | None:
        return element.get(self.q(name), element.get(name))

    def fail(self, message: str) -> PackageError:
        return PackageError(message, path=self.source)

    def parse(self) -> _Parsed:
        files = self.references()
        disks = self.disk_section()
        systems = [c for c in self.root if local(c.tag) in ("VirtualSystem", "VirtualSystemCollection")]
        if len(systems) != 1 or local(systems[0].tag) != "VirtualSystem":
            raise self.fail("only packages with exactly one VirtualSystem are supported "
                            "(a VirtualSystemCollection holds several VMs)")
        system = systems[0]
        name = (system.findtext(self.q("Name")) or "").strip() or self.attr(system, "id") or "vm"
        os = self.os_section(system)
        hardware = system.find(self.q("VirtualHardwareSection"))
        if hardware is None:
            raise self.fail("VirtualSystem has no VirtualHardwareSection")
        model = self.hardware(hardware, name, os, files, disks)
        vbox = system.find(f"{{{VBOX}}}Machine")
        if vbox is not None:
            model = self.apply_vbox(vbox, model)
        for section in system:
            if local(section.tag) in _OVF_VENDOR_SECTIONS and section.tag.startswith(f"{{{self.ns}}}"):
                text = element_text(section)
                if self.ns == OVF2:
                    text = text.replace(OVF2, OVF1)
                self.vendor[f"section/{local(section.tag)}"] = text
        model = model.with_vendor(CODEC, self.vendor)
        used = {d.path for d in model.disks if d.path}
        return _Parsed(model=model, files={p: p for p in used}, hrefs=list(files.values()))

    def references(self) -> dict[str, str]:
        refs = self.root.find(self.q("References"))
        files: dict[str, str] = {}
        if refs is None:
            return files
        for element in refs:
            if local(element.tag) != "File":
                continue
            file_id, href = self.attr(element, "id"), self.attr(element, "href")
            if not file_id or not href:
                raise self.fail("a File in References lacks ovf:id or ovf:href")
            why = check_package_path(href)
            if why is not None or "://" in href:
                raise UnsafePackage(f"File {file_id}: href {href!r} {why or 'is a URL'}", path=self.source)
            if self.attr(element, "compression") not in (None, "identity"):
                raise self.fail(f"File {href!r}: compressed files (ovf:compression) are not supported")
            if self.attr(element, "chunkSize"):
                raise self.fail(f"File {href!r}: chunked files (ovf:chunkSize) are not supported")
            files[file_id] = href
        return files

    def disk_section(self) -> dict[str, tuple[str | None, int | None, str | None, str | None]]:
        """diskId -> (fileRef, capacity, format, subformat)."""
        result: dict[str, tuple[str | None, int | None, str | None, str | None]] = {}
        for section in self.root:
            if local(section.tag) not in ("DiskSection", "VirtualDiskDesc"):
                continue
            for disk in section:
                if local(disk.tag) != "Disk":
                    continue
                disk_id = self.attr(disk, "diskId")
                if not disk_id:
                    raise self.fail("a Disk lacks ovf:diskId")
                capacity = _capacity(self.attr(disk, "capacity"), self.attr(disk, "capacityAllocationUnits"))
                uri = self.attr(disk, "format")
                fmt: tuple[str | None, str | None] = (None, None)
                if uri:
                    found = _URI_FORMAT.get(uri.lower())
                    if found is None:
                        raise self.fail(f"Disk {disk_id}: format {uri!r} is not one polyvisor handles")
                    fmt = found
                result[disk_id] = (self.attr(disk, "fileRef"), capacity, fmt[0], fmt[1])
        return result

    def os_section(self, system: ET.Element) -> GuestOS:
        section = system.find(self.q("OperatingSystemSection"))
        if section is None:
            return GuestOS()
        own = {k.split("}", 1)[1]: v for k, v in section.attrib.items() if k.startswith(f"{{{PV}}}")}
        vim = section.get(f"{{{VMW}}}osType")
        vbox = section.findtext(f"{{{VBOX}}}OSType")
        cim_text = self.attr(section, "id")
        os: GuestOS | None = None
        if vim:
            vmx = guestos.vmx_from_vim(vim)
            os = guestos.os_from_vmx(vmx) if vmx else guestos.guess_os(vim)
            if vmx is None or guestos.vim_from_vmx(guestos.vmx_guest_os(os)) != vim:
                self.vendor["vmw:osType"] = vim
        elif vbox:
            os = guestos.os_from_native("vbox", vbox) or guestos.guess_os(vbox)
        elif cim_text and cim_text.isdigit():
            os = guestos.os_from_native("cim", int(cim_text))
        os = os or GuestOS()
        if own:
            try:
                os = GuestOS(family=OsFamily(own.get("family", os.family.value)),
                             distribution=own.get("distribution", os.distribution),
                             version=own.get("version", os.version),
                             arch=Arch(own.get("arch", os.arch.value)), osinfo=own.get("osinfo", os.osinfo))
            except ValueError as exc:
                raise self.fail(f"OperatingSystemSection: {exc}") from None
        return os

    def items(self, hardware: ET.Element) -> Iterator[_Item]:
        for element in hardware:
            kind = local(element.tag)
            if kind not in ("Item", "StorageItem", "EthernetPortItem"):
                continue
            values: dict[str, list[str]] = {}
            extra: list[ET.Element] = []
            for child in element:
                uri = child.tag[1:].split("}", 1)[0] if child.tag.startswith("{") else ""
                if "wbem/wscim" in uri:
                    values.setdefault(local(child.tag), []).append((child.text or "").strip())
                else:
                    extra.append(child)
            yield _Item(kind, values, extra, element)

    def hardware(self, hardware: ET.Element, name: str, os: GuestOS, files: dict[str, str],
                 disk_info: dict[str, tuple[str | None, int | None, str | None, str | None]]) -> VmModel:
        system = hardware.find(self.q("System"))
        if system is not None:
            vst = system.findtext(f"{{{VSSD}}}VirtualSystemType")
            if vst and vst.strip() != DEFAULT_SYSTEM_TYPE:
                self.vendor["VirtualSystemType"] = vst.strip()
        firmware, secure_boot = Firmware.BIOS, False
        for element in hardware:
            if element.tag in (f"{{{VMW}}}Config", f"{{{VMW}}}ExtraConfig"):
                key = element.get(f"{{{VMW}}}key", "")
                value = element.get(f"{{{VMW}}}value", "")
                if key == "firmware":
                    firmware = Firmware.UEFI if value.lower() == "efi" else Firmware.BIOS
                elif key in ("bootOptions.efiSecureBootEnabled", "uefi.secureBoot.enabled"):
                    secure_boot = value.lower() == "true"
                else:
                    self.vendor[f"{local(element.tag)}/{key}"] = value
        cpu = Cpu()
        memory = 0
        controllers: dict[str, Controller] = {}  # InstanceID -> controller
        channels: dict[str, int] = {}  # InstanceID of an IDE channel item -> channel number
        counts: dict[Bus, int] = {}
        devices: list[_Item] = []
        nics: list[Nic] = []
        serials: list[Serial] = []
        unknown = 0
        all_items = list(self.items(hardware))
        for item in all_items:
            rtype = item.int("ResourceType", 0)
            iid = item.get("InstanceID") or ""
            subtype = (item.get("ResourceSubType") or "").lower()
            if rtype == dev.RT_PROCESSOR:
                count = item.int("VirtualQuantity", 1) or 1
                cores = 1
                for extra in item.extra:
                    if local(extra.tag) == "CoresPerSocket" and (extra.text or "").strip().isdigit():
                        cores = int((extra.text or "1").strip())
                if cores < 1 or count % cores:
                    raise self.fail(f"{count} vCPUs do not divide into sockets of {cores} cores")
                cpu = Cpu(sockets=count // cores, cores=cores)
            elif rtype == dev.RT_MEMORY:
                memory = _memory(item, self)
            elif rtype == dev.RT_IDE:
                channel = item.int("Address", None)
                existing = next((c for c in controllers.values() if c.model == ControllerModel.IDE), None)
                if existing is None:
                    existing = Controller(ControllerModel.IDE, 0)
                    counts[Bus.IDE] = 1
                controllers[iid] = existing
                channels[iid] = channel if channel is not None else len(channels)
            elif rtype in (dev.RT_SCSI, dev.RT_OTHER_STORAGE) and subtype in dev.OVF_CONTROLLER_READ:
                model = dev.OVF_CONTROLLER_READ[subtype]
                bus = Controller(model).bus
                index = counts.get(bus, 0)
                counts[bus] = index + 1
                controllers[iid] = Controller(model, index)
            elif rtype == dev.RT_SCSI:
                raise self.fail(f"SCSI controller subtype {subtype!r} is not one polyvisor maps")
            elif rtype in (dev.RT_DISK, dev.RT_CD, dev.RT_DVD, dev.RT_FLOPPY):
                devices.append(item)
            elif rtype == dev.RT_ETHERNET:
                nic_model = dev.OVF_NIC_READ.get(subtype or "e1000")
                if nic_model is None:
                    raise self.fail(f"network adapter subtype {subtype!r} is not one polyvisor maps")
                mac = (item.get("Address") or "").lower().replace("-", ":") or None
                nics.append(Nic(nic_model, mac, item.get("Connection") or None))
            elif rtype == dev.RT_SERIAL:
                port = item.int("Address", len(serials))
                serials.append(Serial(port if port is not None else len(serials)))
            else:
                self.vendor[f"item/{unknown}"] = _normalised_item(item)
                unknown += 1
        if memory <= 0:
            raise self.fail("VirtualHardwareSection has no memory item")
        disks = self.storage_devices(devices, controllers, channels, files, disk_info)
        used = {(d.bus, d.controller) for d in disks}
        ctrl_list = sorted({(c.bus, c.index): c for c in controllers.values()}.values(),
                           key=lambda c: (c.bus, c.index))
        if any(d.bus == Bus.FDC for d in disks):
            ctrl_list.append(Controller(ControllerModel.FDC, 0))
        del used
        return VmModel(name=name, memory=memory, cpu=cpu, firmware=firmware, secure_boot=secure_boot, os=os,
                       controllers=tuple(ctrl_list), disks=tuple(disks), nics=tuple(nics),
                       serials=tuple(sorted(serials, key=lambda s: s.port)))

    def storage_devices(self, items: list[_Item], controllers: dict[str, Controller], channels: dict[str, int],
                        files: dict[str, str],
                        disk_info: dict[str, tuple[str | None, int | None, str | None, str | None]]) -> list[Disk]:
        disks: list[Disk] = []
        floppies = 0
        for item in items:
            rtype = item.int("ResourceType", 0)
            device = {dev.RT_DISK: DeviceKind.DISK, dev.RT_CD: DeviceKind.CDROM, dev.RT_DVD: DeviceKind.CDROM,
                      dev.RT_FLOPPY: DeviceKind.FLOPPY}[rtype or 0]
            where = f"item {item.get('InstanceID')} ({item.get('ElementName') or device.value})"
            path: str | None = None
            capacity: int | None = None
            fmt: str | None = None
            subformat: str | None = None
            resource = item.get("HostResource") or ""
            if resource:
                match = re.match(r"^(?:ovf:)?/(disk|file)/(.+)$", resource)
                if match is None:
                    raise self.fail(f"{where}: HostResource {resource!r} is not ovf:/disk/ID or ovf:/file/ID")
                what, ident = match.groups()
                if what == "disk":
                    if ident not in disk_info:
                        raise self.fail(f"{where}: HostResource names disk {ident!r}, not in DiskSection")
                    file_ref, capacity, fmt, subformat = disk_info[ident]
                    if file_ref is not None:
                        if file_ref not in files:
                            raise self.fail(f"{where}: disk {ident!r} names file {file_ref!r}, not in References")
                        path = files[file_ref]
                    elif capacity is None:
                        raise self.fail(f"{where}: disk {ident!r} has neither a file nor a capacity")
                    else:
                        raise self.fail(f"{where}: disk {ident!r} is an empty disk to create; not supported")
                else:
                    if ident not in files:
                        raise self.fail(f"{where}: HostResource names file {ident!r}, not in References")
                    path, fmt = files[ident], "raw"
            if device == DeviceKind.FLOPPY:
                unit = item.int("AddressOnParent", floppies) or 0
                floppies += 1
                disks.append(Disk(device, Bus.FDC, 0, unit, path, fmt, subformat, capacity))
                continue
            parent = item.get("Parent") or ""
            if parent not in controllers:
                raise self.fail(f"{where}: Parent {parent!r} is not a storage controller item")
            ctrl = controllers[parent]
            unit = item.int("AddressOnParent", 0) or 0
            if ctrl.bus == Bus.IDE:
                unit = channels[parent] * 2 + unit
            disks.append(Disk(device, ctrl.bus, ctrl.index, unit, path, fmt, subformat, capacity))
        return disks

    def apply_vbox(self, machine: ET.Element, model: VmModel) -> VmModel:
        """Take what only ``vbox:Machine`` says: firmware, chipset, UUID, MAC addresses."""
        def child(parent: ET.Element, name: str) -> ET.Element | None:
            # vbox:Machine's children carry whatever default namespace the envelope declared
            return next((c for c in parent if local(c.tag) == name), None)

        hardware = child(machine, "Hardware")
        changes: dict[str, object] = {}
        uuid_text = (machine.get("uuid") or "").strip("{}")
        if uuid_text:
            import uuid as uuid_module

            with contextlib.suppress(ValueError):
                changes["uuid"] = str(uuid_module.UUID(uuid_text))
        if hardware is not None:
            def find(name: str) -> ET.Element | None:
                return child(hardware, name)

            firmware_el = find("Firmware")
            if firmware_el is not None:
                fw = dev.VBOX_FIRMWARE_READ.get((firmware_el.get("type") or "").lower())
                if fw is not None:
                    changes["firmware"] = fw
            chipset = find("Chipset")
            if chipset is not None:
                machine_type = dev.VBOX_CHIPSET_READ.get((chipset.get("type") or "").lower())
                if machine_type is not None:
                    changes["machine"] = machine_type
            network = find("Network")
            if network is not None:
                macs = [a.get("MACAddress", "") for a in network if local(a.tag) == "Adapter"
                        and a.get("enabled", "true") == "true"]
                nics = list(model.nics)
                for i, nic in enumerate(nics):
                    if nic.mac is None and i < len(macs) and re.fullmatch(r"[0-9A-Fa-f]{12}", macs[i]):
                        raw = macs[i].lower()
                        nics[i] = dataclasses.replace(nic, mac=":".join(raw[j:j + 2] for j in range(0, 12, 2)))
                changes["nics"] = tuple(nics)
        return dataclasses.replace(model, **changes)  # type: ignore[arg-type]


def _normalised_item(item: _Item) -> str:
    """An unmapped hardware item rebuilt as an OVF 1.0 ``Item`` with RASD children in schema order."""
    element = ET.Element(f"{{{OVF1}}}Item")
    for name in sorted(item.values):
        if name in ("InstanceID", "Parent"):
            continue
        for value in item.values[name]:
            ET.SubElement(element, f"{{{RASD}}}{name}").text = value
    return element_text(element)


def _capacity(text: str | None, units: str | None) -> int | None:
    if text is None or not text.strip().isdigit():
        return None
    return int(text) * _unit_factor(units or "byte")


def _unit_factor(units: str) -> int:
    text = units.replace(" ", "").lower()
    named = {"byte": 1, "bytes": 1, "kilobytes": 1 << 10, "kb": 1 << 10, "megabytes": MiB, "mb": MiB,
             "gigabytes": 1 << 30, "gb": 1 << 30}
    if text in named:
        return named[text]
    match = re.fullmatch(r"byte\*(\d+)\^(\d+)", text)
    if match:
        factor: int = int(match.group(1)) ** int(match.group(2))
        return factor
    raise PackageError(f"allocation units {units!r} not understood")


def _memory(item: _Item, reader: _OvfReader) -> int:
    quantity = item.int("VirtualQuantity", None)
    if quantity is None:
        raise reader.fail("memory item has no VirtualQuantity")
    try:
        size = quantity * _unit_factor(item.get("AllocationUnits") or "byte * 2^20")
    except PackageError as exc:
        raise reader.fail(f"memory item: {exc.reason}") from None
    return -(-size // MiB) * MiB


def _parse_manifest(data: bytes, source: Path) -> dict[str, tuple[str, str]]:
    entries: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        match = MANIFEST_RE.match(line)
        if match is None:
            raise PackageError(f"line {number} is not 'ALGO(file)= digest'", path=source)
        algo, name, digest = match.groups()
        entries[name.strip()] = (algo.lower(), digest.lower())
    return entries


def _check_manifest(manifest: dict[str, tuple[str, str]], names: list[str], source: Path) -> None:
    for name in names:
        if name not in manifest:
            raise ManifestMismatch(f"manifest has no entry for {name!r}", path=source)
    for name in manifest:
        if name not in names:
            raise ManifestMismatch(f"manifest lists {name!r}, which is not in the package", path=source)


def _digest_stream(chunks: Iterator[bytes], algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(COPY_CHUNK):
            yield chunk


# ======================================================================== writing


def _sub(parent: ET.Element, tag: str, text: str | None = None, attrib: dict[str, str] | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib or {})
    if text is not None:
        element.text = text
    return element


def _item(parent: ET.Element, values: dict[str, str], extras: list[ET.Element] | None = None) -> ET.Element:
    item = _sub(parent, f"{{{OVF1}}}Item")
    for name in sorted(values):
        _sub(item, f"{{{RASD}}}{name}", values[name])
    for extra in extras or []:
        item.append(extra)
    return item


def _vmw_config(key: str, value: str, tag: str = "Config") -> ET.Element:
    return ET.Element(f"{{{VMW}}}{tag}", {f"{{{OVF1}}}required": "false", f"{{{VMW}}}key": key,
                                          f"{{{VMW}}}value": value})


def _disk_capacity(disk: Disk, path: Path) -> int:
    if disk.capacity is not None:
        return disk.capacity
    try:
        from polyvisor.disk import open_image

        with open_image(path, disk.format) as image:
            size: int = image.virtual_size
            return size
    except Exception as exc:  # noqa: BLE001 - any failure means: capacity unknown
        raise UnmappableModel(f"OVF needs the capacity of {disk.path}; the model does not give it and "
                              f"the image could not be opened ({exc})") from None


def build_ovf(model: VmModel, disk_paths: Mapping[str, Path]) -> bytes:
    """The OVF 1.0 descriptor for *model* (disk files as named by ``Disk.path``)."""
    ET.register_namespace("polyvisor", PV)  # the libvirt codec uses the same prefix for its own namespace
    vendor = model.vendor_keys(CODEC)
    env = ET.Element(f"{{{OVF1}}}Envelope", {f"{{{OVF1}}}version": "1.0",
                                             "{http://www.w3.org/XML/1998/namespace}lang": "en-US"})
    refs = _sub(env, f"{{{OVF1}}}References")
    file_ids: dict[str, str] = {}
    for disk in model.disks:
        if disk.path is not None and disk.path not in file_ids:
            file_ids[disk.path] = f"file{len(file_ids) + 1}"
            _sub(refs, f"{{{OVF1}}}File", attrib={
                f"{{{OVF1}}}href": disk.path, f"{{{OVF1}}}id": file_ids[disk.path],
                f"{{{OVF1}}}size": str(os.path.getsize(disk_paths[disk.path]))})
    hard_disks = [d for d in model.disks if d.device == DeviceKind.DISK]
    disk_ids: dict[int, str] = {}
    if hard_disks:
        section = _sub(env, f"{{{OVF1}}}DiskSection")
        _sub(section, f"{{{OVF1}}}Info", "Virtual disk information")
        for n, disk in enumerate(hard_disks, 1):
            assert disk.path is not None
            disk_ids[id(disk)] = f"vmdisk{n}"
            attrs = {f"{{{OVF1}}}capacity": str(_disk_capacity(disk, disk_paths[disk.path])),
                     f"{{{OVF1}}}diskId": f"vmdisk{n}", f"{{{OVF1}}}fileRef": file_ids[disk.path]}
            uri = FORMAT_URI.get((disk.format or "", disk.subformat)) or FORMAT_URI.get((disk.format or "", None))
            if uri is None and disk.format == "vmdk":
                uri = FORMAT_URI[("vmdk", "streamOptimized")]
            if uri is not None:
                attrs[f"{{{OVF1}}}format"] = uri
            _sub(section, f"{{{OVF1}}}Disk", attrib=attrs)
    networks = sorted({n.network for n in model.nics if n.network})
    if networks:
        section = _sub(env, f"{{{OVF1}}}NetworkSection")
        _sub(section, f"{{{OVF1}}}Info", "The list of logical networks")
        for network in networks:
            net = _sub(section, f"{{{OVF1}}}Network", attrib={f"{{{OVF1}}}name": network})
            _sub(net, f"{{{OVF1}}}Description", f"The {network} network")
    system = _sub(env, f"{{{OVF1}}}VirtualSystem", attrib={f"{{{OVF1}}}id": model.name})
    _sub(system, f"{{{OVF1}}}Info", "A virtual machine")
    _sub(system, f"{{{OVF1}}}Name", model.name)
    for name in sorted(_OVF_VENDOR_SECTIONS):
        text = vendor.get(f"section/{name}")
        if text is not None:
            system.append(element_from_text(text, key=f"section/{name}"))
    system.append(_os_section(model, vendor))
    system.append(_hardware_section(model, vendor, disk_ids, file_ids))
    return xml_bytes(env)


def _os_section(model: VmModel, vendor: Mapping[str, str]) -> ET.Element:
    os = model.os
    cim = guestos.lookup(os, "cim")
    vmx = guestos.vmx_guest_os(os)
    vim = guestos.vim_from_vmx(vmx)
    kept = vendor.get("vmw:osType")
    if kept is not None:
        kept_vmx = guestos.vmx_from_vim(kept)
        kept_os = guestos.os_from_vmx(kept_vmx) if kept_vmx else guestos.guess_os(kept)
        if (kept_os.family, kept_os.arch) == (os.family, os.arch):
            vim = kept
    attrs = {f"{{{OVF1}}}id": str(cim)}
    if vim is not None:
        attrs[f"{{{VMW}}}osType"] = vim
    read_back = (guestos.os_from_vmx(guestos.vmx_from_vim(vim) or "") if vim and guestos.vmx_from_vim(vim)
                 else guestos.guess_os(vim) if vim else guestos.os_from_native("cim", int(str(cim))) or GuestOS())
    if read_back != os:
        attrs[f"{{{PV}}}family"] = os.family.value
        attrs[f"{{{PV}}}arch"] = os.arch.value
        for name in ("distribution", "version", "osinfo"):
            value = getattr(os, name)
            if value is not None:
                attrs[f"{{{PV}}}{name}"] = value
    section = ET.Element(f"{{{OVF1}}}OperatingSystemSection", attrs)
    _sub(section, f"{{{OVF1}}}Info", "The kind of installed guest operating system")
    return section


def _hardware_section(model: VmModel, vendor: Mapping[str, str], disk_ids: dict[int, str],
                      file_ids: dict[str, str]) -> ET.Element:
    section = ET.Element(f"{{{OVF1}}}VirtualHardwareSection")
    _sub(section, f"{{{OVF1}}}Info", "Virtual hardware requirements")
    system = _sub(section, f"{{{OVF1}}}System")
    _sub(system, f"{{{VSSD}}}ElementName", "Virtual Hardware Family")
    _sub(system, f"{{{VSSD}}}InstanceID", "0")
    _sub(system, f"{{{VSSD}}}VirtualSystemIdentifier", model.name)
    _sub(system, f"{{{VSSD}}}VirtualSystemType", vendor.get("VirtualSystemType", DEFAULT_SYSTEM_TYPE))
    next_id = iter(range(1, 1 << 20))
    count = model.cpu.count
    cores = model.cpu.cores * model.cpu.threads
    cores_el = ET.Element(f"{{{VMW}}}CoresPerSocket", {f"{{{OVF1}}}required": "false"})
    cores_el.text = str(cores)
    _item(section, {"AllocationUnits": "hertz * 10^6", "Description": "Number of Virtual CPUs",
                    "ElementName": f"{count} virtual CPU(s)", "InstanceID": str(next(next_id)),
                    "ResourceType": str(dev.RT_PROCESSOR), "VirtualQuantity": str(count)}, [cores_el])
    _item(section, {"AllocationUnits": "byte * 2^20", "Description": "Memory Size",
                    "ElementName": f"{model.memory // MiB}MB of memory", "InstanceID": str(next(next_id)),
                    "ResourceType": str(dev.RT_MEMORY), "VirtualQuantity": str(model.memory // MiB)})
    parents: dict[tuple[Bus, int], list[str]] = {}
    for ctrl in model.controllers:
        if ctrl.model == ControllerModel.FDC:
            continue
        if ctrl.model not in dev.OVF_CONTROLLER:
            raise UnmappableModel(f"OVF (as VMware reads it) has no {ctrl.model} controller")
        rtype, subtype = dev.OVF_CONTROLLER[ctrl.model]
        if ctrl.model == ControllerModel.IDE:
            ids = []
            for channel in (0, 1):
                iid = str(next(next_id))
                ids.append(iid)
                _item(section, {"Address": str(channel), "Description": "IDE Controller",
                                "ElementName": f"IDE {channel}", "InstanceID": iid, "ResourceType": str(rtype)})
            parents[(ctrl.bus, ctrl.index)] = ids
            continue
        iid = str(next(next_id))
        values = {"Address": str(ctrl.index), "Description": f"{ctrl.bus.upper()} Controller",
                  "ElementName": f"{ctrl.bus.upper()} Controller {ctrl.index}", "InstanceID": iid,
                  "ResourceType": str(rtype)}
        if subtype is not None:
            values["ResourceSubType"] = subtype
        _item(section, values)
        parents[(ctrl.bus, ctrl.index)] = [iid]
    numbers = {DeviceKind.DISK: 0, DeviceKind.CDROM: 0, DeviceKind.FLOPPY: 0}
    for disk in model.disks:
        numbers[disk.device] += 1
        values = {"InstanceID": str(next(next_id))}
        if disk.device == DeviceKind.FLOPPY:
            values.update({"AddressOnParent": str(disk.unit), "ElementName": f"Floppy drive {numbers[disk.device]}",
                           "ResourceType": str(dev.RT_FLOPPY), "AutomaticAllocation": "false"})
        else:
            ids = parents[(disk.bus, disk.controller)]
            if disk.bus == Bus.IDE:
                values.update({"AddressOnParent": str(disk.unit % 2), "Parent": ids[disk.unit // 2]})
            else:
                values.update({"AddressOnParent": str(disk.unit), "Parent": ids[0]})
            if disk.device == DeviceKind.DISK:
                values.update({"ElementName": f"Hard disk {numbers[disk.device]}",
                               "ResourceType": str(dev.RT_DISK)})
            else:
                values.update({"ElementName": f"CD/DVD drive {numbers[disk.device]}",
                               "ResourceType": str(dev.RT_CD), "AutomaticAllocation": "false"})
        if disk.device == DeviceKind.DISK:
            values["HostResource"] = f"ovf:/disk/{disk_ids[id(disk)]}"
        elif disk.path is not None:
            values["HostResource"] = f"ovf:/file/{file_ids[disk.path]}"
        _item(section, values)
    for n, nic in enumerate(model.nics, 1):
        if nic.model not in dev.OVF_NIC:
            raise UnmappableModel(f"OVF (as VMware reads it) has no {nic.model} network adapter")
        values = {"AutomaticAllocation": "true", "ElementName": f"Network adapter {n}",
                  "InstanceID": str(next(next_id)), "ResourceSubType": dev.OVF_NIC[nic.model],
                  "ResourceType": str(dev.RT_ETHERNET),
                  "Description": f"{dev.OVF_NIC[nic.model]} ethernet adapter"
                                 + (f' on "{nic.network}"' if nic.network else "")}
        if nic.mac:
            values["Address"] = nic.mac
        if nic.network:
            values["Connection"] = nic.network
        _item(section, values)
    for serial in model.serials:
        _item(section, {"Address": str(serial.port), "ElementName": f"Serial port {serial.port + 1}",
                        "InstanceID": str(next(next_id)), "ResourceType": str(dev.RT_SERIAL)})
    for key in sorted((k for k in vendor if k.startswith("item/")), key=lambda k: int(k.split("/")[1])):
        element = element_from_text(vendor[key], key=key)
        values = {local(child.tag): (child.text or "") for child in element}
        values["InstanceID"] = str(next(next_id))
        values.setdefault("ElementName", values.get("Caption") or values.get("Description") or "Device")
        _item(section, values)
    if model.firmware == Firmware.UEFI:
        section.append(_vmw_config("firmware", "efi"))
        section.append(_vmw_config("bootOptions.efiSecureBootEnabled", "true" if model.secure_boot else "false"))
    for key in sorted(vendor):
        tag, _, name = key.partition("/")
        if tag in ("Config", "ExtraConfig"):
            section.append(_vmw_config(name, vendor[key], tag))
    return section


def write_manifest(entries: list[tuple[str, str]]) -> bytes:
    """A SHA256 manifest for (name, hex digest) pairs."""
    return "".join(f"SHA256({name})= {digest}\n" for name, digest in entries).encode("utf-8")


def _stem(model: VmModel) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.name).lstrip(".")
    return safe or "vm"


# ======================================================================== codecs


@register_codec
class OvfCodec(Codec):
    """An OVF descriptor with its files beside it."""

    name = CODEC
    description = "OVF 1.x/2.x descriptor (DMTF, VMware and VirtualBox dialects; writes DMTF OVF 1.0 + vmw:)"
    suffixes = (".ovf",)
    disk_formats = (("vmdk", "streamOptimized"), ("vmdk", "monolithicSparse"), ("vhd", None), ("qcow2", None))
    lossy = frozenset({"uuid", "machine", "graphics", "disks.boot_order", "cpu.threads"})
    target = "vmware"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if path.is_dir():
            return 60 if len(list(path.glob("*.ovf"))) == 1 else 0
        text = head[:8192]
        return 90 if b"Envelope" in text and b"schemas.dmtf.org/ovf/envelope" in text else 0

    @classmethod
    def check_disks(cls, model: VmModel, disk_paths: Mapping[str, Path]) -> None:
        removable = {d.path for d in model.disks if d.device != DeviceKind.DISK and d.path}
        hard = dataclasses.replace(model, disks=tuple(d for d in model.disks if d.device == DeviceKind.DISK))
        super().check_disks(hard, disk_paths)
        for path in removable:
            if path not in disk_paths:
                raise PackageError(f"no file given for image {path!r}")

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = single_descriptor(path, ".ovf")
        data = read_limited(path, options.max_descriptor, what="OVF descriptor")
        parsed = _parse_ovf(data, path)
        home = path.parent.resolve()
        sources: dict[str, DiskSource] = {}
        for href in parsed.hrefs:
            target = resolve_in_package(home, href, source=path, what="file", policy=options.policy,
                                        must_exist=options.require_disks)
            sources[href] = DiskSource(target)
        manifest_path = path.with_suffix(".mf")
        if manifest_path.exists():
            manifest = _parse_manifest(read_limited(manifest_path, options.max_descriptor, what="manifest"),
                                       manifest_path)
            _check_manifest(manifest, [path.name, *parsed.hrefs], manifest_path)
            checked = {path.name: _file_chunks(path)}
            for href in parsed.hrefs:
                if sources[href].path.exists():
                    checked[href] = _file_chunks(sources[href].path)
            for name, chunks in checked.items():
                algo, digest = manifest[name]
                if _digest_stream(chunks, algo) != digest:
                    raise ManifestMismatch(f"{algo.upper()} digest of {name!r} does not match the manifest",
                                           path=manifest_path)
                if name in sources:
                    sources[name] = dataclasses.replace(sources[name], digest=(algo, digest))
        used = {d.path for d in parsed.model.disks if d.path}
        model = parsed.model.validate(source=str(path))
        return VmPackage(model=model, codec=cls.name, source=path,
                         disks={k: v for k, v in sources.items() if k in used})

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        cls.check_disks(model, disk_paths)
        descriptor = build_ovf(model, disk_paths)
        stem = _stem(model)
        entries = [(f"{stem}.ovf", hashlib.sha256(descriptor).hexdigest())]
        with OutputFiles(Path(outdir)) as files:
            for name in sorted({d.path for d in model.disks if d.path}):
                files.copy(name, disk_paths[name])
                entries.append((name, _digest_stream(_file_chunks(disk_paths[name]), "sha256")))
            files.write_bytes(f"{stem}.ovf", descriptor)
            files.write_bytes(f"{stem}.mf", write_manifest(entries))
        return files.names


@register_codec
class OvaCodec(Codec):
    """An OVA: a ustar archive holding the descriptor, the manifest and the disks."""

    name = "ova"
    description = "OVA archive (tar of .ovf first, .mf, disks); SHA256 manifest on write, SHA1/256/512 read"
    suffixes = (".ova",)
    disk_formats = OvfCodec.disk_formats
    lossy = OvfCodec.lossy
    target = "vmware"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if len(head) < 512 or head[257:262] != b"ustar":
            return 0
        name = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        return 95 if name.lower().endswith(".ovf") else 10

    @classmethod
    def check_disks(cls, model: VmModel, disk_paths: Mapping[str, Path]) -> None:
        OvfCodec.check_disks(model, disk_paths)

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = Path(path)
        members = _ova_members(path)
        first = members[0]
        if not first.name.lower().endswith(".ovf"):
            raise PackageError(f"the first member is {first.name!r}; an OVA starts with its .ovf descriptor",
                               path=path)
        by_name = {m.name: m for m in members}
        with open(path, "rb") as handle:
            descriptor = _read_member(handle, first, options.max_descriptor, path)
            parsed = _parse_ovf(descriptor, path)
            manifests = [m for m in members if m.name.lower().endswith(".mf")]
            if len(manifests) > 1:
                raise PackageError("more than one manifest (.mf) member", path=path)
            for href in parsed.hrefs:
                if href not in by_name:
                    raise PackageError(f"References names {href!r}, which the archive does not contain", path=path)
            digests: dict[str, tuple[str, str]] = {}
            if manifests:
                manifest = _parse_manifest(_read_member(handle, manifests[0], options.max_descriptor, path), path)
                _check_manifest(manifest, [first.name, *parsed.hrefs], path)
                for name in [first.name, *parsed.hrefs]:
                    member = by_name[name]
                    algo, digest = manifest[name]
                    if _digest_stream(_member_chunks(handle, member), algo) != digest:
                        raise ManifestMismatch(f"{algo.upper()} digest of member {name!r} does not match "
                                               "the manifest", path=path)
                    digests[name] = (algo, digest)
        used = {d.path for d in parsed.model.disks if d.path}
        sources = {name: DiskSource(path, by_name[name].offset_data, by_name[name].size, digests.get(name))
                   for name in parsed.hrefs if name in used}
        model = parsed.model.validate(source=str(path))
        return VmPackage(model=model, codec=cls.name, source=path, disks=sources)

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        cls.check_disks(model, disk_paths)
        descriptor = build_ovf(model, disk_paths)
        stem = _stem(model)
        names = sorted({d.path for d in model.disks if d.path})
        entries = [(f"{stem}.ovf", hashlib.sha256(descriptor).hexdigest())]
        entries += [(name, _digest_stream(_file_chunks(disk_paths[name]), "sha256")) for name in names]
        manifest = write_manifest(entries)
        for name in [f"{stem}.ovf", f"{stem}.mf", *names]:
            if len(name.encode("utf-8")) > 99:
                raise UnmappableModel(f"OVA member name {name!r} is longer than ustar's 99 bytes")
        with OutputFiles(Path(outdir)) as files, files.open(f"{stem}.ova") as handle, \
                    tarfile.open(fileobj=handle, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
            _add_bytes(tar, f"{stem}.ovf", descriptor)
            _add_bytes(tar, f"{stem}.mf", manifest)
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = os.path.getsize(disk_paths[name])
                info.mode = 0o644
                with open(disk_paths[name], "rb") as src:
                    tar.addfile(info, src)
        return files.names


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _ova_members(path: Path) -> list[tarfile.TarInfo]:
    """The archive's members, refusing anything but regular files with safe, unique names."""
    return tar_members(path, package="OVA", max_members=MAX_MEMBERS)


def _member_chunks(handle: IO[bytes], member: tarfile.TarInfo) -> Iterator[bytes]:
    handle.seek(member.offset_data)
    remaining = member.size
    while remaining > 0:
        chunk = handle.read(min(COPY_CHUNK, remaining))
        if not chunk:
            raise PackageError(f"member {member.name!r} is truncated")
        remaining -= len(chunk)
        yield chunk


def _read_member(handle: IO[bytes], member: tarfile.TarInfo, limit: int, path: Path) -> bytes:
    from polyvisor.errors import DescriptorTooLarge

    if member.size > limit:
        raise DescriptorTooLarge(f"member {member.name!r} is {member.size} bytes, over the {limit}-byte limit",
                                 path=path)
    return b"".join(_member_chunks(handle, member))


__all__ = ["OvaCodec", "OvfCodec", "build_ovf"]
