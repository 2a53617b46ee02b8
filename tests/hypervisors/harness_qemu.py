"""Contract harness for the direct QEMU driver: a temporary root and the busybox guest in counter mode.

The guest's disk is the bootable busybox disk converted to qcow2 (so internal
snapshots work), booted in counter mode: it prints ``polyvisor-counter N``
every second and keeps running, so the contract can pause, resume and
snapshot it.  Every QEMU process whose command line names the test's
directory is killed when the harness exits, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from polyvisor.demo.bootdisk import COUNTER_PREFIX, build_boot_disk
from polyvisor.hypervisors import connect
from polyvisor.vm.model import (
    Bus,
    Controller,
    ControllerModel,
    Cpu,
    DeviceKind,
    Disk,
    GuestOS,
    Nic,
    NicModel,
    OsFamily,
    Serial,
    VmModel,
)
from tests.hypervisors.harness import Harness, harness
from tests.peers import qemu_img

#: The first line the counter guest prints once its init runs.
COUNTER_MARKER = f"{COUNTER_PREFIX} 0"
#: Seconds a TCG boot of the busybox guest may take on a busy 2-core machine.
BOOT_TIMEOUT = 90.0


def qemu_pids(under: Path) -> list[int]:
    """Live QEMU processes whose command line mentions *under*."""
    needle = str(under).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and argv and b"qemu-system" in argv[0] and any(needle in a for a in argv):
            pids.append(int(entry.name))
    return pids


def kill_qemus(under: Path) -> list[int]:
    """SIGKILL every QEMU process started for *under* (test teardown); returns the pids killed."""
    pids = qemu_pids(under)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu_pids(under) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


@contextlib.contextmanager
def qemu_cleanup(under: Path) -> Iterator[None]:
    """Kill every QEMU process started for *under* on the way out, even on failure."""
    try:
        yield
    finally:
        kill_qemus(under)


def root_uri(root: Path, **params: str) -> str:
    """``qemu:///session?root=ROOT`` (plus parameters)."""
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"qemu:///session?root={root}{extra}"


def boot_disk(directory: Path, *, counter: bool = True) -> Path:
    """The busybox boot disk (raw) in *directory*, built once per directory and mode."""
    path = directory / ("counter.raw" if counter else "marker.raw")
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        build_boot_disk(path, extra_cmdline="polyvisor.counter" if counter else "")
    return path


def guest_model(name: str, disk_path: str, fmt: str, *, memory_mib: int = 256) -> VmModel:
    """A one-disk BIOS guest: virtio-blk boot disk, an e1000 NIC, COM1 for the console."""
    return VmModel(
        name=name,
        memory=memory_mib << 20,
        cpu=Cpu(),
        os=GuestOS(family=OsFamily.LINUX, distribution="debian"),
        controllers=(Controller(ControllerModel.VIRTIO_BLK),),
        disks=(Disk(DeviceKind.DISK, Bus.VIRTIO, 0, 0, path=disk_path, format=fmt, boot_order=1),),
        nics=(Nic(NicModel.E1000, mac="52:54:00:12:34:56"),),
        serials=(Serial(0),),
    ).validate()


def make_qcow2_guest(directory: Path, name: str, *, counter: bool = True) -> tuple[VmModel, dict[str, Path]]:
    """A new qcow2 copy of the boot disk for VM *name*, and its model."""
    raw = boot_disk(directory, counter=counter)
    image = directory / f"{name.replace('/', '_')}.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    return guest_model(name, image.name, "qcow2"), {image.name: image}


@harness("qemu")
@contextlib.contextmanager
def qemu_harness(tmp_path: Path) -> Iterator[Harness]:
    """A QEMU root under *tmp_path* with the counter guest."""
    images = tmp_path / "images"
    with qemu_cleanup(tmp_path), connect(root_uri(tmp_path / "root")) as driver:
        yield Harness(
            driver=driver,
            make_vm=lambda name: make_qcow2_guest(images, name),
            state_timeout=BOOT_TIMEOUT,
            console_marker=COUNTER_MARKER,
        )
