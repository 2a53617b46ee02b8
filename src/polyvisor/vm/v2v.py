"""Converting a VM package from one hypervisor's form to another's (``polyvisor v2v``).

:func:`v2v` reads the source package with its codec, chooses the target
hypervisor's devices the guest is known to drive
(:func:`~polyvisor.vm.mapping.choose_devices`), converts every disk with
:func:`polyvisor.disk.convert.convert` to the target's native format, writes
the target package (descriptor named after the VM) and a conversion report
(``report.json``, ``report.txt``) into OUTDIR.

Everything is produced in a staging directory inside OUTDIR and moved into
place only when all of it succeeded; on failure the staging directory is
removed (and OUTDIR too when v2v created it), so OUTDIR never holds partial
results and nothing is written outside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyvisor import records
from polyvisor.disk import CreateOptions, ReferencePolicy, open_image
from polyvisor.disk.convert import convert
from polyvisor.errors import UnmappableModel, UsageError
from polyvisor.vm.codecs import Codec, ReadOptions, drop_fields, get_codec, read_package
from polyvisor.vm.codecs._common import file_stem
from polyvisor.vm.mapping import Change, choose_devices, hyperv_generation
from polyvisor.vm.model import DeviceKind, Disk, VmModel, disk_label

#: Called with (bytes done, bytes in total) over all disks.
Progress = Callable[[int, int], None]

#: Codecs whose package file holds the disks (an archive), rather than naming disk files beside it.
_EMBEDDING = {"ova", "xva"}
_EXTENSIONS = {"qcow2": ".qcow2", "vmdk": ".vmdk", "vhd": ".vhd", "vhdx": ".vhdx", "vdi": ".vdi", "raw": ".img"}


@dataclass(frozen=True)
class TargetPreset:
    """What ``--to NAME`` means: the codec, the hypervisor whose devices to choose, the native disk format."""

    name: str
    codec: str
    hypervisor: str | None  #: a :data:`~polyvisor.vm.mapping.TARGETS` name; None: the package names no devices
    disk_format: tuple[str, str | None]
    note: str = ""

    def resolve(self, model: VmModel) -> tuple[str | None, tuple[str, str | None], list[str]]:
        """(hypervisor, disk format, notes) for *model*; Hyper-V's generation depends on the guest."""
        if self.name != "hyperv":
            return self.hypervisor, self.disk_format, [self.note] if self.note else []
        generation = hyperv_generation(model)
        notes = [f"Hyper-V generation {generation.generation}: " + "; ".join(generation.reasons)]
        if generation.generation == 2:
            return "hyperv-gen2", ("vhdx", None), notes
        return "hyperv-gen1", ("vhd", None), notes


PRESETS: dict[str, TargetPreset] = {p.name: p for p in (
    TargetPreset("ova", "ova", "vmware", ("vmdk", "streamOptimized")),
    TargetPreset("ovf", "ovf", "vmware", ("vmdk", "streamOptimized")),
    TargetPreset("vmx", "vmx", "vmware", ("vmdk", "monolithicSparse")),
    TargetPreset("libvirt", "libvirt", "kvm", ("qcow2", None)),
    TargetPreset("proxmox", "proxmox", "kvm", ("qcow2", None)),
    TargetPreset("xl", "xl", "xen-hvm", ("raw", None)),
    TargetPreset("vbox", "vbox", "virtualbox", ("vdi", None)),
    TargetPreset("xva", "xva", "xenserver", ("raw", None),
                 "XVA disks are raw images cut into checksummed 1 MiB chunks inside the archive"),
    TargetPreset("hyperv", "hyperv", "hyperv-gen1", ("vhd", None)),
    TargetPreset("ec2", "ec2", None, ("vmdk", "streamOptimized"),
                 "EC2 attaches its own storage and network devices (NVMe, ENA) when it launches the image"),
)}


@dataclass
class DiskReport:
    """One image the conversion produced."""

    device: str
    source: str
    source_format: str | None
    source_size: int | None
    target: str
    format: str
    subformat: str | None
    virtual_size: int
    bytes_written: int
    converted: bool


@dataclass
class ConversionReport:
    """What :func:`v2v` did: mappings, device changes with reasons, what the target cannot keep, disks."""

    source: str
    source_codec: str
    target: str
    target_codec: str
    hypervisor: str | None
    vm: str
    outdir: str
    mappings: list[str] = field(default_factory=list)
    changes: list[dict[str, str]] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    vendor_carried: list[str] = field(default_factory=list)
    vendor_dropped: list[str] = field(default_factory=list)
    disks: list[DiskReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return dataclasses.asdict(self)

    def to_text(self) -> str:
        """The report for people."""
        lines = [f"polyvisor v2v: {self.vm}",
                 f"  source: {self.source} ({self.source_codec})",
                 f"  target: {self.target} ({self.target_codec}"
                 + (f", devices for {self.hypervisor})" if self.hypervisor else ")"),
                 f"  output: {self.outdir}", ""]
        sections: list[tuple[str, list[str]]] = [
            ("Mappings", self.mappings),
            ("Device changes", [f"{c['what']}: {c['before']} -> {c['after']}: {c['reason']}" for c in self.changes]
             or ["none: the target offers every device the guest has"]),
            ("Not expressible by the target (dropped)", [f"{d['field']}: {d['value']}" for d in self.dropped]
             or ["nothing"]),
            ("Vendor keys carried", self.vendor_carried or ["none"]),
            ("Vendor keys dropped", self.vendor_dropped or ["none"]),
            ("Disks", [f"{d.device}: {d.source} ({d.source_format or 'probed'}, {d.source_size} bytes) -> {d.target}"
                       f" ({d.format}{'/' + d.subformat if d.subformat else ''}, virtual size {d.virtual_size}, "
                       f"{d.bytes_written} bytes written{'' if d.converted else ', copied'})" for d in self.disks]
             or ["none"]),
            ("Notes", self.notes or ["none"]),
            ("Files", self.files),
        ]
        for title, items in sections:
            lines.append(f"{title}:")
            lines += [f"  {item}" for item in items]
            lines.append("")
        return "\n".join(lines)


def vendor_namespace(codec: str) -> str:
    """The ``VmModel.vendor`` key a codec keeps its vendor keys under (OVA shares OVF's)."""
    return "ovf" if codec in ("ova", "ovf") else codec


def v2v(  # noqa: PLR0917 - the documented signature: v2v(src, target, outdir, disk_format, progress, policy)
    src: str | os.PathLike[str],
    target: str,
    outdir: str | os.PathLike[str],
    disk_format: str | None = None,
    progress: Progress | None = None,
    policy: ReferencePolicy | None = None,
    *,
    drivers: Iterable[str] = (),
    source_codec: str | None = None,
) -> ConversionReport:
    """Convert the VM package *src* for *target* (a :data:`PRESETS` name) into *outdir*.

    *disk_format* (``FMT`` or ``FMT/SUBFORMAT``) overrides the target's native
    disk format; it must be one the target package can carry.  *policy* says
    where the source's disk references may lead (default: inside the package).
    *drivers* names driver packages installed in the guest (``virtio-win``,
    ``vmware-tools``, ``xen-pv``), widening the devices it can be given.
    """
    if target not in PRESETS:
        raise UsageError(f"unknown target {target!r} (known: {', '.join(PRESETS)})")
    preset = PRESETS[target]
    codec = get_codec(preset.codec)
    src_path = Path(src)
    out = Path(outdir)
    options = ReadOptions(policy=policy) if policy is not None else ReadOptions()
    package = read_package(src_path, source_codec, options)
    model = package.model
    hypervisor, native, notes = preset.resolve(model)
    fmt, subformat = _disk_format(codec, disk_format, native)
    report = ConversionReport(source=str(src_path), source_codec=package.codec, target=target,
                              target_codec=codec.name, hypervisor=hypervisor, vm=model.name,
                              outdir=str(out), notes=notes)
    changes: tuple[Change, ...] = ()
    adapted = model
    if hypervisor is not None:
        choice = choose_devices(model, hypervisor, drivers=drivers)
        adapted, changes = choice.model, choice.changes
    report.changes = [{"what": c.what, "before": c.before, "after": c.after, "reason": c.reason} for c in changes]
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".polyvisor-v2v-", dir=out))
    placed: list[Path] = []  # files already in OUTDIR, removed again if anything fails
    try:
        final_model, disk_lines = _convert_disks(package.disks, model, adapted, staging, fmt=fmt,
                                                 subformat=subformat, codec=codec, report=report,
                                                 progress=progress, policy=options.policy)
        report.mappings = _mappings(model, final_model, disk_lines)
        _lossy(final_model, codec, report)
        _vendor(final_model, codec.name, report)
        images = sorted({d.path for d in final_model.disks if d.path})
        stem = file_stem(final_model.name)
        for name in [*images, *(stem + suffix for suffix in codec.suffixes), "report.json", "report.txt"]:
            if (out / name).exists():
                raise UsageError(f"{out / name} already exists; choose an empty output directory")
        disk_paths = {name: staging / "disks" / name for name in images}
        if codec.name not in _EMBEDDING:
            # the package references its disks where they will stay: move them into OUTDIR first
            for name in images:
                os.replace(disk_paths[name], out / name)
                placed.append(out / name)
                disk_paths[name] = out / name
        written = codec.write(final_model.validate(), out, disk_paths)
        placed += [p for p in written if p not in placed]
        home = out.resolve()
        report.files = [*sorted((p.resolve().relative_to(home) if p.is_absolute() else p.relative_to(out))
                                .as_posix() for p in placed), "report.json", "report.txt"]
        for name, text in (("report.json", json.dumps(report.to_dict(), indent=2) + "\n"),
                           ("report.txt", report.to_text())):
            tmp = staging / name
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out / name)
            placed.append(out / name)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return report


def _disk_format(codec: type[Codec], requested: str | None,
                 native: tuple[str, str | None]) -> tuple[str, str | None]:
    if requested is None:
        return native
    fmt, _, sub = requested.partition("/")
    subformat = sub or None
    fmt = {"vpc": "vhd"}.get(fmt.lower(), fmt.lower())
    if subformat is None:
        subformat = next((s for f, s in codec.disk_formats if f == fmt), None)
    if not codec.supports_format(fmt, subformat):
        carried = ", ".join(f"{f}{'/' + s if s else ''}" for f, s in codec.disk_formats)
        raise UsageError(f"{codec.name} packages carry {carried} disks, not {requested}")
    return fmt, subformat


def _convert_disks(sources: dict[str, Any], original: VmModel, model: VmModel, staging: Path, *, fmt: str,
                   subformat: str | None, codec: type[Codec], report: ConversionReport, progress: Progress | None,
                   policy: ReferencePolicy) -> tuple[VmModel, list[str]]:
    """Convert hard disks, copy removable media; returns *model* naming the new files, and a mapping line per
    drive (source address and file -> target address and file)."""
    extracted_dir = staging / "source"
    disks_dir = staging / "disks"
    disks_dir.mkdir(parents=True)
    stem = file_stem(original.name)
    members = {name: src for name, src in sources.items() if src.is_member}
    extracted: dict[str, Path] = {}
    if members:
        from polyvisor.vm.codecs import VmPackage

        extracted = VmPackage(model=original, codec="", source=staging, disks=members).extract(extracted_dir)
    total = sum(_size(extracted.get(n) or src.path) for n, src in sources.items())
    done = 0
    new_disks: list[Disk] = []
    names: dict[str, str] = {}
    used: set[str] = set()
    number = 0
    drop_removable = codec.name == "ec2"
    lines: list[str] = []
    originals = list(original.disks)

    def describe(disk: Disk) -> str:
        return (f"{disk_label(disk)} {disk.path or '(empty)'} [{disk.format or '?'}"
                f"{'/' + disk.subformat if disk.subformat else ''}]")

    def mapped(adapted: Disk, new: Disk | None) -> None:
        source = next((d for d in originals if d.path == adapted.path and d.device == adapted.device), None)
        if source is not None:
            originals.remove(source)
        line = f"{adapted.device} {describe(source) if source else '?'} -> "
        line += describe(new) + (f", boot order {new.boot_order}" if new.boot_order else "") if new \
            else "not carried"
        lines.append(line)

    for disk in sorted(model.disks, key=lambda d: (d.bus, d.controller, d.unit)):
        if disk.path is None:
            if drop_removable:
                mapped(disk, None)
                continue
            new_disks.append(disk)
            mapped(disk, disk)
            continue
        if drop_removable and disk.device != DeviceKind.DISK:
            report.notes.append(f"{disk.device} {disk_label(disk)} ({disk.path}) is not carried: the target has no "
                                "removable drives")
            mapped(disk, None)
            continue
        source_file = extracted.get(disk.path) or sources[disk.path].path
        if disk.path in names:
            new_disks.append(dataclasses.replace(disk, path=names[disk.path]))
            mapped(disk, new_disks[-1])
            continue
        if disk.device == DeviceKind.DISK:
            number += 1
            name = _unique(f"{stem}-disk{number}{_EXTENSIONS[fmt]}", used)
            base = done

            def step(pos: int, _total: int, base: int = base) -> None:
                if progress is not None:
                    progress(base + pos, total)

            result = convert(source_file, disks_dir / name, fmt, CreateOptions(subformat=subformat)
                             if subformat and fmt in ("vmdk", "vhd", "vhdx", "vdi") else CreateOptions(),
                             source_format=disk.format, policy=_policy_for(source_file, policy), progress=step)
            done += _size(source_file)
            report.disks.append(DiskReport(f"{disk.device} {disk_label(disk)}", disk.path, disk.format,
                                           _size(source_file), name, result.format,
                                           result.subformat if result.subformat not in ("", result.format) else None,
                                           result.virtual_size, result.data_bytes_written, True))
            new = dataclasses.replace(disk, path=name, format=result.format,
                                      subformat=result.subformat if fmt in ("vmdk",) else None,
                                      capacity=result.virtual_size)
        else:
            name = _unique(Path(disk.path).name, used)
            shutil.copyfile(source_file, disks_dir / name)
            done += _size(source_file)
            report.disks.append(DiskReport(f"{disk.device} {disk_label(disk)}", disk.path, disk.format,
                                           _size(source_file), name, "raw", None, _size(source_file),
                                           _size(source_file), False))
            new = dataclasses.replace(disk, path=name, format="raw", subformat=None, capacity=None)
        names[disk.path] = name
        new_disks.append(new)
        mapped(disk, new)
        if progress is not None:
            progress(done, total)
    if drop_removable:
        kept = {(d.bus, d.controller) for d in new_disks}
        model = dataclasses.replace(model, controllers=tuple(c for c in model.controllers
                                                             if (c.bus, c.index) in kept))
    shutil.rmtree(extracted_dir, ignore_errors=True)
    return dataclasses.replace(model, disks=tuple(new_disks)), lines


def _policy_for(image: Path, policy: ReferencePolicy) -> ReferencePolicy:
    """The source policy, plus the image's own directory (VMDK extents and backing files beside it)."""
    return records.replace(policy, allowed_dirs=(*policy.allowed_dirs, image.resolve().parent))


def _size(path: Path) -> int:
    try:
        with open_image(path) as image:
            return image.virtual_size
    except Exception:  # noqa: BLE001 - only for progress totals and the report
        return path.stat().st_size


def _unique(name: str, used: set[str]) -> str:
    candidate = name
    n = 1
    while candidate in used or candidate in ("report.json", "report.txt"):
        n += 1
        stem, dot, ext = name.rpartition(".")
        candidate = f"{stem}-{n}.{ext}" if dot else f"{name}-{n}"
    used.add(candidate)
    return candidate


def _mappings(before: VmModel, after: VmModel, disk_lines: list[str]) -> list[str]:
    def controllers(model: VmModel) -> str:
        return ", ".join(f"{c.bus}{c.index} {c.model}" for c in model.controllers) or "none"

    lines = [f"firmware: {before.firmware} -> {after.firmware}"
             + (f" (Secure Boot {'on' if after.secure_boot else 'off'})" if after.firmware == "uefi" else ""),
             f"chipset: {before.machine} -> {after.machine}",
             f"vCPUs: {before.cpu.count} ({before.cpu.sockets}x{before.cpu.cores}x{before.cpu.threads}) -> "
             f"{after.cpu.count} ({after.cpu.sockets}x{after.cpu.cores}x{after.cpu.threads})",
             f"memory: {before.memory // (1 << 20)} MiB -> {after.memory // (1 << 20)} MiB",
             f"guest OS: {before.os.osinfo or before.os.distribution or before.os.family} ({before.os.arch})",
             f"storage controllers: {controllers(before)} -> {controllers(after)}",
             *disk_lines]
    for i, b_nic in enumerate(before.nics):
        a_nic = after.nics[i] if i < len(after.nics) else None
        lines.append(f"nic {i}: {b_nic.model} {b_nic.mac or '(host-assigned MAC)'} on {b_nic.network or '-'} -> "
                     + (f"{a_nic.model}" if a_nic else "not carried"))
    lines.append("serial ports: " + (", ".join(f"COM{s.port + 1}" for s in before.serials) or "none"))
    lines.append(f"display: {before.graphics} -> {after.graphics}")
    return lines


def _lossy(model: VmModel, codec: type[Codec], report: ConversionReport) -> None:
    for path in sorted(codec.lossy):
        try:
            dropped = drop_fields(model, {path})
        except (KeyError, UnmappableModel):
            continue
        if dropped != model:
            report.dropped.append({"field": path, "value": _describe(model, path)})


def _describe(model: VmModel, path: str) -> str:
    head, _, rest = path.partition(".")
    if path == "disks.removable":
        return ", ".join(f"{d.device} {disk_label(d)}" for d in model.disks if d.device != DeviceKind.DISK)
    if path == "disks.address":
        return ", ".join(disk_label(d) for d in model.disks)
    if path in ("cpu.threads", "cpu.topology"):
        cpu = model.cpu
        return f"{cpu.sockets} socket(s) x {cpu.cores} core(s) x {cpu.threads} thread(s)"
    value = getattr(model, head)
    if isinstance(value, tuple):
        if rest:
            return ", ".join(f"{disk_label(v) if isinstance(v, Disk) else i}: {getattr(v, rest)}"
                             for i, v in enumerate(value))
        return ", ".join(str(v) for v in value) or "none"
    if rest:
        return str(getattr(value, rest))
    return str(value)


def _vendor(model: VmModel, codec: str, report: ConversionReport) -> None:
    keep = vendor_namespace(codec)
    for namespace, keys in sorted(model.vendor.items()):
        for key in sorted(keys):
            entry = f"{namespace}.{key}"
            (report.vendor_carried if namespace == keep else report.vendor_dropped).append(entry)


__all__ = ["PRESETS", "ConversionReport", "DiskReport", "TargetPreset", "v2v", "vendor_namespace"]
