"""VMware's vCenter simulator (vcsim) on loopback, for the vsphere driver's tests.

The launcher in tests/hypervisors/vcsim/main.go is built from Debian's golang-go and
golang-github-vmware-govmomi-dev (GOPATH=/usr/share/gocode, GO111MODULE=off), once per source
version, into .cache/vcsim/<source hash>/.  One simulator serves a whole test process: started on
first use on 127.0.0.1 with a free port, stopped (SIGTERM, then SIGKILL) at exit; the kernel also
sends it SIGTERM if the test process dies first (PR_SET_PDEATHSIG).  Its log is .cache/vcsim/vcsim.log.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from polyvisor.disk import create_image
from polyvisor.errors import HypervisorError
from polyvisor.hypervisors.vsphere import VsphereDriver
from polyvisor.vm.model import Bus, Controller, ControllerModel, Cpu, DeviceKind, Disk, MiB, Nic, NicModel, VmModel
from tests.hypervisors.harness import Harness, harness
from tests.peers import REPO

SOURCE = Path(__file__).with_name("vcsim") / "main.go"
GOPATH = "/usr/share/gocode"
#: The VMs vcsim's VPX model creates (one standalone host, one cluster, two VMs per pool).
SIMULATOR_VMS = ("DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1")
#: The cluster's hosts (vMotion targets).
CLUSTER_HOSTS = ("DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2")

_lock = threading.Lock()
_server: tuple[subprocess.Popen[str], str] | None = None


def build_vcsim() -> Path:
    """The vcsim binary for the current launcher source (built on first use, ~20 s)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    cache = REPO / ".cache" / "vcsim"
    binary = cache / digest / "vcsim"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise AssertionError("go is not installed: Debian packages golang-go and golang-github-vmware-govmomi-dev")
    if not (Path(GOPATH) / "src/github.com/vmware/govmomi/simulator").is_dir():
        raise AssertionError("govmomi's simulator is missing: Debian package golang-github-vmware-govmomi-dev")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f".vcsim.{os.getpid()}")
    env = {**os.environ, "GOPATH": GOPATH, "GO111MODULE": "off", "GOFLAGS": "",
           "GOCACHE": str(cache / "go-build"), "CGO_ENABLED": "0"}
    proc = subprocess.run([go, "build", "-o", str(partial), "."], cwd=SOURCE.parent, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"building vcsim failed:\n{proc.stdout}{proc.stderr}")
    os.replace(partial, binary)
    return binary


def _die_with_parent() -> None:
    """In the child: ask the kernel for SIGTERM when the test process dies (prctl PR_SET_PDEATHSIG)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # vcsim removes its temporary datastores on SIGTERM
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def vcsim_url() -> str:
    """The running simulator's SDK URL (https://polyvisor:polyvisor-test@127.0.0.1:PORT/sdk), started on first
    use."""
    global _server  # noqa: PLW0603 - one simulator per test process
    with _lock:
        if _server is not None and _server[0].poll() is None:
            return _server[1]
        binary = build_vcsim()
        log = open(binary.parent.parent / "vcsim.log", "wb")  # noqa: SIM115 - vcsim's log, for diagnostics
        proc = subprocess.Popen([str(binary), "-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL, text=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
        atexit.register(_stop, proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("https://"):
            _stop(proc)
            log.close()
            tail = Path(log.name).read_text(errors="replace")[-2000:]
            raise AssertionError(f"vcsim did not start: {line!r} {tail}")
        _server = (proc, line)
        return line


def vsphere_uri(**parameters: str) -> str:
    """A vsphere:// URI for the simulator (the launcher accepts one login: polyvisor / polyvisor-test)."""
    url = urlsplit(vcsim_url())
    query = "&".join(f"{k}={v}" for k, v in {"insecure": "1", **parameters}.items())
    return f"vsphere://{url.username}:{url.password}@{url.hostname}:{url.port}{url.path}?{query}"


def make_disk(directory: Path, name: str, size: int = 4 * MiB) -> Path:
    """A small monolithicFlat VMDK (descriptor + NAME-flat.vmdk), the flavour ESXi attaches as it is."""
    path = directory / f"{name}.vmdk"
    with create_image(path, "vmdk", size, subformat="monolithicFlat", adapter_type="lsilogic"):
        pass
    return path


def guest_model(name: str, disk: str) -> VmModel:
    """Two vCPUs (one socket, two cores), 256 MiB, an LSI Logic SCSI disk, a CD-ROM, an E1000 on VM Network."""
    return VmModel(
        name=name, memory=256 * MiB, cpu=Cpu(sockets=1, cores=2),
        controllers=(Controller(ControllerModel.LSILOGIC), Controller(ControllerModel.IDE)),
        disks=(Disk(DeviceKind.DISK, Bus.SCSI, 0, 0, path=disk, format="vmdk", boot_order=1),
               Disk(DeviceKind.CDROM, Bus.IDE, 0, 2)),
        nics=(Nic(NicModel.E1000, network="VM Network"),),
    )


def remove_vm(driver: VsphereDriver, name: str) -> None:
    """Power off (if on) and delete *name* with its datastore files, whatever its state."""
    with contextlib.suppress(HypervisorError):
        driver.destroy(name)
    with contextlib.suppress(HypervisorError):
        driver.ex_delete(name)


@contextlib.contextmanager
def vsphere_driver(**parameters: str) -> Iterator[tuple[VsphereDriver, list[str]]]:
    """A connection to the simulator; VMs recorded in the list are deleted afterwards."""
    defined: list[str] = []
    with VsphereDriver.connect(vsphere_uri(**parameters)) as driver:
        try:
            yield driver, defined
        finally:
            for name in defined:
                remove_vm(driver, name)


@harness("vsphere")
@contextlib.contextmanager
def vsphere_harness(tmp_path: Path) -> Iterator[Harness]:
    """vcsim's vCenter (VPX model)."""
    with vsphere_driver() as (driver, defined):

        def make_vm(name: str) -> tuple[VmModel, dict[str, Path]]:
            defined.append(name)
            disk = make_disk(tmp_path, name)
            return guest_model(name, disk.name), {disk.name: disk}

        yield Harness(driver=driver, make_vm=make_vm, state_timeout=30.0, preexisting=SIMULATOR_VMS)
