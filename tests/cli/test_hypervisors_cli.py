"""``polyvisor drivers``, ``polyvisor -c URI vm …`` and ``polyvisor migrate`` as separate processes, as users run them.

The VM started by ``vm start`` keeps running after that process exits; the
other commands are other processes that find it through the root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyvisor.demo.bootdisk import COUNTER_PREFIX
from polyvisor.hypervisors import Capability, connect
from polyvisor.vm.codecs import write_package
from tests.hypervisors.harness import wait_for
from tests.hypervisors.harness_qemu import BOOT_TIMEOUT, boot_disk, guest_model, qemu_cleanup, qemu_pids, root_uri
from tests.peers import polyvisor_cli, polyvisor_env

COUNTER = re.compile(rf"^{COUNTER_PREFIX} (\d+)\r?$", re.MULTILINE)


def cli(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = polyvisor_cli(*args, cwd=cwd, timeout=240)
    if ok:
        assert proc.returncode == 0, f"polyvisor {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return proc


def counters(text: str) -> list[int]:
    return [int(n) for n in COUNTER.findall(text)]


def test_drivers_matrix(tmp_path: Path) -> None:
    matrix = json.loads(cli("drivers", "--json", cwd=tmp_path).stdout)
    assert matrix["capabilities"] == [c.value for c in Capability]
    qemu = matrix["drivers"]["qemu"]
    assert "migrate-live" in qemu["capabilities"]
    assert "import-image" not in qemu["capabilities"]
    assert qemu["schemes"] == ["qemu"]
    text = cli("drivers", cwd=tmp_path).stdout
    names = text.splitlines()[0].split()[1:]
    assert names == sorted(matrix["drivers"])
    for line in text.splitlines()[1 : 1 + len(Capability)]:  # every cell is generated from the declarations
        capability, *cells = line.split()
        for name, cell in zip(names, cells, strict=True):
            assert (cell == "yes") == (capability in matrix["drivers"][name]["capabilities"]), (capability, name)
    for module in matrix["unavailable"]:
        assert f"unavailable: {module}" in text


def test_vm_commands_need_a_uri(tmp_path: Path) -> None:
    env = {k: v for k, v in polyvisor_env().items() if k != "POLYVISOR_URI"}
    proc = subprocess.run([sys.executable, "-m", "polyvisor", "vm", "list"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "polyvisor: no hypervisor given: use -c URI or set POLYVISOR_URI"


def test_define_list_info_undefine_and_errors(tmp_path: Path) -> None:
    disk = boot_disk(tmp_path, counter=False)
    model_file = tmp_path / "vm.json"
    model_file.write_text(guest_model("plain", disk.name, "raw").to_json())
    uri = root_uri(tmp_path / "root")
    assert cli("-c", uri, "vm", "define", str(model_file), cwd=tmp_path).stdout.strip() == "plain defined (shut off)"
    proc = cli("-c", uri, "vm", "define", str(model_file), cwd=tmp_path, ok=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("polyvisor: qemu: plain: a VM called 'plain' already exists")
    listed = json.loads(cli("-c", uri, "vm", "list", "--json", cwd=tmp_path).stdout)
    assert [(v["name"], v["state"], v["vcpus"], v["memory"]) for v in listed] == [("plain", "shut off", 1, 256 << 20)]
    env_listing = subprocess.run([sys.executable, "-m", "polyvisor", "vm", "list"], capture_output=True, text=True,
                                 env={**polyvisor_env(), "POLYVISOR_URI": uri}, cwd=tmp_path, check=True, timeout=60)
    assert env_listing.stdout.splitlines()[1].split() == ["plain", "shut", "off", "1", "256", "MiB"]
    info = json.loads(cli("-c", uri, "vm", "info", "plain", "--json", cwd=tmp_path).stdout)
    assert info["state"] == "shut off"
    proc = cli("-c", uri, "vm", "pause", "plain", cwd=tmp_path, ok=False)
    assert proc.returncode == 1
    assert "not running" in proc.stderr or "is shut off" in proc.stderr
    proc = cli("-c", uri, "vm", "start", "ghost", cwd=tmp_path, ok=False)
    assert proc.stderr.startswith("polyvisor: qemu: ghost: no VM called 'ghost'")
    proc = cli("-c", uri, "vm", "snapshot", "list", "plain", cwd=tmp_path, ok=False)
    assert "internal snapshots need qcow2 disks" in proc.stderr
    proc = cli("-c", uri, "vm", "snapshot", "create", "plain", cwd=tmp_path, ok=False)
    assert proc.stderr.strip() == "polyvisor: vm snapshot create needs a snapshot name"
    cli("-c", uri, "vm", "undefine", "plain", cwd=tmp_path)
    assert json.loads(cli("-c", uri, "vm", "list", "--json", cwd=tmp_path).stdout) == []


def test_define_from_a_vm_package(tmp_path: Path) -> None:
    """``vm define`` reads any package polyvisor.vm's codecs read (here a libvirt domain XML)."""
    disk = boot_disk(tmp_path / "images", counter=False)
    written = write_package(guest_model("from-xml", disk.name, "raw"), "libvirt", tmp_path / "pkg",
                            {disk.name: disk})
    (xml,) = [p for p in written if p.suffix == ".xml"]
    uri = root_uri(tmp_path / "root")
    cli("-c", uri, "vm", "define", str(xml), cwd=tmp_path)
    info = json.loads(cli("-c", uri, "vm", "info", "from-xml", "--json", cwd=tmp_path).stdout)
    assert (info["name"], info["state"], info["memory"]) == ("from-xml", "shut off", 256 << 20)
    with connect(uri) as driver:
        assert driver.export("from-xml").disks == {disk.name: tmp_path / "pkg" / disk.name}
    proc = cli("-c", uri, "vm", "define", str(disk), cwd=tmp_path, ok=False)
    assert "not a VM package polyvisor knows" in proc.stderr


def test_snapshots_of_a_stopped_vm(tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(boot_disk(tmp_path, counter=False)),
                    str(qcow2)], check=True)
    model_file = tmp_path / "vm.json"
    model_file.write_text(guest_model("snappy", qcow2.name, "qcow2").to_json())
    uri = root_uri(tmp_path / "root")
    cli("-c", uri, "vm", "define", str(model_file), cwd=tmp_path)
    out = cli("-c", uri, "vm", "snapshot", "create", "snappy", "s1", "--description", "from the CLI", cwd=tmp_path)
    assert out.stdout.strip() == "snapshot s1 of snappy created"
    snaps = json.loads(cli("-c", uri, "vm", "snapshot", "list", "snappy", "--json", cwd=tmp_path).stdout)
    assert [(s["name"], s["description"], s["includes_memory"]) for s in snaps] == [("s1", "from the CLI", False)]
    table = cli("-c", uri, "vm", "snapshot", "list", "snappy", cwd=tmp_path).stdout.splitlines()
    assert table[0].split() == ["NAME", "CREATED", "MEMORY", "DESCRIPTION"]
    assert table[1].split()[0] == "s1"
    assert table[1].split()[2:] == ["no", "from", "the", "CLI"]
    cli("-c", uri, "vm", "snapshot", "revert", "snappy", "s1", cwd=tmp_path)
    proc = cli("-c", uri, "vm", "snapshot", "revert", "snappy", "s2", cwd=tmp_path, ok=False)
    assert proc.stderr.strip() == "polyvisor: qemu: snappy: no snapshot called 's2'"
    cli("-c", uri, "vm", "snapshot", "delete", "snappy", "s1", cwd=tmp_path)
    assert json.loads(cli("-c", uri, "vm", "snapshot", "list", "snappy", "--json", cwd=tmp_path).stdout) == []


@pytest.mark.boot
@pytest.mark.timeout(400)
def test_vm_lifecycle_and_migrations_from_the_command_line(tmp_path: Path) -> None:
    """start returns while the VM runs on; console, console --follow, stats, snapshot, live migrate A -> B,
    cold migrate B -> C (the shutdown is ignored, so it is destroyed), destroy."""
    disk = boot_disk(tmp_path, counter=True)
    model_file = tmp_path / "vm.json"
    model_file.write_text(guest_model("cli", disk.name, "raw").to_json())
    uri_a, uri_b, uri_c = (root_uri(tmp_path / r) for r in "abc")
    with qemu_cleanup(tmp_path):
        cli("-c", uri_a, "vm", "define", str(model_file), cwd=tmp_path)
        assert cli("-c", uri_a, "vm", "start", "cli", cwd=tmp_path).stdout.strip() == "cli started"
        assert len(qemu_pids(tmp_path / "a")) == 1  # the start process exited; QEMU runs on
        listed = json.loads(cli("-c", uri_a, "vm", "list", "--json", cwd=tmp_path).stdout)
        assert [(v["name"], v["state"]) for v in listed] == [("cli", "running")]
        wait_for(lambda: 2 in counters(cli("-c", uri_a, "vm", "console", "cli", cwd=tmp_path).stdout),
                 BOOT_TIMEOUT, "the counter on the console", interval=1.0)
        stats = json.loads(cli("-c", uri_a, "vm", "stats", "cli", "--json", cwd=tmp_path).stdout)
        assert stats["cpu_time_ns"] > 0
        assert stats["disks"]["virtio0:0"]["read_bytes"] > 0
        assert cli("-c", uri_a, "vm", "pause", "cli", cwd=tmp_path).stdout.strip() == "cli paused"
        assert json.loads(cli("-c", uri_a, "vm", "info", "cli", "--json", cwd=tmp_path).stdout)["state"] == "paused"
        cli("-c", uri_a, "vm", "resume", "cli", cwd=tmp_path)

        # Live: A -> B; the report is printed; the counter continues on B.
        before = max(counters(cli("-c", uri_a, "vm", "console", "cli", cwd=tmp_path).stdout))
        proc = cli("migrate", "cli", "--from", uri_a, "--to", uri_b, "--live", "--downtime-ms", "300",
                   "--bandwidth", "512", cwd=tmp_path)
        assert "migration of cli: LIVE" in proc.stdout
        assert re.search(r"^  total time: \d+\.\d\d s$", proc.stdout, re.MULTILINE)
        assert re.search(r"^  downtime: \d+ ms$", proc.stdout, re.MULTILINE)
        assert re.search(r"^  transferred: .* \(\d+ bytes\)$", proc.stdout, re.MULTILINE)
        assert json.loads(cli("-c", uri_a, "vm", "list", "--json", cwd=tmp_path).stdout) == []
        wait_for(lambda: max(counters(cli("-c", uri_b, "vm", "console", "cli", cwd=tmp_path).stdout)) > before + 1,
                 30, "the counter to continue on B", interval=1.0)
        seen = counters(cli("-c", uri_b, "vm", "console", "cli", cwd=tmp_path).stdout)
        assert seen == list(range(len(seen)))

        # console --follow streams until the VM stops.
        follower = subprocess.Popen([sys.executable, "-m", "polyvisor", "-c", uri_b, "vm", "console", "cli",
                                     "--follow"], stdout=subprocess.PIPE, text=True, env=polyvisor_env(),
                                    cwd=tmp_path)
        try:
            assert follower.stdout is not None
            os.set_blocking(follower.stdout.fileno(), True)
            last = max(seen)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                line = follower.stdout.readline()
                numbers = counters(line)
                if numbers and numbers[0] > last + 1:
                    break
            else:
                raise AssertionError("console --follow printed no new counter")

            # Cold: B -> C without --live; the guest ignores the power button, so it is destroyed after 1 s.
            proc = cli("migrate", "cli", "--from", uri_b, "--to", uri_c, "--shutdown-timeout", "1",
                       "--disk-dir", str(tmp_path), "--json", cwd=tmp_path)
            assert follower.wait(timeout=30) == 0  # the VM stopped on B: --follow ends
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        report = json.loads(proc.stdout)
        assert report["kind"] == "cold"
        assert report["downtime_ms"] > 0
        assert report["transferred_bytes"] > 0
        assert any("was destroyed" in note for note in report["notes"])
        assert any("COLD migration (live migration was not asked for)" in note for note in report["notes"])
        listed = json.loads(cli("-c", uri_c, "vm", "list", "--json", cwd=tmp_path).stdout)
        assert [(v["name"], v["state"]) for v in listed] == [("cli", "running")]
        wait_for(lambda: 1 in counters(cli("-c", uri_c, "vm", "console", "cli", cwd=tmp_path).stdout),
                 BOOT_TIMEOUT, "the guest booting on C", interval=1.0)
        assert cli("-c", uri_c, "vm", "destroy", "cli", cwd=tmp_path).stdout.strip() == "cli destroyed"
        assert qemu_pids(tmp_path) == []
        info = json.loads(cli("-c", uri_c, "vm", "info", "cli", "--json", cwd=tmp_path).stdout)
        assert info["state"] == "shut off"
