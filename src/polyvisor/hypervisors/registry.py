"""Finding a driver for a connection URI; driver modules are imported only when a URI needs them.

:data:`DRIVER_MODULES` lists, per URI scheme, the modules that may handle it,
in the order they are asked (libcloud's lazy provider table).  Importing a
module registers its driver class (:func:`register_driver`); the first class
whose :meth:`~polyvisor.hypervisors.driver.Driver.accepts` returns True for
the URI gets it.  A module whose third-party library is missing is skipped
with the reason kept for ``polyvisor drivers``.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from polyvisor.errors import UnknownDriver
from polyvisor.hypervisors.driver import Driver

D = TypeVar("D", bound=type[Driver])

#: URI scheme -> driver modules to try, in order.
DRIVER_MODULES: dict[str, tuple[str, ...]] = {
    # qemu:///session?root=DIR is polyvisor's own QEMU driver; other qemu:/// URIs are libvirt's.
    "qemu": ("polyvisor.hypervisors.qemu", "polyvisor.hypervisors.libvirt"),
    "qemu+ssh": ("polyvisor.hypervisors.libvirt",),
    "qemu+tcp": ("polyvisor.hypervisors.libvirt",),
    "qemu+unix": ("polyvisor.hypervisors.libvirt",),
    "xen": ("polyvisor.hypervisors.libvirt",),
    "test": ("polyvisor.hypervisors.libvirt",),
    "libvirt": ("polyvisor.hypervisors.libvirt",),
    "vsphere": ("polyvisor.hypervisors.vsphere",),
    "ec2": ("polyvisor.hypervisors.ec2",),
}

_REGISTERED: dict[str, type[Driver]] = {}
#: Modules that could not be imported, and why (shown by ``polyvisor drivers``).
UNAVAILABLE: dict[str, str] = {}


def register_driver(cls: D) -> D:
    """Class decorator: make a driver findable (called when its module is imported)."""
    existing = _REGISTERED.get(cls.name)
    if existing is not None and existing is not cls:
        raise RuntimeError(f"driver {cls.name!r} registered twice")
    _REGISTERED[cls.name] = cls
    return cls


def _import(module: str) -> bool:
    if module in UNAVAILABLE:
        return False
    try:
        importlib.import_module(module)
    except ImportError as exc:
        UNAVAILABLE[module] = f"{exc.name or module}: {exc}"
        return False
    return True


def _modules() -> list[str]:
    return list(dict.fromkeys(m for modules in DRIVER_MODULES.values() for m in modules))


def driver_classes() -> dict[str, type[Driver]]:
    """Every driver whose module imports, by name (imports them all)."""
    for module in _modules():
        _import(module)
    return dict(sorted(_REGISTERED.items()))


def driver_for(uri: str) -> type[Driver]:
    """The driver class that handles *uri*."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    # "libvirt+qemu", "xen+ssh": a transport or driver prefix falls back to the scheme before the "+".
    candidates = DRIVER_MODULES.get(scheme) or DRIVER_MODULES.get(scheme.split("+", 1)[0], ())
    if not candidates:
        known = ", ".join(sorted(DRIVER_MODULES))
        raise UnknownDriver("polyvisor", f"no driver for URI {uri!r} (known schemes: {known})")
    for module in candidates:
        if not _import(module):
            continue
        for cls in _REGISTERED.values():
            if cls.__module__ == module and cls.accepts(uri):
                return cls
    missing = [f"{m} ({UNAVAILABLE[m]})" for m in candidates if m in UNAVAILABLE]
    hint = f"; unavailable: {', '.join(missing)}" if missing else ""
    raise UnknownDriver("polyvisor", f"no driver accepts URI {uri!r}{hint}")


def connect(uri: str) -> Driver:
    """Open a connection to the hypervisor *uri* names."""
    return driver_for(uri).connect(uri)
