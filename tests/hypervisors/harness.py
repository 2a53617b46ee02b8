"""How the driver contract test reaches a real hypervisor for each registered driver.

Each driver's test module registers a harness factory with :func:`harness`:
a context manager that starts the peer on loopback (QEMU under a temporary
root, libvirt's embedded driver, vcsim, a moto server…), connects, and yields
a :class:`Harness`.  The shared contract (tests/hypervisors/test_contract.py)
runs the same scenario over every registered driver through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from polyvisor.hypervisors import Driver
from polyvisor.vm.model import VmModel


@dataclass
class Harness:
    """A connected driver and what the contract needs to exercise it."""

    driver: Driver
    #: A model (and its disks: model disk path -> host file) for a new VM called NAME, ready to ``define``.
    make_vm: Callable[[str], tuple[VmModel, dict[str, Path]]]
    #: Seconds to wait for a state change (TCG guests are slow; simulators are quick).
    state_timeout: float = 120.0
    #: Text the guest prints on its serial console once up, when the VM runs a real guest.
    console_marker: str | None = None
    #: Names of VMs that exist before the test (listed by ``list``).
    preexisting: tuple[str, ...] = ()


HarnessFactory = Callable[[Path], AbstractContextManager[Harness]]
HARNESSES: dict[str, HarnessFactory] = {}


def harness(driver_name: str) -> Callable[[HarnessFactory], HarnessFactory]:
    """Register the harness factory for *driver_name*."""

    def register(factory: HarnessFactory) -> HarnessFactory:
        HARNESSES[driver_name] = factory
        return factory

    return register


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll *predicate* until true, failing the test with *what* after *timeout* seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def iter_lines(chunks: Iterator[str]) -> Iterator[str]:
    """Split a stream of console text chunks into lines."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split("\n")
        yield from lines
    if pending:
        yield pending
