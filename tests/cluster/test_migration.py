"""polyvisor.cluster.migrate between qemu driver roots: the cold path, its dispatch and its rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyvisor.cluster import migrate
from polyvisor.demo.bootdisk import BOOT_MARKER
from polyvisor.disk import open_image, registered_formats
from polyvisor.errors import MigrationFailed
from polyvisor.hypervisors import MigrationOptions, VmState, connect
from polyvisor.hypervisors.libvirt import LibvirtDriver
from polyvisor.hypervisors.qemu import QemuDriver
from tests.hypervisors.harness import wait_for
from tests.hypervisors.harness_libvirt import COUNTER_MARKER, embed_root, embedded_driver
from tests.hypervisors.harness_qemu import BOOT_TIMEOUT, boot_disk, guest_model, qemu_cleanup, root_uri
from tests.peers import qemu_compare


def _raw_guest(tmp_path: Path, name: str, *, counter: bool) -> tuple[str, Path]:
    """Define a raw-disk busybox guest under root A; returns A's URI and the disk."""
    disk = boot_disk(tmp_path / "images", counter=counter)
    uri_a = root_uri(tmp_path / "a")
    with connect(uri_a) as host_a:
        host_a.define(guest_model(name, disk.name, "raw"), {disk.name: disk})
    return uri_a, disk


@pytest.mark.boot
@pytest.mark.timeout(300)
def test_cold_migration_of_a_stopped_vm_boots_on_the_destination(tmp_path: Path) -> None:
    """A stopped VM asked to move live moves cold; its converted disk boots on the destination."""
    uri_a, disk = _raw_guest(tmp_path, "cold", counter=False)
    uri_b = root_uri(tmp_path / "b")
    with qemu_cleanup(tmp_path):
        report = migrate("cold", uri_a, uri_b, MigrationOptions(live=True))
        assert report.kind == "cold"
        assert "COLD migration (the VM is not running)" in report.notes[0]
        assert report.downtime_ms is None  # it was not running: no downtime
        assert report.total_seconds > 0
        fmt = QemuDriver.preferred_disk_format if QemuDriver.preferred_disk_format in registered_formats() else "raw"
        converted = disk.with_name(f"{disk.stem}.qemu.{fmt}")
        assert converted.is_file()
        with open_image(converted) as image:
            assert image.format_name == fmt
        assert report.transferred_bytes > 0
        with connect(uri_a) as host_a, connect(uri_b) as host_b:
            assert host_a.get("cold").state is VmState.SHUT_OFF  # the source stays defined, shut off
            exported = host_b.export("cold")
            assert exported.disks == {converted.name: converted}
            assert exported.model.disks[0].format == fmt
            # The marker guest prints its marker and powers itself off: QEMU exits, the VM is shut off.
            wait_for(lambda: BOOT_MARKER in "".join(host_b.console("cold")), BOOT_TIMEOUT, "the marker on B")
            wait_for(lambda: host_b.get("cold").state is VmState.SHUT_OFF, 60, "the guest to power off")
        qemu_compare(converted, fmt, disk, "raw")  # once QEMU let go of it (the guest never writes)


@pytest.mark.timeout(120)
def test_cold_migration_rolls_back_and_restarts_the_source(tmp_path: Path) -> None:
    """A failure after the source was stopped (here: the disk directory does not exist) restarts it."""
    uri_a, _ = _raw_guest(tmp_path, "back", counter=True)
    uri_b = root_uri(tmp_path / "b")
    with qemu_cleanup(tmp_path):
        with connect(uri_a) as host_a:
            host_a.start("back")
        said: list[str] = []
        with pytest.raises(MigrationFailed, match="source restarted") as info:
            migrate("back", uri_a, uri_b, MigrationOptions(live=False), disk_dir=tmp_path / "missing",
                    shutdown_timeout=0.5, say=said.append)
        assert "cold migration to qemu failed" in str(info.value)
        assert any("destroying back" in line for line in said)
        with connect(uri_a) as host_a, connect(uri_b) as host_b:
            assert host_a.get("back").state is VmState.RUNNING
            assert host_b.list_vms() == []
            host_a.destroy("back")


def test_cold_migration_refuses_a_taken_name(tmp_path: Path) -> None:
    uri_a, disk = _raw_guest(tmp_path, "twin", counter=False)
    uri_b = root_uri(tmp_path / "b")
    with connect(uri_b) as host_b:
        host_b.define(guest_model("twin", disk.name, "raw"), {disk.name: disk})
    with pytest.raises(MigrationFailed, match="already has a VM called 'twin'"):
        migrate("twin", uri_a, uri_b, MigrationOptions(live=False))


@pytest.mark.boot
@pytest.mark.timeout(400)
def test_cold_migration_between_hypervisors_qemu_to_libvirt(tmp_path: Path) -> None:
    """A running guest under polyvisor's QEMU driver moves, cold, to libvirt's embedded driver and runs there."""
    uri_a, _ = _raw_guest(tmp_path, "across", counter=True)
    uri_b = LibvirtDriver.default_uri(embed_root())
    with qemu_cleanup(tmp_path), embedded_driver(tmp_path) as (_, defined):
        with connect(uri_a) as host_a:
            host_a.start("across")
            wait_for(lambda: COUNTER_MARKER in "".join(host_a.console("across")), BOOT_TIMEOUT, "the guest on A")
        defined.append("across")
        # busybox has no ACPI daemon: the power button is ignored and the guest is destroyed after the timeout
        report = migrate("across", uri_a, uri_b, MigrationOptions(live=True), shutdown_timeout=3)
        assert report.kind == "cold"
        assert "COLD" in report.notes[0]
        assert report.downtime_ms is not None
        assert report.downtime_ms > 0
        assert report.transferred_bytes > 0
        with connect(uri_a) as host_a, connect(uri_b) as host_b:
            assert host_a.get("across").state is VmState.SHUT_OFF
            assert host_b.get("across").state is VmState.RUNNING
            exported = host_b.export("across")
            assert [d.format for d in exported.model.disks] == [LibvirtDriver.preferred_disk_format]
            wait_for(lambda: COUNTER_MARKER in "".join(host_b.console("across")), BOOT_TIMEOUT,
                     "the guest's counter on libvirt")
