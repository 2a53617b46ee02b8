"""libvirt's embedded QEMU driver with the busybox guest (TCG) in counter mode, for the driver contract.

libvirt allows one embedded root per process, so every test of a pytest
process shares :func:`embed_root` (a short directory under /tmp: QEMU's
monitor socket lives under it), with the v2v boot tests.  Each harness destroys and undefines the
domains it defined; at exit every domain left in the root is destroyed and
the root removed, so no QEMU outlives the tests.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from polyvisor.demo.bootdisk import COUNTER_PREFIX, build_boot_disk
from polyvisor.disk import registered_formats
from polyvisor.disk.convert import convert
from polyvisor.errors import HypervisorError
from polyvisor.hypervisors.libvirt import LibvirtDriver
from polyvisor.vm.model import Bus, Controller, ControllerModel, Cpu, DeviceKind, Disk, MiB, Serial, VmModel
from tests.hypervisors.harness import Harness, harness
from tests.vm.libvirt_boot import shared_embed_root

#: What the counter guest prints first.
COUNTER_MARKER = f"{COUNTER_PREFIX} 0"

_lock = threading.Lock()
_root: Path | None = None
_template: dict[str, Path] = {}


def _remove(driver: LibvirtDriver, name: str) -> None:
    """Destroy (if running) and undefine *name*, whatever state it is in."""
    with contextlib.suppress(HypervisorError):
        driver.destroy(name)
    with contextlib.suppress(HypervisorError):
        driver.undefine(name)


def _cleanup_root(root: Path) -> None:
    with contextlib.suppress(HypervisorError), LibvirtDriver.connect(LibvirtDriver.default_uri(root)) as driver:
        for vm in driver.list_vms():
            _remove(driver, vm.name)
    shutil.rmtree(root, ignore_errors=True)


def embed_root() -> Path:
    """The embedded driver's root for this test process (created on first use, removed at exit).

    libvirt allows one embedded root per process, and tests/vm/libvirt_boot.py boots converted guests
    under one too, so this is that root (its qemu.conf is the one the driver writes, plus options for
    hosts without cgroups).  Domains left in it are destroyed at exit.
    """
    global _root  # noqa: PLW0603 - one embedded root per process, as libvirt requires
    with _lock:
        if _root is None:
            _root = shared_embed_root()
            atexit.register(_cleanup_root, _root)
        return _root


def disk_format() -> str:
    """qcow2 (internal snapshots need it) once polyvisor writes qcow2, raw until then."""
    return "qcow2" if "qcow2" in registered_formats() else "raw"


def boot_disk_template() -> Path:
    """The counter-mode busybox boot disk in :func:`disk_format` (built once per process)."""
    fmt = disk_format()
    with _lock:
        if fmt not in _template:
            assert _root is not None, "call embed_root() first"
            raw = _root / "template.raw"
            if not raw.exists():
                build_boot_disk(raw, extra_cmdline="polyvisor.counter")
            if fmt == "raw":
                _template[fmt] = raw
            else:
                converted = _root / f"template.{fmt}"
                convert(raw, converted, fmt)
                _template[fmt] = converted
        return _template[fmt]


def guest_model(name: str, disk_file: str, fmt: str) -> VmModel:
    """The busybox guest: 128 MiB, one vCPU, its disk on IDE, a serial port for the console."""
    return VmModel(
        name=name, memory=128 * MiB, cpu=Cpu(),
        controllers=(Controller(ControllerModel.IDE),),
        disks=(Disk(DeviceKind.DISK, Bus.IDE, 0, 0, path=disk_file, format=fmt, boot_order=1),),
        serials=(Serial(0),),
    )


def make_guest(name: str, directory: Path) -> tuple[VmModel, dict[str, Path]]:
    """A model and its disk (a copy of the template in *directory*) for a new guest called *name*."""
    embed_root()
    template = boot_disk_template()
    fmt = disk_format()
    disk = directory / f"{name}.{fmt}"
    shutil.copyfile(template, disk)
    member = disk.name
    return guest_model(name, member, fmt), {member: disk}


@contextlib.contextmanager
def embedded_driver(tmp_path: Path) -> Iterator[tuple[LibvirtDriver, list[str]]]:
    """A connection to the process's embedded root; the domains recorded in the list are removed after."""
    defined: list[str] = []
    with LibvirtDriver.connect(LibvirtDriver.default_uri(embed_root())) as driver:
        try:
            yield driver, defined
        finally:
            for name in defined:
                _remove(driver, name)


@harness("libvirt")
@contextlib.contextmanager
def libvirt_harness(tmp_path: Path) -> Iterator[Harness]:
    """libvirt's embedded QEMU driver booting the busybox guest."""
    with embedded_driver(tmp_path) as (driver, defined):

        def make_vm(name: str) -> tuple[VmModel, dict[str, Path]]:
            defined.append(name)
            return make_guest(name, tmp_path)

        yield Harness(driver=driver, make_vm=make_vm, state_timeout=120.0, console_marker=COUNTER_MARKER)
