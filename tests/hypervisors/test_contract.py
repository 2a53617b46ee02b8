"""The contract every registered driver passes, against its real peer on loopback.

Operations a driver does not declare raise UnsupportedOperation naming the
driver and the operation; the ones it declares behave the same everywhere:
define → shut off, start → running, pause/resume, snapshots, stats, console,
shutdown/destroy → shut off, undefine → gone.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.hypervisors
from polyvisor.errors import UnsupportedOperation, VmNotFound
from polyvisor.hypervisors import Capability, VmState, driver_classes
from polyvisor.hypervisors.driver import CAPABILITY_METHODS
from tests.hypervisors.harness import HARNESSES, Harness, wait_for

# Import every test module of this package so that their harnesses register.
for _module in pkgutil.iter_modules(tests.hypervisors.__path__):
    if _module.name.startswith("harness_"):
        importlib.import_module(f"tests.hypervisors.{_module.name}")

DRIVERS = sorted(driver_classes())


def test_every_driver_has_a_harness() -> None:
    missing = [name for name in DRIVERS if name not in HARNESSES]
    assert not missing, f"drivers without a contract harness in tests/hypervisors/harness_*.py: {missing}"


@pytest.fixture(params=DRIVERS)
def connected(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    factory = HARNESSES[request.param]
    with factory(tmp_path) as harness:
        yield harness


def _call(harness: Harness, capability: Capability, vm: str) -> None:
    driver = harness.driver
    method = getattr(driver, CAPABILITY_METHODS[capability])
    args: dict[Capability, tuple[object, ...]] = {
        Capability.LIST: (),
        Capability.DEFINE: harness.make_vm(vm),
        Capability.SNAPSHOT_CREATE: (vm, "s"),
        Capability.SNAPSHOT_REVERT: (vm, "s"),
        Capability.SNAPSHOT_DELETE: (vm, "s"),
        Capability.MIGRATE_LIVE: (vm, driver, None),
        Capability.IMPORT_IMAGE: (Path("disk.vmdk"),),
    }
    result = method(*args.get(capability, (vm,)))
    if capability is Capability.CONSOLE:
        next(iter(result))


def test_undeclared_operations_raise_unsupported(connected: Harness) -> None:
    driver = connected.driver
    for capability in Capability:
        if driver.supports(capability):
            continue
        with pytest.raises(UnsupportedOperation) as info:
            _call(connected, capability, "contract-vm")
        assert info.value.driver == driver.name
        assert info.value.operation == capability.value


def test_lifecycle(connected: Harness) -> None:
    driver = connected.driver
    name = "contract-vm"
    caps = driver.capabilities
    if Capability.LIST in caps:
        listed = {vm.name: vm for vm in driver.list_vms()}
        assert set(connected.preexisting) <= set(listed)
        assert all(isinstance(vm.state, VmState) for vm in listed.values())
    if Capability.DEFINE not in caps:
        return
    model, disks = connected.make_vm(name)
    info = driver.define(model, disks)
    assert info.name == name
    assert info.state is VmState.SHUT_OFF
    assert info.vcpus == model.cpu.count
    assert info.memory == model.memory
    if Capability.LIST in caps:
        assert name in {vm.name for vm in driver.list_vms()}

    def state() -> VmState:
        return driver.get(name).state

    if Capability.START in caps:
        driver.start(name)
        wait_for(lambda: state() is VmState.RUNNING, connected.state_timeout, "running")
        marker = connected.console_marker
        if Capability.CONSOLE in caps and marker:
            wait_for(lambda: marker in "".join(driver.console(name)), connected.state_timeout,
                     f"{marker!r} on the serial console")
        if Capability.PAUSE in caps:
            driver.pause(name)
            wait_for(lambda: state() is VmState.PAUSED, connected.state_timeout, "paused")
            driver.resume(name)
            wait_for(lambda: state() is VmState.RUNNING, connected.state_timeout, "running again")
        if Capability.STATS in caps:
            stats = driver.stats(name)
            assert stats.cpu_time_ns is None or stats.cpu_time_ns >= 0
        if Capability.SNAPSHOT_CREATE in caps:
            snap = driver.snapshot_create(name, "contract-snap", "taken by the contract test")
            assert snap.name == "contract-snap"
            assert "contract-snap" in [s.name for s in driver.snapshot_list(name)]
            driver.snapshot_revert(name, "contract-snap")
            driver.snapshot_delete(name, "contract-snap")
            assert "contract-snap" not in [s.name for s in driver.snapshot_list(name)]
        if Capability.DESTROY in caps:
            if driver.get(name).state is not VmState.RUNNING and Capability.START in caps:
                driver.start(name)
            driver.destroy(name)
            wait_for(lambda: state() in (VmState.SHUT_OFF, VmState.TERMINATED), connected.state_timeout, "off")
    if Capability.UNDEFINE in caps:
        driver.undefine(name)
        with pytest.raises(VmNotFound):
            driver.get(name)
