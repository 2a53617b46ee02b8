"""Amazon EC2 VM Import: an ``ImportImage`` request (``NAME.json``) beside the disk files to upload.

``NAME.json`` holds the parameters of EC2's ``ImportImage`` API action (EC2
API reference "ImportImage"; boto3 ``ec2.import_image(**params)``, or ``aws
ec2 import-image --cli-input-json file://NAME.json``): ``Description``,
``DiskContainers`` (one per disk, boot disk first: ``Description``,
``Format`` ``vmdk``/``vhd``/``vhdx``/``raw``, ``UserBucket`` ``{S3Bucket,
S3Key}``), ``BootMode`` (``legacy-bios``/``uefi``/``uefi-preferred``),
``Platform`` (``Linux``/``Windows``), ``Architecture`` (``x86_64``,
``i386``, ``arm64``), ``LicenseType`` and ``TagSpecifications`` for the
``import-image-task``.  polyvisor writes ``S3Bucket`` as the placeholder
``REPLACE-WITH-YOUR-BUCKET``: upload the disks, put the bucket's name there,
then run the import.  The disks are streamOptimized VMDKs (the format VM
Import documents for VMware exports).

An import request describes disks, firmware and platform only — EC2 picks
memory and vCPUs with the instance type at launch.  polyvisor records the
VM's name, memory, vCPU count and guest OS as tags (``Name``,
``polyvisor:memory-mib``, ``polyvisor:vcpus``, ``polyvisor:os-*``) so that a
round trip keeps them; without those tags memory reads as 1024 MiB and one
vCPU.  Everything else cannot be expressed (``lossy``): controllers and disk
addresses (EC2 attaches volumes itself; read back as NVMe disks in order),
CD-ROM and floppy drives, NICs (EC2 attaches ENA interfaces at launch),
serial ports, display, chipset, UUID, Secure Boot, disk capacity, subformat
and boot order (the first disk boots).  Unknown request keys are kept as
vendor keys.  Disk files are looked up by the file name of their ``S3Key``
beside the JSON file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polyvisor.errors import PackageError, UnmappableModel, UnsafePackage
from polyvisor.vm.codecs import register_codec
from polyvisor.vm.codecs._common import ImageFinder, file_stem
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
    OsFamily,
    VmModel,
    check_package_path,
)
from polyvisor.vm.safety import read_limited

CODEC = "ec2"
BUCKET_PLACEHOLDER = "REPLACE-WITH-YOUR-BUCKET"
_FORMATS = {"vmdk": "vmdk", "vhd": "vhd", "vhdx": "vhdx", "raw": "raw"}
_ARCH = {"x86_64": Arch.X86_64, "i386": Arch.I686, "arm64": Arch.AARCH64}
_ARCH_WRITE = {v: k for k, v in _ARCH.items()}
_KNOWN = {"Description", "DiskContainers", "BootMode", "Platform", "Architecture", "LicenseType",
          "TagSpecifications"}
_OS_TAGS = ("distribution", "version", "osinfo")


@register_codec
class Ec2Codec(Codec):
    """An EC2 ``ImportImage`` request and its disks."""

    name = CODEC
    description = "Amazon EC2 VM Import request (ImportImage parameters as JSON) beside streamOptimized VMDKs"
    suffixes = (".json",)
    disk_formats = (("vmdk", "streamOptimized"), ("vhd", None), ("vhdx", None), ("raw", None))
    lossy = frozenset({"uuid", "machine", "graphics", "secure_boot", "nics", "serials", "cpu.topology",
                       "disks.removable", "disks.address", "disks.boot_order", "disks.capacity",
                       "disks.subformat"})
    target = "kvm"

    @classmethod
    def probe(cls, path: Path, head: bytes) -> int:
        if path.is_dir() or not head.lstrip().startswith(b"{"):
            return 0
        return 90 if b'"DiskContainers"' in head else 0

    @classmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        path = Path(path)
        data = read_limited(path, options.max_descriptor, what="ImportImage request")
        try:
            request = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PackageError(f"not valid JSON: {exc}", path=path) from None
        if not isinstance(request, dict):
            raise PackageError("an ImportImage request is a JSON object", path=path)
        finder = ImageFinder(path.parent, path, options)
        model = _model(request, path, finder)
        return VmPackage(model=model.validate(source=str(path)), codec=CODEC, source=path, disks=finder.sources)

    @classmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        request = build_request(model)
        disks = [d for d in model.disks if d.device == DeviceKind.DISK]
        with OutputFiles(Path(outdir)) as files:
            for disk in disks:
                assert disk.path is not None
                if disk.path not in disk_paths:
                    raise PackageError(f"no file given for image {disk.path!r}")
                files.copy(disk.path, disk_paths[disk.path])
            files.write_bytes(f"{file_stem(model.name)}.json",
                              (json.dumps(request, indent=2) + "\n").encode("utf-8"))
        return files.names


def _tags(request: dict[str, Any]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for spec in request.get("TagSpecifications") or []:
        if isinstance(spec, dict) and spec.get("ResourceType") == "import-image-task":
            for tag in spec.get("Tags") or []:
                if isinstance(tag, dict) and isinstance(tag.get("Key"), str):
                    tags[tag["Key"]] = str(tag.get("Value", ""))
    return tags


def _model(request: dict[str, Any], path: Path, finder: ImageFinder) -> VmModel:
    tags = _tags(request)
    name = tags.pop("Name", None) or str(request.get("Description") or "") or path.stem
    try:
        memory = int(tags.pop("polyvisor:memory-mib", "1024")) * MiB
        vcpus = int(tags.pop("polyvisor:vcpus", "1"))
    except ValueError:
        raise PackageError("tags polyvisor:memory-mib and polyvisor:vcpus must be numbers", path=path) from None
    platform = str(request.get("Platform") or "")
    family = {"linux": OsFamily.LINUX, "windows": OsFamily.WINDOWS}.get(platform.lower(), OsFamily.OTHER)
    arch_name = str(request.get("Architecture") or "x86_64")
    if arch_name not in _ARCH:
        raise PackageError(f"Architecture {arch_name!r} is not one of {', '.join(_ARCH)}", path=path)
    os = GuestOS(family=family, arch=_ARCH[arch_name], **{k: tags.pop(f"polyvisor:os-{k}", None) for k in _OS_TAGS})
    boot_mode = str(request.get("BootMode") or "legacy-bios")
    if boot_mode not in ("legacy-bios", "uefi", "uefi-preferred"):
        raise PackageError(f"BootMode {boot_mode!r} is not legacy-bios, uefi or uefi-preferred", path=path)
    vendor: dict[str, str] = {f"tag:{k}": v for k, v in tags.items()}
    if boot_mode == "uefi-preferred":
        vendor["BootMode"] = boot_mode
    if request.get("LicenseType", "BYOL") != "BYOL":
        vendor["LicenseType"] = str(request["LicenseType"])
    if request.get("Description") not in (None, name):
        vendor["Description"] = str(request["Description"])
    for key, value in request.items():
        if key not in _KNOWN:
            vendor[key] = json.dumps(value, sort_keys=True)
    containers = request.get("DiskContainers")
    if not isinstance(containers, list) or not containers:
        raise PackageError("DiskContainers must be a non-empty list", path=path)
    disks: list[Disk] = []
    for n, container in enumerate(containers):
        if not isinstance(container, dict):
            raise PackageError(f"DiskContainers[{n}] is not an object", path=path)
        fmt = str(container.get("Format") or "").lower()
        if fmt not in _FORMATS:
            raise PackageError(f"DiskContainers[{n}].Format {fmt!r} is not one polyvisor maps "
                               f"({', '.join(_FORMATS)})", path=path)
        bucket = container.get("UserBucket") or {}
        key = str(bucket.get("S3Key") or container.get("Url") or "") if isinstance(bucket, dict) else ""
        file_name = key.rstrip("/").rsplit("/", 1)[-1]
        why = check_package_path(file_name) if file_name else "is empty"
        if why is not None or file_name in (".", ".."):
            raise UnsafePackage(f"DiskContainers[{n}]: disk file {file_name!r} {why or 'is not a file name'}",
                                path=path)
        disk_path = finder.add(file_name, f"DiskContainers[{n}]")
        disks.append(Disk(DeviceKind.DISK, Bus.NVME, 0, n, disk_path, _FORMATS[fmt], None, None,
                          1 if n == 0 else None))
    model = VmModel(name=name, memory=memory, cpu=Cpu(1, max(vcpus, 1), 1),
                    firmware=Firmware.BIOS if boot_mode == "legacy-bios" else Firmware.UEFI, os=os,
                    controllers=(Controller(ControllerModel.NVME, 0),), disks=tuple(disks))
    return model.with_vendor(CODEC, vendor)


def build_request(model: VmModel) -> dict[str, Any]:
    """The ImportImage parameters for *model* (hard disks only, boot disk first)."""
    vendor = model.vendor_keys(CODEC)
    disks = sorted((d for d in model.disks if d.device == DeviceKind.DISK),
                   key=lambda d: (d.boot_order is None, d.boot_order or 0))
    if not disks:
        raise UnmappableModel("an EC2 import needs at least one disk")
    if model.os.arch not in _ARCH_WRITE:
        raise UnmappableModel(f"EC2 imports {', '.join(_ARCH)} images, not {model.os.arch}")
    containers: list[dict[str, Any]] = []
    for disk in disks:
        assert disk.path is not None
        fmt = disk.format or "vmdk"
        if fmt not in _FORMATS:
            raise UnmappableModel(f"EC2 imports VMDK, VHD, VHDX or raw disks, not {fmt} ({disk.path})")
        containers.append({"Description": disk.path, "Format": fmt,
                           "UserBucket": {"S3Bucket": BUCKET_PLACEHOLDER,
                                          "S3Key": f"{file_stem(model.name)}/{disk.path}"}})
    tags = [{"Key": "Name", "Value": model.name},
            {"Key": "polyvisor:memory-mib", "Value": str(model.memory // MiB)},
            {"Key": "polyvisor:vcpus", "Value": str(model.cpu.count)}]
    tags += [{"Key": f"polyvisor:os-{k}", "Value": str(getattr(model.os, k))} for k in _OS_TAGS
             if getattr(model.os, k) is not None]
    tags += [{"Key": k[len("tag:"):], "Value": v} for k, v in vendor.items() if k.startswith("tag:")]
    boot_mode = "legacy-bios" if model.firmware == Firmware.BIOS else vendor.get("BootMode", "uefi")
    request: dict[str, Any] = {
        "Description": vendor.get("Description", model.name),
        "DiskContainers": containers,
        "BootMode": boot_mode if boot_mode in ("uefi", "uefi-preferred", "legacy-bios") else "uefi",
        "Architecture": _ARCH_WRITE[model.os.arch],
        "LicenseType": vendor.get("LicenseType", "BYOL"),
        "TagSpecifications": [{"ResourceType": "import-image-task", "Tags": tags}],
    }
    if model.os.family in (OsFamily.LINUX, OsFamily.WINDOWS):
        request["Platform"] = "Linux" if model.os.family == OsFamily.LINUX else "Windows"
    for key, value in vendor.items():
        if key in _KNOWN or key.startswith("tag:") or key == "BootMode":
            continue
        try:
            request[key] = json.loads(value)
        except json.JSONDecodeError:
            raise UnmappableModel(f"vendor key ec2.{key} does not hold JSON") from None
    return request


__all__ = ["Ec2Codec", "build_request"]
