"""The model's JSON form and validation; the mapping tables and choose_devices."""

from __future__ import annotations

import dataclasses
import json

import pytest

from polyvisor.errors import InvalidModel
from polyvisor.vm.mapping import choose_devices, hyperv_generation
from polyvisor.vm.mapping.guestos import lookup, os_from_vmx, vim_from_vmx
from polyvisor.vm.model import Controller, ControllerModel, Nic, NicModel, VmModel
from tests.vm.helpers import CORPUS, DEBIAN, WIN2K19


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_json_round_trip(name: str) -> None:
    model = CORPUS[name]
    assert VmModel.from_json(model.to_json()) == model


def test_json_errors_name_the_field() -> None:
    data = json.loads(CORPUS["linux-bios-lsilogic"].to_json())
    data["disks"][0]["unit"] = "zero"
    with pytest.raises(InvalidModel, match=r"\$\.disks\[0\]\.unit: expected an integer"):
        VmModel.from_dict(data)
    data = json.loads(CORPUS["linux-bios-lsilogic"].to_json())
    data["cpu"]["cpus"] = 2
    with pytest.raises(InvalidModel, match="unknown field 'cpus'"):
        VmModel.from_dict(data)
    data = json.loads(CORPUS["linux-bios-lsilogic"].to_json())
    data["secure_boot"] = True
    data["disks"][1]["path"] = "../escape.img"
    with pytest.raises(InvalidModel, match=r"secure_boot: needs firmware uefi[\s\S]*contains '\.\.'"):
        VmModel.from_dict(data)


def test_os_identifiers() -> None:
    assert lookup(DEBIAN, "vmx") == "debian12-64"
    assert vim_from_vmx("debian12-64") == "debian12_64Guest"
    assert lookup(DEBIAN, "cim") == 96
    assert lookup(WIN2K19, "vmx") == "windows2019srv-64"
    assert lookup(WIN2K19, "proxmox") == "win10"
    assert os_from_vmx("windows2019srv-64") == WIN2K19
    assert os_from_vmx("other5xlinux-64").family.value == "linux"


def test_choose_devices_for_kvm() -> None:
    base = CORPUS["linux-bios-lsilogic"]
    pv = Controller(ControllerModel.PVSCSI, 0)
    vmware = dataclasses.replace(base, controllers=(pv, Controller(ControllerModel.IDE)),
                                 nics=(Nic(NicModel.VMXNET3, None, "VM Network"),))
    choice = choose_devices(vmware, "kvm")
    text = [str(c) for c in choice.changes]
    assert "controller scsi0: pvscsi -> virtio-scsi: kvm has no pvscsi; Linux guests have virtio drivers since " \
           "2.6.25 (virtio-scsi since 3.4)" in text
    assert any(c.startswith("nic 0: vmxnet3 -> virtio-net") for c in text)
    assert ControllerModel.VIRTIO_SCSI in {c.model for c in choice.model.controllers}
    assert choose_devices(base, "kvm").changes == (), "devices the target offers and the guest drives are kept"


def test_windows_without_virtio_drivers_keeps_emulated_devices() -> None:
    choice = choose_devices(CORPUS["windows-server-uefi"], "kvm")
    models = {c.model for c in choice.model.controllers}
    assert ControllerModel.VIRTIO_SCSI not in models
    assert choice.model.nics[0].model == NicModel.E1000E
    with_drivers = choose_devices(CORPUS["windows-server-uefi"], "kvm", drivers=["virtio-win"])
    assert ControllerModel.VIRTIO_SCSI in {c.model for c in with_drivers.model.controllers}


def test_hyperv_generation() -> None:
    assert hyperv_generation(CORPUS["windows-server-uefi"]).generation == 2
    assert hyperv_generation(CORPUS["linux-bios-lsilogic"]).generation == 1
