"""Hyper-V: configuration XML (read) and a PowerShell import script (read and write).

**Reading the XML configuration** (``Virtual Machines/<GUID>.xml``,
configuration version 5 and older — Windows Server 2008 R2 to 2012 R2):
``<configuration>`` with ``<properties><name>``, ``<subtype>`` (1:
generation 2) and ``<notes>``; ``<settings><memory><bank><size>`` (MiB) and
``<settings><processors><count>``; devices as elements named after their
device GUID: the emulated IDE controller ``_83f8638b-…_`` with
``controllerN/driveM/{type,pathname}`` (``VHD``, ``ISO``, ``NONE``), the
synthetic SCSI controllers and synthetic network adapters found through
``<manifest>`` (device ``d422512d-…`` and ``2fc216b0-…``, their element named
after the instance GUID; ``MacAddress`` as ``00-15-5D-…``, the switch name in
``Connection/AltSwitchName``), the COM ports ``_8e3a359f-…_`` (``portN/
connection``), the floppy ``_8f0d2762-…_`` and the BIOS ``_ac6b8dc1-…_``
(``bios_guid``, ``boot/deviceN``, ``secure_boot_enabled``).  Device GUIDs as
Microsoft documents them in its Hyper-V WMI provider (``Msvm_*`` DeviceID /
InstanceID values).  Windows paths are looked up by file name inside the
package (beside the XML, or in the export's ``Virtual Hard Disks``);
relative paths must stay inside it.  Parsed with defusedxml (UTF-16 is fine).

**The import script** polyvisor writes, ``NAME.ps1``, uses only ``New-VM``
(``-Generation`` 1 for BIOS, 2 for UEFI), ``Set-VMProcessor``,
``Set-VMMemory``, ``Add-VMScsiController``, ``Add-VMHardDiskDrive``,
``Add-VMDvdDrive``, ``Remove-/Add-/Connect-VMNetworkAdapter``,
``Set-VMFirmware`` (Secure Boot, first boot device), ``Set-VMBios``
(generation 1 startup order), ``Set-VMComPort`` and ``Set-VM -Notes`` (the
guest OS, which Hyper-V does not record) — cmdlets and parameters as
documented in Microsoft's Hyper-V PowerShell module reference.  Disks are the
VHD/VHDX files beside the script.  The reader is a restricted parser of
exactly these statements: it tokenises single-quoted strings, numbers,
``$true``/``$false``, ``@(...)`` lists and ``(Join-Path $here '…')``; anything
else is refused, nothing is ever executed.

Lossy: the BIOS UUID (no cmdlet sets it), the chipset and display (fixed per
generation), the vCPU topology (a count), boot order beyond one device, disk
format (read from the file name's .vhd/.vhdx suffix only), capacity and
subformat (properties of the files).
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polyvisor.errors import PackageError, UnmappableModel, UnsafePackage
from polyvisor.vm.codecs import register_codec
from polyvisor.vm.codecs._common import ImageFinder, disk_files, file_stem, truthy, windows_basename
from polyvisor.vm.codecs.codec import Codec, OutputFiles, ReadOptions, VmPackage
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
from polyvisor.vm.safety import parse_xml, read_limited

CODEC = "hyperv"
IDE_GUID = "83f8638b-8dca-4152-9eda-2ca8b33039b4"
SCSI_DEVICE = "d422512d-2bf2-4752-809d-7b82b5fcb1b4"
NIC_DEVICE = "2fc216b0-d2e2-4967-9b6d-b8a5c9ca2778"
COM_GUID = "8e3a359f-559a-4b6a-98a9-1690a6100ed7"
FLOPPY_GUID = "8f0d2762-0b00-4e04-af4f-19010527cb93"
BIOS_GUID = "ac6b8dc1-3257-4a70-b1b2-a9c9215659ad"
_NOTES = re.compile(r"polyvisor-os:((?:\s+[a-z]+=[^\s;]+)+)")
_BIOS_KINDS = {"CD": DeviceKind.CDROM, "IDE": DeviceKind.DISK, "Floppy": DeviceKind.FLOPPY}
_XML_BOOT = {"optical": DeviceKind.CDROM, "harddrive": DeviceKind.DISK, "floppy": DeviceKind.FLOPPY}


def _os_notes(os: GuestOS, notes: str = "") -> str:
    """The VM's notes: the user's text (one line), then the guest OS, which Hyper-V does not record."""
    fields = [f"{name}={value}" for name in ("family", "distribution", "version", "arch", "osinfo")
              if (value := getattr(os, name)) is not None]
    own = "polyvisor-os: " + " ".join(fields)
    text = " ".join(notes.split())
    return f"{text} | {own}" if text else own


def _user_notes(notes: str) -> str:
    """The user's part of the notes (without polyvisor's guest OS record)."""
    return _NOTES.sub("", notes).strip().removesuffix("|").strip()


def _os_from_notes(notes: str, source: Path) -> GuestOS:
    match = _NOTES.search(notes)
    if match is None:
        return GuestOS()
    values = dict(item.split("=", 1) for item in match.group(1).split())
    try:
        return GuestOS(family=OsFamily(values.get("family", "other")), distribution=values.get("distribution"),
                       version=values.get("version"), arch=Arch(values.get("arch", "x86_64")),
                       osinfo=values.get("osinfo"))
    except ValueError as exc:
        raise PackageError(f"notes: polyvisor-os: {exc}", path=source) from None


# ======================================================================= the script


def _quote(value: str) -> str:
    """A PowerShell single-quoted (verbatim) string."""
    return "'" + value.replace("'", "''") + "'"


def render_ps1(model: VmModel) -> str:
    """The import script for *model* (generation from its firmware; disks beside the script)."""
    generation = 2 if model.firmware == Firmware.UEFI else 1
    lines = [
        f"# polyvisor: Hyper-V import script for {model.name!r} (generation {generation}).",
        "# Run it in an elevated PowerShell on the Hyper-V host; the disks are the files beside it.",
        "$ErrorActionPreference = 'Stop'",
        "$here = Split-Path -Parent $MyInvocation.MyCommand.Path",
        f"$vm = New-VM -Name {_quote(model.name)} -Generation {generation} -MemoryStartupBytes {model.memory} "
        "-NoVHD -Path $here",
        f"Set-VMProcessor -VM $vm -Count {model.cpu.count}",
        f"Set-VMMemory -VM $vm -DynamicMemoryEnabled $false -StartupBytes {model.memory}",
        f"Set-VM -VM $vm -Notes {_quote(_os_notes(model.os, model.vendor_keys(CODEC).get('notes', '')))}",
    ]
    scsi = [c for c in model.controllers if c.bus == Bus.SCSI]
    for ctrl in model.controllers:
        if ctrl.model not in (ControllerModel.IDE, ControllerModel.STORVSC):
            raise UnmappableModel(f"Hyper-V has no {ctrl.model} controller (IDE and synthetic SCSI only)")
        if ctrl.model == ControllerModel.IDE and generation == 2:
            raise UnmappableModel("Hyper-V generation 2 has no IDE controller; disks and DVD drives go on SCSI")
    # generation 2 VMs have SCSI controller 0 already; generation 1 VMs none
    for _ in range(len(scsi) - (1 if generation == 2 else 0)):
        lines.append("Add-VMScsiController -VM $vm")
    first_boot = min((d for d in model.disks if d.boot_order is not None), key=lambda d: d.boot_order or 0,
                     default=None)
    for disk in model.disks:
        if disk.bus == Bus.IDE:
            ctype, number, location = "IDE", disk.unit // 2, disk.unit % 2
        elif disk.bus == Bus.SCSI:
            ctype, number, location = "SCSI", disk.controller, disk.unit
        else:
            raise UnmappableModel(f"Hyper-V has no {disk.bus} bus")
        where = f"-ControllerType {ctype} -ControllerNumber {number} -ControllerLocation {location}"
        path = f" -Path (Join-Path $here {_quote(disk.path)})" if disk.path else ""
        target = "$boot = " if disk is first_boot and generation == 2 else ""
        passthru = " -Passthru" if target else ""
        if disk.device == DeviceKind.DISK:
            if disk.format not in (None, "vhd", "vhdx"):
                raise UnmappableModel(f"Hyper-V disks are VHD or VHDX, not {disk.format} ({disk.path})")
            lines.append(f"{target}Add-VMHardDiskDrive -VM $vm {where}{path}{passthru}")
        elif disk.device == DeviceKind.CDROM:
            lines.append(f"{target}Add-VMDvdDrive -VM $vm {where}{path}{passthru}")
        else:
            raise UnmappableModel("polyvisor does not write Hyper-V virtual floppy drives")
    lines.append("Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter")
    for n, nic in enumerate(model.nics, 1):
        if nic.model != NicModel.NETVSC:
            raise UnmappableModel(f"Hyper-V network adapters are synthetic (netvsc), not {nic.model}")
        mac = f" -StaticMacAddress {_quote(nic.mac.replace(':', '').upper())}" if nic.mac else ""
        lines.append(f"Add-VMNetworkAdapter -VM $vm -Name {_quote(f'Network Adapter {n}')}{mac}")
        if nic.network:
            lines.append(f"Connect-VMNetworkAdapter -VMName {_quote(model.name)} -Name "
                         f"{_quote(f'Network Adapter {n}')} -SwitchName {_quote(nic.network)}")
    if generation == 2:
        template = " -SecureBootTemplate 'MicrosoftUEFICertificateAuthority'" \
            if model.secure_boot and model.os.family != OsFamily.WINDOWS else ""
        lines.append(f"Set-VMFirmware -VM $vm -EnableSecureBoot {'On' if model.secure_boot else 'Off'}{template}")
        if first_boot is not None:
            lines.append("Set-VMFirmware -VM $vm -FirstBootDevice $boot")
    else:
        kinds = {DeviceKind.DISK: "IDE", DeviceKind.CDROM: "CD", DeviceKind.FLOPPY: "Floppy"}
        ordered = [kinds[d.device] for d in sorted((d for d in model.disks if d.boot_order is not None),
                                                   key=lambda d: d.boot_order or 0)]
        order = list(dict.fromkeys(ordered))
        order += [k for k in ("IDE", "CD", "LegacyNetworkAdapter", "Floppy") if k not in order]
        lines.append("Set-VMBios -VM $vm -StartupOrder @(" + ", ".join(_quote(k) for k in order) + ")")
    for serial in model.serials:
        if serial.port > 1:
            raise UnmappableModel(f"Hyper-V has COM1 and COM2, not COM{serial.port + 1}")
        pipe = rf"\\.\pipe\{file_stem(model.name)}-com{serial.port + 1}"
        lines.append(f"Set-VMComPort -VM $vm -Number {serial.port + 1} -Path {_quote(pipe)}")
    return "\r\n".join(lines) + "\r\n"


_TOKEN = re.compile(r"""\s*(?:
    (?P<string>'(?:[^']|'')*')
  | (?P<join>\(Join-Path\s+\$here\s+'(?:[^']|'')*'\))
  | (?P<list>@\((?:\s*'(?:[^']|'')*'\s*,?)*\s*\))
  | (?P<param>-[A-Za-z]+)
  | (?P<var>\$[A-Za-z]+)
  | (?P<number>\d+)
  | (?P<word>[A-Za-z][A-Za-z0-9-]*)
)""", re.VERBOSE)
_STRING = re.compile(r"'((?:[^']|'')*)'")

#: Exactly the cmdlets (and their parameters) the writer emits: nothing else is accepted.
_CMDLETS: dict[str, set[str]] = {
    "New-VM": {"Name", "Generation", "MemoryStartupBytes", "NoVHD", "Path"},
    "Set-VMProcessor": {"VM", "Count"},
    "Set-VMMemory": {"VM", "DynamicMemoryEnabled", "StartupBytes"},
    "Set-VM": {"VM", "Notes"},
    "Add-VMScsiController": {"VM"},
    "Add-VMHardDiskDrive": {"VM", "ControllerType", "ControllerNumber", "ControllerLocation", "Path", "Passthru"},
    "Add-VMDvdDrive": {"VM", "ControllerType", "ControllerNumber", "ControllerLocation", "Path", "Passthru"},
    "Add-VMNetworkAdapter": {"VM", "Name", "StaticMacAddress"},
    "Connect-VMNetworkAdapter": {"VMName", "Name", "SwitchName"},
    "Set-VMFirmware": {"VM", "EnableSecureBoot", "SecureBootTemplate", "FirstBootDevice"},
    "Set-VMBios": {"VM", "StartupOrder"},
    "Set-VMComPort": {"VM", "Number", "Path"},
}
_FIXED_LINES = {"$ErrorActionPreference = 'Stop'", "$here = Split-Path -Parent $MyInvocation.MyCommand.Path",
                "Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter"}


def _unquote(text: str) -> str:
    return text[1:-1].replace("''", "'")


def parse_ps1(text: str, source: Path) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(assigned variable, cmdlet, {parameter: value}) for every statement; refuses anything else."""
    statements: list[tuple[str | None, str, dict[str, Any]]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#") or line in _FIXED_LINES:
            continue
        target: str | None = None
        match = re.match(r"^\$([A-Za-z]+)\s*=\s*(.*)$", line)
        if match:
            target, line = match.group(1), match.group(2)
        position = 0
        tokens: list[tuple[str, str]] = []
        while position < len(line):
            token = _TOKEN.match(line, position)
            if token is None or token.end() == position:
                raise UnsafePackage(f"line {number}: not a statement polyvisor writes: {raw.strip()[:80]!r}",
                                    path=source)
            kind = token.lastgroup
            assert kind is not None
            tokens.append((kind, token.group(kind)))
            position = token.end()
            while position < len(line) and line[position] == " ":
                position += 1
        if not tokens or tokens[0][0] != "word" or tokens[0][1] not in _CMDLETS:
            raise UnsafePackage(f"line {number}: {tokens[0][1] if tokens else line!r} is not one of the cmdlets "
                                "polyvisor writes", path=source)
        cmdlet = tokens[0][1]
        params: dict[str, Any] = {}
        index = 1
        while index < len(tokens):
            kind, value = tokens[index]
            if kind != "param" or value[1:] not in _CMDLETS[cmdlet]:
                raise UnsafePackage(f"line {number}: {cmdlet} does not take {value!r} here", path=source)
            name = value[1:]
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            if following is None or following[0] == "param":
                params[name] = True
                index += 1
                continue
            fkind, fvalue = following
            if fkind == "string":
                params[name] = _unquote(fvalue)
            elif fkind == "join":
                params[name] = ("join", _unquote(fvalue[fvalue.index("'"):-1]))
            elif fkind == "list":
                params[name] = [_unquote(m.group(0)) for m in _STRING.finditer(fvalue)]
            elif fkind == "number":
                params[name] = int(fvalue)
            elif fkind == "var":
                params[name] = {"$true": True, "$false": False}.get(fvalue.lower(), ("var", fvalue[1:]))
            else:
                params[name] = fvalue
            index += 2
        statements.append((target, cmdlet, params))
    return statements


def _model_from_ps1(statements: list[tuple[str | None, str, dict[str, Any]]], path: Path,
                    finder: ImageFinder) -> VmModel:
    new = [p for _, c, p in statements if c == "New-VM"]
    if len(new) != 1:
        raise PackageError(f"the script has {len(new)} New-VM statements; expected one", path=path)
    head = new[0]
    generation = head.get("Generation", 1)
    if generation not in (1, 2):
        raise PackageError(f"New-VM -Generation {generation!r} is neither 1 nor 2", path=path)
    name = str(head.get("Name") or path.stem)
    memory = int(head.get("MemoryStartupBytes", 0))
    count = 1
    os = GuestOS()
    scsi_count = 1 if generation == 2 else 0
    disks: list[Disk] = []
    nics: dict[str, Nic] = {}
    serials: list[Serial] = []
    secure_boot = False
    boot_variable: str | None = None
    vendor: dict[str, str] = {}
    variables: dict[str, int] = {}
    startup: list[str] = []
    for target, cmdlet, params in statements:
        if cmdlet == "Set-VMProcessor":
            count = int(params.get("Count", 1))
        elif cmdlet == "Set-VMMemory":
            memory = int(params.get("StartupBytes", memory))
        elif cmdlet == "Set-VM":
            os = _os_from_notes(str(params.get("Notes", "")), path)
            if _user_notes(str(params.get("Notes", ""))):
                vendor["notes"] = _user_notes(str(params.get("Notes", "")))
        elif cmdlet == "Add-VMScsiController":
            scsi_count += 1
        elif cmdlet in ("Add-VMHardDiskDrive", "Add-VMDvdDrive"):
            ctype = str(params.get("ControllerType", "IDE" if generation == 1 else "SCSI")).upper()
            number, location = int(params.get("ControllerNumber", 0)), int(params.get("ControllerLocation", 0))
            if ctype == "IDE":
                bus, controller, unit = Bus.IDE, 0, number * 2 + location
            elif ctype == "SCSI":
                bus, controller, unit = Bus.SCSI, number, location
            else:
                raise PackageError(f"{cmdlet}: controller type {ctype!r} unknown", path=path)
            image = params.get("Path")
            disk_path = None
            if isinstance(image, tuple) and image[0] == "join":
                disk_path = finder.add(image[1], f"{cmdlet} -Path")
            elif image is not None:
                raise UnsafePackage(f"{cmdlet} -Path must be (Join-Path $here 'file'), a file beside the script",
                                    path=path)
            device = DeviceKind.DISK if cmdlet == "Add-VMHardDiskDrive" else DeviceKind.CDROM
            fmt = (Path(disk_path).suffix.lower().lstrip(".") or None) if disk_path else None
            if device == DeviceKind.CDROM and disk_path:
                fmt = "raw"
            elif fmt not in (None, "vhd", "vhdx"):
                fmt = None
            if target:
                variables[target] = len(disks)
            disks.append(Disk(device, bus, controller, unit, disk_path, fmt))
        elif cmdlet == "Add-VMNetworkAdapter":
            mac_text = str(params.get("StaticMacAddress", ""))
            mac = ":".join(mac_text[i:i + 2] for i in range(0, 12, 2)).lower() \
                if re.fullmatch(r"[0-9A-Fa-f]{12}", mac_text) else None
            nics[str(params.get("Name", f"Network Adapter {len(nics) + 1}"))] = Nic(NicModel.NETVSC, mac)
        elif cmdlet == "Connect-VMNetworkAdapter":
            adapter = str(params.get("Name", ""))
            if adapter not in nics:
                raise PackageError(f"Connect-VMNetworkAdapter names unknown adapter {adapter!r}", path=path)
            nics[adapter] = dataclasses.replace(nics[adapter], network=str(params.get("SwitchName")))
        elif cmdlet == "Set-VMFirmware":
            if "EnableSecureBoot" in params:
                secure_boot = str(params["EnableSecureBoot"]).lower() == "on"
            boot = params.get("FirstBootDevice")
            if isinstance(boot, tuple) and boot[0] == "var":
                boot_variable = boot[1]
        elif cmdlet == "Set-VMBios":
            startup = [str(k) for k in params.get("StartupOrder", [])]
        elif cmdlet == "Set-VMComPort":
            serials.append(Serial(int(params.get("Number", 1)) - 1))
    if boot_variable is not None:
        if boot_variable not in variables:
            raise PackageError(f"-FirstBootDevice ${boot_variable} names no drive", path=path)
        index = variables[boot_variable]
        disks[index] = dataclasses.replace(disks[index], boot_order=1)
    disks = _kind_order(disks, [_BIOS_KINDS[k] for k in startup if k in _BIOS_KINDS])
    controllers = [Controller(ControllerModel.STORVSC, i) for i in range(scsi_count)
                   if any(d.bus == Bus.SCSI and d.controller == i for d in disks) or (generation == 2 and i == 0)]
    if any(d.bus == Bus.IDE for d in disks):
        controllers.append(Controller(ControllerModel.IDE, 0))
    if generation == 2 and not any(d.bus == Bus.SCSI for d in disks):
        controllers = [c for c in controllers if c.bus != Bus.SCSI]
    return VmModel(name=name, memory=memory, cpu=Cpu(1, count, 1),
                   firmware=Firmware.UEFI if generation == 2 else Firmware.BIOS,
                   secure_boot=secure_boot and generation == 2, os=os, controllers=tuple(controllers),
                   disks=tuple(disks), nics=tuple(nics.values()), serials=tuple(serials)).with_vendor(CODEC, vendor)


def _kind_order(disks: list[Disk], kinds: list[DeviceKind]) -> list[Disk]:
    """A startup order by kind (first device of each kind, as the BIOS tries them) as boot orders."""
    if not kinds or any(d.boot_order is not None for d in disks):
        return disks
    result = list(disks)
    position = 1
    for kind in kinds:
        for disk in sorted(result, key=lambda d: (d.bus, d.controller, d.unit)):
            if disk.device == kind:
                result[result.index(disk)] = dataclasses.replace(disk, boot_order=position)
                position += 1
                break
    return result


# ======================================================================= the XML configuration


def _text(element: ET.Element | None) -> str:
    return (element.text or "").strip() if element is not None else ""


def _child(parent: ET.Element, name: str) -> ET.Element | None:
    for child in parent:
        if child.tag.lower() == name.lower():
            return child
    return None


def _model_from_xml(root: ET.Element, path: Path, finder: ImageFinder, home: Path) -> VmModel:
    properties = _child(root, "properties")
    settings = _child(root, "settings")
    if properties is None or settings is None:
        raise PackageError("a Hyper-V configuration has <properties> and <settings>", path=path)
    name = _text(_child(properties, "name")) or path.stem
    generation = 2 if _text(_child(properties, "subtype")) == "1" else 1
    notes = _text(_child(properties, "notes"))
    os = _os_from_notes(notes, path)
    memory_el = _child(settings, "memory")
    bank = _child(memory_el, "bank") if memory_el is not None else None
    processors = _child(settings, "processors")
    try:
        memory = int(_text(_child(bank, "size")) if bank is not None else "0") * MiB
        count = int(_text(_child(processors, "count")) or "1") if processors is not None else 1
    except ValueError:
        raise PackageError("memory size or processor count is not a number", path=path) from None
    if memory <= 0:
        raise PackageError("settings/memory/bank/size is missing or zero", path=path)
    uuid = None
    secure_boot = False
    boot_kinds: list[DeviceKind] = []
    bios = _child(root, f"_{BIOS_GUID}_")
    if bios is not None:
        guid = _text(_child(bios, "bios_guid")).strip("{}").lower()
        uuid = guid or None
        secure_boot = generation == 2 and truthy(_text(_child(bios, "secure_boot_enabled")))
        boot = _child(bios, "boot")
        for entry in boot if boot is not None else []:
            kind = _XML_BOOT.get(_text(entry).lower())
            if kind is not None and kind not in boot_kinds:
                boot_kinds.append(kind)
    disks: list[Disk] = []

    def image(reference: str, what: str) -> str | None:
        if not reference:
            return None
        base = windows_basename(reference)
        if base is None:
            return finder.add(reference.replace("\\", "/"), what)
        for folder in (home, home.parent / "Virtual Hard Disks", home / "Virtual Hard Disks"):
            candidate = folder / base
            if candidate.is_file():
                return finder.register(_resolved(candidate, finder, what), what)
        if finder.options.require_disks:
            raise PackageError(f"{what} {reference!r}: no {base!r} beside the configuration or in "
                               "'Virtual Hard Disks'", path=path)
        return finder.add(base, what, must_exist=False)

    def drives(controller_el: ET.Element, bus: Bus, controller: int, ide: bool) -> None:
        for number, ctrl in enumerate(c for c in controller_el if c.tag.lower().startswith("controller")):
            for drive in ctrl:
                match = re.fullmatch(r"drive(\d+)", drive.tag.lower())
                if match is None:
                    continue
                kind = _text(_child(drive, "type")).upper()
                if kind in ("NONE", ""):
                    continue
                unit = int(match.group(1))
                disk_path = image(_text(_child(drive, "pathname")), f"{drive.tag} pathname")
                if kind in ("VHD", "VHDX"):
                    if disk_path is None:
                        raise PackageError(f"{ctrl.tag}/{drive.tag}: a hard disk without a pathname", path=path)
                    fmt = Path(disk_path).suffix.lower().lstrip(".")
                    disks.append(Disk(DeviceKind.DISK, bus, controller if not ide else 0,
                                      number * 2 + unit if ide else unit, disk_path,
                                      fmt if fmt in ("vhd", "vhdx") else None))
                elif kind in ("ISO", "DVD"):
                    disks.append(Disk(DeviceKind.CDROM, bus, controller if not ide else 0,
                                      number * 2 + unit if ide else unit, disk_path, "raw" if disk_path else None))
                else:
                    raise PackageError(f"{ctrl.tag}/{drive.tag}: drive type {kind!r} unknown", path=path)

    ide = _child(root, f"_{IDE_GUID}_")
    if ide is not None:
        drives(ide, Bus.IDE, 0, True)
    manifest = _child(root, "manifest")
    scsi_instances: list[str] = []
    nic_instances: list[str] = []
    for vdev in manifest if manifest is not None else []:
        device = _text(_child(vdev, "device")).lower()
        instance = _text(_child(vdev, "instance")).lower()
        if device == SCSI_DEVICE:
            scsi_instances.append(instance)
        elif device == NIC_DEVICE:
            nic_instances.append(instance)
    for index, instance in enumerate(scsi_instances):
        element = _child(root, f"_{instance}_")
        if element is not None:
            drives(element, Bus.SCSI, index, False)
    nics: list[Nic] = []
    for instance in nic_instances:
        element = _child(root, f"_{instance}_")
        if element is None:
            continue
        mac_text = _text(_child(element, "MacAddress")).replace("-", "")
        static = truthy(_text(_child(element, "MacAddressIsStatic")))
        mac = ":".join(mac_text[i:i + 2] for i in range(0, 12, 2)).lower() \
            if static and re.fullmatch(r"[0-9A-Fa-f]{12}", mac_text) else None
        connection = _child(element, "Connection")
        switch = _text(_child(connection, "AltSwitchName")) if connection is not None else ""
        nics.append(Nic(NicModel.NETVSC, mac, switch or None))
    serials: list[Serial] = []
    com = _child(root, f"_{COM_GUID}_")
    for port in com if com is not None else []:
        match = re.fullmatch(r"port(\d)", port.tag.lower())
        if match and _text(_child(port, "connection")):
            serials.append(Serial(int(match.group(1))))
    floppy = _child(root, f"_{FLOPPY_GUID}_")
    if floppy is not None:
        for ctrl in floppy:
            drive = _child(ctrl, "drive0")
            if drive is not None and _text(_child(drive, "type")).upper() == "VFD" and \
                    _text(_child(drive, "pathname")):
                disks.append(Disk(DeviceKind.FLOPPY, Bus.FDC, 0, 0,
                                  image(_text(_child(drive, "pathname")), "floppy pathname"), "raw"))
    disks = _kind_order(disks, boot_kinds)
    controllers = [Controller(ControllerModel.STORVSC, i) for i in range(len(scsi_instances))
                   if any(d.bus == Bus.SCSI and d.controller == i for d in disks)]
    if any(d.bus == Bus.IDE for d in disks):
        controllers.append(Controller(ControllerModel.IDE, 0))
    if any(d.bus == Bus.FDC for d in disks):
        controllers.append(Controller(ControllerModel.FDC, 0))
    vendor = {"notes": _user_notes(notes)} if _user_notes(notes) else {}
    return VmModel(name=name, memory=memory, cpu=Cpu(1, count, 1), uuid=uuid,
                   firmware=Firmware.UEFI if generation == 2 else Firmware.BIOS, secure_boot=secure_boot, os=os,
                   controllers=tuple(controllers), disks=tuple(disks), nics=tuple(nics),
                   serials=tuple(serials)).with_vendor(CODEC, vendor)


def _resolved(candidate: Path, finder: ImageFinder, what: str) -> Path:
    target = candidate.resolve()
    roots = [finder.home, finder.home.parent]
    if not (finder.options.policy.permits(target, finder.home) or any(r in target.parents for r in roots)):
        raise UnsafePackage(f"{what} {candidate} resolves outside the package", path=finder.source)
    return target


@register_codec
class HypervCodec(Codec):
    """Hyper-V: reads the configuration XML and polyvisor's import script; writes the script."""

    name = CODEC
    description = "Hyper-V configuration XML (version 5 and older; read) and PowerShell import script (.ps1)"
    suffixes = (".ps1", ".xml")
    disk_formats = (("vhdx", None), ("vhd", None))
    lossy = frozenset({"uuid", "machine", "graphics", "cpu.topology", "disks.boot_order", "disks.capacity",
                       "disks.format", "disks.subformat"})
    target = "hyperv-gen2"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if path.is_dir():
            return 0
        if path.suffix.lower() == ".ps1":
            return 90 if b"New-VM" in head else 20
        text = head[:8192]
        if text.startswith((b"\xff\xfe", b"\xfe\xff")):
            text = text.decode("utf-16", "replace").encode("utf-8", "replace")
        return 85 if b"<configuration" in text and (b"<properties" in text or b"_83f8638b" in text.lower()) else 0

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = Path(path)
        data = read_limited(path, options.max_descriptor, what="Hyper-V configuration")
        home = path.parent.resolve()
        if path.suffix.lower() == ".ps1":
            finder = ImageFinder(path.parent, path, options)
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise PackageError("the script is not UTF-8", path=path) from None
            model = _model_from_ps1(parse_ps1(text, path), path, finder)
        else:
            root = parse_xml(data, source=path)
            if root.tag != "configuration":
                raise PackageError(f"root element is <{root.tag}>, not a Hyper-V <configuration>", path=path)
            package_root = home.parent if home.name.lower() == "virtual machines" else home
            finder = ImageFinder(package_root, path, options)
            model = _model_from_xml(root, path, finder, home)
        return VmPackage(model=model.validate(source=str(path)), codec=CODEC, source=path, disks=finder.sources)

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        names = disk_files(model, disk_paths)
        for name in names:
            if check_package_path(name) is not None or "/" in name:
                raise UnmappableModel(f"Hyper-V import scripts name disks beside them; {name!r} is not a plain name")
        text = render_ps1(model)
        with OutputFiles(Path(outdir)) as files:
            for name in names:
                files.copy(name, disk_paths[name])
            files.write_bytes(f"{file_stem(model.name)}.ps1", text.encode("utf-8"))
        return files.names


__all__ = ["HypervCodec", "parse_ps1", "render_ps1"]
