"""Which guests have drivers for which devices, and choosing devices for a target hypervisor.

:data:`DRIVER_RULES` says, per guest family, which storage controllers and
network adapters the installed guest can drive and why.  Sources:

* Linux: the kernel version each driver was merged in (``drivers/virtio``,
  ``virtio_blk``/``virtio_net`` 2.6.24-2.6.25, ``virtio_scsi`` 3.4,
  ``vmxnet3`` 2.6.32, ``vmw_pvscsi`` 2.6.33, ``nvme`` 3.3, Hyper-V
  ``hv_storvsc``/``hv_netvsc`` out of staging by 3.4, Xen
  ``xen-blkfront``/``xen-netfront`` 2.6.24).  polyvisor assumes a Linux
  guest runs 3.10 or later (every distribution in the OS table does), so
  every listed driver is present; the versions go into the reasons.
* Windows: Microsoft's inbox drivers — ``storahci``/``msahci`` (Windows 7 /
  2008 R2 and later), ``lsi_scsi``/``lsi_sas`` (Vista / 2008 and later),
  ``stornvme`` (8.1 / 2012 R2 and later), Hyper-V ``storvsc``/``netvsc``
  integration components (7 / 2008 R2 and later), the Intel 82574L
  (e1000e) driver (8 / 2012 and later) while the 82545EM (e1000) driver is
  not shipped after 7 / 2008 R2 (VMware KB 2015181-era guidance: use E1000E
  for Windows 8 / 2012 and later).  virtio needs the virtio-win drivers,
  VMXNET3 and PVSCSI need VMware Tools, Xen PV devices need the Xen PV drivers;
  BusLogic, PCnet and RTL8139 have no 64-bit drivers.
* FreeBSD: ``virtio`` 9.0, ``nvme`` 9.2, ``vmx`` (vmxnet3) 10.0,
  ``pvscsi`` 13.0, Hyper-V ``hv_storvsc``/``hn`` 10.0.
* Hyper-V generations: Microsoft, "Should I create a generation 1 or 2
  virtual machine in Hyper-V?" (learn.microsoft.com, windows-server/
  virtualization/hyper-v/plan) and "Generation 2 Virtual Machine Overview"
  (TechNet dn282285): generation 2 is UEFI only, has no IDE (boots from SCSI),
  and supports 64-bit Windows 8 / Server 2012 and later and current 64-bit
  Linux; generation 1 is BIOS and boots from IDE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from polyvisor.errors import UnmappableModel
from polyvisor.vm.model import (
    CONTROLLER_BUS,
    MAX_UNIT,
    Arch,
    Bus,
    Controller,
    ControllerModel,
    DeviceKind,
    Disk,
    Firmware,
    GuestOS,
    Nic,
    NicModel,
    OsFamily,
    VmModel,
)

C = ControllerModel
N = NicModel
Device = ControllerModel | NicModel

#: Windows releases from oldest to newest, by our GuestOS version (client and server interleaved by date).
WINDOWS_ORDER = ("7", "2008r2", "8", "2012", "8.1", "2012r2", "10", "2016", "2019", "11", "2022", "2025")


@dataclass(frozen=True)
class DriverRule:
    """Whether a guest family can drive *device*: from Windows release ``since`` (Linux/BSD: always),
    up to Windows release ``until``, given driver package ``needs`` (None: in the box)."""

    device: Device
    family: OsFamily
    reason: str
    needs: str | None = None
    since: str | None = None
    until: str | None = None


_L, _W, _B = OsFamily.LINUX, OsFamily.WINDOWS, OsFamily.FREEBSD


def _rules() -> tuple[DriverRule, ...]:
    L, W, B = _L, _W, _B  # noqa: N806 - short names keep the rule table readable
    rules = [
        # Linux
        DriverRule(C.IDE, L, "Linux has had IDE (ata_piix) drivers since 2.x"),
        DriverRule(C.AHCI, L, "Linux has had the ahci driver since 2.6.19"),
        DriverRule(C.LSILOGIC, L, "Linux has had mptspi for LSI Logic since 2.6.x"),
        DriverRule(C.LSISAS, L, "Linux has had mptsas for LSI SAS since 2.6.x"),
        DriverRule(C.BUSLOGIC, L, "Linux has had the BusLogic driver since 2.x"),
        DriverRule(C.PVSCSI, L, "Linux has had vmw_pvscsi since 2.6.33"),
        DriverRule(C.NVME, L, "Linux has had the nvme driver since 3.3"),
        DriverRule(C.VIRTIO_BLK, L, "Linux guests have virtio drivers since 2.6.25"),
        DriverRule(C.VIRTIO_SCSI, L, "Linux guests have virtio drivers since 2.6.25 (virtio-scsi since 3.4)"),
        DriverRule(C.STORVSC, L, "Linux has had hv_storvsc since 3.4"),
        DriverRule(C.XEN_BLKFRONT, L, "Linux has had xen-blkfront since 2.6.24"),
        DriverRule(C.FDC, L, "Linux has a floppy driver"),
        DriverRule(N.E1000, L, "Linux has had the e1000 driver since 2.4"),
        DriverRule(N.E1000E, L, "Linux has had the e1000e driver since 2.6.24"),
        DriverRule(N.VMXNET3, L, "Linux has had the vmxnet3 driver since 2.6.32"),
        DriverRule(N.VIRTIO_NET, L, "Linux guests have virtio drivers since 2.6.25"),
        DriverRule(N.NETVSC, L, "Linux has had hv_netvsc since 3.4"),
        DriverRule(N.NETFRONT, L, "Linux has had xen-netfront since 2.6.24"),
        DriverRule(N.RTL8139, L, "Linux has had 8139cp/8139too since 2.4"),
        DriverRule(N.PCNET, L, "Linux has had pcnet32 since 2.4"),
        # Windows
        DriverRule(C.IDE, W, "Windows has inbox IDE drivers"),
        DriverRule(C.AHCI, W, "Windows has an inbox AHCI driver since 7 / 2008 R2", since="7"),
        DriverRule(C.LSILOGIC, W, "Windows has the inbox lsi_scsi driver since Vista / 2008"),
        DriverRule(C.LSISAS, W, "Windows has the inbox lsi_sas driver since Vista / 2008"),
        DriverRule(C.PVSCSI, W, "Windows drives PVSCSI with VMware Tools", needs="vmware-tools"),
        DriverRule(C.NVME, W, "Windows has the inbox stornvme driver since 8.1 / 2012 R2", since="8.1"),
        DriverRule(C.VIRTIO_BLK, W, "Windows drives virtio-blk with the virtio-win drivers", needs="virtio-win"),
        DriverRule(C.VIRTIO_SCSI, W, "Windows drives virtio-scsi with the virtio-win drivers", needs="virtio-win"),
        DriverRule(C.STORVSC, W, "Windows has Hyper-V storvsc inbox since 7 / 2008 R2", since="7"),
        DriverRule(C.XEN_BLKFRONT, W, "Windows drives Xen PV disks with the Xen PV drivers", needs="xen-pv"),
        DriverRule(C.FDC, W, "Windows has an inbox floppy driver"),
        DriverRule(N.E1000, W, "Windows ships the Intel 82545EM driver up to 7 / 2008 R2", until="2008r2"),
        DriverRule(N.E1000E, W, "Windows has the inbox Intel 82574L driver since 8 / 2012", since="8"),
        DriverRule(N.VMXNET3, W, "Windows drives VMXNET3 with VMware Tools", needs="vmware-tools"),
        DriverRule(N.VIRTIO_NET, W, "Windows drives virtio-net with the virtio-win drivers", needs="virtio-win"),
        DriverRule(N.NETVSC, W, "Windows has Hyper-V netvsc inbox since 7 / 2008 R2", since="7"),
        DriverRule(N.NETFRONT, W, "Windows drives Xen PV NICs with the Xen PV drivers", needs="xen-pv"),
        # FreeBSD
        DriverRule(C.IDE, B, "FreeBSD has ata(4)"),
        DriverRule(C.AHCI, B, "FreeBSD has ahci(4)"),
        DriverRule(C.LSILOGIC, B, "FreeBSD has mpt(4)"),
        DriverRule(C.LSISAS, B, "FreeBSD has mpt(4)"),
        DriverRule(C.PVSCSI, B, "FreeBSD has pvscsi(4) since 13.0"),
        DriverRule(C.NVME, B, "FreeBSD has nvme(4) since 9.2"),
        DriverRule(C.VIRTIO_BLK, B, "FreeBSD has virtio drivers since 9.0"),
        DriverRule(C.VIRTIO_SCSI, B, "FreeBSD has virtio drivers since 9.0"),
        DriverRule(C.STORVSC, B, "FreeBSD has hv_storvsc since 10.0"),
        DriverRule(C.FDC, B, "FreeBSD has fdc(4)"),
        DriverRule(N.E1000, B, "FreeBSD has em(4)"),
        DriverRule(N.E1000E, B, "FreeBSD has em(4)"),
        DriverRule(N.VMXNET3, B, "FreeBSD has vmx(4) since 10.0"),
        DriverRule(N.VIRTIO_NET, B, "FreeBSD has virtio drivers since 9.0"),
        DriverRule(N.NETVSC, B, "FreeBSD has hn(4) since 10.0"),
        DriverRule(N.RTL8139, B, "FreeBSD has rl(4)"),
        DriverRule(N.PCNET, B, "FreeBSD has le(4)/pcn(4)"),
    ]
    # Solaris and unknown guests: only the oldest, most widely emulated hardware.
    for family in (OsFamily.SOLARIS, OsFamily.OTHER):
        rules += [
            DriverRule(C.IDE, family, "IDE is the most widely supported storage controller"),
            DriverRule(C.AHCI, family, "AHCI is widely supported"),
            DriverRule(C.FDC, family, "floppy controllers are widely supported"),
            DriverRule(N.E1000, family, "the Intel e1000 is the most widely supported NIC"),
        ]
    return tuple(rules)


DRIVER_RULES: tuple[DriverRule, ...] = _rules()


def _windows_rank(os: GuestOS) -> int | None:
    if os.version in WINDOWS_ORDER:
        return WINDOWS_ORDER.index(os.version)
    return None


def _applies(rule: DriverRule, os: GuestOS, drivers: frozenset[str]) -> bool:
    if rule.family != os.family:
        return False
    if rule.needs is not None and rule.needs not in drivers:
        return False
    if os.family == OsFamily.WINDOWS:
        rank = _windows_rank(os)
        if rule.since is not None and (rank is None or rank < WINDOWS_ORDER.index(rule.since)):
            return False
        if rule.until is not None and (rank is None or rank > WINDOWS_ORDER.index(rule.until)):
            return False
    return True


def driver_reason(os: GuestOS, device: Device, drivers: Iterable[str] = ()) -> str | None:
    """Why *os* can drive *device* (None: it is not known to)."""
    installed = frozenset(drivers)
    for rule in DRIVER_RULES:
        if rule.device == device and _applies(rule, os, installed):
            return rule.reason
    return None


# ------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """What a destination hypervisor offers, best choice first."""

    name: str
    disk_controllers: tuple[ControllerModel, ...]  #: for hard disks
    removable_controllers: tuple[ControllerModel, ...]  #: for CD-ROM drives
    nics: tuple[NicModel, ...]
    firmware: tuple[Firmware, ...] = (Firmware.BIOS, Firmware.UEFI)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("kvm", (C.VIRTIO_SCSI, C.VIRTIO_BLK, C.AHCI, C.LSILOGIC, C.IDE), (C.AHCI, C.IDE, C.VIRTIO_SCSI),
               (N.VIRTIO_NET, N.E1000E, N.E1000, N.RTL8139)),
        Target("vmware", (C.PVSCSI, C.LSISAS, C.LSILOGIC, C.NVME, C.AHCI, C.IDE), (C.AHCI, C.IDE),
               (N.VMXNET3, N.E1000E, N.E1000, N.PCNET)),
        Target("virtualbox", (C.AHCI, C.LSILOGIC, C.LSISAS, C.NVME, C.VIRTIO_SCSI, C.IDE), (C.AHCI, C.IDE),
               (N.E1000, N.VIRTIO_NET, N.PCNET)),
        Target("hyperv-gen1", (C.IDE, C.STORVSC), (C.IDE,), (N.NETVSC,), (Firmware.BIOS,)),
        Target("hyperv-gen2", (C.STORVSC,), (C.STORVSC,), (N.NETVSC,), (Firmware.UEFI,)),
        Target("xen-pv", (C.XEN_BLKFRONT,), (C.XEN_BLKFRONT, C.IDE), (N.NETFRONT,)),
        # xl HVM guests (xl.cfg(5)): PV disks and NICs, or the emulated IDE/NICs of qemu-xen
        Target("xen-hvm", (C.XEN_BLKFRONT, C.IDE), (C.IDE,), (N.NETFRONT, N.E1000, N.E1000E, N.RTL8139)),
        # XenServer / XCP-ng: every VBD and VIF is a PV device (the emulated twins are not configurable)
        Target("xenserver", (C.XEN_BLKFRONT,), (C.XEN_BLKFRONT,), (N.NETFRONT,)),
    )
}


@dataclass(frozen=True)
class Change:
    """One device replaced for the target, and why."""

    what: str  #: ``controller scsi0``, ``nic 0``, ``firmware``…
    before: str
    after: str
    reason: str

    def __str__(self) -> str:
        return f"{self.what}: {self.before} -> {self.after}: {self.reason}"


@dataclass(frozen=True)
class Choice:
    """The adapted model and the list of changes (empty when nothing had to change)."""

    model: VmModel
    changes: tuple[Change, ...]


def _pick(os: GuestOS, options: Sequence[Device], drivers: frozenset[str]) -> tuple[Device, str] | None:
    for option in options:
        reason = driver_reason(os, option, drivers)
        if reason is not None:
            return option, reason
    return None


def choose_devices(model: VmModel, target: Target | str, *, drivers: Iterable[str] = ()) -> Choice:
    """Replace every controller and NIC *target* lacks, or the guest cannot drive, by the target's
    best device the guest is known to support.

    *drivers* names driver packages installed in the guest beyond its inbox
    drivers (``virtio-win``, ``vmware-tools``, ``xen-pv``).  A device that is
    already offered by the target and driven by the guest is kept.  Disks
    move with their controller (units are kept when the new bus has room).
    Raises :class:`UnmappableModel` when no offered device has a driver.
    """
    tgt = TARGETS[target] if isinstance(target, str) else target
    installed = frozenset(drivers)
    os = model.os
    changes: list[Change] = []

    # firmware first: it can decide the Hyper-V generation
    firmware = model.firmware
    secure_boot = model.secure_boot
    if firmware not in tgt.firmware:
        new_fw = tgt.firmware[0]
        changes.append(Change("firmware", firmware.value, new_fw.value,
                              f"{tgt.name} offers only {', '.join(f.value for f in tgt.firmware)} firmware; "
                              "the guest's boot loader must match"))
        firmware = new_fw
        secure_boot = secure_boot and firmware == Firmware.UEFI

    # controllers: decide a replacement per controller
    removable_only = {
        (d.bus, d.controller) for d in model.disks
    } - {(d.bus, d.controller) for d in model.disks if d.device == DeviceKind.DISK}
    replaced: dict[tuple[Bus, int], ControllerModel] = {}
    for ctrl in model.controllers:
        if ctrl.model == C.FDC:
            replaced[(ctrl.bus, ctrl.index)] = ctrl.model
            continue
        offered = tgt.removable_controllers if (ctrl.bus, ctrl.index) in removable_only else tgt.disk_controllers
        if ctrl.model in offered and driver_reason(os, ctrl.model, installed) is not None:
            replaced[(ctrl.bus, ctrl.index)] = ctrl.model
            continue
        picked = _pick(os, offered, installed)
        if picked is None:
            raise UnmappableModel(
                f"{tgt.name} offers no storage controller a {_os_name(os)} guest is known to drive "
                f"(offered: {', '.join(offered)}; installed drivers: {', '.join(sorted(installed)) or 'none'})"
            )
        new_model, reason = picked
        assert isinstance(new_model, ControllerModel)
        why = reason if ctrl.model in offered else f"{tgt.name} has no {ctrl.model}; {reason}"
        changes.append(Change(f"controller {ctrl.bus}{ctrl.index}", ctrl.model.value, new_model.value, why))
        replaced[(ctrl.bus, ctrl.index)] = new_model

    controllers, disks = _readdress(model, replaced)

    nics: list[Nic] = []
    for i, nic in enumerate(model.nics):
        if nic.model in tgt.nics and driver_reason(os, nic.model, installed) is not None:
            nics.append(nic)
            continue
        picked = _pick(os, tgt.nics, installed)
        if picked is None:
            raise UnmappableModel(f"{tgt.name} offers no network adapter a {_os_name(os)} guest is known to drive")
        new_nic, reason = picked
        assert isinstance(new_nic, NicModel)
        why = reason if nic.model in tgt.nics else f"{tgt.name} has no {nic.model}; {reason}"
        changes.append(Change(f"nic {i}", nic.model.value, new_nic.value, why))
        nics.append(dataclasses.replace(nic, model=new_nic))

    adapted = dataclasses.replace(model, firmware=firmware, secure_boot=secure_boot, controllers=controllers,
                                  disks=disks, nics=tuple(nics))
    return Choice(adapted.validate(), tuple(changes))


def _os_name(os: GuestOS) -> str:
    return " ".join(p for p in (os.distribution or os.family.value, os.version) if p)


def _readdress(model: VmModel, replaced: dict[tuple[Bus, int], ControllerModel],
               ) -> tuple[tuple[Controller, ...], tuple[Disk, ...]]:
    """New controllers (re-indexed per bus) and disks moved onto them.

    A replaced controller joins a controller of the same new model when there is one (an NVMe disk moved
    to AHCI shares the existing SATA controller), so targets that number devices on one controller per
    bus (Proxmox, Hyper-V) can express the result; controllers kept as they were keep their own."""
    new_index: dict[tuple[Bus, int], tuple[Bus, int]] = {}
    controllers: list[Controller] = []
    counts: dict[Bus, int] = {}
    order = sorted(model.controllers, key=lambda c: replaced[(c.bus, c.index)] != c.model)  # kept ones first
    for ctrl in order:
        new_model = replaced[(ctrl.bus, ctrl.index)]
        bus = CONTROLLER_BUS[new_model]
        if new_model != ctrl.model:
            existing = next((c for c in controllers if c.model == new_model), None)
            if existing is not None:
                new_index[(ctrl.bus, ctrl.index)] = (bus, existing.index)
                continue
        index = counts.get(bus, 0)
        counts[bus] = index + 1
        new_index[(ctrl.bus, ctrl.index)] = (bus, index)
        controllers.append(Controller(new_model, index))
    disks: list[Disk] = []
    used: dict[tuple[Bus, int], set[int]] = {}
    for disk in model.disks:
        bus, index = new_index[(disk.bus, disk.controller)]
        taken = used.setdefault((bus, index), set())
        unit = disk.unit
        if unit > MAX_UNIT[bus] or unit in taken:
            unit = min(u for u in range(MAX_UNIT[bus] + 1) if u not in taken)
        taken.add(unit)
        disks.append(dataclasses.replace(disk, bus=bus, controller=index, unit=unit))
    return tuple(controllers), tuple(disks)


# ------------------------------------------------------------------ Hyper-V


@dataclass(frozen=True)
class HyperVGeneration:
    """The Hyper-V generation a model fits, with the reasons."""

    generation: int
    reasons: tuple[str, ...]


def hyperv_generation(model: VmModel) -> HyperVGeneration:
    """Generation 2 when the guest boots UEFI, is 64-bit and is a release generation 2 supports; else 1."""
    reasons: list[str] = []
    os = model.os
    if model.firmware != Firmware.UEFI:
        reasons.append("the guest boots with BIOS; generation 2 is UEFI only")
    if os.arch != Arch.X86_64:
        reasons.append("generation 2 runs 64-bit guests only")
    if os.family == OsFamily.WINDOWS:
        rank = _windows_rank(os)
        if rank is None or rank < WINDOWS_ORDER.index("8"):
            reasons.append("generation 2 supports 64-bit Windows 8 / Server 2012 and later")
    elif os.family not in (OsFamily.LINUX, OsFamily.FREEBSD):
        reasons.append(f"generation 2 does not support {os.family} guests")
    if reasons:
        return HyperVGeneration(1, tuple(reasons))
    why = ["UEFI 64-bit guest of a supported release: generation 2 (no IDE; disks and DVD on SCSI)"]
    if model.secure_boot and os.family == OsFamily.LINUX:
        why.append("Linux with Secure Boot needs the 'Microsoft UEFI Certificate Authority' template")
    return HyperVGeneration(2, tuple(why))
