"""The direct QEMU driver against real QEMU processes (TCG) and the busybox guest.

Boot tests are few (each TCG boot takes 5-11 s) and each has a timeout; every
QEMU process started for a test's directory is killed at teardown.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyvisor.demo.bootdisk import COUNTER_PREFIX
from polyvisor.errors import (
    ConnectionFailed,
    InvalidState,
    MigrationFailed,
    OperationTimeout,
    SnapshotNotFound,
    UnmappableModel,
    UsageError,
    VmExists,
    VmNotFound,
)
from polyvisor.hypervisors import MigrationOptions, VmState, connect, driver_for
from polyvisor.hypervisors.qemu import (
    QEMU_CONTROLLERS,
    QEMU_NICS,
    Definition,
    DiskFile,
    QemuDriver,
    VmPaths,
    check_model,
    command_line,
    find_uefi_firmware,
)
from polyvisor.vm.model import (
    Bus,
    Controller,
    ControllerModel,
    DeviceKind,
    Disk,
    Firmware,
    Graphics,
    Machine,
    Nic,
    NicModel,
    Serial,
    VmModel,
)
from tests.hypervisors.harness import wait_for
from tests.hypervisors.harness_qemu import (
    BOOT_TIMEOUT,
    COUNTER_MARKER,
    guest_model,
    make_qcow2_guest,
    qemu_cleanup,
    qemu_pids,
    root_uri,
)
from tests.peers import polyvisor_env, qemu_img

C = ControllerModel
COUNTER = re.compile(rf"^{COUNTER_PREFIX} (\d+)\r?$", re.MULTILINE)


def counters(text: str) -> list[int]:
    """The numbers the counter guest printed, in order."""
    return [int(n) for n in COUNTER.findall(text)]


def console_text(driver: QemuDriver, name: str) -> str:
    return "".join(driver.console(name))


def wait_counter(driver: QemuDriver, name: str, at_least: int, timeout: float = BOOT_TIMEOUT) -> list[int]:
    """Wait until the guest has printed counter *at_least*; returns every counter printed so far."""
    wait_for(lambda: any(n >= at_least for n in counters(console_text(driver, name))), timeout,
             f"{COUNTER_PREFIX} {at_least} on the console of {name}")
    return counters(console_text(driver, name))


# ------------------------------------------------------------------------------ URIs and registry


def test_uri_forms(tmp_path: Path) -> None:
    assert QemuDriver.accepts(f"qemu:///session?root={tmp_path}")
    assert QemuDriver.accepts(f"qemu:///session?root={tmp_path}&accel=kvm")
    assert not QemuDriver.accepts("qemu:///session")
    assert not QemuDriver.accepts("qemu:///system")
    assert not QemuDriver.accepts(f"qemu+ssh://host/session?root={tmp_path}")
    assert driver_for(f"qemu:///session?root={tmp_path}") is QemuDriver
    driver = connect(f"qemu:///session?root={tmp_path}/new&accel=kvm&migration_port=4444")
    assert isinstance(driver, QemuDriver)
    assert (driver.root, driver.accel, driver.migration_port) == (tmp_path / "new", "kvm", 4444)
    assert driver.root.is_dir()
    for bad in (f"qemu:///session?root={tmp_path}&accel=hvf", f"qemu:///session?root={tmp_path}&colour=red",
                f"qemu:///session?root={tmp_path}&migration_port=99999", "qemu:///session?root="):
        with pytest.raises(ConnectionFailed):
            QemuDriver.connect(bad)


# ----------------------------------------------------------------------------- command lines


def _every_device_model(machine: Machine) -> VmModel:
    """A model using every controller and NIC the driver maps (one disk or CD-ROM per controller)."""
    controllers: list[Controller] = []
    per_bus: dict[Bus, int] = {}
    for kind in QEMU_CONTROLLERS:
        if not (kind is C.IDE and machine is Machine.Q35):
            bus = Controller(kind).bus
            controllers.append(Controller(kind, per_bus.get(bus, 0)))
            per_bus[bus] = per_bus.get(bus, 0) + 1
    disks = []
    for i, controller in enumerate(controllers):
        device = DeviceKind.FLOPPY if controller.model is C.FDC else DeviceKind.DISK
        disks.append(Disk(device, controller.bus, controller.index, 0, path=f"d{i}.qcow2", format="qcow2",
                          boot_order=i + 1))
        if controller.model in (C.IDE, C.AHCI, C.VIRTIO_SCSI, C.LSILOGIC):
            disks.append(Disk(DeviceKind.CDROM, controller.bus, controller.index, 1))
    nics = tuple(Nic(model) for model in QEMU_NICS)
    return VmModel(name="every, device", memory=128 << 20, machine=machine, controllers=tuple(controllers),
                   disks=tuple(disks), nics=nics, serials=(Serial(0), Serial(1)), graphics=Graphics.VNC).validate()


def test_command_line_escapes_and_maps(tmp_path: Path) -> None:
    model = _every_device_model(Machine.I440FX)
    files = {d.path: DiskFile(tmp_path / f"dir,with,commas/{d.path}", "qcow2") for d in model.disks if d.path}
    argv = command_line(Definition(model, files), VmPaths(tmp_path / "vm,1"), binary="qemu-system-x86_64",
                        accel="tcg", qmp_fd=3, firmware=None)
    assert argv[argv.index("-name") + 1] == "guest=every,, device,debug-threads=on"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert f"file,id=serial0,path={tmp_path}/vm,,1/console.log" in argv
    devices = [json.loads(a) for i, a in enumerate(argv) if argv[i - 1] == "-device" and a.startswith("{")]
    drivers = {d["driver"] for d in devices}
    assert {"lsi53c895a", "mptsas1068", "pvscsi", "virtio-scsi-pci", "ich9-ahci", "nvme", "nvme-ns",
            "virtio-blk-pci", "ide-hd", "ide-cd", "scsi-hd", "scsi-cd", "floppy"} <= drivers
    assert {"e1000", "e1000e", "virtio-net-pci", "rtl8139", "vmxnet3", "pcnet"} <= drivers
    blockdevs = [json.loads(a) for i, a in enumerate(argv) if argv[i - 1] == "-blockdev"]
    assert str(tmp_path / "dir,with,commas/d0.qcow2") in {b["file"]["filename"] for b in blockdevs}


@pytest.mark.parametrize(("change", "message"), [
    ({"controllers": (Controller(C.BUSLOGIC),), "disks": ()}, "buslogic"),
    ({"graphics": Graphics.SPICE}, "SPICE"),
    ({"nics": (Nic(NicModel.NETVSC),)}, "netvsc"),
    ({"machine": Machine.Q35, "controllers": (Controller(C.IDE),), "disks": ()}, "IDE"),
    ({"controllers": (Controller(C.VIRTIO_BLK),), "disks": (Disk(DeviceKind.CDROM, Bus.VIRTIO, 0, 0),)}, "CD-ROM"),
    ({"controllers": (Controller(C.LSILOGIC),), "disks": (Disk(DeviceKind.DISK, Bus.SCSI, 0, 9, path="a"),)},
     "targets 0-6"),
    ({"serials": (Serial(5),)}, "serial port 5"),
    ({"firmware": Firmware.UEFI, "secure_boot": True}, "q35"),
])
def test_unmappable_models_are_refused(change: dict[str, object], message: str) -> None:
    model = dataclasses.replace(VmModel(name="x", memory=64 << 20), **change)  # type: ignore[arg-type]
    with pytest.raises(UnmappableModel, match=message):
        check_model(model)


def test_uefi_firmware_from_descriptors() -> None:
    plain = find_uefi_firmware(Machine.I440FX, secure_boot=False)
    assert plain.code.is_file()
    assert plain.vars_template.is_file()
    assert not plain.requires_smm
    secure = find_uefi_firmware(Machine.Q35, secure_boot=True)
    assert "secboot" in secure.code.name or "ms" in secure.code.name
    assert secure.requires_smm


@pytest.mark.timeout(120)
@pytest.mark.parametrize("machine", [Machine.I440FX, Machine.Q35])
def test_every_device_starts_in_qemu(tmp_path: Path, machine: Machine) -> None:
    """QEMU accepts the command line of every mapped device: start, look at the devices over QMP, destroy."""
    model = dataclasses.replace(_every_device_model(machine), name=f"all-{machine}")
    disks = {}
    for disk in model.disks:
        if disk.path:
            qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / disk.path), "16M")
            disks[disk.path] = tmp_path / disk.path
    with qemu_cleanup(tmp_path), connect(root_uri(tmp_path / "root")) as driver:
        assert isinstance(driver, QemuDriver)
        driver.define(model, disks)
        driver.start(model.name)
        assert driver.get(model.name).state is VmState.RUNNING
        assert driver.get(model.name).extra["vnc"].startswith("127.0.0.1:")
        with driver._qmp(model.name) as qmp:
            nodes = {n["node-name"] for n in qmp.execute("query-named-block-nodes")}
            pci = {d["qdev_id"] for bus in qmp.execute("query-pci") for d in bus["devices"]}
        assert {f"drive{i}" for i, d in enumerate(model.disks) if d.path} <= nodes
        assert {"nic0", "nic1", "nic2", "nic3", "nic4", "nic5"} <= pci
        stats = driver.stats(model.name)
        assert set(stats.disks) == {f"{d.bus}{d.controller}:{d.unit}" for d in model.disks if d.path}
        driver.destroy(model.name)
        assert driver.get(model.name).state is VmState.SHUT_OFF


@pytest.mark.timeout(120)
def test_uefi_secure_boot_vm_starts(tmp_path: Path) -> None:
    """q35 + OVMF secure boot (SMM): QEMU starts with the per-VM variable store copy."""
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "d.qcow2"), "16M")
    model = dataclasses.replace(guest_model("uefi", "d.qcow2", "qcow2"), firmware=Firmware.UEFI, secure_boot=True,
                                machine=Machine.Q35)
    with qemu_cleanup(tmp_path), connect(root_uri(tmp_path / "root")) as driver:
        assert isinstance(driver, QemuDriver)
        driver.define(model, {"d.qcow2": tmp_path / "d.qcow2"})
        nvram = tmp_path / "root" / "uefi" / "nvram.fd"
        assert nvram.is_file()
        argv = driver.ex_command_line("uefi")
        assert "smm=on" in argv[argv.index("-machine") + 1]
        driver.start("uefi")
        assert driver.get("uefi").state is VmState.RUNNING
        driver.destroy("uefi")


# ------------------------------------------------------------------------------ definitions


def test_define_undefine_and_persistence(tmp_path: Path) -> None:
    model, disks = make_qcow2_guest(tmp_path / "images", "vm/with slash")
    uri = root_uri(tmp_path / "root")
    with connect(uri) as driver:
        info = driver.define(model, disks)
        assert (info.state, info.vcpus, info.memory) == (VmState.SHUT_OFF, 1, 256 << 20)
        with pytest.raises(VmExists):
            driver.define(model, disks)
        with pytest.raises(UsageError, match="no host file"):
            driver.define(dataclasses.replace(model, name="other"), {})
    assert (tmp_path / "root" / "vm%2Fwith%20slash" / "vm.json").is_file()
    with connect(uri) as again:  # a new connection sees the same VM
        assert [vm.name for vm in again.list_vms()] == ["vm/with slash"]
        exported = again.export("vm/with slash")
        assert exported.model == model
        assert exported.disks == {k: v.resolve() for k, v in disks.items()}
        with pytest.raises(InvalidState):
            again.pause("vm/with slash")
        with pytest.raises(InvalidState):
            again.destroy("vm/with slash")
        again.undefine("vm/with slash")
        with pytest.raises(VmNotFound):
            again.get("vm/with slash")
    assert all(p.exists() for p in disks.values())  # disks are left alone


def test_snapshots_need_qcow2(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "d.raw"), "16M")
    with connect(root_uri(tmp_path / "root")) as driver:
        driver.define(guest_model("raw", "d.raw", "raw"), {"d.raw": tmp_path / "d.raw"})
        with pytest.raises(InvalidState, match="qcow2"):
            driver.snapshot_create("raw", "s")
        with pytest.raises(InvalidState, match="qcow2"):
            driver.snapshot_list("raw")


def test_offline_snapshots(tmp_path: Path) -> None:
    """A shut-off VM's snapshots are disk-only, through qemu-img on the qcow2 files."""
    model, disks = make_qcow2_guest(tmp_path / "images", "off")
    with connect(root_uri(tmp_path / "root")) as driver:
        driver.define(model, disks)
        snap = driver.snapshot_create("off", "before", "pristine")
        assert (snap.name, snap.includes_memory, snap.description) == ("before", False, "pristine")
        assert [s.name for s in driver.snapshot_list("off")] == ["before"]
        with pytest.raises(InvalidState, match="exists"):
            driver.snapshot_create("off", "before")
        driver.snapshot_revert("off", "before")
        with pytest.raises(SnapshotNotFound):
            driver.snapshot_revert("off", "nope")
        driver.snapshot_delete("off", "before")
        assert driver.snapshot_list("off") == []
    assert json.loads(qemu_img("info", "--output=json", str(disks["off.qcow2"])).stdout).get("snapshots") is None


# ------------------------------------------------------------------------------ a running guest


@pytest.mark.boot
@pytest.mark.timeout(300)
def test_running_guest_lifecycle(tmp_path: Path) -> None:
    """One boot of the counter guest: console, other connections and processes, pause, stats, snapshots
    with memory (revert really goes back), reboot, shutdown timeout, destroy."""
    uri = root_uri(tmp_path / "root")
    model, disks = make_qcow2_guest(tmp_path / "images", "guest")
    with qemu_cleanup(tmp_path), connect(uri) as driver:
        assert isinstance(driver, QemuDriver)
        driver.define(model, disks)
        driver.start("guest")
        with pytest.raises(InvalidState):
            driver.start("guest")
        wait_counter(driver, "guest", 0)
        assert COUNTER_MARKER in console_text(driver, "guest")

        # Another connection and another process see it running.
        with connect(uri) as other:
            assert other.get("guest").state is VmState.RUNNING
        listed = subprocess.run([sys.executable, "-c",
                                 "import json, sys; from polyvisor.hypervisors import connect; "
                                 "print(json.dumps([v.as_dict() for v in connect(sys.argv[1]).list_vms()]))", uri],
                                capture_output=True, text=True, env=polyvisor_env(), check=True, timeout=60)
        assert [(v["name"], v["state"]) for v in json.loads(listed.stdout)] == [("guest", "running")]

        driver.pause("guest")
        assert driver.get("guest").state is VmState.PAUSED
        with pytest.raises(InvalidState):
            driver.pause("guest")
        paused_at = counters(console_text(driver, "guest"))
        time.sleep(2.5)
        assert counters(console_text(driver, "guest")) == paused_at  # the vCPUs really stopped
        driver.resume("guest")
        assert driver.get("guest").state is VmState.RUNNING

        stats = driver.stats("guest")
        assert stats.cpu_time_ns is not None
        assert stats.cpu_time_ns > 0
        assert stats.memory_bytes == 256 << 20
        assert stats.disks["virtio0:0"].read_bytes > 0

        # A snapshot with memory: after reverting, the counter goes back to where it was.
        at_snapshot = max(wait_counter(driver, "guest", max(paused_at, default=0) + 1))
        snap = driver.snapshot_create("guest", "live", "counter running")
        assert snap.includes_memory
        wait_counter(driver, "guest", at_snapshot + 4)
        driver.snapshot_revert("guest", "live")
        assert driver.get("guest").state is VmState.RUNNING
        after_revert = len(counters(console_text(driver, "guest")))
        wait_for(lambda: len(counters(console_text(driver, "guest"))) > after_revert + 1, 30, "counter after revert")
        resumed = counters(console_text(driver, "guest"))[after_revert:]
        assert resumed[0] <= at_snapshot + 2, (at_snapshot, resumed)  # back in time, not continuing
        assert [s.name for s in driver.snapshot_list("guest")] == ["live"]
        assert driver.snapshot_list("guest")[0].description == "counter running"
        driver.snapshot_delete("guest", "live")
        assert driver.snapshot_list("guest") == []

        # The busybox init ignores the ACPI power button: shutdown times out and the VM keeps running.
        started = time.monotonic()
        with pytest.raises(OperationTimeout):
            driver.shutdown("guest", timeout=2)
        assert time.monotonic() - started < 20
        assert driver.get("guest").state is VmState.RUNNING

        # reboot is a hard reset: the boot loader runs again.
        driver.reboot("guest")
        wait_for(lambda: console_text(driver, "guest").count("SYSLINUX") >= 2, BOOT_TIMEOUT, "a second boot")

        with pytest.raises(InvalidState):
            driver.undefine("guest")
        pid = driver.get("guest").extra["pid"]
        driver.destroy("guest")
        assert driver.get("guest").state is VmState.SHUT_OFF
        assert pid not in qemu_pids(tmp_path)
        driver.undefine("guest")


# ------------------------------------------------------------------------------ live migration


@pytest.mark.boot
@pytest.mark.timeout(300)
def test_live_migration_counter_continues(tmp_path: Path) -> None:
    """The counter guest moves from root A to root B while it runs; failures roll back first."""
    uri_a, uri_b = root_uri(tmp_path / "a"), root_uri(tmp_path / "b")
    model, disks = make_qcow2_guest(tmp_path / "images", "mover")
    with qemu_cleanup(tmp_path), connect(uri_a) as host_a, connect(uri_b) as host_b:
        assert isinstance(host_a, QemuDriver)
        assert isinstance(host_b, QemuDriver)
        host_a.define(model, disks)
        host_a.start("mover")
        wait_counter(host_a, "mover", 2)

        # 1. The destination's migration port is taken: refused, the source keeps running.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with connect(root_uri(tmp_path / "b", migration_port=str(port))) as busy, \
                    pytest.raises(MigrationFailed, match="rolled back") as info:
                host_a.migrate("mover", busy, MigrationOptions())
        assert "still running" in str(info.value)
        assert host_a.get("mover").state is VmState.RUNNING
        assert host_b.list_vms() == []

        # 2. Too little bandwidth to finish in time: cancelled, the source keeps running.
        with pytest.raises(MigrationFailed, match="not complete after") as info:
            host_a.migrate("mover", host_b, MigrationOptions(bandwidth_mib=1, timeout=2))
        assert "migration cancelled" in str(info.value)
        assert host_a.get("mover").state is VmState.RUNNING
        assert host_b.list_vms() == []
        assert len(qemu_pids(tmp_path / "b")) == 0
        before = max(wait_counter(host_a, "mover", max(counters(console_text(host_a, "mover"))) + 1))

        # 3. A migration that completes.
        progress: list[tuple[int, int]] = []
        states: list[VmState] = []

        def on_progress(done: int, total: int) -> None:
            progress.append((done, total))
            states.append(host_a.get("mover").state)

        report = host_a.migrate("mover", host_b, MigrationOptions(downtime_ms=300, bandwidth_mib=512,
                                                                  progress=on_progress))
        assert set(states) == {VmState.MIGRATING}
        assert report.kind == "live"
        assert report.total_seconds > 0
        assert report.downtime_ms is not None
        assert report.downtime_ms >= 0
        assert report.transferred_bytes > 1 << 20
        assert progress
        assert progress[-1][1] >= 256 << 20
        assert host_a.list_vms() == []
        assert not (tmp_path / "a" / "mover").exists()
        assert qemu_pids(tmp_path / "a") == []
        assert host_b.get("mover").state is VmState.RUNNING

        # The counter continues on B: B's own log carries on from A's numbers, the whole history has no gap.
        log_b = tmp_path / "b" / "mover" / "console.log"
        wait_for(lambda: len(counters(log_b.read_text(errors="replace"))) >= 3, 30, "the counter on B")
        on_b = counters(log_b.read_text(errors="replace"))
        assert on_b[0] > before, (before, on_b)
        assert on_b == list(range(on_b[0], on_b[0] + len(on_b)))
        history = counters(console_text(host_b, "mover"))
        assert history == list(range(len(history))), history  # 0, 1, 2, … across the switch-over
        assert "SYSLINUX" in console_text(host_b, "mover")  # one boot, on A
        with connect(uri_b) as fresh:
            assert fresh.get("mover").state is VmState.RUNNING
        host_b.destroy("mover")


def test_migration_needs_a_running_vm_and_another_root(tmp_path: Path) -> None:
    model, disks = make_qcow2_guest(tmp_path / "images", "idle")
    with connect(root_uri(tmp_path / "a")) as host_a, connect(root_uri(tmp_path / "b", accel="kvm")) as kvm:
        host_a.define(model, disks)
        with pytest.raises(MigrationFailed, match="same root"):
            host_a.migrate("idle", host_a, MigrationOptions())
        with pytest.raises(MigrationFailed, match="accelerators differ"):
            host_a.migrate("idle", kvm, MigrationOptions())
        with connect(root_uri(tmp_path / "c")) as host_c, pytest.raises(InvalidState):
            host_a.migrate("idle", host_c, MigrationOptions())
