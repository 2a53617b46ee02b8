"""The libvirt driver (libvirt-python): any libvirt URI, the embedded QEMU driver by default.

URIs
----
``qemu:///embed?root=DIR`` (the default: :meth:`LibvirtDriver.default_uri`)
    libvirt's embedded QEMU driver, run inside the calling process (no
    libvirtd).  libvirt keeps every definition, log and runtime file under
    DIR and starts QEMU itself.  libvirt allows **one embedded root per
    process** for the life of the process (a second root is refused with
    ConnectionFailed); several connections to the same root are fine.  DIR
    must be short (QEMU's monitor socket lives under it, and UNIX socket paths
    are limited to 108 bytes).
``qemu:///system``, ``qemu+ssh://host/system``, ``xen:///``, ``test:///default`` …
    any other libvirt URI, opened with ``virConnectOpen``.  ``test:///default``
    is libvirt's built-in test driver (no guests really run: fast tests).
``libvirt+URI``
    forces this driver for *URI* (``libvirt+qemu:///session``).

``qemu:///session?root=DIR`` is polyvisor's own QEMU driver, not this one.
polyvisor's own query parameter ``accel=kvm`` (removed before libvirt sees the
URI) makes QEMU domains ``<domain type="kvm">``; without it they are
``type="qemu"`` (TCG), which is the only accelerator that boots guests on
hosts where nested KVM hangs.

The embedded root as root user
------------------------------
When DIR/etc/qemu.conf does not exist, the driver writes one with
``stdio_handler = "file"`` (QEMU writes its own log files, so no virtlogd
daemon is needed: without it starting a domain fails with "Failed to connect
socket to '/run/libvirt/virtlogd-sock'") and, when the process runs as root,
``user = "+0"`` / ``group = "+0"``: a privileged embedded driver otherwise runs
QEMU as Debian's ``libvirt-qemu`` user (package libvirt-daemon-system), which
cannot reach disks or the root itself inside a private (0700) directory such
as pytest's temporary directories ("Unable to read …/master-key.aes:
Permission denied").  To run QEMU unprivileged instead, write DIR/etc/qemu.conf
with ``user = "libvirt-qemu"`` before the first connection and keep DIR and
the disks reachable by that user.  No ``<seclabel>`` is needed either way.

Mapping
-------
* the model becomes domain XML through polyvisor's libvirt codec
  (:mod:`polyvisor.vm.codecs.libvirt`); the domain type comes from the
  connection (see above), disk sources are the host files given to
  :meth:`~LibvirtDriver.define`, and disks without a format get the probed
  one.  On the embedded driver (which has no virtual networks) interfaces of
  type ``network`` become user-mode (SLIRP) interfaces.
* serial ports of a local QEMU connection log to a file
  (``<serial type="pty"><log file=… append="off"/>``): DIR/console/NAME.serialN.log
  on the embedded driver, libvirt's log directory otherwise;
  :meth:`~LibvirtDriver.console` reads the log the domain XML names.
* states: ``virDomainGetState`` (libvirt API reference, virDomainState and
  its reasons) through :data:`LibvirtDriver.STATE_MAP` and :data:`REASON_STATES`.
* snapshots: ``virDomainSnapshotCreateXML`` with default flags (internal
  snapshots, with memory while the domain runs: qcow2 disks needed),
  ``virDomainListAllSnapshots``, ``virDomainRevertToSnapshot``,
  ``virDomainSnapshotDelete``.
* stats: ``virDomainGetInfo`` (cpuTime), ``virDomainMemoryStats`` (balloon
  ``actual``), ``virDomainBlockStats`` per disk target,
  ``virDomainInterfaceStats`` per interface with a host-side target device.
* export: the inactive domain XML read back through the codec.

Live migration between two embedded roots is impossible in one process (one
root per process) and is not declared.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import re
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit

import libvirt

from polyvisor.disk import ReferencePolicy, probe_format
from polyvisor.errors import (
    ConnectionFailed,
    HypervisorError,
    InvalidState,
    OperationTimeout,
    PolyvisorError,
    SnapshotNotFound,
    UsageError,
    VmExists,
    VmNotFound,
)
from polyvisor.hypervisors.driver import (
    Capability,
    DiskStats,
    Driver,
    ExportedVm,
    NicStats,
    Snapshot,
    VmInfo,
    VmState,
    VmStats,
)
from polyvisor.hypervisors.registry import register_driver
from polyvisor.vm.codecs import ReadOptions
from polyvisor.vm.codecs.libvirt import LibvirtCodec
from polyvisor.vm.model import VmModel
from polyvisor.vm.safety import parse_xml

#: Driver name in messages and the registry.
NAME = "libvirt"

#: virDomainState (libvirt-domain.h) -> its name, as STATE_MAP keys.
NATIVE_STATES: dict[int, str] = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

#: (state, reason) pairs whose common state is more precise than the state's own.
REASON_STATES: dict[tuple[int, int], VmState] = {
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION): VmState.MIGRATING,
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY): VmState.MIGRATING,
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP): VmState.PENDING,
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SAVED): VmState.SUSPENDED,
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED): VmState.CRASHED,
}

#: virConnectGetType() -> the domain type to define.
DOMAIN_TYPES = {"QEMU": "qemu", "Test": "test", "Xen": "xen", "LXC": "lxc"}

#: URI query parameters polyvisor reads itself (removed before the URI reaches libvirt).
POLYVISOR_PARAMETERS = ("accel",)

#: Longest embedded root: QEMU's monitor socket is ROOT/lib/qemu/domain-ID-NAME/monitor.sock (NAME cut to 20
#: characters) and UNIX socket paths hold at most 107 bytes.
MAX_EMBED_ROOT = 60

_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process).

    The embedded driver refuses to open without one ("An event loop
    implementation must be registered"); remote connections use it for keepalives.
    """
    global _event_loop_started  # noqa: PLW0603 - one loop per process, as libvirt requires
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-event-loop", daemon=True).start()
        # libvirt prints every error on stderr unless a handler takes it; errors reach callers as exceptions.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _event_loop_started = True


def _split_uri(uri: str) -> tuple[str, dict[str, str]]:
    """The libvirt URI for *uri* (``libvirt+`` and polyvisor's parameters removed) and those parameters."""
    target = uri[len("libvirt+"):] if uri.startswith("libvirt+") else uri
    parts = urlsplit(target)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in POLYVISOR_PARAMETERS}
    theirs = [(k, v) for k, v in query if k not in POLYVISOR_PARAMETERS]
    rebuilt = target.split("?", 1)[0].split("#", 1)[0]
    if theirs:
        rebuilt += "?" + urlencode(theirs, safe="/")
    return rebuilt, ours


def _embed_root(libvirt_uri: str) -> Path | None:
    parts = urlsplit(libvirt_uri)
    if parts.scheme != "qemu" or parts.path != "/embed":
        return None
    root = dict(parse_qsl(parts.query)).get("root")
    return Path(root) if root else None


def _safe_file_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "vm"
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def _prepare_embed_root(root: Path) -> None:
    """Create the embedded driver's root and its qemu.conf (see the module docstring)."""
    if not root.is_absolute():
        raise ConnectionFailed(NAME, f"the embedded driver's root must be an absolute path, not {str(root)!r}")
    if len(str(root)) > MAX_EMBED_ROOT:
        raise ConnectionFailed(NAME, f"embedded root {str(root)!r} is longer than {MAX_EMBED_ROOT} characters: "
                                     "QEMU's monitor socket under it would exceed the UNIX socket path limit")
    (root / "console").mkdir(parents=True, exist_ok=True)
    conf = root / "etc" / "qemu.conf"
    if conf.exists():
        return
    lines = [
        "# Written by polyvisor: QEMU writes its own logs (no virtlogd daemon).",
        'stdio_handler = "file"',
    ]
    if os.geteuid() == 0:
        lines += [
            "# Run QEMU as the calling user (root), as a session driver would; set libvirt-qemu to drop privileges.",
            'user = "+0"',
            'group = "+0"',
        ]
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("\n".join(lines) + "\n")


@register_driver
class LibvirtDriver(Driver):
    """Any hypervisor libvirt manages; the embedded QEMU driver by default."""

    name = NAME
    schemes = ("qemu", "qemu+ssh", "qemu+tcp", "qemu+unix", "xen", "test", "libvirt")
    description = "libvirt (libvirt-python): qemu:///embed?root=DIR by default, any libvirt URI"
    capabilities = frozenset({
        Capability.LIST, Capability.GET, Capability.DEFINE, Capability.UNDEFINE,
        Capability.START, Capability.SHUTDOWN, Capability.DESTROY, Capability.REBOOT,
        Capability.PAUSE, Capability.RESUME,
        Capability.SNAPSHOT_CREATE, Capability.SNAPSHOT_LIST, Capability.SNAPSHOT_REVERT,
        Capability.SNAPSHOT_DELETE,
        Capability.STATS, Capability.CONSOLE, Capability.EXPORT,
    })
    #: virDomainState name -> common state (libvirt API reference, enum virDomainState).
    STATE_MAP: ClassVar[Mapping[str, VmState]] = {
        "nostate": VmState.UNKNOWN,
        "running": VmState.RUNNING,
        "blocked": VmState.RUNNING,  # running, waiting on a resource
        "paused": VmState.PAUSED,
        "shutdown": VmState.STOPPING,  # being shut down
        "shutoff": VmState.SHUT_OFF,
        "crashed": VmState.CRASHED,
        "pmsuspended": VmState.SUSPENDED,  # suspended by the guest's power management
    }

    @classmethod
    def default_uri(cls, root: str | os.PathLike[str]) -> str:
        """The default connection: libvirt's embedded QEMU driver keeping everything under *root*."""
        return f"qemu:///embed?root={Path(root).absolute()}"

    @classmethod
    def accepts(cls, uri: str) -> bool:
        if uri.startswith("libvirt+"):
            return True
        parts = urlsplit(uri)
        base = parts.scheme.split("+", 1)[0]
        if base not in ("qemu", "xen", "test"):
            return False
        # qemu:///session?root=DIR belongs to polyvisor's own QEMU driver.
        return not (parts.scheme == "qemu" and parts.path == "/session"
                    and "root" in dict(parse_qsl(parts.query)))

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.libvirt_uri, options = _split_uri(uri)
        accel = options.get("accel", "tcg")
        if accel not in ("tcg", "kvm"):
            raise ConnectionFailed(NAME, f"accel={accel!r}: use tcg or kvm")
        self.embed_root = _embed_root(self.libvirt_uri)
        if self.embed_root is not None:
            _prepare_embed_root(self.embed_root)
        _ensure_event_loop()
        try:
            self.conn: Any = libvirt.open(self.libvirt_uri)
        except libvirt.libvirtError as exc:
            raise ConnectionFailed(NAME, f"cannot open {self.libvirt_uri}: {exc.get_error_message()}") from None
        hv_type = str(self.conn.getType())
        self.domain_type = DOMAIN_TYPES.get(hv_type, hv_type.lower())
        if self.domain_type == "qemu" and accel == "kvm":
            self.domain_type = "kvm"
        self.console_dir = self._console_dir(hv_type)

    def _console_dir(self, hv_type: str) -> Path | None:
        """Where serial logs of new domains go (None: the connection's files are not on this host)."""
        if hv_type != "QEMU":
            return None
        if self.embed_root is not None:
            return self.embed_root / "console"
        parts = urlsplit(self.libvirt_uri)
        if parts.hostname not in (None, "", "localhost"):
            return None
        if parts.path == "/system":
            return Path("/var/log/libvirt/qemu")
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return cache / "libvirt" / "qemu" / "log"

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    # ------------------------------------------------------------- plumbing

    def _fail(self, exc: Any, vm: str | None = None, snapshot: str | None = None) -> NoReturn:
        """Raise the polyvisor error for a libvirtError (virErrorNumber, libvirt API reference)."""
        code = exc.get_error_code()
        message = str(exc.get_error_message() or exc)
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            raise VmNotFound(NAME, "no such VM", vm=vm) from None
        if code == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            raise SnapshotNotFound(NAME, f"no snapshot {snapshot!r}", vm=vm) from None
        if code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_DENIED):
            raise InvalidState(NAME, message, vm=vm) from None
        if code in (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNRESPONSIVE):
            raise OperationTimeout(NAME, message, vm=vm) from None
        raise HypervisorError(NAME, message, vm=vm) from None

    def _domain(self, name: str) -> Any:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            self._fail(exc, name)

    def _xml(self, dom: Any, flags: int = 0) -> ET.Element:
        return parse_xml(str(dom.XMLDesc(flags)).encode(), source=f"domain {dom.name()}")

    @contextlib.contextmanager
    def _calls(self, vm: str, snapshot: str | None = None) -> Iterator[None]:
        try:
            yield
        except libvirt.libvirtError as exc:
            self._fail(exc, vm, snapshot)

    def _state(self, dom: Any) -> tuple[VmState, str]:
        state, reason = dom.state()
        native = NATIVE_STATES.get(state, f"state {state}")
        common = REASON_STATES.get((state, reason), self.map_state(native))
        return common, native

    def _info(self, dom: Any) -> VmInfo:
        state, native = self._state(dom)
        _, max_kib, _, vcpus, _ = dom.info()
        extra: dict[str, Any] = {"persistent": bool(dom.isPersistent()), "domain_type": self.domain_type}
        if dom.isActive():
            extra["id"] = int(dom.ID())
        return VmInfo(name=str(dom.name()), state=state, vcpus=int(vcpus), memory=int(max_kib) * 1024,
                      uuid=str(dom.UUIDString()), native_state=native, extra=extra)

    # ------------------------------------------------------------ inventory

    def list_vms(self) -> list[VmInfo]:
        """``virConnectListAllDomains``: active and inactive domains."""
        try:
            domains = self.conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            self._fail(exc)
        found = []
        for dom in domains:
            with contextlib.suppress(VmNotFound), self._calls(str(dom.name())):  # VmNotFound: undefined meanwhile
                found.append(self._info(dom))
        return sorted(found, key=lambda vm: vm.name)

    def get(self, name: str) -> VmInfo:
        """``virDomainLookupByName`` and ``virDomainGetInfo``."""
        dom = self._domain(name)
        with self._calls(name):
            return self._info(dom)

    def define(self, model: VmModel, disks: Mapping[str, Path]) -> VmInfo:
        """``virDomainDefineXML`` of the codec's domain XML (VmExists if the name is taken)."""
        model.validate()
        with contextlib.suppress(VmNotFound):
            self._domain(model.name)
            raise VmExists(NAME, "a VM of that name is already defined", vm=model.name)
        xml = self.domain_xml(model, disks)
        with self._calls(model.name):
            dom = self.conn.defineXML(xml)
            return self._info(dom)

    def domain_xml(self, model: VmModel, disks: Mapping[str, Path]) -> str:
        """The domain XML :meth:`define` gives libvirt for *model* with *disks* (model disk path -> host file)."""
        LibvirtCodec.check_disks(model, disks)
        model = _with_probed_formats(model, disks)
        root = _codec_domain(model, disks)
        root.set("type", self.domain_type)
        devices = root.find("devices")
        if devices is not None:
            if self.embed_root is not None:
                _user_mode_networks(devices)
            if self.console_dir is not None:
                self._log_serials(devices, model.name)
        return ET.tostring(root, encoding="unicode")

    def _log_serials(self, devices: ET.Element, vm: str) -> None:
        assert self.console_dir is not None
        for serial in devices.findall("serial"):
            if serial.get("type", "pty") != "pty" or serial.find("log") is not None:
                continue
            target = serial.find("target")
            port = target.get("port", "0") if target is not None else "0"
            log = self.console_dir / f"{_safe_file_name(vm)}.serial{port}.log"
            element = ET.Element("log", {"file": str(log), "append": "off"})
            serial.insert(0, element)

    def undefine(self, name: str) -> None:
        """``virDomainUndefineFlags`` with snapshot metadata and NVRAM (disk files stay)."""
        dom = self._domain(name)
        with self._calls(name):
            if dom.isActive():
                raise InvalidState(NAME, "the VM is running: shut it down or destroy it first", vm=name)
            flags = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            if self.domain_type in ("qemu", "kvm"):
                flags |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            dom.undefineFlags(flags)

    # ------------------------------------------------------------ lifecycle

    def start(self, name: str) -> None:
        """``virDomainCreate``."""
        dom = self._domain(name)
        with self._calls(name):
            if dom.isActive():
                raise InvalidState(NAME, "the VM is already running", vm=name)
            dom.create()

    def shutdown(self, name: str, timeout: float = 60.0) -> None:
        """``virDomainShutdown`` (ACPI power button or guest agent), then wait for shut off."""
        dom = self._domain(name)
        with self._calls(name):
            if not dom.isActive():
                raise InvalidState(NAME, "the VM is not running", vm=name)
            dom.shutdown()
            deadline = time.monotonic() + timeout
            while dom.isActive():
                if time.monotonic() > deadline:
                    raise OperationTimeout(NAME, f"the guest did not power off within {timeout:g} s", vm=name)
                time.sleep(0.2)

    def destroy(self, name: str) -> None:
        """``virDomainDestroy``."""
        dom = self._domain(name)
        with self._calls(name):
            if not dom.isActive():
                raise InvalidState(NAME, "the VM is not running", vm=name)
            dom.destroy()

    def reboot(self, name: str) -> None:
        """``virDomainReboot`` (asks the guest, like shutdown)."""
        dom = self._domain(name)
        with self._calls(name):
            dom.reboot(0)

    def pause(self, name: str) -> None:
        """``virDomainSuspend``."""
        dom = self._domain(name)
        with self._calls(name):
            dom.suspend()

    def resume(self, name: str) -> None:
        """``virDomainResume``."""
        dom = self._domain(name)
        with self._calls(name):
            dom.resume()

    # ------------------------------------------------------------ snapshots

    def snapshot_create(self, name: str, snapshot: str, description: str = "") -> Snapshot:
        """``virDomainSnapshotCreateXML`` (internal: qcow2 disks; with memory when running)."""
        dom = self._domain(name)
        xml = ET.Element("domainsnapshot")
        ET.SubElement(xml, "name").text = snapshot
        if description:
            ET.SubElement(xml, "description").text = description
        with self._calls(name, snapshot):
            with contextlib.suppress(libvirt.libvirtError):
                dom.snapshotLookupByName(snapshot, 0)
                raise HypervisorError(NAME, f"snapshot {snapshot!r} already exists", vm=name)
            created = dom.snapshotCreateXML(ET.tostring(xml, encoding="unicode"), 0)
            return _snapshot(created)

    def snapshot_list(self, name: str) -> list[Snapshot]:
        """``virDomainListAllSnapshots``, oldest first (parents before children)."""
        dom = self._domain(name)
        with self._calls(name):
            snaps = [_snapshot(s) for s in dom.listAllSnapshots(0)]
        by_name = {s.name: s for s in snaps}

        def depth(snap: Snapshot) -> int:
            n = 0
            while snap.parent in by_name and n < len(by_name):
                snap, n = by_name[snap.parent], n + 1
            return n

        epoch = datetime.fromtimestamp(0, UTC)
        return sorted(snaps, key=lambda s: (s.created or epoch, depth(s), s.name))

    def snapshot_revert(self, name: str, snapshot: str) -> None:
        """``virDomainRevertToSnapshot`` (the VM runs afterwards if it ran when the snapshot was taken)."""
        dom = self._domain(name)
        with self._calls(name, snapshot):
            dom.revertToSnapshot(dom.snapshotLookupByName(snapshot, 0), 0)

    def snapshot_delete(self, name: str, snapshot: str) -> None:
        """``virDomainSnapshotDelete``."""
        dom = self._domain(name)
        with self._calls(name, snapshot):
            dom.snapshotLookupByName(snapshot, 0).delete(0)

    # ---------------------------------------------------------- observation

    def stats(self, name: str) -> VmStats:
        """``virDomainGetInfo``, ``virDomainMemoryStats``, ``virDomainBlockStats``, ``virDomainInterfaceStats``."""
        dom = self._domain(name)
        with self._calls(name):
            if not dom.isActive():
                raise InvalidState(NAME, "the VM is not running", vm=name)
            _, _, memory_kib, _, cpu_time = dom.info()
            memory = int(memory_kib) * 1024
            with contextlib.suppress(libvirt.libvirtError):
                balloon = dom.memoryStats()
                if "actual" in balloon:
                    memory = int(balloon["actual"]) * 1024
            devices = self._xml(dom).find("devices")
            disks: dict[str, DiskStats] = {}
            nics: dict[str, NicStats] = {}
            if devices is not None:
                for disk in devices.findall("disk"):
                    target = disk.find("target")
                    dev = target.get("dev") if target is not None else None
                    if not dev or disk.find("source") is None:
                        continue
                    rd_req, rd_bytes, wr_req, wr_bytes, _errs = dom.blockStats(dev)
                    disks[dev] = DiskStats(read_bytes=max(rd_bytes, 0), write_bytes=max(wr_bytes, 0),
                                           read_ops=max(rd_req, 0), write_ops=max(wr_req, 0))
                for interface in devices.findall("interface"):
                    target = interface.find("target")
                    dev = target.get("dev") if target is not None else None
                    if not dev:
                        continue  # user-mode networking has no host-side device to count on
                    rx_bytes, rx_packets, _, _, tx_bytes, tx_packets, _, _ = dom.interfaceStats(dev)
                    nics[dev] = NicStats(rx_bytes=rx_bytes, tx_bytes=tx_bytes, rx_packets=rx_packets,
                                         tx_packets=tx_packets)
            return VmStats(cpu_time_ns=int(cpu_time), memory_bytes=memory, disks=disks, nics=nics)

    def console_log(self, name: str) -> Path:
        """The file the VM's first serial port logs to, as its domain XML names it."""
        dom = self._domain(name)
        with self._calls(name):
            devices = self._xml(dom).find("devices")
        serials = devices.findall("serial") if devices is not None else []
        if not serials:
            raise HypervisorError(NAME, "the VM has no serial port", vm=name)
        for serial in serials:
            log = serial.find("log")
            source = serial.find("source")
            if log is not None and log.get("file"):
                path = log.get("file", "")
            elif serial.get("type") == "file" and source is not None and source.get("path"):
                path = source.get("path", "")
            else:
                continue
            if urlsplit(self.libvirt_uri).hostname not in (None, "", "localhost"):
                raise HypervisorError(NAME, f"the serial log {path} is on the remote host", vm=name)
            return Path(path)
        raise HypervisorError(NAME, "the VM's serial port does not log to a file (define it through polyvisor "
                                    "on a local QEMU connection, or add <log file=...> to it)", vm=name)

    def console(self, name: str, *, follow: bool = False) -> Iterator[str]:
        """The serial log so far; with *follow*, keep yielding until the VM stops (``tail -f``)."""
        path = self.console_log(name)
        return self._tail(name, path, follow)

    def _tail(self, name: str, path: Path, follow: bool) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset = 0
        while True:
            try:
                with open(path, "rb") as handle:
                    if os.fstat(handle.fileno()).st_size < offset:
                        offset = 0  # the log was restarted (append="off" on the next start)
                    handle.seek(offset)
                    data = handle.read()
            except FileNotFoundError:
                data = b""
            offset += len(data)
            text = decoder.decode(data)
            if text:
                yield text
            if not follow:
                return
            if not data:
                try:
                    running = bool(self._domain(name).isActive())
                except (VmNotFound, libvirt.libvirtError):
                    running = False
                if not running:
                    return
                time.sleep(0.2)

    def export(self, name: str) -> ExportedVm:
        """The inactive domain XML read back through the codec; disks are the domain's source files."""
        dom = self._domain(name)
        with self._calls(name):
            root = self._xml(dom, libvirt.VIR_DOMAIN_XML_INACTIVE)
        _strip_host_specifics(root, self.console_dir)
        with tempfile.TemporaryDirectory(prefix="polyvisor-export-") as tmp:
            path = Path(tmp) / "domain.xml"
            path.write_bytes(ET.tostring(root))
            try:
                package = LibvirtCodec.read(path, ReadOptions(policy=ReferencePolicy(allow_anywhere=True)))
            except PolyvisorError as exc:
                raise HypervisorError(NAME, f"cannot export: {exc}", vm=name) from None
        return ExportedVm(model=package.model, disks={k: v.path for k, v in package.disks.items()})


# ------------------------------------------------------------------ helpers


def _with_probed_formats(model: VmModel, disks: Mapping[str, Path]) -> VmModel:
    """*model* with every disk's format set (probed from its host file when the model leaves it out)."""
    import dataclasses

    changed = []
    for disk in model.disks:
        if disk.path is not None and disk.format is None:
            try:
                disk = dataclasses.replace(disk, format=probe_format(Path(disks[disk.path])))
            except PolyvisorError as exc:
                raise UsageError(f"disk {disk.path}: cannot tell its format: {exc}") from None
        changed.append(disk)
    return dataclasses.replace(model, disks=tuple(changed))


def _codec_domain(model: VmModel, disks: Mapping[str, Path]) -> ET.Element:
    """The codec's domain XML for *model*, its disk sources pointing at the host files in *disks*.

    The codec writes packages, with disk sources inside the package directory
    and the images copied there.  Here it writes into a temporary directory
    with empty stand-ins for the images (nothing is copied), and the sources
    are then rewritten to the host files themselves.
    """
    with tempfile.TemporaryDirectory(prefix="polyvisor-define-") as tmp:
        home = Path(tmp).resolve()
        written = LibvirtCodec.write(model, home, {member: Path(os.devnull) for member in disks})
        xml_file = next(p for p in written if p.suffix == ".xml" and p.relative_to(home).as_posix() not in disks)
        root = parse_xml(xml_file.read_bytes(), source=xml_file)
    for disk in root.iter("disk"):
        source = disk.find("source")
        if source is not None and source.get("file"):
            member = Path(source.get("file", "")).relative_to(home).as_posix()
            source.set("file", str(Path(disks[member]).resolve()))
    return root


def _user_mode_networks(devices: ET.Element) -> None:
    """Interfaces on virtual networks become user-mode ones (the embedded driver has no network driver)."""
    for interface in devices.findall("interface"):
        if interface.get("type") == "network":
            interface.set("type", "user")
            for source in interface.findall("source"):
                interface.remove(source)


def _strip_host_specifics(root: ET.Element, console_dir: Path | None) -> None:
    """Drop what only makes sense on this host: security labels, the id, serial logs polyvisor placed."""
    root.attrib.pop("id", None)
    for seclabel in root.findall("seclabel"):
        root.remove(seclabel)
    devices = root.find("devices")
    if devices is None:
        return
    for element in [*devices.findall("serial"), *devices.findall("console")]:
        for log in element.findall("log"):
            if console_dir is not None and Path(log.get("file", "")).parent == console_dir:
                element.remove(log)


def _snapshot(snap: Any) -> Snapshot:
    """A Snapshot from ``virDomainSnapshotGetXMLDesc`` (libvirt's domainsnapshot XML format)."""
    root = parse_xml(str(snap.getXMLDesc(0)).encode(), source="domainsnapshot")
    created_text = root.findtext("creationTime")
    created = datetime.fromtimestamp(int(created_text), UTC) if created_text else None
    memory = root.find("memory")
    includes_memory = (memory.get("snapshot", "no") != "no") if memory is not None else \
        root.findtext("state") in ("running", "paused")
    return Snapshot(name=str(snap.getName()), created=created, description=root.findtext("description") or "",
                    parent=root.findtext("parent/name"), includes_memory=includes_memory)
