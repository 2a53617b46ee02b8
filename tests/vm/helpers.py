"""Shared helpers for the VM tests: the corpus of models, validators, placeholder disk files."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from polyvisor.vm.codecs import Codec
from polyvisor.vm.mapping import choose_devices
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
    Nic,
    NicModel,
    OsFamily,
    Serial,
    VmModel,
)

REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30

DEBIAN = GuestOS(OsFamily.LINUX, "debian", "12", Arch.X86_64, "debian12")
WIN2K19 = GuestOS(OsFamily.WINDOWS, "windows-server", "2019", Arch.X86_64, "win2k19")
WIN11 = GuestOS(OsFamily.WINDOWS, "windows", "11", Arch.X86_64, "win11")

CORPUS: dict[str, VmModel] = {
    "linux-bios-lsilogic": VmModel(
        name="web01", memory=2 * GiB, cpu=Cpu(1, 2, 1), uuid="0b3c6a8e-4f1d-4e2a-9c55-7d1e2f3a4b5c",
        os=DEBIAN, controllers=(Controller(ControllerModel.LSILOGIC, 0), Controller(ControllerModel.IDE, 0)),
        disks=(Disk(DeviceKind.DISK, Bus.SCSI, 0, 0, "web01-disk1.img", capacity=20 * GiB, boot_order=1),
               Disk(DeviceKind.DISK, Bus.SCSI, 0, 1, "web01-disk2.img", capacity=GiB),
               Disk(DeviceKind.CDROM, Bus.IDE, 0, 2, "install.iso", "raw")),
        nics=(Nic(NicModel.E1000, "00:50:56:01:02:03", "VM Network"),),
        serials=(Serial(0),), graphics=Graphics.VNC),
    "linux-uefi-secureboot-virtio": VmModel(
        name="db01", memory=4 * GiB, cpu=Cpu(2, 2, 1), firmware=Firmware.UEFI, secure_boot=True,
        machine=Machine.Q35, os=DEBIAN,
        controllers=(Controller(ControllerModel.AHCI, 0), Controller(ControllerModel.VIRTIO_SCSI, 0)),
        disks=(Disk(DeviceKind.DISK, Bus.SCSI, 0, 0, "db01.img", capacity=10 * GiB, boot_order=1),
               Disk(DeviceKind.CDROM, Bus.SATA, 0, 0)),
        nics=(Nic(NicModel.VIRTIO_NET, "52:54:00:aa:bb:cc", "default"), Nic(NicModel.E1000E, None, "backend"))),
    "windows-server-uefi": VmModel(
        name="dc01", memory=8 * GiB, cpu=Cpu(1, 4, 1), uuid="7c2e1d3f-0a9b-4c8d-8e7f-6a5b4c3d2e1f",
        firmware=Firmware.UEFI, os=WIN2K19,
        controllers=(Controller(ControllerModel.LSISAS, 0), Controller(ControllerModel.AHCI, 0)),
        disks=(Disk(DeviceKind.DISK, Bus.SCSI, 0, 0, "dc01-c.img", capacity=60 * GiB),
               Disk(DeviceKind.DISK, Bus.SCSI, 0, 1, "dc01-d.img", capacity=100 * GiB),
               Disk(DeviceKind.CDROM, Bus.SATA, 0, 1, "win2019.iso", "raw")),
        nics=(Nic(NicModel.E1000E, "00:50:56:0a:0b:0c", "Servers"),)),
    "windows-client-nvme": VmModel(
        name="desk01", memory=8 * GiB, cpu=Cpu(1, 2, 1), firmware=Firmware.UEFI, secure_boot=True, os=WIN11,
        controllers=(Controller(ControllerModel.NVME, 0), Controller(ControllerModel.AHCI, 0)),
        disks=(Disk(DeviceKind.DISK, Bus.NVME, 0, 0, "desk01.img", capacity=64 * GiB),
               Disk(DeviceKind.CDROM, Bus.SATA, 0, 0, "win11.iso", "raw")),
        nics=(Nic(NicModel.E1000E, None, "nat"),)),
}


def adapt(model: VmModel, codec: type[Codec]) -> VmModel:
    """*model* made expressible by *codec*: devices its hypervisor offers, disks in its first native format.

    Guests moved to Xen are assumed to carry the Xen PV drivers, and guests moved to VirtualBox the virtio-win
    drivers (Windows 8 and later have no inbox driver for any NIC VirtualBox emulates but virtio)."""
    drivers = ("xen-pv",) if codec.target.startswith("xen") else ("virtio-win",) if codec.target == "virtualbox" \
        else ()
    adapted = choose_devices(model, codec.target, drivers=drivers).model
    fmt, sub = codec.disk_formats[0]
    disks = tuple(dataclasses.replace(d, format=fmt, subformat=sub) if d.device == DeviceKind.DISK else d
                  for d in adapted.disks)
    return dataclasses.replace(adapted, disks=disks)


def placeholder_disks(model: VmModel, where: Path) -> dict[str, Path]:
    """Small stand-in files for every image the model names."""
    where.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for i, disk in enumerate(model.disks):
        if disk.path is not None and disk.path not in files:
            path = where / f"src{i}-{Path(disk.path).name}"
            path.write_bytes(disk.path.encode() * 64)
            files[disk.path] = path
    return files


def shared_dir() -> Path:
    """The project's shared/ directory: $POLYVISOR_SHARED, <repo>/../shared, then /work/shared."""
    candidates = [Path(p) for p in (os.environ.get("POLYVISOR_SHARED"),) if p]
    candidates += [REPO.parent / "shared", Path("/work/shared")]
    for candidate in candidates:
        if (candidate / "schemas" / "ovf" / "validate.py").is_file():
            return candidate
    raise AssertionError(
        "shared/schemas/ovf/validate.py not found: set POLYVISOR_SHARED or check out shared/ beside the repository "
        f"(looked in {', '.join(map(str, candidates))})")


def validate_ovf(path: Path) -> None:
    """Fail unless the DMTF OVF 1.0 schema accepts *path* (shared/schemas/ovf/validate.py, needs lxml)."""
    script = shared_dir() / "schemas" / "ovf" / "validate.py"
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"OVF schema validation failed:\n{proc.stdout}{proc.stderr}"


def validate_libvirt(path: Path) -> None:
    """Fail unless ``virt-xml-validate FILE domain`` accepts *path* (Debian libvirt-clients + libxml2-utils)."""
    tool = shutil.which("virt-xml-validate")
    assert tool is not None, "virt-xml-validate is not installed (Debian package libvirt-clients)"
    assert shutil.which("xmllint"), "xmllint is not installed (Debian libxml2-utils); virt-xml-validate needs it"
    proc = subprocess.run([tool, str(path), "domain"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"virt-xml-validate failed:\n{proc.stdout}{proc.stderr}"
