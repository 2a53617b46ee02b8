"""``polyvisor vm inspect``, ``vm codecs`` and ``polyvisor v2v`` as users run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polyvisor.cli import main
from polyvisor.vm.codecs import write_package
from polyvisor.vm.model import (
    Bus,
    Controller,
    ControllerModel,
    DeviceKind,
    Disk,
    GuestOS,
    Nic,
    NicModel,
    OsFamily,
    Serial,
    VmModel,
)
from tests.peers import polyvisor_cli, polyvisor_env


def _package(where: Path) -> Path:
    image = where / "disk.img"
    image.write_bytes(b"\x00" * 1024 + b"payload" * 100)
    model = VmModel(name="cli-vm", memory=512 << 20, os=GuestOS(OsFamily.LINUX),
                    controllers=(Controller(ControllerModel.LSILOGIC, 0),),
                    disks=(Disk(DeviceKind.DISK, Bus.SCSI, 0, 0, "disk.img", "raw", boot_order=1),),
                    nics=(Nic(NicModel.E1000, "00:50:56:aa:bb:cc", "LAN"),), serials=(Serial(0),))
    written = write_package(model, "libvirt", where / "pkg", {"disk.img": image})
    return next(p for p in written if p.suffix == ".xml")


def test_inspect_text_and_json(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xml = _package(workdir)
    assert main(["vm", "inspect", str(xml)]) == 0
    out = capsys.readouterr().out
    assert "codec: libvirt" in out
    assert "disk scsi0:0: disk.img (raw" in out
    assert "nic 0: e1000 00:50:56:aa:bb:cc on LAN" in out
    assert main(["vm", "inspect", "--json", str(xml)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["codec"] == "libvirt"
    assert data["model"]["name"] == "cli-vm"
    assert data["disks"][0]["path"] == "disk.img"


def test_codecs_lists_every_codec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vm", "codecs"]) == 0
    out = capsys.readouterr().out
    for name in ("ec2", "hyperv", "libvirt", "ova", "ovf", "proxmox", "vbox", "vmx", "xl", "xva"):
        assert f"\n{name} " in f"\n{out}"


def test_v2v_writes_the_package_and_prints_the_report(workdir: Path) -> None:
    xml = _package(workdir)
    proc = polyvisor_cli("v2v", str(xml), "--to", "hyperv", "-o", "out", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "Hyper-V generation 1" in proc.stdout
    assert "controller scsi0: lsilogic -> ide" in proc.stdout
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["cli-vm-disk1.vhd", "cli-vm.ps1", "report.json",
                                                                   "report.txt"]
    again = polyvisor_cli("vm", "inspect", "out/cli-vm.ps1", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "codec: hyperv" in again.stdout


def test_v2v_errors_are_one_line_and_leave_nothing(workdir: Path) -> None:
    xml = _package(workdir)
    proc = polyvisor_cli("v2v", str(xml), "--to", "vbox", "-o", "out", "--disk-format", "qcow2", cwd=workdir)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("polyvisor: ")
    assert "qcow2" in proc.stderr
    assert not (workdir / "out").exists()
    missing = polyvisor_cli("vm", "inspect", "nothing.ova", cwd=workdir)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    bad_target = polyvisor_cli("v2v", str(xml), "--to", "esxi", "-o", "out", cwd=workdir)
    assert bad_target.returncode == 2
    assert "invalid choice" in bad_target.stderr


def test_v2v_parser_targets_are_the_presets() -> None:
    from polyvisor.cli.v2v import TARGETS
    from polyvisor.vm.v2v import PRESETS

    assert set(TARGETS) == set(PRESETS)


def test_disk_commands_do_not_import_the_vm_or_hypervisor_layers() -> None:
    """Every conversion pays for the interpreter's start: the disk commands load only the disk layer."""
    code = ("import sys; from polyvisor.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('polyvisor.vm', 'polyvisor.hypervisors'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=polyvisor_env(),
                          check=True, timeout=60)
    assert proc.stdout.strip() == "[]"
