"""Mapping tables between polyvisor's neutral VM model and each codec's native names.

* :mod:`~polyvisor.vm.mapping.devices` — controllers, NICs, firmware and chipset names per codec;
* :mod:`~polyvisor.vm.mapping.guestos` — guest OS identifiers (libosinfo, VMware, CIM, Proxmox, VirtualBox);
* :mod:`~polyvisor.vm.mapping.drivers` — which guests drive which devices, :func:`choose_devices`,
  Hyper-V generation rules.

Every table cites its sources in its module's docstring or next to the rows.
"""

from polyvisor.vm.mapping.drivers import (
    DRIVER_RULES,
    TARGETS,
    Change,
    Choice,
    HyperVGeneration,
    Target,
    choose_devices,
    driver_reason,
    hyperv_generation,
)
from polyvisor.vm.mapping.guestos import OS_TABLE, OsRow, lookup, os_from_native

__all__ = [
    "DRIVER_RULES",
    "OS_TABLE",
    "TARGETS",
    "Change",
    "Choice",
    "HyperVGeneration",
    "OsRow",
    "Target",
    "choose_devices",
    "driver_reason",
    "hyperv_generation",
    "lookup",
    "os_from_native",
]
