"""Device names: polyvisor's vocabulary to each codec's native spelling, as data.

Each table maps a neutral name (:class:`~polyvisor.vm.model.ControllerModel`,
:class:`~polyvisor.vm.model.NicModel`, …) to the string a codec writes.  A
model value missing from a codec's table cannot be expressed by that codec
(writing it raises :class:`~polyvisor.errors.UnmappableModel`).  Reading is
case-insensitive and also accepts the aliases listed in ``*_READ_ALIASES``.

Sources (public documentation and source, consulted for the values; no code copied):

* libvirt domain XML: ``docs/formatdomain.rst`` and the RELAX NG schema
  ``domaincommon.rng`` as shipped with libvirt 9.0 (Debian 12,
  /usr/share/libvirt/schemas) — SCSI controller models ``buslogic, lsilogic,
  lsisas1068, vmpvscsi, virtio-scsi``; disk buses ``ide, fdc, scsi, virtio,
  xen, sata``; interface models as QEMU names them (``e1000, e1000e,
  vmxnet3, virtio, rtl8139, pcnet``) and ``netfront`` for Xen.  libvirt 9.0
  has no NVMe disk bus and no Hyper-V device models.
* VMware .vmx: libvirt ``src/vmx/vmx.c`` (mapping comment at the top:
  ``scsiN.virtualDev = "buslogic|lsilogic|lsisas1068|pvscsi"``,
  ``ethernetN.virtualDev = "vlance|vmxnet|vmxnet3|e1000|e1000e"``), and VMware
  Workstation-written files (``sataN``, ``nvmeN`` controllers, ``ideN:M``).
* OVF: DMTF DSP0243 (OVF 1.1/2.0) and CIM_ResourceAllocationSettingData
  ``ResourceType`` values (5 IDE, 6 parallel SCSI HBA, 10 Ethernet, 14 floppy,
  15 CD, 17 disk, 20 other storage, 21 serial port; govmomi ``ovf/cim.go``);
  ``ResourceSubType`` strings as VMware ovftool writes them (``lsilogic``,
  ``lsilogicsas``, ``buslogic``, ``VirtualSCSI``, ``vmware.sata.ahci``,
  ``vmware.nvme.controller``, ``E1000``, ``E1000e``, ``VmxNet3``, ``PCNet32``)
  and as VirtualBox writes them (``PIIX4``, ``AHCI``, ``LsiLogicSAS``,
  ``VirtioSCSI``, ``NVMe``, ``virtio``; VirtualBox ``src/VBox/Main/src-server/
  ApplianceImplExport.cpp``).
* VirtualBox network adapter types (``vbox:Machine`` ``Adapter/@type``):
  ``Am79C970A``, ``Am79C973`` (PCnet), ``82540EM``, ``82543GC``, ``82545EM``
  (e1000), ``virtio`` — VirtualBox ``NetworkAdapterType`` enum
  (``src/VBox/Main/idl/VirtualBox.xidl``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from polyvisor.vm.model import ControllerModel, Firmware, Machine, NicModel

C = ControllerModel
N = NicModel

# --------------------------------------------------------------------------- libvirt

#: ``<controller type=... model=...>`` per controller model: (type, model or None).
LIBVIRT_CONTROLLER: dict[ControllerModel, tuple[str, str | None]] = {
    C.IDE: ("ide", None),
    C.AHCI: ("sata", None),
    C.LSILOGIC: ("scsi", "lsilogic"),
    C.LSISAS: ("scsi", "lsisas1068"),
    C.BUSLOGIC: ("scsi", "buslogic"),
    C.PVSCSI: ("scsi", "vmpvscsi"),
    C.VIRTIO_SCSI: ("scsi", "virtio-scsi"),
    C.VIRTIO_BLK: ("virtio", None),  # no <controller>: virtio disks are PCI functions of their own
    C.XEN_BLKFRONT: ("xen", None),  # no <controller>: Xen PV disks
    C.FDC: ("fdc", None),
}
#: libvirt's ``<target bus=...>`` for the bus a controller drives.
LIBVIRT_DISK_BUS = {"ide": "ide", "sata": "sata", "scsi": "scsi", "virtio": "virtio", "xen": "xen", "fdc": "fdc"}
#: Models libvirt also accepts on read for a SCSI controller.
LIBVIRT_SCSI_READ_ALIASES = {"auto": C.LSILOGIC, "virtio-transitional": C.VIRTIO_SCSI,
                             "virtio-non-transitional": C.VIRTIO_SCSI, "lsisas1078": C.LSISAS}

LIBVIRT_NIC: dict[NicModel, str] = {
    N.E1000: "e1000",
    N.E1000E: "e1000e",
    N.VMXNET3: "vmxnet3",
    N.VIRTIO_NET: "virtio",
    N.RTL8139: "rtl8139",
    N.PCNET: "pcnet",
    N.NETFRONT: "netfront",
}
LIBVIRT_NIC_READ_ALIASES = {"virtio-net-pci": N.VIRTIO_NET, "virtio-transitional": N.VIRTIO_NET,
                            "virtio-non-transitional": N.VIRTIO_NET, "e1000-82545em": N.E1000,
                            "netvsc": N.NETVSC}

#: QEMU machine types: the base names; versioned names (pc-q35-8.2) read as their family.
LIBVIRT_MACHINE: dict[Machine, str] = {Machine.I440FX: "pc", Machine.Q35: "q35"}


def libvirt_machine_from(name: str) -> Machine | None:
    """The chipset family of a QEMU machine type name (``pc-i440fx-7.2``, ``q35``…)."""
    lowered = name.lower()
    if lowered == "q35" or lowered.startswith("pc-q35"):
        return Machine.Q35
    if lowered in ("pc", "xenfv") or lowered.startswith("pc-i440fx"):
        return Machine.I440FX
    return None


# --------------------------------------------------------------------------- VMware .vmx

#: The .vmx controller prefix and ``virtualDev`` per controller model.
VMX_CONTROLLER: dict[ControllerModel, tuple[str, str | None]] = {
    C.IDE: ("ide", None),
    C.AHCI: ("sata", None),
    C.LSILOGIC: ("scsi", "lsilogic"),
    C.LSISAS: ("scsi", "lsisas1068"),
    C.BUSLOGIC: ("scsi", "buslogic"),
    C.PVSCSI: ("scsi", "pvscsi"),
    C.NVME: ("nvme", None),
}
VMX_NIC: dict[NicModel, str] = {
    N.E1000: "e1000",
    N.E1000E: "e1000e",
    N.VMXNET3: "vmxnet3",
    N.PCNET: "vlance",
}

# --------------------------------------------------------------------------- OVF

#: CIM ResourceType values used in OVF VirtualHardwareSection items.
RT_OTHER = 1
RT_PROCESSOR = 3
RT_MEMORY = 4
RT_IDE = 5
RT_SCSI = 6
RT_ETHERNET = 10
RT_FLOPPY = 14
RT_CD = 15
RT_DVD = 16
RT_DISK = 17
RT_OTHER_STORAGE = 20
RT_SERIAL = 21
RT_USB = 23
RT_GRAPHICS = 24

#: What polyvisor writes for each controller: (ResourceType, ResourceSubType or None).
#: The VMware spellings are used because VMware importers are the strictest readers.
OVF_CONTROLLER: dict[ControllerModel, tuple[int, str | None]] = {
    C.IDE: (RT_IDE, None),
    C.AHCI: (RT_OTHER_STORAGE, "vmware.sata.ahci"),
    C.LSILOGIC: (RT_SCSI, "lsilogic"),
    C.LSISAS: (RT_SCSI, "lsilogicsas"),
    C.BUSLOGIC: (RT_SCSI, "buslogic"),
    C.PVSCSI: (RT_SCSI, "VirtualSCSI"),
    C.NVME: (RT_OTHER_STORAGE, "vmware.nvme.controller"),
    C.VIRTIO_SCSI: (RT_SCSI, "VirtioSCSI"),
}
#: ResourceSubType spellings read (lower-cased) for storage controllers, VMware and VirtualBox dialects.
OVF_CONTROLLER_READ: dict[str, ControllerModel] = {
    "piix3": C.IDE, "piix4": C.IDE, "ich6": C.IDE,
    "ahci": C.AHCI, "vmware.sata.ahci": C.AHCI,
    "lsilogic": C.LSILOGIC,
    "lsilogicsas": C.LSISAS, "lsisas1068": C.LSISAS,
    "buslogic": C.BUSLOGIC,
    "virtualscsi": C.PVSCSI, "pvscsi": C.PVSCSI,
    "vmware.nvme.controller": C.NVME, "nvme": C.NVME,
    "virtioscsi": C.VIRTIO_SCSI, "virtio-scsi": C.VIRTIO_SCSI,
}

OVF_NIC: dict[NicModel, str] = {
    N.E1000: "E1000",
    N.E1000E: "E1000e",
    N.VMXNET3: "VmxNet3",
    N.PCNET: "PCNet32",
    N.VIRTIO_NET: "virtio",
}
OVF_NIC_READ: dict[str, NicModel] = {
    "e1000": N.E1000, "e1000e": N.E1000E, "vmxnet3": N.VMXNET3, "pcnet32": N.PCNET,
    "virtio": N.VIRTIO_NET, "virtio-net": N.VIRTIO_NET,
}

#: VirtualBox ``Adapter/@type`` values read from ``vbox:Machine``.
VBOX_NIC_READ: dict[str, NicModel] = {
    "am79c970a": N.PCNET, "am79c973": N.PCNET, "am79c960": N.PCNET,
    "82540em": N.E1000, "82543gc": N.E1000, "82545em": N.E1000, "virtio": N.VIRTIO_NET,
}
#: VirtualBox ``Firmware/@type`` values.
VBOX_FIRMWARE_READ: dict[str, Firmware] = {"bios": Firmware.BIOS, "efi": Firmware.UEFI, "efi32": Firmware.UEFI,
                                           "efi64": Firmware.UEFI, "efidual": Firmware.UEFI}
#: VirtualBox ``Chipset/@type`` values.
VBOX_CHIPSET_READ: dict[str, Machine] = {"piix3": Machine.I440FX, "ich9": Machine.Q35}


K = TypeVar("K")


def invert(table: Mapping[K, str]) -> dict[str, K]:
    """Lower-cased native name -> neutral value, for reading."""
    return {native.lower(): neutral for neutral, native in table.items()}
