"""XenServer / XCP-ng XVA exports (``xe vm-export``, ``xe vm-import``).

Layout, as xapi's ``export.ml``, ``importexport.ml`` and ``stream_vdi.ml``
write and read it: an uncompressed tar whose first member ``ova.xml`` is an
XML-RPC struct ``{version: {...}, objects: [{class, id, snapshot}, ...]}``
holding the VM, VBD, VDI, VIF, network and SR records, their references
replaced by ``Ref:N`` ids.  Each exported VDI's bytes follow in the folder
named by its id: 1 MiB chunks ``Ref:N/00000000``, ``Ref:N/00000001``… in
increasing order, each followed by its checksum — ``.checksum`` (SHA-1, hex)
or, on newer XenServer, ``.xxhash`` (XXH64, 16 upper-case hex digits).  Chunks
of zeros are left out, except the first and the last, which are always
present; a zero-length chunk is a keep-alive and is skipped.

Reading never extracts: members must be regular files named ``ova.xml`` or
``Ref:N/NNNNNNNN[.checksum|.xxhash]`` (no links, no absolute or ``..``
names), ``ova.xml`` is parsed with entities refused, and every chunk is
hashed and compared with its checksum file before anything else happens.  A
disk is then a raw image assembled from its chunks (:class:`Piece`), which
:meth:`VmPackage.extract` writes sparse into the caller's directory.
Writing chunks raw disks and writes SHA-1 ``.checksum`` files, which every
xapi version verifies.

Mapped VM fields: ``name_label``, ``uuid``, ``memory_static_max``,
``VCPUs_max`` with ``platform:cores-per-socket``, ``HVM_boot_params``
(``firmware=uefi``, ``order``), ``platform:secureboot``,
``platform:hvm_serial`` (absent: a pty serial port 0; ``none``: no serial
port), VBD ``userdevice``/``type``/``empty``, VDI ``virtual_size`` and
``name_label`` (the disk's file name), VIF ``device``/``MAC`` and its
network's ``name_label``; the guest OS is kept in ``other_config``
``polyvisor-os-*`` keys.  Other ``platform`` and ``other_config`` keys are
vendor keys.  Lossy: the chipset and display (XenServer offers one of each),
SMT threads, boot order beyond one device per kind, disk subformats, serial
ports other than 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from polyvisor.disk.image import is_zero
from polyvisor.errors import DescriptorTooLarge, ManifestMismatch, PackageError, UnmappableModel, UnsafePackage
from polyvisor.vm.codecs import register_codec
from polyvisor.vm.codecs._common import derived_uuid, disk_files, file_stem, truthy
from polyvisor.vm.codecs.codec import Codec, DiskSource, OutputFiles, Piece, ReadOptions, VmPackage
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
    NicModel,
    OsFamily,
    Serial,
    VmModel,
    check_package_path,
)
from polyvisor.vm.safety import parse_xml, tar_members

CODEC = "xva"
CHUNK = 1 << 20
MAX_MEMBERS = 1 << 22
_CHUNK_NAME = re.compile(r"^(Ref:\d+)/(\d{8})(\.checksum|\.xxhash)?$")
_ALGORITHMS = {".checksum": "sha1", ".xxhash": "xxh64"}
#: platform keys polyvisor writes for every HVM guest (so reading them back adds no vendor keys).
_DEFAULT_PLATFORM = {"acpi": "1", "apic": "true", "pae": "true", "nx": "true", "viridian": "false",
                     "device-model": "qemu-upstream-compat"}
_OS_KEYS = ("family", "distribution", "version", "arch", "osinfo")
XenObject = dict[str, Any]


# ------------------------------------------------------------------ XML-RPC values


def rpc_to_python(value: ET.Element, source: Path, depth: int = 0) -> Any:
    """An XML-RPC ``<value>`` as Python (struct -> dict, array -> list, scalars -> str/int/bool)."""
    if depth > 32:
        raise UnsafePackage("XML-RPC values nested deeper than 32 levels", path=source)
    children = list(value)
    if not children:
        return value.text or ""
    if len(children) != 1:
        raise PackageError("an XML-RPC <value> holds more than one element", path=source)
    node = children[0]
    tag = node.tag
    if tag == "struct":
        result: dict[str, Any] = {}
        for member in node:
            name, inner = member.find("name"), member.find("value")
            if member.tag != "member" or name is None or inner is None:
                raise PackageError("malformed XML-RPC struct member", path=source)
            result[name.text or ""] = rpc_to_python(inner, source, depth + 1)
        return result
    if tag == "array":
        data = node.find("data")
        return [rpc_to_python(v, source, depth + 1) for v in (data if data is not None else [])]
    if tag in ("string", "dateTime.iso8601", "base64"):
        return node.text or ""
    if tag in ("i4", "int", "i8"):
        try:
            return int((node.text or "").strip())
        except ValueError:
            raise PackageError(f"XML-RPC <{tag}> {node.text!r} is not a number", path=source) from None
    if tag == "boolean":
        return (node.text or "").strip() == "1"
    if tag == "double":
        return (node.text or "").strip()
    raise PackageError(f"unknown XML-RPC type <{tag}>", path=source)


def python_to_rpc(value: Any) -> ET.Element:
    """Python -> XML-RPC ``<value>`` as xapi writes it (plain text strings, int64 as strings)."""
    element = ET.Element("value")
    if isinstance(value, bool):
        ET.SubElement(element, "boolean").text = "1" if value else "0"
    elif isinstance(value, int):
        ET.SubElement(element, "i4").text = str(value)
    elif isinstance(value, float):
        ET.SubElement(element, "double").text = repr(value)
    elif isinstance(value, str):
        element.text = value
    elif isinstance(value, dict):
        struct = ET.SubElement(element, "struct")
        for key, item in value.items():
            member = ET.SubElement(struct, "member")
            ET.SubElement(member, "name").text = key
            member.append(python_to_rpc(item))
    elif isinstance(value, list | tuple):
        data = ET.SubElement(ET.SubElement(element, "array"), "data")
        for item in value:
            data.append(python_to_rpc(item))
    else:  # pragma: no cover - a bug in the writer
        raise TypeError(f"cannot write {type(value).__name__} as XML-RPC")
    return element


# ------------------------------------------------------------------ the archive


@dataclasses.dataclass
class _Archive:
    header: dict[str, Any]
    objects: dict[str, tuple[str, XenObject]]  # id -> (class, record)
    pieces: dict[str, list[Piece]]  # Ref:N -> verified chunks


def _scan(path: Path, options: ReadOptions) -> _Archive:
    members = tar_members(
        path, package="XVA", max_members=MAX_MEMBERS, hint=" (gunzip a compressed XVA first)",
        name_problem=lambda name: None if name == "ova.xml" or _CHUNK_NAME.match(name)
        else "is neither ova.xml nor a Ref:N/NNNNNNNN chunk",
    )
    if members[0].name != "ova.xml":
        raise PackageError("the first member is not ova.xml", path=path)
    with open(path, "rb") as handle:
        first = members[0]
        if first.size > options.max_descriptor:
            raise DescriptorTooLarge(f"ova.xml is {first.size} bytes, over the {options.max_descriptor}-byte "
                                     "limit", path=path)
        handle.seek(first.offset_data)
        root = parse_xml(handle.read(first.size), source=f"{path}: ova.xml")
        header, objects = _parse_header(root, path)
        pieces = _verify_chunks(handle, members[1:], path)
    return _Archive(header, objects, pieces)


def _parse_header(root: ET.Element, path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, XenObject]]]:
    if root.tag != "value":
        raise PackageError(f"ova.xml: root element is <{root.tag}>, not an XML-RPC <value>", path=path)
    data = rpc_to_python(root, path)
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise PackageError("ova.xml: not a {version, objects} struct", path=path)
    objects: dict[str, tuple[str, XenObject]] = {}
    for obj in data["objects"]:
        if not isinstance(obj, dict) or not isinstance(obj.get("snapshot"), dict):
            raise PackageError("ova.xml: an object lacks class, id or snapshot", path=path)
        objects[str(obj.get("id"))] = (str(obj.get("class")), obj["snapshot"])
    version = data.get("version")
    return version if isinstance(version, dict) else {}, objects


def _verify_chunks(handle: IO[bytes], members: list[tarfile.TarInfo], path: Path) -> dict[str, list[Piece]]:
    """Every chunk hashed and compared with the checksum file that follows it."""
    pieces: dict[str, list[Piece]] = {}
    last: dict[str, int] = {}
    index = 0
    while index < len(members):
        member = members[index]
        match = _CHUNK_NAME.match(member.name)
        assert match is not None
        prefix, number, suffix = match.group(1), int(match.group(2)), match.group(3)
        if suffix is not None:
            raise PackageError(f"checksum member {member.name!r} does not follow its chunk", path=path)
        if member.size > CHUNK:
            raise PackageError(f"chunk {member.name!r} is {member.size} bytes, over 1 MiB", path=path)
        if index + 1 >= len(members) or not members[index + 1].name.startswith(member.name + "."):
            raise PackageError(f"chunk {member.name!r} has no checksum member after it", path=path)
        check = members[index + 1]
        algorithm = _ALGORITHMS[check.name[len(member.name):]]
        if check.size > 128:
            raise PackageError(f"checksum member {check.name!r} is too large", path=path)
        handle.seek(member.offset_data)
        data = handle.read(member.size)
        handle.seek(check.offset_data)
        expected = handle.read(check.size).decode("ascii", "replace").strip()
        actual = _digest(algorithm, data)
        if actual.lower() != expected.lower():
            raise ManifestMismatch(f"chunk {member.name!r}: {algorithm} checksum {actual} does not match "
                                   f"{check.name!r} ({expected[:40]})", path=path)
        index += 2
        if member.size == 0:
            continue  # keep-alive written while the exporter waited
        if number <= last.get(prefix, -1):
            raise PackageError(f"chunk {member.name!r} is out of order", path=path)
        last[prefix] = number
        pieces.setdefault(prefix, []).append(Piece(number * CHUNK, member.offset_data, member.size,
                                                   (algorithm, expected.upper() if algorithm == "xxh64"
                                                    else expected.lower())))
    return pieces


def _digest(algorithm: str, data: bytes) -> str:
    if algorithm == "xxh64":
        try:
            import xxhash
        except ImportError:  # the checksums of newer XenServer exports (PyPI package xxhash)
            raise PackageError("verifying .xxhash (XXH64) checksums needs the Python package xxhash") from None

        return f"{xxhash.xxh64_intdigest(data):016X}"
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


# ------------------------------------------------------------------ reading the model


def _ref_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _number(record: XenObject, key: str, path: Path, default: int | None = None) -> int:
    value = record.get(key, default)
    try:
        return int(str(value))
    except (TypeError, ValueError):
        raise PackageError(f"ova.xml: {key} {value!r} is not a number", path=path) from None


def _model(archive: _Archive, path: Path) -> tuple[VmModel, dict[str, DiskSource]]:
    vms = [(i, rec) for i, (cls, rec) in archive.objects.items() if cls == "VM" and not rec.get("is_a_snapshot")]
    if len(vms) != 1:
        raise PackageError(f"ova.xml holds {len(vms)} VMs; polyvisor reads exports of exactly one", path=path)
    _vm_id, vm = vms[0]
    vendor: dict[str, str] = {}
    name = str(vm.get("name_label") or path.stem)
    memory = _number(vm, "memory_static_max", path)
    memory = -(-memory // MiB) * MiB
    count = _number(vm, "VCPUs_max", path, 1)
    platform = _str_map(vm.get("platform"))
    cores = int(platform.pop("cores-per-socket", "1") or "1") if platform.get("cores-per-socket", "1").isdigit() \
        else 1
    if cores < 1 or count < 1 or count % cores:
        raise PackageError(f"ova.xml: {count} vCPUs do not divide into sockets of {cores} cores", path=path)
    boot_params = _str_map(vm.get("HVM_boot_params"))
    firmware = Firmware.UEFI if boot_params.pop("firmware", "bios") == "uefi" else Firmware.BIOS
    order = boot_params.pop("order", "cd")
    secure_boot = truthy(platform.pop("secureboot", "false")) and firmware == Firmware.UEFI
    serial = platform.pop("hvm_serial", "pty")
    serials = () if serial == "none" else (Serial(0),)
    if serial not in ("none", "pty"):
        vendor["platform.hvm_serial"] = serial
    for key, value in platform.items():
        if _DEFAULT_PLATFORM.get(key) != value:
            vendor[f"platform.{key}"] = value
    for key in _DEFAULT_PLATFORM:
        if key not in platform:
            vendor[f"platform.{key}"] = ""  # absent on the source: not written back either
    for key, value in boot_params.items():
        vendor[f"HVM_boot_params.{key}"] = value
    if vm.get("HVM_boot_policy", "BIOS order") != "BIOS order":
        vendor["HVM_boot_policy"] = str(vm.get("HVM_boot_policy"))
        for key in ("PV_bootloader", "PV_kernel", "PV_ramdisk", "PV_args", "PV_bootloader_args"):
            if vm.get(key):
                vendor[key] = str(vm[key])
    other = _str_map(vm.get("other_config"))
    os_fields = {k: other.pop(f"polyvisor-os-{k}") for k in _OS_KEYS if f"polyvisor-os-{k}" in other}
    try:
        os = GuestOS(family=OsFamily(os_fields.get("family", "other")), distribution=os_fields.get("distribution"),
                     version=os_fields.get("version"), arch=Arch(os_fields.get("arch", "x86_64")),
                     osinfo=os_fields.get("osinfo"))
    except ValueError as exc:
        raise PackageError(f"ova.xml: other_config polyvisor-os-*: {exc}", path=path) from None
    for key, value in other.items():
        vendor[f"other_config.{key}"] = value
    uuid = str(vm.get("uuid") or "").lower() or None
    if uuid == derived_uuid("xva", name):
        uuid = None
    disks: list[Disk] = []
    sources: dict[str, DiskSource] = {}
    for vbd_id in _ref_list(vm.get("VBDs")):
        cls, vbd = archive.objects.get(vbd_id, ("", {}))
        if cls != "VBD":
            continue
        unit = _number(vbd, "userdevice", path, 0)
        device = DeviceKind.CDROM if str(vbd.get("type", "Disk")).upper() == "CD" else DeviceKind.DISK
        vdi_id = str(vbd.get("VDI", ""))
        vdi_cls, vdi = archive.objects.get(vdi_id, ("", {}))
        if vbd.get("empty") or vdi_cls != "VDI" or (vdi_id not in archive.pieces and device == DeviceKind.CDROM):
            if device == DeviceKind.DISK:
                raise PackageError(f"VBD {vbd_id}: a disk without an exported VDI", path=path)
            disks.append(Disk(DeviceKind.CDROM, Bus.XEN, 0, unit))
            continue
        size = _number(vdi, "virtual_size", path)
        chunks = archive.pieces.get(vdi_id, [])
        if chunks and chunks[-1].offset + chunks[-1].length > size:
            raise PackageError(f"VDI {vdi_id}: chunks extend past its virtual_size {size}", path=path)
        label = str(vdi.get("name_label") or "")
        name_in_package = label if label and check_package_path(label) is None and label not in sources \
            else f"{vdi_id.replace(':', '-').lower()}.raw"
        sources[name_in_package] = DiskSource(path, size=size, pieces=tuple(chunks))
        disks.append(Disk(device, Bus.XEN, 0, unit, name_in_package, "raw", None,
                          size if device == DeviceKind.DISK else None))
    disks = _apply_order(disks, order)
    nics: list[tuple[int, Nic]] = []
    for vif_id in _ref_list(vm.get("VIFs")):
        cls, vif = archive.objects.get(vif_id, ("", {}))
        if cls != "VIF":
            continue
        _net_cls, network = archive.objects.get(str(vif.get("network", "")), ("", {}))
        mac = str(vif.get("MAC") or "").lower() or None
        nics.append((_number(vif, "device", path, len(nics)),
                     Nic(NicModel.NETFRONT, mac, str(network.get("name_label") or "") or None)))
    controllers = (Controller(ControllerModel.XEN_BLKFRONT, 0),) if disks else ()
    model = VmModel(name=name, memory=memory, cpu=Cpu(count // cores, cores), uuid=uuid, firmware=firmware,
                    secure_boot=secure_boot, os=os, controllers=controllers, disks=tuple(disks),
                    nics=tuple(n for _, n in sorted(nics, key=lambda item: item[0])), serials=serials)
    return model.with_vendor(CODEC, vendor), sources


def _apply_order(disks: list[Disk], order: str) -> list[Disk]:
    """``HVM_boot_params:order`` (c disk, d CD-ROM, n network) as per-device boot orders."""
    kinds = {"c": DeviceKind.DISK, "d": DeviceKind.CDROM}
    result = sorted(disks, key=lambda d: d.unit)
    position = 1
    for letter in order:
        kind = kinds.get(letter)
        for i, disk in enumerate(result):
            if kind is not None and disk.device == kind and disk.boot_order is None:
                result[i] = dataclasses.replace(disk, boot_order=position)
                position += 1
                break
    return result


# ------------------------------------------------------------------ writing


def _vm_record(model: VmModel, ids: dict[str, str], vbds: list[str], vifs: list[str]) -> XenObject:
    vendor = model.vendor_keys(CODEC)
    memory = str(model.memory)
    platform = dict(_DEFAULT_PLATFORM)
    platform["cores-per-socket"] = str(model.cpu.cores * model.cpu.threads)
    if model.secure_boot:
        platform["secureboot"] = "true"
    if not model.serials:
        platform["hvm_serial"] = "none"
    boot_params = {"order": _order(model)}
    if model.firmware == Firmware.UEFI:
        boot_params["firmware"] = "uefi"
    other: dict[str, str] = {}
    for key, value in vendor.items():
        if key.startswith("platform."):
            if value:
                platform[key[len("platform."):]] = value
            else:
                platform.pop(key[len("platform."):], None)
        elif key.startswith("HVM_boot_params."):
            boot_params[key[len("HVM_boot_params."):]] = value
        elif key.startswith("other_config."):
            other[key[len("other_config."):]] = value
    for key in _OS_KEYS:
        value = getattr(model.os, key)
        if value is not None and (key != "family" or value != OsFamily.OTHER) and \
                (key != "arch" or value != Arch.X86_64):
            other[f"polyvisor-os-{key}"] = str(value)
    pv = "HVM_boot_policy" in vendor
    return {
        "uuid": model.uuid or derived_uuid("xva", model.name), "allowed_operations": [],
        "current_operations": {}, "power_state": "Halted", "name_label": model.name, "name_description": "",
        "user_version": "1", "is_a_template": False, "suspend_VDI": "OpaqueRef:NULL",
        "resident_on": "OpaqueRef:NULL", "affinity": "OpaqueRef:NULL",
        "memory_overhead": "0", "memory_target": memory, "memory_static_max": memory,
        "memory_dynamic_max": memory, "memory_dynamic_min": memory, "memory_static_min": memory,
        "VCPUs_params": {}, "VCPUs_max": str(model.cpu.count), "VCPUs_at_startup": str(model.cpu.count),
        "actions_after_shutdown": "destroy", "actions_after_reboot": "restart", "actions_after_crash": "restart",
        "consoles": [], "VIFs": vifs, "VBDs": vbds, "crash_dumps": [], "VTPMs": [],
        "PV_bootloader": vendor.get("PV_bootloader", ""), "PV_kernel": vendor.get("PV_kernel", ""),
        "PV_ramdisk": vendor.get("PV_ramdisk", ""), "PV_args": vendor.get("PV_args", ""),
        "PV_bootloader_args": vendor.get("PV_bootloader_args", ""), "PV_legacy_args": "",
        "HVM_boot_policy": vendor.get("HVM_boot_policy", "") if pv else "BIOS order",
        "HVM_boot_params": boot_params, "HVM_shadow_multiplier": 1.0, "platform": platform, "PCI_bus": "",
        "other_config": other, "domid": "-1", "domarch": "", "last_boot_CPU_flags": {},
        "is_control_domain": False, "metrics": "OpaqueRef:NULL", "guest_metrics": "OpaqueRef:NULL",
        "last_booted_record": "", "recommendations": "", "xenstore_data": {}, "ha_always_run": False,
        "ha_restart_priority": "", "is_a_snapshot": False, "snapshot_of": "OpaqueRef:NULL", "snapshots": [],
        "snapshot_time": "19700101T00:00:00Z", "transportable_snapshot_id": "", "blobs": {}, "tags": [],
        "blocked_operations": {}, "is_default_template": False, "domain_type": "pv" if pv else "hvm",
    }


def _order(model: VmModel) -> str:
    letters = {DeviceKind.DISK: "c", DeviceKind.CDROM: "d"}
    ordered = sorted((d for d in model.disks if d.boot_order is not None and d.device in letters),
                     key=lambda d: d.boot_order or 0)
    order = "".join(dict.fromkeys(letters[d.device] for d in ordered))
    return order or "cd"


def build_header(model: VmModel, vdi_names: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """ova.xml for *model*; *vdi_names* maps each image to write to its Ref:N id (filled in here)."""
    counter = iter(range(1 << 30))
    vm_id = f"Ref:{next(counter)}"
    objects: list[dict[str, Any]] = []
    sr_id = f"Ref:{next(counter)}"
    vbd_ids: list[str] = []
    for disk in sorted(model.disks, key=lambda d: d.unit):
        if disk.bus != Bus.XEN:
            raise UnmappableModel(f"XVA disks are Xen PV devices (VBDs), not {disk.bus}; choose devices first")
        vbd_id = f"Ref:{next(counter)}"
        vbd_ids.append(vbd_id)
        vdi_id = "OpaqueRef:NULL"
        if disk.path is not None:
            if disk.path not in vdi_names:
                vdi_id = vdi_names[disk.path] = f"Ref:{next(counter)}"
                objects.append({"class": "VDI", "id": vdi_id, "snapshot": {
                    "uuid": derived_uuid("xva-vdi", f"{model.name}/{disk.path}"), "name_label": disk.path,
                    "name_description": "", "allowed_operations": [], "current_operations": {}, "SR": sr_id,
                    "VBDs": [vbd_id], "crash_dumps": [], "virtual_size": str(disk.capacity or 0),
                    "physical_utilisation": "0", "type": "user", "sharable": False,
                    "read_only": disk.device != DeviceKind.DISK, "other_config": {}, "storage_lock": False,
                    "location": "", "managed": True, "missing": False, "parent": "OpaqueRef:NULL",
                    "xenstore_data": {}, "sm_config": {}, "is_a_snapshot": False,
                    "snapshot_of": "OpaqueRef:NULL", "snapshots": [], "snapshot_time": "19700101T00:00:00Z",
                    "tags": []}})
            else:
                vdi_id = vdi_names[disk.path]
        cd = disk.device == DeviceKind.CDROM
        if disk.device == DeviceKind.FLOPPY:
            raise UnmappableModel("XenServer VMs have no floppy drives")
        objects.append({"class": "VBD", "id": vbd_id, "snapshot": {
            "uuid": derived_uuid("xva-vbd", f"{model.name}/{disk.unit}"), "allowed_operations": [],
            "current_operations": {}, "VM": vm_id, "VDI": vdi_id, "device": f"xvd{chr(ord('a') + disk.unit)}"
            if disk.unit < 26 else "", "userdevice": str(disk.unit), "bootable": disk.boot_order == 1,
            "mode": "RO" if cd else "RW", "type": "CD" if cd else "Disk", "unpluggable": False,
            "storage_lock": False, "empty": disk.path is None, "other_config": {}, "currently_attached": False,
            "status_code": "0", "status_detail": "", "runtime_properties": {}, "qos_algorithm_type": "",
            "qos_algorithm_params": {}, "qos_supported_algorithms": [], "metrics": "OpaqueRef:NULL"}})
    vif_ids: list[str] = []
    networks: dict[str, str] = {}
    for n, nic in enumerate(model.nics):
        if nic.model != NicModel.NETFRONT:
            raise UnmappableModel(f"XenServer VIFs are Xen PV network devices, not {nic.model}; choose devices "
                                  "first")
        vif_id = f"Ref:{next(counter)}"
        vif_ids.append(vif_id)
        label = nic.network or ""
        if label not in networks:
            networks[label] = f"Ref:{next(counter)}"
            objects.append({"class": "network", "id": networks[label], "snapshot": {
                "uuid": derived_uuid("xva-net", label), "name_label": label, "name_description": "",
                "allowed_operations": [], "current_operations": {}, "VIFs": [], "PIFs": [], "MTU": "1500",
                "other_config": {}, "bridge": "", "blobs": {}, "tags": []}})
        objects.append({"class": "VIF", "id": vif_id, "snapshot": {
            "uuid": derived_uuid("xva-vif", f"{model.name}/{n}"), "allowed_operations": [],
            "current_operations": {}, "device": str(n), "network": networks[label], "VM": vm_id,
            "MAC": nic.mac or "", "MTU": "1500", "other_config": {}, "currently_attached": False,
            "status_code": "0", "status_detail": "", "runtime_properties": {}, "qos_algorithm_type": "",
            "qos_algorithm_params": {}, "qos_supported_algorithms": [], "metrics": "OpaqueRef:NULL",
            "MAC_autogenerated": nic.mac is None}})
    objects.append({"class": "SR", "id": sr_id, "snapshot": {
        "uuid": derived_uuid("xva-sr", model.name), "name_label": "polyvisor export", "name_description": "",
        "allowed_operations": [], "current_operations": {}, "VDIs": list(vdi_names.values()), "PBDs": [],
        "virtual_allocation": "0", "physical_utilisation": "0", "physical_size": "0", "type": "",
        "content_type": "", "shared": False, "other_config": {}, "tags": [], "sm_config": {}, "blobs": {}}})
    vm = {"class": "VM", "id": vm_id, "snapshot": _vm_record(model, vdi_names, vbd_ids, vif_ids)}
    version = {"hostname": "polyvisor", "date": datetime.date.today().isoformat(), "product_version": "",
               "product_brand": "polyvisor", "build_number": "", "xapi_major": 1, "xapi_minor": 1,
               "export_vsn": 2}
    root = python_to_rpc({"version": version, "objects": [vm, *objects]})
    return ET.tostring(root, encoding="utf-8"), vdi_names


def _chunks(image: Path) -> Iterator[tuple[int, bytes]]:
    """(number, bytes) of every chunk to write: non-zero chunks, and always the first and the last."""
    size = image.stat().st_size
    last = max(0, (size - 1) // CHUNK)
    with open(image, "rb") as handle:
        for number in range(last + 1):
            data = handle.read(CHUNK)
            if number in (0, last) or not is_zero(data):
                yield number, data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


@register_codec
class XvaCodec(Codec):
    """A XenServer / XCP-ng ``.xva`` export."""

    name = CODEC
    description = "XenServer / XCP-ng XVA export (tar of ova.xml and checksummed 1 MiB chunks)"
    suffixes = (".xva",)
    disk_formats = (("raw", None),)
    lossy = frozenset({"machine", "graphics", "cpu.threads", "disks.boot_order", "disks.subformat",
                       "disks.capacity"})
    target = "xenserver"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if len(head) < 512 or (head[257:262] != b"ustar" and head[257:263] != b"ustar "):
            return 0
        return 95 if head[:8] == b"ova.xml\0" else 0

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = Path(path)
        archive = _scan(path, options)
        model, sources = _model(archive, path)
        return VmPackage(model=model.validate(source=str(path)), codec=CODEC, source=path, disks=sources)

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        names = disk_files(model, disk_paths)
        for disk in model.disks:
            if disk.path is not None and disk.format not in (None, "raw"):
                raise UnmappableModel(f"an XVA carries raw disks chunked into the archive, not {disk.format} "
                                      f"({disk.path}); convert it to raw first")
        sized = tuple(dataclasses.replace(d, capacity=disk_paths[d.path].stat().st_size) if d.path else d
                      for d in model.disks)
        header, ids = build_header(dataclasses.replace(model, disks=sized), {})
        with OutputFiles(Path(outdir)) as files, files.open(f"{file_stem(model.name)}.xva") as handle, \
                tarfile.open(fileobj=handle, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
            _add(tar, "ova.xml", header)
            for name in sorted(names, key=lambda n: ids[n]):
                prefix = ids[name]
                for number, data in _chunks(disk_paths[name]):
                    chunk_name = f"{prefix}/{number:08d}"
                    _add(tar, chunk_name, data)
                    _add(tar, chunk_name + ".checksum", hashlib.sha1(data, usedforsecurity=False)
                         .hexdigest().encode("ascii"))
        return files.names


__all__ = ["XvaCodec", "build_header", "python_to_rpc", "rpc_to_python"]
