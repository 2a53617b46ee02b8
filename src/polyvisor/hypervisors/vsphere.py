"""The vSphere driver (pyvmomi): vCenter or ESXi through the vSphere Web Services API.

URI
---
``vsphere://USER[:PASSWORD]@HOST[:PORT][/PATH]?insecure=1&datacenter=DC&host=ESXI&datastore=DS``

* the SDK endpoint is ``https://HOST:PORT/PATH`` (port 443 and path ``/sdk`` by default);
* the password may be left out of the URI and given in ``POLYVISOR_VSPHERE_PASSWORD``
  (the user likewise in ``POLYVISOR_VSPHERE_USER``); user and password are percent-decoded;
* ``insecure=1`` skips the TLS certificate check (self-signed vCenter, vcsim);
* ``datacenter`` (default: the first one), ``host`` (the ESXi host new VMs are placed on and the
  target of :meth:`VsphereDriver.migrate`; default: vCenter chooses within the first compute
  resource) and ``datastore`` (default: the first datastore the placement can see).

Mapping (vSphere Web Services API reference, vim.VirtualMachine)
----------------------------------------------------------------
* states: ``runtime.powerState`` through :data:`VsphereDriver.STATE_MAP`; a VM whose
  ``runtime.connectionState`` is not ``connected`` is ``unknown``.  ``extra`` carries the
  connection state, the host, a pending question, the tools status and the guest id;
* ``start`` ``PowerOnVM_Task`` (it also resumes a suspended VM); ``destroy`` ``PowerOffVM_Task``;
  ``shutdown`` ``ShutdownGuest`` — it needs VMware Tools running in the guest, so without them the
  driver raises InvalidState instead of pulling the plug; ``reboot`` ``RebootGuest`` when the tools
  run, otherwise ``ResetVM_Task`` (a hard reset: the guest is not asked).  vSphere has no pause
  (a suspend writes memory to disk): :meth:`VsphereDriver.ex_suspend` is ``SuspendVM_Task``;
* snapshots: ``CreateSnapshot_Task`` (with memory while powered on), the ``snapshot.rootSnapshotList``
  tree, ``RevertToSnapshot_Task``, ``RemoveSnapshot_Task`` (children kept);
* ``define``: ``CreateVM_Task`` with a ``VirtualMachineConfigSpec`` built from the model: ``guestId``
  from :mod:`polyvisor.vm.mapping.guestos`, ``numCPUs``, ``numCoresPerSocket`` (threads folded into
  cores), ``memoryMB``, ``firmware`` (and Secure Boot), the UUID, storage controllers, disks, CD-ROMs
  and NICs as device changes, disk boot order.  Each disk image (VMDK, flat or sparse) is uploaded
  with the datastore's HTTP file interface (``PUT /folder/...?dcPath=&dsName=``) into the VM's folder
  and attached as an existing disk.  ESXi runs flat VMDKs (monolithicFlat); hosted sparse ones need
  its multiextent module or ``vmkfstools -i``; streamOptimized images must be imported (OVF), not
  attached, and are refused, as are non-VMDK images (convert them first).  Serial ports and the
  display are not created (vSphere always has its own console);
* ``undefine``: ``UnregisterVM`` — the VM's files stay on the datastore (its .vmx can be registered
  again), as :meth:`~polyvisor.hypervisors.driver.Driver.undefine` promises; :meth:`VsphereDriver.ex_delete`
  is ``Destroy_Task``, which deletes them;
* :meth:`VsphereDriver.ex_relocate` is ``RelocateVM_Task`` to another host (and its compute
  resource's root pool); :meth:`VsphereDriver.migrate` is the same on a powered-on VM, i.e. vMotion,
  to the host named by a destination connection to the same vCenter.

Not declared: stats (vCenter's ``summary.quickStats`` holds usage rates, not counters, and the
simulator leaves it empty), console, export and image import.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import pyVim.connect
import pyVmomi

from polyvisor.disk import open_image
from polyvisor.errors import (
    ConnectionFailed,
    HypervisorError,
    InvalidState,
    MigrationFailed,
    OperationTimeout,
    PolyvisorError,
    SnapshotNotFound,
    UnmappableModel,
    UsageError,
    VmExists,
    VmNotFound,
)
from polyvisor.hypervisors.driver import (
    Capability,
    Driver,
    MigrationOptions,
    MigrationReport,
    Snapshot,
    VmInfo,
    VmState,
)
from polyvisor.hypervisors.registry import register_driver
from polyvisor.vm.mapping import guestos
from polyvisor.vm.model import Bus, ControllerModel, DeviceKind, Firmware, MiB, NicModel, VmModel

# pyVmomi's generated stubs leave most constructors unannotated: treat the managed object tree as dynamic.
vim: Any = pyVmomi.vim
vmodl: Any = pyVmomi.vmodl
pyvim_connect: Any = pyVim.connect

NAME = "vsphere"
PASSWORD_ENV = "POLYVISOR_VSPHERE_PASSWORD"  # noqa: S105 - the variable's name, not a password
USER_ENV = "POLYVISOR_VSPHERE_USER"

#: Properties fetched for every VM in one PropertyCollector round trip.
VM_PROPERTIES = (
    "name", "runtime.powerState", "runtime.connectionState", "runtime.host", "runtime.question",
    "config.hardware.numCPU", "config.hardware.memoryMB", "config.uuid", "config.guestId", "config.template",
    "guest.toolsRunningStatus",
)

#: Storage controller model -> vim device class name (vim.vm.device.*) for SCSI, SATA and NVMe.
CONTROLLER_CLASSES: dict[ControllerModel, str] = {
    ControllerModel.LSILOGIC: "VirtualLsiLogicController",
    ControllerModel.LSISAS: "VirtualLsiLogicSASController",
    ControllerModel.BUSLOGIC: "VirtualBusLogicController",
    ControllerModel.PVSCSI: "ParaVirtualSCSIController",
    ControllerModel.AHCI: "VirtualAHCIController",
    ControllerModel.NVME: "VirtualNVMEController",
}
#: NIC model -> vim device class name.
NIC_CLASSES: dict[NicModel, str] = {
    NicModel.E1000: "VirtualE1000",
    NicModel.E1000E: "VirtualE1000e",
    NicModel.VMXNET3: "VirtualVmxnet3",
    NicModel.PCNET: "VirtualPCNet32",
}
#: The IDE controllers every vSphere VM has (primary and secondary channel), by device key.
IDE_KEYS = (200, 201)
#: The SCSI controller itself sits on unit 7 of its bus.
SCSI_CONTROLLER_UNIT = 7
#: VMDK subformats ESXi can attach as they are, and the backing each needs.
VMDK_BACKINGS = {"monolithicFlat": "FlatVer2BackingInfo", "twoGbMaxExtentFlat": "FlatVer2BackingInfo",
                 "vmfs": "FlatVer2BackingInfo", "monolithicSparse": "SparseVer2BackingInfo",
                 "twoGbMaxExtentSparse": "SparseVer2BackingInfo"}


@dataclass(frozen=True)
class Endpoint:
    """What a vsphere:// URI names."""

    host: str
    port: int
    path: str
    user: str
    password: str
    insecure: bool
    datacenter: str | None
    esx_host: str | None
    datastore: str | None

    @classmethod
    def parse(cls, uri: str) -> Endpoint:
        """Parse a ``vsphere://`` URI (see the module docstring)."""
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme != "vsphere" or not parts.hostname:
            raise ConnectionFailed(NAME, f"not a vsphere://USER@HOST URI: {uri!r}")
        query = dict(urllib.parse.parse_qsl(parts.query))
        unknown = set(query) - {"insecure", "datacenter", "host", "datastore"}
        if unknown:
            raise ConnectionFailed(NAME, f"unknown URI parameters: {', '.join(sorted(unknown))}")
        user = urllib.parse.unquote(parts.username or "") or os.environ.get(USER_ENV, "")
        password = urllib.parse.unquote(parts.password or "") if parts.password is not None \
            else os.environ.get(PASSWORD_ENV, "")
        if not user:
            raise ConnectionFailed(NAME, f"no user: vsphere://USER@HOST or ${USER_ENV}")
        try:
            port = parts.port or 443
        except ValueError:
            raise ConnectionFailed(NAME, f"bad port in {uri!r}") from None
        return cls(host=parts.hostname, port=port, path=parts.path if parts.path not in ("", "/") else "/sdk",
                   user=user, password=password, insecure=query.get("insecure", "0") in ("1", "true", "yes"),
                   datacenter=query.get("datacenter"), esx_host=query.get("host"),
                   datastore=query.get("datastore"))

    @property
    def server(self) -> str:
        """host:port, to tell whether two connections reach the same vCenter."""
        return f"{self.host}:{self.port}"


@register_driver
class VsphereDriver(Driver):
    """VMware vCenter / ESXi through pyvmomi."""

    name = NAME
    schemes = ("vsphere",)
    description = "VMware vSphere (pyvmomi): vsphere://USER@HOST/?insecure=1; tested against vcsim"
    capabilities = frozenset({
        Capability.LIST, Capability.GET, Capability.DEFINE, Capability.UNDEFINE,
        Capability.START, Capability.SHUTDOWN, Capability.DESTROY, Capability.REBOOT,
        Capability.SNAPSHOT_CREATE, Capability.SNAPSHOT_LIST, Capability.SNAPSHOT_REVERT,
        Capability.SNAPSHOT_DELETE, Capability.MIGRATE_LIVE,
    })
    #: vim.VirtualMachine.PowerState -> common state.
    STATE_MAP: ClassVar[Mapping[str, VmState]] = {
        "poweredOn": VmState.RUNNING,
        "poweredOff": VmState.SHUT_OFF,
        "suspended": VmState.SUSPENDED,
    }

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.endpoint = Endpoint.parse(uri)
        ep = self.endpoint
        try:
            # An explicit context: pyVim skips the certificate check for loopback hosts unless given one.
            self.si: Any = pyvim_connect.SmartConnect(
                host=ep.host, port=ep.port, path=ep.path, user=ep.user, pwd=ep.password,
                sslContext=None if ep.insecure else ssl.create_default_context(),
                disableSslCertValidation=ep.insecure, connectionPoolTimeout=-1)
        except vim.fault.InvalidLogin:
            raise ConnectionFailed(NAME, f"{ep.server}: login refused for {ep.user!r}") from None
        except (OSError, vmodl.MethodFault) as exc:
            raise ConnectionFailed(NAME, f"cannot reach {ep.server}: {_fault_text(exc)}") from None
        self.content: Any = self.si.RetrieveContent()
        self.datacenter: Any = self._pick_datacenter(ep.datacenter)

    def close(self) -> None:
        si, self.si = self.si, None
        if si is not None:
            with contextlib.suppress(Exception):
                pyvim_connect.Disconnect(si)

    # ------------------------------------------------------------- plumbing

    def _pick_datacenter(self, name: str | None) -> Any:
        datacenters = self._objects(vim.Datacenter, self.content.rootFolder)
        for dc in datacenters:
            if name is None or dc.name == name:
                return dc
        raise ConnectionFailed(NAME, f"no datacenter {name!r}" if name else "the server has no datacenter")

    def _objects(self, kind: Any, root: Any) -> list[Any]:
        view = self.content.viewManager.CreateContainerView(root, [kind], True)
        try:
            return list(view.view)
        finally:
            view.Destroy()

    def _collect(self, refs: list[Any], properties: tuple[str, ...],
                 kind: Any = None) -> list[tuple[Any, dict[str, Any]]]:
        """Properties of many objects (VMs by default) in one ``RetrievePropertiesEx``
        (vmodl.query.PropertyCollector); unset properties are left out."""
        if not refs:
            return []
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=ref) for ref in refs],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=kind or vim.VirtualMachine,
                                                                pathSet=list(properties))])
        collector = self.content.propertyCollector
        result = collector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        found: list[tuple[Any, dict[str, Any]]] = []
        while result is not None:
            for obj in result.objects:
                found.append((obj.obj, {prop.name: prop.val for prop in obj.propSet or []}))
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
        return found

    def _vm_refs(self) -> list[Any]:
        return self._objects(vim.VirtualMachine, self.datacenter.vmFolder)

    def _vm(self, name: str) -> Any:
        matches = [ref for ref, props in self._collect(self._vm_refs(), ("name",)) if props.get("name") == name]
        if not matches:
            raise VmNotFound(NAME, "no such VM", vm=name)
        if len(matches) > 1:
            raise HypervisorError(NAME, f"{len(matches)} VMs have this name (in different folders)", vm=name)
        return matches[0]

    def _info(self, props: Mapping[str, Any]) -> VmInfo:
        power = str(props.get("runtime.powerState", ""))
        connection = str(props.get("runtime.connectionState", "connected"))
        state = self.map_state(power) if connection == "connected" else VmState.UNKNOWN
        question = props.get("runtime.question")
        host = props.get("runtime.host")
        extra: dict[str, Any] = {
            "connection_state": connection,
            "host": host.name if host is not None else None,
            "question": question.text if question is not None else None,
            "tools_running_status": props.get("guest.toolsRunningStatus"),
            "guest_id": props.get("config.guestId"),
            "template": bool(props.get("config.template", False)),
        }
        memory_mb = props.get("config.hardware.memoryMB") or 0
        return VmInfo(name=str(props["name"]), state=state, vcpus=int(props.get("config.hardware.numCPU") or 0),
                      memory=int(memory_mb) * MiB, uuid=props.get("config.uuid"),
                      native_state=power if connection == "connected" else f"{power} ({connection})", extra=extra)

    def _wait(self, task: Any, vm: str | None, what: str, timeout: float | None = None) -> None:
        """Wait for a vim.Task; its fault becomes the matching polyvisor error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # info.state and info.error only: vcsim names a snapshot as a revert task's entity, which
            # pyVmomi refuses to deserialize as a whole TaskInfo (entity must be a ManagedEntity).
            found = self._collect([task], ("info.state", "info.error"), vim.Task)
            info = found[0][1] if found else {}
            if info.get("info.state") == "success":
                return
            if info.get("info.state") == "error":
                self._fail(info.get("info.error"), vm, what)
            if deadline is not None and time.monotonic() > deadline:
                with contextlib.suppress(vmodl.MethodFault):
                    task.CancelTask()
                raise OperationTimeout(NAME, f"{what} did not finish within {timeout:g} s", vm=vm)
            time.sleep(0.1)

    def _fail(self, fault: Any, vm: str | None, what: str) -> NoReturn:
        """Raise the polyvisor error for a vmodl fault (or a task's LocalizedMethodFault)."""
        text = f"{what}: {_fault_text(fault)}"
        if isinstance(fault, vmodl.LocalizedMethodFault):
            fault = fault.fault
        if isinstance(fault, (vim.fault.InvalidPowerState, vim.fault.InvalidState, vim.fault.ToolsUnavailable)):
            raise InvalidState(NAME, text, vm=vm)
        if isinstance(fault, (vim.fault.DuplicateName, vim.fault.FileAlreadyExists)):
            raise VmExists(NAME, text, vm=vm)
        if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
            raise VmNotFound(NAME, text, vm=vm)
        raise HypervisorError(NAME, text, vm=vm)

    @contextlib.contextmanager
    def _calls(self, vm: str | None, what: str) -> Iterator[None]:
        """Faults raised by direct (non-task) calls become polyvisor errors."""
        try:
            yield
        except vmodl.MethodFault as fault:
            self._fail(fault, vm, what)

    def _power_state(self, ref: Any) -> str:
        return str(ref.runtime.powerState)

    def _tools_running(self, ref: Any) -> bool:
        return bool(ref.guest is not None and ref.guest.toolsRunningStatus == "guestToolsRunning")

    def _host(self, name: str) -> Any:
        for host in self._objects(vim.HostSystem, self.datacenter.hostFolder):
            if host.name == name:
                return host
        raise HypervisorError(NAME, f"no ESXi host {name!r} in datacenter {self.datacenter.name}")

    # ------------------------------------------------------------ inventory

    def list_vms(self) -> list[VmInfo]:
        """Every VM of the datacenter (one PropertyCollector query)."""
        with self._calls(None, "list"):
            found = [self._info(props) for _, props in self._collect(self._vm_refs(), VM_PROPERTIES)
                     if "name" in props]
        return sorted(found, key=lambda vm: vm.name)

    def get(self, name: str) -> VmInfo:
        """One VM by name."""
        ref = self._vm(name)
        with self._calls(name, "get"):
            return self._info(self._collect([ref], VM_PROPERTIES)[0][1])

    # -------------------------------------------------------------- define

    def define(self, model: VmModel, disks: Mapping[str, Path]) -> VmInfo:
        """Upload the disk images into the VM's datastore folder, then ``CreateVM_Task``."""
        model.validate()
        with contextlib.suppress(VmNotFound):
            self._vm(model.name)
            raise VmExists(NAME, "a VM of that name exists", vm=model.name)
        pool, host = self._placement()
        datastore = self._datastore(host)
        folder = self._free_folder(datastore, model.name)
        uploads = _disk_uploads(model, disks)
        files = {member: f"[{datastore.name}] {folder}/{upload.name}" for member, upload in uploads.items()}
        spec, boot_files = self._config_spec(model, datastore.name, folder, files=files,
                                             capacities={m: u.capacity for m, u in uploads.items()},
                                             backings={m: u.backing for m, u in uploads.items()})
        created = False
        try:
            for upload in uploads.values():
                for path in upload.files:
                    self._upload(datastore.name, f"{folder}/{path.name}", path, model.name)
            task = self.datacenter.vmFolder.CreateVM_Task(config=spec, pool=pool, host=host)
            self._wait(task, model.name, "CreateVM_Task")
            created = True
            if boot_files:
                self._set_boot_order(model.name, boot_files)
        except BaseException:
            if created:
                with contextlib.suppress(PolyvisorError, vmodl.MethodFault):
                    self.ex_delete(model.name)
            self._delete_folder(datastore.name, folder)
            raise
        return self.get(model.name)

    def _placement(self) -> tuple[Any, Any]:
        """The resource pool (and host, when the URI names one) new VMs go to."""
        if self.endpoint.esx_host:
            host = self._host(self.endpoint.esx_host)
            return host.parent.resourcePool, host
        for compute in self._objects(vim.ComputeResource, self.datacenter.hostFolder):
            return compute.resourcePool, None
        raise HypervisorError(NAME, f"datacenter {self.datacenter.name} has no compute resource")

    def _datastore(self, host: Any) -> Any:
        candidates = list(host.datastore) if host is not None else list(self.datacenter.datastore)
        for datastore in candidates:
            if self.endpoint.datastore in (None, datastore.name):
                return datastore
        raise HypervisorError(NAME, f"no datastore {self.endpoint.datastore!r}" if self.endpoint.datastore
                              else "no datastore to put the VM on")

    def _datastore_url(self, datastore: str, path: str) -> str:
        ep = self.endpoint
        query = urllib.parse.urlencode({"dcPath": self.datacenter.name, "dsName": datastore})
        return f"https://{ep.host}:{ep.port}/folder/{urllib.parse.quote(path)}?{query}"

    def _http(self, method: str, url: str, body: Any = None, length: int | None = None) -> int:
        """One request to the datastore HTTP interface with this session's cookie (vSphere Web Services SDK
        Programming Guide, "HTTP access to datastore files"); returns the status."""
        cookie = str(self.si._stub.cookie).split(";", 1)[0]
        request = urllib.request.Request(url, data=body, method=method, headers={"Cookie": cookie})  # noqa: S310
        if length is not None:
            request.add_header("Content-Length", str(length))
            request.add_header("Content-Type", "application/octet-stream")
        context = ssl.create_default_context()
        if self.endpoint.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(request, context=context, timeout=600) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError as exc:
            raise HypervisorError(NAME, f"{method} {url.split('?', maxsplit=1)[0]}: {exc}") from None

    def _free_folder(self, datastore: Any, name: str) -> str:
        """A datastore folder for a new VM: its name, or NAME_1, NAME_2… when taken (as vCenter does)."""
        base = re.sub(r"[^A-Za-z0-9._ -]", "_", name).strip(". ") or "vm"
        for n in range(1000):
            folder = base if n == 0 else f"{base}_{n}"
            if self._http("HEAD", self._datastore_url(datastore.name, f"{folder}/{folder}.vmx")) == 404:
                return folder
        raise HypervisorError(NAME, f"no free folder for {name!r} on {datastore.name}", vm=name)

    def _upload(self, datastore: str, path: str, source: Path, vm: str) -> None:
        size = source.stat().st_size
        with open(source, "rb") as handle:
            status = self._http("PUT", self._datastore_url(datastore, path), handle, size)
        if status not in (200, 201, 204):
            raise HypervisorError(NAME, f"uploading {source} to [{datastore}] {path}: HTTP {status}", vm=vm)

    def _delete_folder(self, datastore: str, folder: str) -> None:
        with contextlib.suppress(PolyvisorError, vmodl.MethodFault):
            task = self.content.fileManager.DeleteDatastoreFile_Task(
                name=f"[{datastore}] {folder}", datacenter=self.datacenter)
            self._wait(task, None, "DeleteDatastoreFile_Task")

    def _network(self, name: str | None) -> Any:
        networks = list(self.datacenter.network)
        for network in networks:
            if name is None or network.name == name:
                return network
        raise UsageError(f"no network {name!r} in datacenter {self.datacenter.name} "
                         f"(there are: {', '.join(n.name for n in networks)})")

    def _config_spec(self, model: VmModel, datastore: str, folder: str, *, files: Mapping[str, str],
                     capacities: Mapping[str, int], backings: Mapping[str, str]) -> tuple[Any, list[str]]:
        """The vim.vm.ConfigSpec for *model* (vSphere API reference, VirtualMachineConfigSpec), and the
        datastore files of its boot disks in boot order."""
        guest_id = guestos.vim_from_vmx(guestos.vmx_guest_os(model.os)) or "otherGuest64"
        spec = vim.vm.ConfigSpec(
            name=model.name, guestId=guest_id, numCPUs=model.cpu.count,
            numCoresPerSocket=model.cpu.cores * model.cpu.threads, memoryMB=model.memory // MiB,
            firmware="efi" if model.firmware == Firmware.UEFI else "bios",
            files=vim.vm.FileInfo(vmPathName=f"[{datastore}] {folder}/{folder}.vmx"))
        if model.uuid:
            spec.uuid = model.uuid
        changes: list[Any] = []
        controller_keys: dict[tuple[Bus, int], int] = {}
        for n, controller in enumerate(model.controllers):
            if controller.model == ControllerModel.IDE:
                continue
            class_name = CONTROLLER_CLASSES.get(controller.model)
            if class_name is None:
                raise UnmappableModel(f"vSphere has no {controller.model} storage controller")
            key = -100 - n
            device = getattr(vim.vm.device, class_name)(key=key, busNumber=controller.index)
            if controller.bus == Bus.SCSI:
                device.sharedBus = "noSharing"
            controller_keys[(controller.bus, controller.index)] = key
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=device))
        boot_disks: list[tuple[int, str]] = []
        for n, disk in enumerate(model.disks):
            key = -1000 - n
            controller_key, unit = _disk_address(disk, controller_keys)
            if disk.device == DeviceKind.DISK:
                if disk.path is None:
                    raise UnmappableModel(f"disk {disk.bus}{disk.controller}:{disk.unit} has no image")
                backing = getattr(vim.vm.device.VirtualDisk, backings[disk.path])(
                    fileName=files[disk.path], diskMode="persistent")
                device = vim.vm.device.VirtualDisk(key=key, controllerKey=controller_key, unitNumber=unit,
                                                   backing=backing, capacityInKB=capacities[disk.path] // 1024)
                if disk.boot_order is not None:
                    boot_disks.append((disk.boot_order, files[disk.path]))
            elif disk.device == DeviceKind.CDROM:
                if disk.path is not None:
                    cd_backing = vim.vm.device.VirtualCdrom.IsoBackingInfo(fileName=files[disk.path])
                else:
                    cd_backing = vim.vm.device.VirtualCdrom.RemotePassthroughBackingInfo(deviceName="",
                                                                                          exclusive=False)
                device = vim.vm.device.VirtualCdrom(key=key, controllerKey=controller_key, unitNumber=unit,
                                                    backing=cd_backing)
            else:
                raise UnmappableModel("polyvisor does not create floppy drives on vSphere")
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=device))
        for n, nic in enumerate(model.nics):
            class_name = NIC_CLASSES.get(nic.model)
            if class_name is None:
                raise UnmappableModel(f"vSphere has no {nic.model} network adapter")
            network = self._network(nic.network)
            if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
                net_backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                    port=vim.dvs.PortConnection(portgroupKey=network.key,
                                                switchUuid=network.config.distributedVirtualSwitch.uuid))
            else:
                net_backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network.name,
                                                                                   network=network)
            device = getattr(vim.vm.device, class_name)(key=-2000 - n, backing=net_backing,
                                                        addressType="manual" if nic.mac else "generated")
            if nic.mac:
                device.macAddress = nic.mac
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=device))
        spec.deviceChange = changes
        if model.secure_boot:
            spec.bootOptions = vim.vm.BootOptions(efiSecureBootEnabled=True)
        return spec, [file for _, file in sorted(boot_disks)]

    def _set_boot_order(self, name: str, boot_files: list[str]) -> None:
        """``ReconfigVM_Task`` with ``bootOptions.bootOrder``: the disks (by their files) in boot order.

        Done once the VM exists, because boot devices are named by their final device keys."""
        ref = self._vm(name)
        keys = {d.backing.fileName: d.key for d in ref.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualDisk)}
        order = [vim.vm.BootOptions.BootableDiskDevice(deviceKey=keys[file]) for file in boot_files]
        spec = vim.vm.ConfigSpec(bootOptions=vim.vm.BootOptions(bootOrder=order))
        if ref.config.bootOptions is not None and ref.config.bootOptions.efiSecureBootEnabled:
            spec.bootOptions.efiSecureBootEnabled = True
        self._wait(ref.ReconfigVM_Task(spec=spec), name, "ReconfigVM_Task")

    def undefine(self, name: str) -> None:
        """``UnregisterVM``: the VM leaves the inventory; its files stay on the datastore."""
        ref = self._vm(name)
        with self._calls(name, "UnregisterVM"):
            if self._power_state(ref) != "poweredOff":
                raise InvalidState(NAME, "the VM is not powered off", vm=name)
            ref.UnregisterVM()

    def ex_delete(self, name: str) -> None:
        """``Destroy_Task``: remove a powered-off VM and delete its files from the datastore."""
        ref = self._vm(name)
        with self._calls(name, "Destroy_Task"):
            if self._power_state(ref) != "poweredOff":
                raise InvalidState(NAME, "the VM is not powered off", vm=name)
            self._wait(ref.Destroy_Task(), name, "Destroy_Task")

    # ------------------------------------------------------------ lifecycle

    def start(self, name: str) -> None:
        """``PowerOnVM_Task`` (resumes a suspended VM)."""
        ref = self._vm(name)
        with self._calls(name, "PowerOnVM_Task"):
            if self._power_state(ref) == "poweredOn":
                raise InvalidState(NAME, "the VM is already powered on", vm=name)
            self._wait(ref.PowerOnVM_Task(), name, "PowerOnVM_Task")

    def destroy(self, name: str) -> None:
        """``PowerOffVM_Task`` (pull the plug)."""
        ref = self._vm(name)
        with self._calls(name, "PowerOffVM_Task"):
            if self._power_state(ref) == "poweredOff":
                raise InvalidState(NAME, "the VM is already powered off", vm=name)
            self._wait(ref.PowerOffVM_Task(), name, "PowerOffVM_Task")

    def shutdown(self, name: str, timeout: float = 60.0) -> None:
        """``ShutdownGuest`` through VMware Tools, then wait for powered off (InvalidState without tools)."""
        ref = self._vm(name)
        with self._calls(name, "ShutdownGuest"):
            if self._power_state(ref) != "poweredOn":
                raise InvalidState(NAME, "the VM is not powered on", vm=name)
            if not self._tools_running(ref):
                raise InvalidState(NAME, "VMware Tools are not running in the guest, and a graceful shutdown "
                                         "needs them; destroy powers it off at once", vm=name)
            ref.ShutdownGuest()
            deadline = time.monotonic() + timeout
            while self._power_state(ref) != "poweredOff":
                if time.monotonic() > deadline:
                    raise OperationTimeout(NAME, f"the guest did not power off within {timeout:g} s", vm=name)
                time.sleep(0.2)

    def reboot(self, name: str) -> None:
        """``RebootGuest`` when VMware Tools run in the guest, otherwise ``ResetVM_Task`` (a hard reset)."""
        ref = self._vm(name)
        with self._calls(name, "reboot"):
            if self._power_state(ref) != "poweredOn":
                raise InvalidState(NAME, "the VM is not powered on", vm=name)
            if self._tools_running(ref):
                ref.RebootGuest()
            else:
                self._wait(ref.ResetVM_Task(), name, "ResetVM_Task")

    def ex_suspend(self, name: str) -> None:
        """``SuspendVM_Task``: save the VM's memory to the datastore and stop it (start resumes it)."""
        ref = self._vm(name)
        with self._calls(name, "SuspendVM_Task"):
            if self._power_state(ref) != "poweredOn":
                raise InvalidState(NAME, "the VM is not powered on", vm=name)
            self._wait(ref.SuspendVM_Task(), name, "SuspendVM_Task")

    # ------------------------------------------------------------ snapshots

    def _snapshot_nodes(self, ref: Any) -> list[tuple[Any, str | None]]:
        """The snapshot tree, parents before children: (vim.vm.SnapshotTree, parent name)."""
        # Through the PropertyCollector: an unset property (no snapshots) is simply missing there.
        found = self._collect([ref], ("snapshot",))
        info = found[0][1].get("snapshot") if found else None
        nodes: list[tuple[Any, str | None]] = []
        pending: list[tuple[Any, str | None]] = [(node, None) for node in
                                                 (info.rootSnapshotList if info is not None else [])]
        while pending:
            node, parent = pending.pop(0)
            nodes.append((node, parent))
            pending.extend((child, node.name) for child in node.childSnapshotList or [])
        return nodes

    def _snapshot_node(self, ref: Any, name: str, snapshot: str) -> Any:
        matches = [node for node, _ in self._snapshot_nodes(ref) if node.name == snapshot]
        if not matches:
            raise SnapshotNotFound(NAME, f"no snapshot {snapshot!r}", vm=name)
        if len(matches) > 1:
            raise HypervisorError(NAME, f"{len(matches)} snapshots are called {snapshot!r}", vm=name)
        return matches[0]

    def snapshot_create(self, name: str, snapshot: str, description: str = "") -> Snapshot:
        """``CreateSnapshot_Task``, with the memory when the VM is powered on."""
        ref = self._vm(name)
        with self._calls(name, "CreateSnapshot_Task"):
            if any(node.name == snapshot for node, _ in self._snapshot_nodes(ref)):
                raise HypervisorError(NAME, f"snapshot {snapshot!r} already exists", vm=name)
            memory = self._power_state(ref) == "poweredOn"
            self._wait(ref.CreateSnapshot_Task(name=snapshot, description=description, memory=memory,
                                               quiesce=False), name, "CreateSnapshot_Task")
            return next(s for s in self.snapshot_list(name) if s.name == snapshot)

    def snapshot_list(self, name: str) -> list[Snapshot]:
        """The ``snapshot.rootSnapshotList`` tree, oldest first."""
        ref = self._vm(name)
        with self._calls(name, "snapshot list"):
            snaps = [Snapshot(name=node.name, created=node.createTime, description=node.description or "",
                              parent=parent, includes_memory=node.state == "poweredOn")
                     for node, parent in self._snapshot_nodes(ref)]
        return sorted(snaps, key=lambda s: s.created.timestamp() if s.created else 0.0)

    def snapshot_revert(self, name: str, snapshot: str) -> None:
        """``RevertToSnapshot_Task``."""
        ref = self._vm(name)
        with self._calls(name, "RevertToSnapshot_Task"):
            node = self._snapshot_node(ref, name, snapshot)
            self._wait(node.snapshot.RevertToSnapshot_Task(), name, "RevertToSnapshot_Task")

    def snapshot_delete(self, name: str, snapshot: str) -> None:
        """``RemoveSnapshot_Task`` (its children are kept)."""
        ref = self._vm(name)
        with self._calls(name, "RemoveSnapshot_Task"):
            node = self._snapshot_node(ref, name, snapshot)
            self._wait(node.snapshot.RemoveSnapshot_Task(removeChildren=False), name, "RemoveSnapshot_Task")

    # ------------------------------------------------------------ migration

    def ex_relocate(self, name: str, host: str, timeout: float = 600.0) -> None:
        """``RelocateVM_Task`` to ESXi host *host* (and its compute resource's root resource pool)."""
        ref = self._vm(name)
        target = self._host(host)
        spec = vim.vm.RelocateSpec(host=target, pool=target.parent.resourcePool)
        with self._calls(name, "RelocateVM_Task"):
            self._wait(ref.RelocateVM_Task(spec=spec), name, "RelocateVM_Task", timeout)

    def migrate(self, name: str, destination: Driver, options: MigrationOptions) -> MigrationReport:
        """vMotion: ``RelocateVM_Task`` of a powered-on VM to the host *destination*'s URI names.

        *destination* must reach the same vCenter.  vMotion has no downtime or
        bandwidth setting, and vCenter reports neither the switch-over pause nor
        the bytes moved, so the report leaves them out.
        """
        if not isinstance(destination, VsphereDriver) or destination.endpoint.server != self.endpoint.server:
            raise MigrationFailed(NAME, "live migration needs a destination connection to the same vCenter "
                                        "(vsphere://...?host=ESXI)", vm=name)
        target_host = destination.endpoint.esx_host
        if not target_host:
            raise MigrationFailed(NAME, "the destination URI names no ESXi host (?host=NAME)", vm=name)
        if options.downtime_ms is not None or options.bandwidth_mib is not None:
            raise UsageError("vMotion has no downtime limit or bandwidth setting")
        ref = self._vm(name)
        with self._calls(name, "RelocateVM_Task"):
            if self._power_state(ref) != "poweredOn":
                raise InvalidState(NAME, "live migration needs a powered-on VM (ex_relocate moves a stopped one)",
                                   vm=name)
            source_host = ref.runtime.host.name
        started = time.monotonic()
        try:
            self.ex_relocate(name, target_host, options.timeout)
        except (HypervisorError, UsageError) as exc:
            raise MigrationFailed(NAME, f"vMotion to {target_host} failed: {exc}", vm=name) from None
        total = time.monotonic() - started
        ref = self._vm(name)
        if ref.runtime.host.name != target_host or self._power_state(ref) != "poweredOn":
            raise MigrationFailed(NAME, f"after vMotion the VM is {self._power_state(ref)} on "
                                        f"{ref.runtime.host.name}, not running on {target_host}", vm=name)
        return MigrationReport(vm=name, kind="live", source=f"{self.uri} (host {source_host})",
                               destination=destination.uri, total_seconds=total, downtime_ms=None,
                               transferred_bytes=0,
                               notes=("vMotion (RelocateVM_Task); vCenter reports neither the downtime "
                                      "nor the bytes transferred",))


# ------------------------------------------------------------------ helpers


@dataclass(frozen=True)
class _Upload:
    """One model disk's image: the files to upload, the name the VM refers to, its capacity and backing."""

    files: tuple[Path, ...]
    name: str
    capacity: int
    backing: str


def _disk_uploads(model: VmModel, disks: Mapping[str, Path]) -> dict[str, _Upload]:
    """Check every disk image and say what to upload (VMDK disks, ISO CD-ROMs)."""
    uploads: dict[str, _Upload] = {}
    names: dict[str, str] = {}
    for disk in model.disks:
        if disk.path is None:
            continue
        if disk.path not in disks:
            raise UsageError(f"no file given for disk image {disk.path!r}")
        source = Path(disks[disk.path])
        if disk.device == DeviceKind.CDROM:
            upload = _Upload((source,), source.name, source.stat().st_size, "")
        else:
            try:
                with open_image(source) as image:
                    fmt, subformat, capacity = image.format_name, image.subformat, image.virtual_size
                    files = tuple(Path(f.path) for f in image.files)
            except PolyvisorError as exc:
                raise UsageError(f"disk {disk.path}: {exc}") from None
            if fmt != "vmdk":
                raise UnmappableModel(f"vSphere disks are VMDK, not {fmt} ({disk.path}): convert it first "
                                      "(polyvisor disk convert -O vmdk -o subformat=monolithicFlat)")
            if subformat not in VMDK_BACKINGS:
                raise UnmappableModel(f"a {subformat} VMDK cannot be attached on vSphere ({disk.path}): "
                                      "convert it to monolithicFlat (streamOptimized images are imported, "
                                      "not attached)")
            upload = _Upload(files, source.name, capacity, VMDK_BACKINGS[subformat])
        for file in upload.files:
            if names.setdefault(file.name, disk.path) != disk.path:
                raise UsageError(f"two disks upload a file called {file.name!r}; rename one")
        uploads[disk.path] = upload
    return uploads


def _disk_address(disk: Any, controller_keys: Mapping[tuple[Bus, int], int]) -> tuple[int, int]:
    """(controller device key, unit number) of a model disk on vSphere."""
    if disk.bus == Bus.IDE:
        channel, unit = divmod(disk.unit, 2)
        return IDE_KEYS[channel], unit
    key = controller_keys.get((disk.bus, disk.controller))
    if key is None:
        raise UnmappableModel(f"vSphere has no {disk.bus} bus for disk {disk.bus}{disk.controller}:{disk.unit}")
    if disk.bus == Bus.SCSI and disk.unit == SCSI_CONTROLLER_UNIT:
        raise UnmappableModel(f"SCSI unit 7 is the controller's own on vSphere (disk scsi{disk.controller}:7)")
    return key, disk.unit


def _fault_text(fault: Any) -> str:
    """A vmodl fault's message (``msg``, else its localized message, else its type)."""
    message = getattr(fault, "msg", None) or getattr(fault, "localizedMessage", None)
    if not message and getattr(fault, "faultMessage", None):
        message = "; ".join(str(m.message) for m in fault.faultMessage if getattr(m, "message", None))
    return str(message or type(fault).__name__)
