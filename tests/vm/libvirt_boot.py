"""Booting a libvirt domain XML written by polyvisor under libvirt's embedded QEMU driver (TCG).

``qemu:///embed?root=DIR`` runs the QEMU driver inside this process, keeping
its state, logs and configuration under DIR: no libvirt daemon is started or
needed.  The harness changes only what a test host cannot provide as the XML
says: the domain type becomes ``qemu`` (TCG, no KVM here), network interfaces
use QEMU's user-mode network instead of named host networks, and serial port
0 logs to a file that the test reads for the boot marker.

Needs libvirt-python (PyPI ``libvirt-python`` built against Debian's
libvirt-dev) and Debian's ``libvirt-daemon-system`` and
``libvirt-daemon-driver-qemu`` (the QEMU driver module, firmware and
capability files); ``qemu-system-x86`` runs the guest.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QEMU_CONF = """# polyvisor tests: the embedded driver runs as the test's own user, without virtlogd or cgroups
stdio_handler = "file"
user = "root"
group = "root"
security_driver = "none"
namespaces = []
remember_owner = 0
cgroup_controllers = []
"""

_event_loop_started = False
_event_lock = threading.Lock()
#: libvirt opens the embedded driver with one root per process: every boot of a test run shares it.
_root: Path | None = None


def shared_embed_root() -> Path:
    global _root  # noqa: PLW0603 - one embedded driver root per process
    with _event_lock:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="polyvisor-libvirt-"))
            (_root / "etc").mkdir()
            (_root / "etc" / "qemu.conf").write_text(QEMU_CONF)
            atexit.register(shutil.rmtree, _root, True)
        return _root


@dataclass(frozen=True)
class LibvirtBoot:
    """What the guest printed on its serial console and whether the marker appeared."""

    booted: bool
    seconds: float
    console: str


def _libvirt() -> Any:
    try:
        import libvirt  # libvirt-python ships no type information
    except ImportError as exc:  # a missing peer fails the test with the packages to install
        raise AssertionError("libvirt-python is not installed: pip install libvirt-python (needs Debian "
                             "libvirt-dev and pkg-config), and Debian libvirt-daemon-system and "
                             "libvirt-daemon-driver-qemu") from exc
    return libvirt


def _start_event_loop(libvirt: Any) -> None:
    global _event_loop_started  # noqa: PLW0603 - libvirt's event loop is per process
    with _event_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def prepare_domain(xml_text: str, console_log: Path) -> str:
    """The domain XML adjusted for the embedded TCG test host (see the module docstring)."""
    domain = ET.fromstring(xml_text)  # noqa: S314 - polyvisor's own output
    domain.set("type", "qemu")
    devices = domain.find("devices")
    assert devices is not None, "the domain has no <devices>"
    serials = devices.findall("serial")
    assert serials, "the domain has no serial port: the marker could not be seen"
    for serial in serials:
        target = serial.find("target")
        if target is not None and target.get("port", "0") == "0":
            for old in serial.findall("log"):
                serial.remove(old)
            ET.SubElement(serial, "log", {"file": str(console_log), "append": "off"})
    for interface in devices.findall("interface"):
        interface.set("type", "user")
        for source in interface.findall("source"):
            interface.remove(source)
    return ET.tostring(domain, encoding="unicode")


def boot_domain(xml_path: Path, marker: str, *, timeout: float = 240.0) -> LibvirtBoot:
    """Define and start the domain at *xml_path*; wait for *marker* on serial port 0; always clean up."""
    libvirt = _libvirt()
    _start_event_loop(libvirt)
    root = shared_embed_root()
    console_log = Path(tempfile.mkdtemp(prefix="console-", dir=root)) / "serial0.log"
    xml = prepare_domain(xml_path.read_text(encoding="utf-8"), console_log)
    started = time.monotonic()
    conn = libvirt.open(f"qemu:///embed?root={root}")
    domain = None
    booted = False
    try:
        domain = conn.defineXML(xml)
        domain.create()
        while time.monotonic() - started < timeout:
            if console_log.exists() and marker.encode() in console_log.read_bytes():
                booted = True
                break
            if not domain.isActive():
                break
            time.sleep(0.5)
    finally:
        if domain is not None:
            try:
                if domain.isActive():
                    domain.destroy()
            except libvirt.libvirtError:
                pass  # the guest powered itself off meanwhile
            finally:
                domain.undefine()
        conn.close()
    console = console_log.read_bytes().decode(errors="replace") if console_log.exists() else ""
    shutil.rmtree(console_log.parent, ignore_errors=True)
    return LibvirtBoot(booted, time.monotonic() - started, console)
