"""v2v: device choice, disk conversion, the conversion report, OUTDIR discipline; and end-to-end boots.

The boot tests build polyvisor's bootable test disk, package it as a
VMware-style OVA with polyvisor itself, convert it with ``polyvisor v2v`` and
boot the result with libvirt's embedded QEMU driver (TCG), watching serial
port 0 for the marker.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from polyvisor.demo.bootdisk import BOOT_MARKER, build_boot_disk
from polyvisor.disk import CreateOptions, registered_formats
from polyvisor.disk.convert import convert
from polyvisor.errors import OperationFailed, UsageError
from polyvisor.vm.codecs import get_codec, read_package, write_package
from polyvisor.vm.model import (
    Arch,
    Bus,
    Controller,
    ControllerModel,
    DeviceKind,
    Disk,
    Firmware,
    GuestOS,
    Nic,
    NicModel,
    OsFamily,
    Serial,
    VmModel,
)
from polyvisor.vm.v2v import PRESETS, v2v
from tests.peers import polyvisor_cli
from tests.vm.helpers import validate_libvirt
from tests.vm.libvirt_boot import boot_domain

DEBIAN = GuestOS(OsFamily.LINUX, "debian", "12", Arch.X86_64, "debian12")
BOOT_TIMEOUT = 240.0


def vmware_model(disk_format: str, subformat: str | None) -> VmModel:
    """The boot disk as a VMware VM: LSI Logic SCSI, E1000, a serial port, BIOS."""
    return VmModel(
        name="bootvm", memory=256 << 20, os=DEBIAN,
        controllers=(Controller(ControllerModel.LSILOGIC, 0),),
        disks=(Disk(DeviceKind.DISK, Bus.SCSI, 0, 0, f"bootvm-disk1.{disk_format}", disk_format, subformat,
                    boot_order=1),),
        nics=(Nic(NicModel.E1000, "00:50:56:12:34:56", "VM Network"),), serials=(Serial(0),))


@pytest.fixture(scope="module")
def boot_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """polyvisor's bootable raw test disk (32 MiB; prints BOOT_MARKER on ttyS0)."""
    return build_boot_disk(tmp_path_factory.mktemp("bootdisk") / "boot.img").path


def make_ova(boot: Path, where: Path, disk_format: str, subformat: str | None) -> Path:
    """An OVA built by polyvisor: the boot disk converted to *disk_format*, VMware devices."""
    where.mkdir(parents=True, exist_ok=True)
    model = vmware_model(disk_format, subformat)
    image = where / f"bootvm-disk1.{disk_format}"
    convert(boot, image, disk_format, CreateOptions(subformat=subformat) if subformat else None)
    written = write_package(model, "ova", where / "ova", {image.name: image})
    return written[0]


def descriptor(outdir: Path, target: str) -> Path:
    """The package file v2v wrote for *target*."""
    suffixes = get_codec(PRESETS[target].codec).suffixes
    found = [p for p in outdir.iterdir() if p.suffix in suffixes and not p.name.startswith("report")]
    assert len(found) == 1, f"expected one {suffixes} file in {outdir}: {sorted(outdir.iterdir())}"
    return found[0]


def require_formats(*names: str) -> None:
    missing = [n for n in names if n not in registered_formats()]
    if missing:
        pytest.skip(f"needs the {', '.join(missing)} disk format(s), not in this checkout yet")


def assert_boots(xml: Path) -> None:
    validate_libvirt(xml)
    result = boot_domain(xml, BOOT_MARKER, timeout=BOOT_TIMEOUT)
    assert result.booted, f"no {BOOT_MARKER} on the serial console after {result.seconds:.0f}s:\n{result.console}"


# ------------------------------------------------------------------ end-to-end boots


def test_ova_to_libvirt_boots(boot_image: Path, tmp_path: Path) -> None:
    require_formats("vmdk", "qcow2")
    ova = make_ova(boot_image, tmp_path / "src", "vmdk", "streamOptimized")
    proc = polyvisor_cli("v2v", str(ova), "--to", "libvirt", "-o", str(tmp_path / "kvm"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "storage controllers: scsi0 lsilogic -> scsi0 lsilogic" in proc.stdout, "KVM offers LSI Logic: kept"
    report = json.loads((tmp_path / "kvm" / "report.json").read_text())
    assert report["disks"][0]["format"] == "qcow2"
    assert_boots(descriptor(tmp_path / "kvm", "libvirt"))


CHAIN = ("vmx", "vbox", "xva", "hyperv", "proxmox", "libvirt")
NATIVE = {"vmx": "vmdk", "vbox": "vdi", "xva": None, "hyperv": "vhd", "proxmox": "qcow2", "libvirt": "qcow2"}


def run_chain(start: Path, tmp_path: Path, steps: tuple[tuple[str, str | None], ...]) -> Path:
    source = start
    for n, (target, disk_format) in enumerate(steps):
        out = tmp_path / f"{n}-{target}"
        report = v2v(source, target, out, disk_format)
        package = read_package(descriptor(out, target))
        model = package.model
        assert model.firmware == Firmware.BIOS, f"{target}: the MBR boot disk needs BIOS firmware"
        assert model.serials, f"{target}: the serial port was lost"
        if target == "hyperv":
            assert "generation 1" in report.notes[0]
            assert any(d.format == "vhd" for d in report.disks)
        for disk in report.disks:
            expected = disk_format or NATIVE[target]
            if expected is not None:
                assert disk.format == expected, f"{target}: {disk.target} is {disk.format}, not {expected}"
        source = descriptor(out, target)
    return source


def test_chain_ova_vmx_vbox_xva_hyperv_proxmox_libvirt_boots(boot_image: Path, tmp_path: Path) -> None:
    require_formats("vmdk", "qcow2")
    ova = make_ova(boot_image, tmp_path / "src", "vmdk", "streamOptimized")
    final = run_chain(ova, tmp_path, tuple((t, None) for t in CHAIN))
    assert_boots(final)


def test_chain_with_formats_of_this_checkout_boots(boot_image: Path, tmp_path: Path) -> None:
    """The same chain, minus VMware's .vmx (VMDK only), with disk formats every checkout has: VHD in the OVA,
    raw for Proxmox and libvirt."""
    ova = make_ova(boot_image, tmp_path / "src", "vhd", None)
    steps = (("vbox", None), ("xva", None), ("hyperv", None), ("proxmox", "raw"), ("libvirt", "raw"))
    final = run_chain(ova, tmp_path, steps)
    assert_boots(final)


# ------------------------------------------------------------------ the report and OUTDIR


def _source_vm(tmp_path: Path, boot_like: bytes = b"\x00" * 512 + b"data" * 1024) -> Path:
    image = tmp_path / "src" / "disk.img"
    image.parent.mkdir(parents=True)
    image.write_bytes(boot_like)
    model = dataclasses.replace(vmware_model("img", None), disks=(
        Disk(DeviceKind.DISK, Bus.SCSI, 0, 0, "disk.img", "raw", boot_order=1),))
    model = model.with_vendor("libvirt", {"domain/clock#0": '<clock offset="utc" />'})
    written = write_package(model, "libvirt", tmp_path / "src", {"disk.img": image})
    return next(p for p in written if p.suffix == ".xml")


def _listing(root: Path, skip: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if skip not in (p, *p.parents))


def test_report_names_changes_reasons_dropped_fields_and_vendor_keys(tmp_path: Path) -> None:
    source = _source_vm(tmp_path)
    report = v2v(source, "xva", tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    text = (tmp_path / "out" / "report.txt").read_text()
    assert data["source_codec"] == "libvirt"
    assert data["target_codec"] == "xva"
    changes = {c["what"]: c for c in data["changes"]}
    assert changes["controller scsi0"]["after"] == "xen-blkfront"
    assert "xen-blkfront" in changes["controller scsi0"]["reason"]
    assert changes["nic 0"]["before"] == "e1000"
    assert changes["nic 0"]["after"] == "netfront"
    assert "libvirt.domain/clock#0" in data["vendor_dropped"]
    assert any(m.startswith("disk scsi0:0 disk.img") for m in data["mappings"])
    assert data["disks"][0]["format"] == "raw"
    assert "Device changes:" in text
    assert "xen-blkfront" in text
    assert report.files == ["bootvm.xva", "report.json", "report.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == report.files


def test_dropped_fields_come_from_the_target_codec(tmp_path: Path) -> None:
    source = _source_vm(tmp_path)
    v2v(source, "ec2", tmp_path / "ec2", "raw")
    data = json.loads((tmp_path / "ec2" / "report.json").read_text())
    dropped = {d["field"] for d in data["dropped"]}
    assert {"nics", "serials"} <= dropped
    request = json.loads((tmp_path / "ec2" / "bootvm.json").read_text())
    assert request["DiskContainers"][0]["Format"] == "raw"
    assert request["BootMode"] == "legacy-bios"


def test_nothing_outside_outdir_and_no_partial_results_on_failure(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source = _source_vm(tmp_path)
    before = _listing(tmp_path, tmp_path / "out")

    def fail(*_: object, **__: object) -> list[Path]:
        raise OperationFailed("simulated failure while writing the package")

    monkeypatch.setattr(get_codec("vbox"), "write", classmethod(fail))
    with pytest.raises(OperationFailed, match="simulated"):
        v2v(source, "vbox", tmp_path / "out")
    assert not (tmp_path / "out").exists(), "v2v created OUTDIR and left it behind"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OperationFailed):
        v2v(source, "vbox", existing)
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"], "partial results left in OUTDIR"
    monkeypatch.undo()
    v2v(source, "vbox", tmp_path / "out")
    assert _listing(tmp_path, tmp_path / "out") == sorted([*before, existing, existing / "keep.txt"])


def test_existing_files_are_not_overwritten(tmp_path: Path) -> None:
    source = _source_vm(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "bootvm.vbox").write_text("not yours")
    with pytest.raises(UsageError, match="already exists"):
        v2v(source, "vbox", out)
    assert sorted(p.name for p in out.iterdir()) == ["bootvm.vbox"]
    assert (out / "bootvm.vbox").read_text() == "not yours"


def test_disk_format_must_fit_the_target(tmp_path: Path) -> None:
    source = _source_vm(tmp_path)
    with pytest.raises(UsageError, match="carry"):
        v2v(source, "vbox", tmp_path / "out", "qcow2")
    with pytest.raises(UsageError, match="unknown target"):
        v2v(source, "esx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
