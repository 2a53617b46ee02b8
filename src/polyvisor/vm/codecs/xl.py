"""Xen ``xl`` domain configuration files (``xl.cfg(5)``) and the disks they name.

Grammar (xl.cfg(5), "Syntax"): ``KEY = VALUE`` settings separated by new
lines or ``;``, ``#`` comments, VALUE a double- or single-quoted string, a
number, or a list ``[ VALUE, VALUE, ... ]`` that may span lines.  The file is
tokenised and parsed here — never evaluated.

Mapped keys: ``name``, ``uuid``, ``type`` (``hvm``; ``pv``/``pvh`` and the
old ``builder`` are kept as vendor keys), ``memory`` (MiB), ``vcpus``,
``bios`` (``ovmf`` is UEFI), ``disk`` (xl-disk-configuration(5): positional
``target, format, vdev, access`` or ``key=value`` with ``target=`` last;
``devtype=cdrom`` / ``cdrom``; legacy ``phy:``/``file:``/``tap:aio:``
prefixes), ``vif`` (``mac=``, ``bridge=``, ``model=`` — no model, or
``type=vif``, is the PV netfront), ``serial`` (``'pty'`` or a list),
``vnc``/``spice`` and ``boot`` (``c`` disk, ``d`` CD-ROM, ``n`` network).
Disk vdevs ``hdX`` are emulated IDE, ``xvdX`` Xen PV disks, ``sdX`` SCSI.
Disk targets must stay inside the package directory; polyvisor writes
absolute paths of the disks it puts beside the .cfg.

Every other key is kept in ``vendor["xl"]`` (its value as written) and
written back.  Lossy: the guest OS (xl has no field for it), the chipset
(qemu-xen's is i440fx), Secure Boot, SMT topology (``vcpus`` is a count),
boot order beyond one device per kind, disk capacity and subformat.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

from polyvisor.errors import PackageError, UnmappableModel
from polyvisor.vm.codecs import register_codec
from polyvisor.vm.codecs._common import ImageFinder, disk_files, file_stem, truthy
from polyvisor.vm.codecs.codec import Codec, OutputFiles, ReadOptions, VmPackage
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
from polyvisor.vm.safety import read_limited

CODEC = "xl"
Value = str | int | list["Value"]
_TOKEN = re.compile(r"""
    (?P<space>[ \t\r]+|\\\n)
  | (?P<comment>\#[^\n]*)
  | (?P<newline>[\n;])
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>0x[0-9a-fA-F]+|\d+)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[=\[\],])
""", re.VERBOSE)
_FORMATS = {"raw", "qcow", "qcow2", "vhd", "qed"}
_NIC_READ = {"e1000": NicModel.E1000, "e1000e": NicModel.E1000E, "rtl8139": NicModel.RTL8139,
             "virtio-net": NicModel.VIRTIO_NET, "virtio-net-pci": NicModel.VIRTIO_NET}
_NIC_WRITE = {NicModel.E1000: "e1000", NicModel.E1000E: "e1000e", NicModel.RTL8139: "rtl8139",
              NicModel.VIRTIO_NET: "virtio-net"}
_MAPPED = {"name", "uuid", "type", "memory", "vcpus", "bios", "disk", "vif", "serial", "vnc", "spice", "boot"}


def parse_xl(text: str, source: Path) -> dict[str, Value]:
    """The settings of an xl.cfg file (later settings of a key win, as in xl)."""
    tokens: list[tuple[str, str, int]] = []
    line = 1
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise PackageError(f"line {line}: unexpected {text[position:position + 20]!r}", path=source)
        kind = match.lastgroup
        assert kind is not None
        value = match.group(kind)
        if kind not in ("space", "comment"):
            tokens.append((kind, value, line))
        line += value.count("\n")
        position = match.end()
    settings: dict[str, Value] = {}
    index = 0

    def fail(message: str) -> PackageError:
        where = tokens[index][2] if index < len(tokens) else line
        return PackageError(f"line {where}: {message}", path=source)

    def value_at() -> Value:
        nonlocal index
        while index < len(tokens) and tokens[index][0] == "newline" and tokens[index][1] == "\n":
            index += 1
        if index >= len(tokens):
            raise fail("a value is missing")
        kind, text_value, _ = tokens[index]
        if kind == "string":
            index += 1
            body = text_value[1:-1]
            return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)
        if kind == "number":
            index += 1
            return int(text_value, 0)
        if kind == "punct" and text_value == "[":
            index += 1
            items: list[Value] = []
            while True:
                while index < len(tokens) and tokens[index][0] == "newline":
                    index += 1
                if index < len(tokens) and tokens[index][1] == "]":
                    index += 1
                    return items
                items.append(value_at())
                while index < len(tokens) and tokens[index][0] == "newline":
                    index += 1
                if index < len(tokens) and tokens[index][1] == ",":
                    index += 1
                elif index < len(tokens) and tokens[index][1] == "]":
                    continue
                else:
                    raise fail("expected ',' or ']' in a list")
        raise fail(f"expected a string, a number or a list, not {text_value!r}")

    while index < len(tokens):
        kind, text_value, _ = tokens[index]
        if kind == "newline":
            index += 1
            continue
        if kind != "ident":
            raise fail(f"expected a setting name, not {text_value!r}")
        key = text_value
        index += 1
        if index >= len(tokens) or tokens[index][1] != "=":
            raise fail(f"expected '=' after {key}")
        index += 1
        settings[key] = value_at()
        if index < len(tokens) and tokens[index][0] != "newline":
            raise fail(f"unexpected {tokens[index][1]!r} after the value of {key}")
    return settings


def render_value(value: Value) -> str:
    """A value in xl.cfg syntax (strings double-quoted with backslash escapes)."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[ " + ", ".join(render_value(v) for v in value) + " ]"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _vdev(vdev: str) -> tuple[Bus, int] | None:
    match = re.fullmatch(r"(hd|sd|xvd)([a-z]+)", vdev)
    if match is None:
        match_num = re.fullmatch(r"(\d+)", vdev)
        return (Bus.XEN, int(match_num.group(1))) if match_num else None
    index = 0
    for c in match.group(2):
        index = index * 26 + ord(c) - ord("a") + 1
    return {"hd": Bus.IDE, "sd": Bus.SCSI, "xvd": Bus.XEN}[match.group(1)], index - 1


def _vdev_name(bus: Bus, unit: int) -> str:
    prefix = {Bus.IDE: "hd", Bus.SCSI: "sd", Bus.XEN: "xvd"}[bus]
    letters = ""
    n = unit + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return prefix + letters


def parse_disk_spec(spec: str) -> dict[str, str]:
    """xl-disk-configuration(5): positional ``target, format, vdev, access`` and ``key=value`` items."""
    result: dict[str, str] = {}
    rest = spec
    positional: list[str] = []
    while rest:
        if rest.startswith("target="):
            result["target"] = rest[len("target="):]
            break
        item, _, rest = rest.partition(",")
        item = item.strip()
        if "=" in item:
            key, _, value = item.partition("=")
            result[key.strip()] = value.strip()
        elif item in ("cdrom", "devtype:cdrom"):
            result["devtype"] = "cdrom"
        elif item in ("r", "ro", "w", "rw") and positional:
            result["access"] = item
        else:
            positional.append(item)
    if positional:
        target = positional.pop(0)
        match = re.match(r"^(phy|file|tap:aio|tap:qcow2|tap:vhd|aio|qcow2|qcow|raw|vhd|tap):(.*)$", target)
        if match:
            prefix, target = match.groups()
            fmt = prefix.split(":")[-1]
            if fmt in _FORMATS:
                result.setdefault("format", fmt)
        if target:
            result.setdefault("target", target)
    if positional and (positional[0] in _FORMATS or positional[0] == ""):
        fmt = positional.pop(0)
        if fmt:
            result.setdefault("format", fmt)
    if positional:
        result.setdefault("vdev", positional.pop(0))
    while positional and positional[-1] == "":
        positional.pop()
    if positional:
        raise ValueError(f"too many positional parameters in disk spec {spec!r}")
    return result


@register_codec
class XlCodec(Codec):
    """A Xen ``xl`` configuration file and its disks."""

    name = CODEC
    description = "Xen xl domain configuration (xl.cfg(5)), parsed, never evaluated"
    suffixes = (".cfg",)
    disk_formats = (("raw", None), ("qcow2", None), ("vhd", None))
    lossy = frozenset({"os", "machine", "secure_boot", "cpu.topology", "disks.boot_order", "disks.capacity",
                       "disks.subformat"})
    target = "xen-hvm"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if path.is_dir():
            return 0
        score = 30 if path.suffix.lower() == ".cfg" else 0
        if re.search(rb"^\s*(name|memory|vcpus)\s*=", head[:16384], re.M) and \
                re.search(rb"^\s*(disk|vif|builder|type|kernel)\s*=", head[:16384], re.M):
            score += 55
        return score

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = Path(path)
        text = read_limited(path, options.max_descriptor, what="xl configuration").decode("utf-8", "replace")
        settings = parse_xl(text, path)
        finder = ImageFinder(path.parent, path, options)
        model = _model(settings, path, finder)
        return VmPackage(model=model.validate(source=str(path)), codec=CODEC, source=path, disks=finder.sources)

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        names = disk_files(model, disk_paths)
        outdir = Path(outdir).resolve()
        text = render_xl(model, outdir)
        with OutputFiles(outdir) as files:
            for name in names:
                files.copy(name, disk_paths[name])
            files.write_bytes(f"{file_stem(model.name)}.cfg", text.encode("utf-8"))
        return files.names


def _string(settings: dict[str, Value], key: str, path: Path) -> str | None:
    value = settings.get(key)
    if value is None:
        return None
    if isinstance(value, list):
        raise PackageError(f"{key} must be a string or a number, not a list", path=path)
    return str(value)


def _strings(settings: dict[str, Value], key: str, path: Path) -> list[str]:
    value = settings.get(key, [])
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, list) for v in items):
        raise PackageError(f"{key} must be a list of strings", path=path)
    return [str(v) for v in items]


def _model(settings: dict[str, Value], path: Path, finder: ImageFinder) -> VmModel:
    vendor: dict[str, str] = {}
    name = _string(settings, "name", path) or path.stem
    memory_text = _string(settings, "memory", path) or "128"
    vcpus_text = _string(settings, "vcpus", path) or "1"
    if not memory_text.isdigit() or not vcpus_text.isdigit() or int(vcpus_text) < 1:
        raise PackageError("memory and vcpus must be positive numbers", path=path)
    guest_type = _string(settings, "type", path) or ("hvm" if _string(settings, "builder", path) == "hvm"
                                                     else "pv" if "builder" not in settings and "kernel" in settings
                                                     else "hvm")
    if guest_type != "hvm":
        vendor["type"] = guest_type
    uuid = (_string(settings, "uuid", path) or "").lower() or None
    firmware = Firmware.UEFI if _string(settings, "bios", path) == "ovmf" else Firmware.BIOS
    if "bios" in settings and _string(settings, "bios", path) not in ("ovmf", "seabios"):
        vendor["bios"] = str(settings["bios"])
    disks: list[Disk] = []
    for n, spec in enumerate(_strings(settings, "disk", path)):
        try:
            fields = parse_disk_spec(spec)
        except ValueError as exc:
            raise PackageError(f"disk[{n}]: {exc}", path=path) from None
        vdev = fields.pop("vdev", "")
        address = _vdev(vdev)
        if address is None:
            raise PackageError(f"disk[{n}]: vdev {vdev!r} is not hdX, sdX or xvdX", path=path)
        device = DeviceKind.CDROM if fields.pop("devtype", "disk") == "cdrom" else DeviceKind.DISK
        target = fields.pop("target", "")
        fmt = fields.pop("format", "raw")
        fields.pop("access", None)
        disk_path = finder.add(target, f"disk[{n}] target") if target else None
        if disk_path is None and device == DeviceKind.DISK:
            raise PackageError(f"disk[{n}]: a disk needs a target", path=path)
        if fields:
            vendor[f"disk/{vdev}"] = ",".join(f"{k}={v}" for k, v in fields.items())
        bus, unit = address
        disks.append(Disk(device, bus, 0, unit, disk_path, ({"qcow": "qcow2"}.get(fmt, fmt) if fmt in
                                                             ("raw", "qcow2", "vhd") else None)
                          if disk_path else None))
    disks = _boot(disks, _string(settings, "boot", path) or "cd")
    boot = _string(settings, "boot", path)
    if boot is not None and not set(boot) <= {"c", "d", "n"}:
        raise PackageError(f"boot {boot!r}: only c, d and n are boot devices", path=path)
    if boot and "n" in boot:
        vendor["boot"] = boot
    models = {Bus.IDE: ControllerModel.IDE, Bus.SCSI: ControllerModel.LSILOGIC, Bus.XEN: ControllerModel.XEN_BLKFRONT}
    controllers = tuple(Controller(models[b], 0) for b in sorted({d.bus for d in disks}))
    nics: list[Nic] = []
    for n, spec in enumerate(_strings(settings, "vif", path)):
        fields = dict(item.strip().partition("=")[::2] for item in spec.split(",") if item.strip())
        model_name = fields.pop("model", None)
        nic_type = fields.pop("type", None)
        if model_name is None or nic_type == "vif":
            nic_model = NicModel.NETFRONT
        elif model_name in _NIC_READ:
            nic_model = _NIC_READ[model_name]
        else:
            raise PackageError(f"vif[{n}]: model {model_name!r} is not one polyvisor maps", path=path)
        if nic_type not in (None, "vif", "ioemu") or (nic_type == "ioemu" and model_name is None):
            vendor[f"vif/{n}/type"] = str(nic_type)
        mac = fields.pop("mac", "").lower() or None
        network = fields.pop("bridge", None)
        if fields:
            vendor[f"vif/{n}"] = ",".join(f"{k}={v}" for k, v in fields.items())
        nics.append(Nic(nic_model, mac, network))
    serial_value = settings.get("serial", [])
    serial_items = serial_value if isinstance(serial_value, list) else [serial_value]
    serials = tuple(Serial(i) for i, item in enumerate(serial_items) if str(item) not in ("none", ""))
    graphics = Graphics.SPICE if truthy(str(settings.get("spice", 0))) else \
        Graphics.VNC if truthy(str(settings.get("vnc", 0))) else Graphics.NONE
    for key, value in settings.items():
        if (key not in _MAPPED and key not in ("builder",)) or (key == "builder" and "type" not in settings):
            vendor[f"={key}"] = render_value(value)
    model = VmModel(name=name, memory=int(memory_text) * MiB, cpu=Cpu(1, int(vcpus_text), 1), uuid=uuid,
                    firmware=firmware, controllers=controllers, disks=tuple(disks), nics=tuple(nics),
                    serials=serials, graphics=graphics)
    return model.with_vendor(CODEC, vendor)


def _boot(disks: list[Disk], order: str) -> list[Disk]:
    kinds = {"c": DeviceKind.DISK, "d": DeviceKind.CDROM}
    result = sorted(disks, key=lambda d: (d.bus, d.controller, d.unit))
    position = 1
    for letter in order:
        kind = kinds.get(letter)
        for i, disk in enumerate(result):
            if kind is not None and disk.device == kind and disk.boot_order is None:
                result[i] = dataclasses.replace(disk, boot_order=position)
                position += 1
                break
    return result


def render_xl(model: VmModel, outdir: Path) -> str:
    """The xl.cfg text for *model* (disk targets are absolute paths inside *outdir*)."""
    vendor = model.vendor_keys(CODEC)
    lines = [f"# {model.name}: written by polyvisor (xl.cfg(5))"]
    settings: list[tuple[str, Value]] = [("name", model.name)]
    if model.uuid:
        settings.append(("uuid", model.uuid))
    settings.append(("type", vendor.get("type", "hvm")))
    settings.append(("memory", model.memory // MiB))
    settings.append(("vcpus", model.cpu.count))
    if model.firmware == Firmware.UEFI:
        settings.append(("bios", "ovmf"))
    elif "bios" in vendor:
        settings.append(("bios", vendor["bios"]))
    disks: list[Value] = []
    for disk in model.disks:
        if disk.bus not in (Bus.IDE, Bus.SCSI, Bus.XEN):
            raise UnmappableModel(f"xl has no {disk.bus} disks (hdX, sdX, xvdX only)")
        ctrl = model.controller_for(disk)
        if ctrl.model not in (ControllerModel.IDE, ControllerModel.LSILOGIC, ControllerModel.XEN_BLKFRONT) or \
                disk.controller != 0:
            raise UnmappableModel(f"xl has no {ctrl.model} controller {disk.controller}")
        vdev = _vdev_name(disk.bus, disk.unit)
        parts = []
        if disk.path is not None:
            fmt = disk.format or "raw"
            if fmt not in ("raw", "qcow2", "vhd"):
                raise UnmappableModel(f"xl disks are raw, qcow2 or vhd, not {fmt} ({disk.path})")
            parts.append(f"format={fmt}")
        parts.append(f"vdev={vdev}")
        parts.append("access=ro" if disk.device == DeviceKind.CDROM else "access=rw")
        if disk.device == DeviceKind.CDROM:
            parts.append("devtype=cdrom")
        elif disk.device == DeviceKind.FLOPPY:
            raise UnmappableModel("xl has no floppy drives")
        if vendor.get(f"disk/{vdev}"):
            parts.append(vendor[f"disk/{vdev}"])
        parts.append(f"target={outdir / disk.path}" if disk.path else "target=")
        disks.append(",".join(parts))
    settings.append(("disk", disks))
    vifs: list[Value] = []
    for n, nic in enumerate(model.nics):
        parts = []
        if nic.mac:
            parts.append(f"mac={nic.mac}")
        if nic.network:
            parts.append(f"bridge={nic.network}")
        if nic.model == NicModel.NETFRONT:
            parts.append("type=vif")
        elif nic.model in _NIC_WRITE:
            parts.append(f"model={_NIC_WRITE[nic.model]}")
            if vendor.get(f"vif/{n}/type"):
                parts.append(f"type={vendor[f'vif/{n}/type']}")
        else:
            raise UnmappableModel(f"xl has no {nic.model} network adapter")
        if vendor.get(f"vif/{n}"):
            parts.append(vendor[f"vif/{n}"])
        vifs.append(",".join(parts))
    settings.append(("vif", vifs))
    if model.serials:
        ports = max(s.port for s in model.serials) + 1
        present = {s.port for s in model.serials}
        settings.append(("serial", ["pty" if p in present else "none" for p in range(ports)]))
    if model.graphics == Graphics.VNC:
        settings.append(("vnc", 1))
    elif model.graphics == Graphics.SPICE:
        settings.append(("spice", 1))
    letters = {DeviceKind.DISK: "c", DeviceKind.CDROM: "d"}
    order = "".join(dict.fromkeys(letters[d.device] for d in sorted(
        (d for d in model.disks if d.boot_order is not None and d.device in letters),
        key=lambda d: d.boot_order or 0)))
    if vendor.get("boot") and vendor["boot"].replace("n", "") == order:
        order = vendor["boot"]
    if order:
        settings.append(("boot", order))
    lines += [f"{key} = {render_value(value)}" for key, value in settings]
    for key, value in vendor.items():
        if key.startswith("="):
            try:  # a vendor value is untrusted: it must be exactly one value, not more settings
                parsed = parse_xl(f"{key[1:]} = {value}", Path("vendor"))
            except PackageError:
                parsed = {}
            if list(parsed) != [key[1:]] or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key[1:]):
                raise UnmappableModel(f"vendor key xl.{key} does not hold one xl.cfg value")
            lines.append(f"{key[1:]} = {value}")
    return "\n".join(lines) + "\n"


__all__ = ["XlCodec", "parse_disk_spec", "parse_xl", "render_xl"]
