"""One management interface: the Driver protocol and a driver per hypervisor.

>>> from polyvisor.hypervisors import connect
>>> with connect("qemu:///session?root=/var/lib/polyvisor") as hv:   # doctest: +SKIP
...     for vm in hv.list_vms():
...         print(vm.name, vm.state)
"""

from polyvisor.hypervisors.driver import (
    Capability,
    Driver,
    ExportedVm,
    MigrationOptions,
    MigrationReport,
    Snapshot,
    VmInfo,
    VmState,
    VmStats,
)
from polyvisor.hypervisors.registry import connect, driver_classes, driver_for, register_driver

__all__ = [
    "Capability",
    "Driver",
    "ExportedVm",
    "MigrationOptions",
    "MigrationReport",
    "Snapshot",
    "VmInfo",
    "VmState",
    "VmStats",
    "connect",
    "driver_classes",
    "driver_for",
    "register_driver",
]
