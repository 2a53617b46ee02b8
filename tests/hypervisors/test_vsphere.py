"""The vsphere driver against vcsim (VMware's vCenter simulator) on loopback."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polyvisor.disk import create_image
from polyvisor.errors import (
    ConnectionFailed,
    HypervisorError,
    InvalidState,
    MigrationFailed,
    SnapshotNotFound,
    UnmappableModel,
    UsageError,
    VmExists,
    VmNotFound,
)
from polyvisor.hypervisors import MigrationOptions, VmState, connect
from polyvisor.hypervisors.vsphere import Endpoint, VsphereDriver, vim
from polyvisor.vm.model import Bus, Controller, ControllerModel, DeviceKind, Disk, MiB
from tests.hypervisors.harness_vsphere import (
    CLUSTER_HOSTS,
    SIMULATOR_VMS,
    guest_model,
    make_disk,
    vcsim_url,
    vsphere_driver,
    vsphere_uri,
)

# ------------------------------------------------------------------ URIs


def test_uri_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = Endpoint.parse("vsphere://admin%40vsphere.local:p%40ss@vc.example:8443/?insecure=1&datacenter=DC1&host=esx1")
    assert (ep.user, ep.host, ep.port, ep.path) == ("admin@vsphere.local", "vc.example", 8443, "/sdk")
    assert ep.password == "p@ss"  # noqa: S105 - percent-decoded from the URI
    assert (ep.insecure, ep.datacenter, ep.esx_host, ep.datastore) == (True, "DC1", "esx1", None)
    monkeypatch.setenv("POLYVISOR_VSPHERE_PASSWORD", "from-env")
    assert Endpoint.parse("vsphere://root@esx/").password == "from-env"  # noqa: S105 - a test value
    assert not Endpoint.parse("vsphere://root@esx/").insecure
    monkeypatch.delenv("POLYVISOR_VSPHERE_USER", raising=False)
    with pytest.raises(ConnectionFailed, match="no user"):
        Endpoint.parse("vsphere://esx/")
    with pytest.raises(ConnectionFailed, match="unknown URI parameters: pool"):
        Endpoint.parse("vsphere://root@esx/?pool=x")


def test_connection_failures() -> None:
    url = vcsim_url()
    port = url.rsplit(":", 1)[1].split("/")[0]
    with pytest.raises(ConnectionFailed, match="login refused"):
        VsphereDriver.connect(f"vsphere://polyvisor:wrong@127.0.0.1:{port}/sdk?insecure=1")
    with pytest.raises(ConnectionFailed, match="cannot reach"):  # a self-signed certificate, checked
        VsphereDriver.connect(f"vsphere://polyvisor:polyvisor-test@127.0.0.1:{port}/sdk")
    with pytest.raises(ConnectionFailed, match="no datacenter 'DC9'"):
        VsphereDriver.connect(vsphere_uri(datacenter="DC9"))


# ------------------------------------------------------------------ inventory and definition


@pytest.fixture
def vsphere() -> Iterator[tuple[VsphereDriver, list[str]]]:
    with vsphere_driver(host=CLUSTER_HOSTS[0]) as connection:
        yield connection


def _devices(driver: VsphereDriver, name: str) -> list[Any]:
    return list(driver._vm(name).config.hardware.device)


def test_list_the_simulator_inventory() -> None:
    driver = connect(vsphere_uri())
    try:
        listed = {vm.name: vm for vm in driver.list_vms()}
        assert set(SIMULATOR_VMS) <= set(listed)
        vm = listed["DC0_H0_VM0"]
        assert (vm.state, vm.native_state) == (VmState.RUNNING, "poweredOn")
        assert vm.extra["host"] == "DC0_H0"
        assert vm.extra["connection_state"] == "connected"
        assert vm.extra["question"] is None
        with pytest.raises(VmNotFound):
            driver.get("no-such-vm")
    finally:
        driver.close()


def test_define_builds_the_config_spec(vsphere: tuple[VsphereDriver, list[str]], tmp_path: Path) -> None:
    driver, defined = vsphere
    disk = make_disk(tmp_path, "spec-vm")
    model = dataclasses.replace(guest_model("spec-vm", disk.name), uuid="0b8f7d1e-5a2c-4c3e-9d7f-1a2b3c4d5e6f")
    defined.append("spec-vm")
    info = driver.define(model, {disk.name: disk})
    assert (info.state, info.vcpus, info.memory, info.uuid) == (VmState.SHUT_OFF, 2, 256 * MiB, model.uuid)
    assert info.extra["host"] == CLUSTER_HOSTS[0]
    ref = driver._vm("spec-vm")
    assert ref.config.hardware.numCoresPerSocket == 2
    assert ref.config.guestId == "otherGuest64"
    assert ref.config.firmware == "bios"
    devices = _devices(driver, "spec-vm")
    scsi = [d for d in devices if isinstance(d, vim.vm.device.VirtualLsiLogicController)]
    disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualE1000)]
    cdroms = [d for d in devices if isinstance(d, vim.vm.device.VirtualCdrom)]
    assert len(scsi) == 1
    assert len(disks) == 1
    assert len(nics) == 1
    assert len(cdroms) == 1
    assert disks[0].backing.fileName == "[LocalDS_0] spec-vm/spec-vm.vmdk"
    assert disks[0].capacityInKB == 4096
    assert disks[0].controllerKey == scsi[0].key
    assert cdroms[0].controllerKey == 201
    assert cdroms[0].unitNumber == 0
    assert nics[0].backing.deviceName == "VM Network"
    assert [b.deviceKey for b in ref.config.bootOptions.bootOrder] == [disks[0].key]
    # Both files of the flat VMDK were uploaded to the VM's folder.
    for name in ("spec-vm.vmdk", "spec-vm-flat.vmdk"):
        assert driver._http("HEAD", driver._datastore_url("LocalDS_0", f"spec-vm/{name}")) == 200
    with pytest.raises(VmExists):
        driver.define(model, {disk.name: disk})


def test_define_refuses_what_vsphere_cannot_attach(vsphere: tuple[VsphereDriver, list[str]],
                                                   tmp_path: Path) -> None:
    driver, _ = vsphere
    disk = make_disk(tmp_path, "refused")
    model = guest_model("refused", disk.name)
    virtio = dataclasses.replace(model, controllers=(Controller(ControllerModel.VIRTIO_BLK),),
                                 disks=(Disk(DeviceKind.DISK, Bus.VIRTIO, 0, 0, path=disk.name),))
    with pytest.raises(UnmappableModel, match="virtio-blk"):
        driver.define(virtio, {disk.name: disk})
    raw = tmp_path / "refused.raw"
    with create_image(raw, "raw", MiB):
        pass
    with pytest.raises(UnmappableModel, match="not raw"):
        driver.define(guest_model("refused", raw.name), {raw.name: raw})
    stream = tmp_path / "stream.vmdk"
    with create_image(stream, "vmdk", MiB, subformat="streamOptimized"):
        pass
    with pytest.raises(UnmappableModel, match="streamOptimized"):
        driver.define(guest_model("refused", stream.name), {stream.name: stream})
    with pytest.raises(UsageError, match="no network 'nowhere'"):
        driver.define(dataclasses.replace(model, nics=(dataclasses.replace(model.nics[0], network="nowhere"),)),
                      {disk.name: disk})
    with pytest.raises(VmNotFound):
        driver.get("refused")


# ------------------------------------------------------------------ power, snapshots, relocation


def _set_tools_running(driver: VsphereDriver, name: str) -> None:
    """vcsim's test hook: an extraConfig key ``SET.<property>`` sets that property of the VM."""
    spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key="SET.guest.toolsRunningStatus",
                                                                 value="guestToolsRunning")])
    driver._wait(driver._vm(name).ReconfigVM_Task(spec=spec), name, "ReconfigVM_Task")


def test_power_operations(vsphere: tuple[VsphereDriver, list[str]], tmp_path: Path) -> None:
    driver, defined = vsphere
    disk = make_disk(tmp_path, "power-vm")
    defined.append("power-vm")
    driver.define(guest_model("power-vm", disk.name), {disk.name: disk})
    with pytest.raises(InvalidState):
        driver.destroy("power-vm")
    driver.start("power-vm")
    assert driver.get("power-vm").state is VmState.RUNNING
    with pytest.raises(InvalidState):
        driver.start("power-vm")
    driver.ex_suspend("power-vm")
    assert driver.get("power-vm").state is VmState.SUSPENDED
    driver.start("power-vm")  # PowerOnVM_Task resumes a suspended VM
    assert driver.get("power-vm").state is VmState.RUNNING
    driver.reboot("power-vm")  # no VMware Tools: ResetVM_Task
    assert driver.get("power-vm").state is VmState.RUNNING
    with pytest.raises(InvalidState, match="VMware Tools"):
        driver.shutdown("power-vm", timeout=5)
    _set_tools_running(driver, "power-vm")
    assert driver.get("power-vm").extra["tools_running_status"] == "guestToolsRunning"
    driver.shutdown("power-vm", timeout=10)
    assert driver.get("power-vm").state is VmState.SHUT_OFF
    with pytest.raises(InvalidState):
        driver.reboot("power-vm")
    # undefine unregisters: the files stay, so the next VM of that name gets the folder power-vm_1.
    driver.undefine("power-vm")
    with pytest.raises(VmNotFound):
        driver.get("power-vm")
    assert driver._http("HEAD", driver._datastore_url("LocalDS_0", "power-vm/power-vm.vmx")) == 200
    driver.define(guest_model("power-vm", disk.name), {disk.name: disk})
    assert driver._vm("power-vm").config.files.vmPathName == "[LocalDS_0] power-vm_1/power-vm_1.vmx"
    driver.ex_delete("power-vm")
    assert driver._http("HEAD", driver._datastore_url("LocalDS_0", "power-vm_1/power-vm_1.vmx")) == 404
    defined.remove("power-vm")


def test_snapshot_tree(vsphere: tuple[VsphereDriver, list[str]], tmp_path: Path) -> None:
    driver, defined = vsphere
    disk = make_disk(tmp_path, "snap-vm")
    defined.append("snap-vm")
    driver.define(guest_model("snap-vm", disk.name), {disk.name: disk})
    assert driver.snapshot_list("snap-vm") == []
    off = driver.snapshot_create("snap-vm", "off", "powered off")
    assert (off.description, off.includes_memory, off.parent) == ("powered off", False, None)
    driver.start("snap-vm")
    on = driver.snapshot_create("snap-vm", "on")
    assert on.includes_memory
    assert on.parent == "off"
    driver.snapshot_create("snap-vm", "later")
    with pytest.raises(HypervisorError, match="already exists"):
        driver.snapshot_create("snap-vm", "on")
    assert [(s.name, s.parent) for s in driver.snapshot_list("snap-vm")] == [
        ("off", None), ("on", "off"), ("later", "on")]
    driver.snapshot_delete("snap-vm", "on")  # its child is kept, under its parent
    assert [(s.name, s.parent) for s in driver.snapshot_list("snap-vm")] == [("off", None), ("later", "off")]
    driver.snapshot_revert("snap-vm", "off")
    with pytest.raises(SnapshotNotFound):
        driver.snapshot_revert("snap-vm", "on")
    with pytest.raises(SnapshotNotFound):
        driver.snapshot_delete("snap-vm", "on")


def test_relocate_and_vmotion(vsphere: tuple[VsphereDriver, list[str]], tmp_path: Path) -> None:
    driver, defined = vsphere
    disk = make_disk(tmp_path, "moving-vm")
    defined.append("moving-vm")
    driver.define(guest_model("moving-vm", disk.name), {disk.name: disk})
    driver.ex_relocate("moving-vm", CLUSTER_HOSTS[1])  # cold relocation
    assert driver.get("moving-vm").extra["host"] == CLUSTER_HOSTS[1]
    with VsphereDriver.connect(vsphere_uri(host=CLUSTER_HOSTS[2])) as destination:
        with pytest.raises(InvalidState, match="powered-on"):
            driver.migrate("moving-vm", destination, MigrationOptions())
        driver.start("moving-vm")
        with pytest.raises(UsageError, match="downtime"):
            driver.migrate("moving-vm", destination, MigrationOptions(downtime_ms=100))
        report = driver.migrate("moving-vm", destination, MigrationOptions())
        assert (report.kind, report.vm, report.downtime_ms) == ("live", "moving-vm", None)
        assert report.total_seconds >= 0
        assert CLUSTER_HOSTS[1] in report.source
        info = destination.get("moving-vm")
        assert (info.state, info.extra["host"]) == (VmState.RUNNING, CLUSTER_HOSTS[2])
    with VsphereDriver.connect(vsphere_uri()) as no_host, pytest.raises(MigrationFailed, match="names no ESXi host"):
        driver.migrate("moving-vm", no_host, MigrationOptions())
    with pytest.raises(HypervisorError, match="no ESXi host 'nowhere'"):
        driver.ex_relocate("moving-vm", "nowhere")
