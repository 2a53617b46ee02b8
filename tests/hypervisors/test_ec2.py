"""The ec2 driver against moto's EC2, EBS direct APIs and S3 (server mode, loopback)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from polyvisor.disk import create_image
from polyvisor.errors import (
    ConnectionFailed,
    HypervisorError,
    InvalidState,
    UnmappableModel,
    UsageError,
    VmExists,
    VmNotFound,
)
from polyvisor.hypervisors import VmState, connect
from polyvisor.hypervisors.ec2 import Ec2Driver, Endpoint
from polyvisor.vm.model import Bus, Controller, ControllerModel, Cpu, DeviceKind, Disk, MiB
from tests.hypervisors.harness_ec2 import REGION, ec2_driver, ec2_uri, guest_model, moto_endpoint, x86_64_ami


def test_uri_parsing() -> None:
    ep = Endpoint.parse("ec2://eu-west-1?endpoint=http://127.0.0.1:5000&bucket=images")
    assert (ep.region, ep.endpoint, ep.ebs_endpoint, ep.s3_endpoint, ep.bucket) == (
        "eu-west-1", "http://127.0.0.1:5000", "http://127.0.0.1:5000", "http://127.0.0.1:5000", "images")
    assert Endpoint.parse("ec2://us-east-2").endpoint is None  # AWS's own endpoints
    with pytest.raises(ConnectionFailed, match="unknown URI parameters: zone"):
        Endpoint.parse("ec2://us-east-1?zone=a")
    with pytest.raises(ConnectionFailed, match="not an ec2://REGION URI"):
        Endpoint.parse("ec2:///nothing")


def test_unreachable_endpoint() -> None:
    moto_endpoint()  # fake credentials in the environment
    with pytest.raises(ConnectionFailed, match="cannot reach EC2"):
        Ec2Driver.connect(f"ec2://{REGION}?endpoint=http://127.0.0.1:9")


@pytest.fixture
def ec2() -> Iterator[tuple[Ec2Driver, list[str]]]:
    with ec2_driver() as connection:
        yield connection


def test_instance_type_choice(ec2: tuple[Ec2Driver, list[str]]) -> None:
    driver, _ = ec2
    model = guest_model("sized", "ami-x")
    assert driver.choose_instance_type(model) == "t3.micro"  # 2 vCPUs, 1 GiB exactly
    bigger = dataclasses.replace(model, cpu=Cpu(sockets=3), memory=5000 * MiB)
    chosen = driver.instance_types()[driver.choose_instance_type(bigger)]
    assert chosen.vcpus >= 3
    assert chosen.memory >= 5000 * MiB
    assert "x86_64" in chosen.architectures
    with pytest.raises(UnmappableModel, match="no x86_64 instance type"):
        driver.choose_instance_type(dataclasses.replace(model, cpu=Cpu(sockets=4096)))


def test_define_needs_an_ami(ec2: tuple[Ec2Driver, list[str]], tmp_path: Path) -> None:
    driver, _ = ec2
    model = guest_model("no-ami", "ami-x").with_vendor("ec2", {})
    with pytest.raises(UsageError, match=r"ec2\.image_id"):
        driver.define(model, {})
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 512)
    with_disk = dataclasses.replace(guest_model("no-ami", x86_64_ami(driver)),
                                    controllers=(Controller(ControllerModel.IDE),),
                                    disks=(Disk(DeviceKind.DISK, Bus.IDE, 0, 0, path="d.raw"),))
    with pytest.raises(UnmappableModel, match="import_image"):
        driver.define(with_disk, {"d.raw": disk})
    with pytest.raises(VmNotFound):
        driver.get("no-ami")


def test_instance_lifecycle(ec2: tuple[Ec2Driver, list[str]]) -> None:
    driver, defined = ec2
    image = x86_64_ami(driver)
    defined.append("web")
    info = driver.define(guest_model("web", image), {})
    assert (info.state, info.native_state, info.vcpus, info.memory) == (VmState.SHUT_OFF, "stopped", 2, 1024 * MiB)
    assert info.extra["instance_type"] == "t3.micro"
    assert info.extra["image_id"] == image
    instance_id = info.extra["instance_id"]
    assert driver.get(instance_id).name == "web"  # an id works as a name
    with pytest.raises(VmExists):
        driver.define(guest_model("web", image), {})
    assert "web" in {vm.name for vm in driver.list_vms()}
    with pytest.raises(InvalidState, match="stopped"):
        driver.reboot("web")
    driver.start("web")
    assert driver.get("web").state in (VmState.PENDING, VmState.RUNNING)
    driver._wait_state(instance_id, {"running"}, "web", 30)
    with pytest.raises(InvalidState):
        driver.start("web")
    with pytest.raises(InvalidState, match="not stopped"):
        driver.undefine("web")
    driver.reboot("web")
    driver.shutdown("web", timeout=30)
    assert driver.get("web").state is VmState.SHUT_OFF
    driver.start("web")
    driver._wait_state(instance_id, {"running"}, "web", 30)
    driver.destroy("web")
    driver._wait_state(instance_id, {"stopped"}, "web", 30)
    driver.undefine("web")
    with pytest.raises(VmNotFound):
        driver.get("web")
    assert "web" not in {vm.name for vm in driver.list_vms()}  # terminated instances are gone
    defined.remove("web")


def test_console_output(ec2: tuple[Ec2Driver, list[str]]) -> None:
    driver, defined = ec2
    defined.append("console")
    driver.define(guest_model("console", x86_64_ami(driver)), {})
    assert "Linux version" in "".join(driver.console("console"))  # moto's sample boot log
    driver.start("console")
    driver.console_poll_interval = 0.1
    stopper = threading.Timer(0.5, driver.destroy, args=("console",))
    stopper.start()
    started = time.monotonic()
    try:
        chunks = list(driver.console("console", follow=True))  # ends once the instance stops
    finally:
        stopper.join()
    assert len(chunks) == 1
    assert "Linux version" in chunks[0]
    assert time.monotonic() - started < 20


def _sample_disk(tmp_path: Path) -> Path:
    """A 3 MiB raw disk with data in two 512 KiB blocks (0 and 4)."""
    disk = tmp_path / "sample.raw"
    with create_image(disk, "raw", 3 * MiB) as image:
        image.write(0, b"boot sector".ljust(512, b"\0"))
        image.write(2 * MiB + 5, b"payload")
    return disk


def test_import_image_through_ebs_direct_apis(ec2: tuple[Ec2Driver, list[str]], tmp_path: Path) -> None:
    driver, defined = ec2
    disk = _sample_disk(tmp_path)
    seen: list[tuple[int, int]] = []
    snapshot_id = driver.ex_upload_snapshot(disk, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (3 * MiB, 3 * MiB)
    snapshot = driver.ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
    assert (snapshot["State"], snapshot["VolumeSize"]) == ("completed", 1)
    blocks = driver.ebs.list_snapshot_blocks(SnapshotId=snapshot_id)["Blocks"]
    assert sorted(b["BlockIndex"] for b in blocks) == [0, 4]  # zero blocks are not uploaded
    block4 = next(b for b in blocks if b["BlockIndex"] == 4)
    data = driver.ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=4,
                                         BlockToken=block4["BlockToken"])["BlockData"].read()
    assert data[5:12] == b"payload"
    assert len(data) == 512 << 10
    # import_image = that upload + RegisterImage.  (moto records only an AMI's name and description, not its
    # block device mappings, so the AMI -> snapshot link is not checked here.)
    ami = driver.import_image(disk, "polyvisor test image")
    image = driver.ec2.describe_images(ImageIds=[ami])["Images"][0]
    assert image["Description"] == "polyvisor test image"
    assert image["Name"].startswith("polyvisor-sample-")
    # The AMI boots an instance.
    defined.append("imported")
    info = driver.define(guest_model("imported", ami), {})
    assert info.extra["image_id"] == ami
    with pytest.raises(UsageError):
        driver.import_image(tmp_path / "missing.raw")


def test_vm_import_uploads_then_requests_import_image(tmp_path: Path) -> None:
    """S3 upload (converted to a streamOptimized VMDK) and the ImportImage request, which moto lacks."""
    source = tmp_path / "sparse.vmdk"
    with create_image(source, "vmdk", 2 * MiB, subformat="monolithicSparse") as image:
        image.write(0, b"data")
    with ec2_driver(bucket="polyvisor-imports") as (driver, _):
        with pytest.raises(HypervisorError, match="ImportImage"):
            driver.ex_vm_import(source, "sparse disk")
        objects = driver.s3.list_objects_v2(Bucket="polyvisor-imports")["Contents"]
        assert len(objects) == 1
        assert objects[0]["Key"].endswith("/sparse.vmdk")
        body = driver.s3.get_object(Bucket="polyvisor-imports", Key=objects[0]["Key"])["Body"].read()
        assert b"createType=\"streamOptimized\"" in body
        with pytest.raises(HypervisorError, match="DescribeImportImageTasks"):  # moto lacks it too
            driver.ex_import_status("import-ami-0123456789abcdef0")
    with ec2_driver() as (driver, _), pytest.raises(UsageError, match="bucket"):
        driver.ex_vm_import(source)


def test_registry_finds_the_driver() -> None:
    driver = connect(ec2_uri())
    try:
        assert isinstance(driver, Ec2Driver)
    finally:
        driver.close()
