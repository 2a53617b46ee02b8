"""The libvirt driver: the busybox guest under the embedded QEMU driver (TCG), and fast tests on test:///default."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from polyvisor.errors import ConnectionFailed, HypervisorError, InvalidState, SnapshotNotFound, VmExists, VmNotFound
from polyvisor.hypervisors import VmState, connect, driver_for
from polyvisor.hypervisors.libvirt import NATIVE_STATES, LibvirtDriver
from polyvisor.vm.model import Bus, Controller, ControllerModel, Cpu, DeviceKind, Disk, MiB, Nic, NicModel, VmModel
from tests.hypervisors.harness import iter_lines, wait_for
from tests.hypervisors.harness_libvirt import COUNTER_MARKER, disk_format, embed_root, embedded_driver, make_guest

TEST_URI = "test:///default"


# ------------------------------------------------------------------ URIs and tables


def test_uris_pick_the_libvirt_driver() -> None:
    for uri in ("qemu:///embed?root=/tmp/x", "qemu:///system", "qemu+ssh://host/system", "xen:///", TEST_URI,
                "libvirt+qemu:///session", "libvirt+test:///default"):
        assert driver_for(uri) is LibvirtDriver, uri
    assert not LibvirtDriver.accepts("qemu:///session?root=/tmp/x")  # polyvisor's own QEMU driver
    assert LibvirtDriver.accepts("qemu:///session")


def test_every_native_state_is_mapped() -> None:
    assert set(NATIVE_STATES.values()) == set(LibvirtDriver.STATE_MAP)
    assert LibvirtDriver.map_state("shutoff") is VmState.SHUT_OFF
    assert LibvirtDriver.map_state("pmsuspended") is VmState.SUSPENDED


def test_connection_errors() -> None:
    with pytest.raises(ConnectionFailed, match="tcg or kvm"):
        LibvirtDriver.connect(f"{TEST_URI}?accel=hvf")
    with pytest.raises(ConnectionFailed, match="cannot open"):
        LibvirtDriver.connect("test:///nonexistent-test-config.xml")


def test_one_embedded_root_per_process(tmp_path: Path) -> None:
    with embedded_driver(tmp_path):
        other = Path("/tmp") / f"pv-lv-other-{embed_root().name}"
        try:
            with pytest.raises(ConnectionFailed, match="already open"):
                LibvirtDriver.connect(LibvirtDriver.default_uri(other))
        finally:
            import shutil

            shutil.rmtree(other, ignore_errors=True)


def test_embedded_domain_xml(tmp_path: Path) -> None:
    model, disks = make_guest("xml-only", tmp_path)
    model = dataclasses.replace(model, nics=(Nic(NicModel.VIRTIO_NET, network="default"),))
    with embedded_driver(tmp_path) as (driver, _):
        xml = driver.domain_xml(model, disks)
    root = embed_root()
    assert "<domain type=\"qemu\"" in xml
    assert f'<source file="{disks[model.disks[0].path or ""]}"' in xml
    assert '<interface type="user">' in xml  # no virtual networks in the embedded driver
    assert f'<log file="{root}/console/xml-only.serial0.log" append="off"' in xml
    accel = LibvirtDriver(f"{LibvirtDriver.default_uri(root)}&accel=kvm")
    try:
        assert "<domain type=\"kvm\"" in accel.domain_xml(model, disks)
    finally:
        accel.close()
    assert (root / "etc" / "qemu.conf").read_text().count('stdio_handler = "file"') == 1


# ------------------------------------------------------------------ test:///default


@pytest.fixture
def test_driver() -> Iterator[LibvirtDriver]:
    driver = connect(TEST_URI)
    assert isinstance(driver, LibvirtDriver)
    before = {vm.name for vm in driver.list_vms()}
    try:
        yield driver
    finally:
        for vm in driver.list_vms():
            if vm.name not in before:
                with contextlib.suppress(HypervisorError):
                    driver.destroy(vm.name)
                driver.undefine(vm.name)
        driver.close()


def _model(name: str, tmp_path: Path) -> tuple[VmModel, dict[str, Path]]:
    disk = tmp_path / f"{name}.qcow2"
    disk.write_bytes(b"")
    return VmModel(
        name=name, memory=256 * MiB, cpu=Cpu(sockets=1, cores=2),
        controllers=(Controller(ControllerModel.VIRTIO_BLK),),
        disks=(Disk(DeviceKind.DISK, Bus.VIRTIO, 0, 0, path=disk.name, format="qcow2", boot_order=1),),
        nics=(Nic(NicModel.VIRTIO_NET, mac="52:54:00:12:34:56", network="default"),),
    ), {disk.name: disk}


def test_test_driver_lists_its_running_domain(test_driver: LibvirtDriver) -> None:
    listed = {vm.name: vm for vm in test_driver.list_vms()}
    assert listed["test"].state is VmState.RUNNING
    assert listed["test"].native_state == "running"
    assert test_driver.get("test").vcpus >= 1
    with pytest.raises(VmNotFound):
        test_driver.get("no-such-vm")


def test_test_driver_lifecycle(test_driver: LibvirtDriver, tmp_path: Path) -> None:
    model, disks = _model("lifecycle", tmp_path)
    info = test_driver.define(model, disks)
    assert (info.state, info.vcpus, info.memory) == (VmState.SHUT_OFF, 2, 256 * MiB)
    with pytest.raises(VmExists):
        test_driver.define(model, disks)
    with pytest.raises(InvalidState):
        test_driver.destroy("lifecycle")
    test_driver.start("lifecycle")
    assert test_driver.get("lifecycle").state is VmState.RUNNING
    with pytest.raises(InvalidState):
        test_driver.start("lifecycle")
    test_driver.pause("lifecycle")
    assert test_driver.get("lifecycle").state is VmState.PAUSED
    test_driver.resume("lifecycle")
    test_driver.reboot("lifecycle")
    assert test_driver.get("lifecycle").state is VmState.RUNNING
    stats = test_driver.stats("lifecycle")
    assert stats.cpu_time_ns is not None
    assert stats.cpu_time_ns > 0
    assert set(stats.disks) == {"vda"}
    assert len(stats.nics) == 1  # the test driver names the host side of the interface
    with pytest.raises(InvalidState):
        test_driver.undefine("lifecycle")
    test_driver.shutdown("lifecycle", timeout=10)
    assert test_driver.get("lifecycle").state is VmState.SHUT_OFF
    with pytest.raises(InvalidState):
        test_driver.stats("lifecycle")
    test_driver.undefine("lifecycle")
    with pytest.raises(VmNotFound):
        test_driver.get("lifecycle")


def test_test_driver_snapshots(test_driver: LibvirtDriver, tmp_path: Path) -> None:
    model, disks = _model("snaps", tmp_path)
    test_driver.define(model, disks)
    test_driver.start("snaps")
    first = test_driver.snapshot_create("snaps", "first", "before the change")
    assert first.includes_memory
    assert first.description == "before the change"
    assert first.parent is None
    second = test_driver.snapshot_create("snaps", "second")
    assert second.parent == "first"
    with pytest.raises(HypervisorError, match="already exists"):
        test_driver.snapshot_create("snaps", "second")
    assert [s.name for s in test_driver.snapshot_list("snaps")] == ["first", "second"]
    test_driver.destroy("snaps")
    test_driver.snapshot_revert("snaps", "first")
    assert test_driver.get("snaps").state is VmState.RUNNING  # taken while running: reverts to running
    test_driver.snapshot_delete("snaps", "second")
    assert [s.name for s in test_driver.snapshot_list("snaps")] == ["first"]
    with pytest.raises(SnapshotNotFound):
        test_driver.snapshot_revert("snaps", "second")
    with pytest.raises(SnapshotNotFound):
        test_driver.snapshot_delete("snaps", "second")


def test_test_driver_export_and_console(test_driver: LibvirtDriver, tmp_path: Path) -> None:
    model, disks = _model("exported", tmp_path)
    test_driver.define(model, disks)
    exported = test_driver.export("exported")
    assert exported.disks == {"exported.qcow2": disks["exported.qcow2"].resolve()}
    back = exported.model
    assert (back.name, back.memory, back.cpu, back.disks, back.nics) == (
        model.name, model.memory, model.cpu, model.disks, model.nics)
    assert back.vendor_keys("libvirt")["domain@type"] == "test"
    with pytest.raises(HypervisorError, match="no serial port"):
        test_driver.console("exported")


# ------------------------------------------------------------------ the busybox guest under the embedded driver


@pytest.mark.boot
@pytest.mark.timeout(300)
def test_embedded_busybox_guest(tmp_path: Path) -> None:
    """Define, start, pause, resume, snapshot and destroy the busybox guest (TCG); read its serial console."""
    with embedded_driver(tmp_path) as (driver, defined):
        model, disks = make_guest("busybox", tmp_path)
        defined.append("busybox")
        assert driver.define(model, disks).state is VmState.SHUT_OFF
        driver.start("busybox")
        assert driver.get("busybox").state is VmState.RUNNING
        wait_for(lambda: COUNTER_MARKER in "".join(driver.console("busybox")), 120, "the counter on the console")

        # --follow streams: later counter lines arrive while we read.
        seen: list[str] = []
        for line in iter_lines(driver.console("busybox", follow=True)):
            seen.append(line.strip())
            if "polyvisor-counter 2" in seen:
                break
        assert "polyvisor-counter 2" in seen

        driver.pause("busybox")
        assert driver.get("busybox").state is VmState.PAUSED
        paused_log = "".join(driver.console("busybox"))
        time.sleep(2.5)
        assert "".join(driver.console("busybox")) == paused_log  # the vCPUs are stopped: no new output
        driver.resume("busybox")
        assert driver.get("busybox").state is VmState.RUNNING

        stats = driver.stats("busybox")
        assert stats.cpu_time_ns
        assert stats.cpu_time_ns > 0
        assert stats.memory_bytes == 128 * MiB
        assert stats.disks["hda"].read_bytes > 0  # the boot loader read the kernel from it

        if disk_format() == "qcow2":
            snap = driver.snapshot_create("busybox", "running", "counter going")
            assert snap.includes_memory
            assert [s.name for s in driver.snapshot_list("busybox")] == ["running"]
            driver.snapshot_revert("busybox", "running")
            assert driver.get("busybox").state is VmState.RUNNING
            driver.snapshot_delete("busybox", "running")
            assert driver.snapshot_list("busybox") == []
        else:  # polyvisor writes no qcow2 yet: libvirt refuses internal snapshots of raw disks
            with pytest.raises(HypervisorError, match="raw"):
                driver.snapshot_create("busybox", "running")

        driver.destroy("busybox")
        assert driver.get("busybox").state is VmState.SHUT_OFF
        with pytest.raises(InvalidState):
            driver.pause("busybox")
        exported = driver.export("busybox")
        assert exported.model.disks == model.disks
        assert exported.disks == {disks_key: path.resolve() for disks_key, path in disks.items()}
        assert exported.model.vendor_keys("libvirt").get("serial/0#0") is None  # the host's log path is dropped
        driver.undefine("busybox")
        defined.remove("busybox")
        with pytest.raises(VmNotFound):
            driver.get("busybox")
