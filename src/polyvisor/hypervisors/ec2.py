"""The EC2 driver (boto3): Amazon EC2 or any EC2-compatible endpoint (Eucalyptus, moto…).

URI
---
``ec2://REGION[?endpoint=URL&ebs_endpoint=URL&s3_endpoint=URL&bucket=NAME&profile=NAME]``

* ``endpoint``: the EC2 API endpoint (default: AWS's for the region); the EBS direct and S3
  endpoints default to it too (one URL serves every service on moto);
* credentials come from boto3's usual chain (environment, shared files, instance profile), or from
  the named ``profile``;
* ``bucket``: the S3 bucket :meth:`Ec2Driver.ex_vm_import` uploads to (created if missing).

Mapping (Amazon EC2 API Reference)
----------------------------------
* a VM is an instance; its name is its ``Name`` tag (an instance id works as a name too).
  Terminated instances are gone for good and are not listed;
* states: ``InstanceState.Name`` through :data:`Ec2Driver.STATE_MAP`;
* ``define``: EC2 has no defined-but-never-run instance, so ``RunInstances`` launches it from the
  AMI the model names (vendor key ``ec2.image_id``) and ``StopInstances`` stops it as soon as it
  runs: it boots once.  The instance type is vendor key ``ec2.instance_type``, else the type whose
  ``DescribeInstanceTypes`` vCPUs and memory equal the model's (else the smallest that covers
  them) for the model's architecture.  Optional vendor keys ``ec2.subnet_id``, ``ec2.key_name``,
  ``ec2.security_group_ids`` (comma-separated).  The model's disks are the AMI's: disk images
  become an AMI through :meth:`Ec2Driver.import_image` first;
* ``start`` ``StartInstances``; ``shutdown`` ``StopInstances`` (EC2 asks the guest, then forces) and
  waits; ``destroy`` ``StopInstances`` with ``Force``; ``reboot`` ``RebootInstances``;
  ``undefine`` ``TerminateInstances`` of a stopped instance (its EBS volumes go with it unless
  their DeleteOnTermination is off; the AMI stays);
* ``console``: ``GetConsoleOutput`` (the serial console's last 64 KiB, as EC2 buffers it);
* ``import_image``: the disk (any format polyvisor reads) is written into a new EBS snapshot with
  the EBS direct APIs (``StartSnapshot``, ``PutSnapshotBlock`` for every non-zero 512 KiB block,
  ``CompleteSnapshot``), which ``RegisterImage`` turns into an AMI: its id is returned.  As with
  AWS's coldsnap, the guest must already boot on EC2 (no drivers are injected);
  :meth:`Ec2Driver.ex_vm_import` is VM Import/Export instead (S3 upload + ``ImportImage``, which
  adapts the guest, asynchronously: :meth:`Ec2Driver.ex_import_status`).

Not declared: pause/resume (EC2 has none; hibernation must be chosen at launch), snapshots of a
whole VM, statistics (CloudWatch keeps rates, not counters), live migration and export.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers

from polyvisor.disk import CreateOptions, open_image
from polyvisor.disk.convert import convert
from polyvisor.disk.image import is_zero
from polyvisor.errors import (
    ConnectionFailed,
    HypervisorError,
    InvalidState,
    OperationTimeout,
    PolyvisorError,
    UnmappableModel,
    UsageError,
    VmExists,
    VmNotFound,
)
from polyvisor.hypervisors.driver import Capability, Driver, VmInfo, VmState
from polyvisor.hypervisors.registry import register_driver
from polyvisor.vm.model import Arch, Firmware, MiB, VmModel

NAME = "ec2"
GiB = 1 << 30
#: The EBS direct APIs' block size (PutSnapshotBlock).
EBS_BLOCK = 512 << 10
#: Vendor keys (``model.vendor["ec2"]``) define reads.
VENDOR_KEYS = ("image_id", "instance_type", "subnet_id", "key_name", "security_group_ids")
#: Model architecture -> EC2 architecture name.
ARCHITECTURES = {Arch.X86_64: "x86_64", Arch.I686: "i386", Arch.AARCH64: "arm64"}
#: Image formats ImportImage takes as they are (polyvisor format, subformat) -> DiskContainer Format.
VM_IMPORT_FORMATS = {("vmdk", "streamOptimized"): "VMDK", ("vhd", None): "VHD", ("vhdx", None): "VHDX",
                     ("raw", None): "RAW"}


@dataclass(frozen=True)
class Endpoint:
    """What an ec2:// URI names."""

    region: str
    endpoint: str | None
    ebs_endpoint: str | None
    s3_endpoint: str | None
    bucket: str | None
    profile: str | None

    @classmethod
    def parse(cls, uri: str) -> Endpoint:
        """Parse an ``ec2://REGION?...`` URI (see the module docstring)."""
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme != "ec2" or not parts.netloc or parts.path not in ("", "/"):
            raise ConnectionFailed(NAME, f"not an ec2://REGION URI: {uri!r}")
        query = dict(urllib.parse.parse_qsl(parts.query))
        unknown = set(query) - {"endpoint", "ebs_endpoint", "s3_endpoint", "bucket", "profile"}
        if unknown:
            raise ConnectionFailed(NAME, f"unknown URI parameters: {', '.join(sorted(unknown))}")
        endpoint = query.get("endpoint")
        return cls(region=parts.netloc, endpoint=endpoint, ebs_endpoint=query.get("ebs_endpoint", endpoint),
                   s3_endpoint=query.get("s3_endpoint", endpoint), bucket=query.get("bucket"),
                   profile=query.get("profile"))


@dataclass(frozen=True)
class InstanceType:
    """What DescribeInstanceTypes says about one instance type."""

    name: str
    vcpus: int
    memory: int  #: bytes
    architectures: tuple[str, ...]


@register_driver
class Ec2Driver(Driver):
    """Amazon EC2 and EC2-compatible clouds through boto3."""

    name = NAME
    schemes = ("ec2",)
    description = "Amazon EC2 or a compatible endpoint (boto3): ec2://REGION?endpoint=URL; tested against moto"
    capabilities = frozenset({
        Capability.LIST, Capability.GET, Capability.DEFINE, Capability.UNDEFINE,
        Capability.START, Capability.SHUTDOWN, Capability.DESTROY, Capability.REBOOT,
        Capability.CONSOLE, Capability.IMPORT_IMAGE,
    })
    #: InstanceState.Name -> common state (EC2 API Reference, InstanceState).
    STATE_MAP: ClassVar[Mapping[str, VmState]] = {
        "pending": VmState.PENDING,
        "running": VmState.RUNNING,
        "stopping": VmState.STOPPING,
        "stopped": VmState.SHUT_OFF,
        "shutting-down": VmState.STOPPING,  # being terminated
        "terminated": VmState.TERMINATED,
    }
    #: Seconds between polls while waiting for a state.
    poll_interval: float = 0.5
    #: Seconds between GetConsoleOutput polls with ``follow``.
    console_poll_interval: float = 5.0

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.endpoint = Endpoint.parse(uri)
        ep = self.endpoint
        config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10,
                                        read_timeout=120)
        try:
            self.session: Any = boto3.session.Session(profile_name=ep.profile, region_name=ep.region)
            self.ec2: Any = self.session.client("ec2", endpoint_url=ep.endpoint, config=config)
            self.ebs: Any = self.session.client("ebs", endpoint_url=ep.ebs_endpoint, config=config)
            self.s3: Any = self.session.client("s3", endpoint_url=ep.s3_endpoint, config=config)
            self.ec2.describe_availability_zones()
        except botocore.exceptions.NoCredentialsError:
            raise ConnectionFailed(NAME, "no AWS credentials (environment, shared files or profile)") from None
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise ConnectionFailed(NAME, f"cannot reach EC2 in {ep.region} "
                                         f"({ep.endpoint or 'AWS'}): {exc}") from None
        self._types: dict[str, InstanceType] | None = None

    # ------------------------------------------------------------- plumbing

    def _fail(self, exc: Exception, vm: str | None, what: str) -> NoReturn:
        """Raise the polyvisor error for a boto3 error (EC2 API Reference, "Error codes")."""
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            message = str(exc.response.get("Error", {}).get("Message", "")) or code
            if code.startswith("InvalidInstanceID"):
                raise VmNotFound(NAME, f"{what}: {message}", vm=vm) from None
            if code in ("IncorrectInstanceState", "IncorrectState", "InvalidInstanceState"):
                raise InvalidState(NAME, f"{what}: {message}", vm=vm) from None
            raise HypervisorError(NAME, f"{what}: {code}: {message}", vm=vm) from None
        raise HypervisorError(NAME, f"{what}: {exc}", vm=vm) from None

    @contextlib.contextmanager
    def _calls(self, vm: str | None, what: str) -> Iterator[None]:
        try:
            yield
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, vm, what)
        except botocore.parsers.ResponseParserError:
            raise HypervisorError(NAME, f"{what}: the endpoint's answer is not an EC2 API response (does it "
                                        "implement this action?)", vm=vm) from None

    def _instances(self, filters: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """DescribeInstances, every page, terminated instances left out."""
        found: list[dict[str, Any]] = []
        with self._calls(None, "DescribeInstances"):
            for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters or []):
                for reservation in page["Reservations"]:
                    found.extend(i for i in reservation["Instances"] if i["State"]["Name"] != "terminated")
        return found

    def _instance(self, name: str) -> dict[str, Any]:
        """The live instance called *name* (its Name tag, or its id)."""
        if name.startswith("i-"):
            matches = self._instances([{"Name": "instance-id", "Values": [name]}])
        else:
            matches = self._instances([{"Name": "tag:Name", "Values": [name]}])
        if not matches:
            raise VmNotFound(NAME, "no such instance", vm=name)
        if len(matches) > 1:
            ids = ", ".join(i["InstanceId"] for i in matches)
            raise HypervisorError(NAME, f"{len(matches)} instances have this name ({ids}): use an id", vm=name)
        return matches[0]

    def _refresh(self, instance_id: str) -> dict[str, Any]:
        with self._calls(instance_id, "DescribeInstances"):
            reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return dict(reservations[0]["Instances"][0])

    def _wait_state(self, instance_id: str, wanted: set[str], vm: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            instance = self._refresh(instance_id)
            state = instance["State"]["Name"]
            if state in wanted:
                return instance
            if time.monotonic() > deadline:
                raise OperationTimeout(NAME, f"still {state} after {timeout:g} s (waiting for "
                                             f"{' or '.join(sorted(wanted))})", vm=vm)
            time.sleep(self.poll_interval)

    def instance_types(self) -> dict[str, InstanceType]:
        """Every instance type of the region (DescribeInstanceTypes, cached per connection)."""
        if self._types is None:
            types: dict[str, InstanceType] = {}
            with self._calls(None, "DescribeInstanceTypes"):
                for page in self.ec2.get_paginator("describe_instance_types").paginate():
                    for row in page["InstanceTypes"]:
                        types[row["InstanceType"]] = InstanceType(
                            name=row["InstanceType"], vcpus=int(row["VCpuInfo"]["DefaultVCpus"]),
                            memory=int(row["MemoryInfo"]["SizeInMiB"]) * MiB,
                            architectures=tuple(row.get("ProcessorInfo", {}).get("SupportedArchitectures", ())))
            self._types = types
        return self._types

    def choose_instance_type(self, model: VmModel) -> str:
        """The type whose vCPUs and memory equal the model's, else the smallest covering both."""
        arch = ARCHITECTURES[model.os.arch]
        fitting = [t for t in self.instance_types().values()
                   if arch in t.architectures and t.vcpus >= model.cpu.count and t.memory >= model.memory]
        if not fitting:
            raise UnmappableModel(f"no {arch} instance type has {model.cpu.count} vCPUs and "
                                  f"{model.memory // MiB} MiB")
        exact = [t for t in fitting if (t.vcpus, t.memory) == (model.cpu.count, model.memory)]
        best = min(exact or fitting, key=lambda t: (t.memory, t.vcpus, t.name))
        return best.name

    def _info(self, instance: Mapping[str, Any]) -> VmInfo:
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        native = str(instance["State"]["Name"])
        itype = self.instance_types().get(instance["InstanceType"])
        extra = {
            "instance_id": instance["InstanceId"],
            "instance_type": instance["InstanceType"],
            "image_id": instance.get("ImageId"),
            "availability_zone": instance.get("Placement", {}).get("AvailabilityZone"),
            "private_ip": instance.get("PrivateIpAddress"),
            "public_ip": instance.get("PublicIpAddress"),
            "state_reason": instance.get("StateReason", {}).get("Message"),
        }
        return VmInfo(name=tags.get("Name", instance["InstanceId"]), state=self.map_state(native),
                      vcpus=itype.vcpus if itype else 0, memory=itype.memory if itype else 0, uuid=None,
                      native_state=native, extra=extra)

    # ------------------------------------------------------------ inventory

    def list_vms(self) -> list[VmInfo]:
        """DescribeInstances (terminated instances left out)."""
        return sorted((self._info(i) for i in self._instances()), key=lambda vm: vm.name)

    def get(self, name: str) -> VmInfo:
        """One instance by Name tag or id."""
        return self._info(self._instance(name))

    def define(self, model: VmModel, disks: Mapping[str, Path], *, timeout: float = 600.0) -> VmInfo:
        """RunInstances from the model's AMI, then StopInstances once it runs (see the module docstring)."""
        model.validate()
        vendor = model.vendor_keys(NAME)
        image_id = vendor.get("image_id")
        if not image_id:
            raise UsageError("an EC2 instance boots from an AMI: name it in the model's vendor key ec2.image_id "
                             "(import_image turns a disk image into one)")
        if disks:
            raise UnmappableModel("EC2 instances take their disks from the AMI, not from image files: "
                                  "import the image (import_image) and name the AMI in ec2.image_id")
        with contextlib.suppress(VmNotFound):
            self._instance(model.name)
            raise VmExists(NAME, "an instance of that name exists", vm=model.name)
        request: dict[str, Any] = {
            "ImageId": image_id, "MinCount": 1, "MaxCount": 1,
            "InstanceType": vendor.get("instance_type") or self.choose_instance_type(model),
            "TagSpecifications": [{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": model.name}]}],
        }
        if vendor.get("subnet_id"):
            request["SubnetId"] = vendor["subnet_id"]
        if vendor.get("key_name"):
            request["KeyName"] = vendor["key_name"]
        if vendor.get("security_group_ids"):
            request["SecurityGroupIds"] = vendor["security_group_ids"].split(",")
        with self._calls(model.name, "RunInstances"):
            instance_id = self.ec2.run_instances(**request)["Instances"][0]["InstanceId"]
        try:
            self._wait_state(instance_id, {"running"}, model.name, timeout)
            with self._calls(model.name, "StopInstances"):
                self.ec2.stop_instances(InstanceIds=[instance_id])
            return self._info(self._wait_state(instance_id, {"stopped"}, model.name, timeout))
        except BaseException:
            with contextlib.suppress(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                self.ec2.terminate_instances(InstanceIds=[instance_id])
            raise

    def undefine(self, name: str, *, timeout: float = 600.0) -> None:
        """TerminateInstances of a stopped instance, waiting until it is terminated."""
        instance = self._instance(name)
        if instance["State"]["Name"] != "stopped":
            raise InvalidState(NAME, f"the instance is {instance['State']['Name']}, not stopped", vm=name)
        with self._calls(name, "TerminateInstances"):
            self.ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
        self._wait_state(instance["InstanceId"], {"terminated"}, name, timeout)

    # ------------------------------------------------------------ lifecycle

    def _require(self, name: str, states: set[str], what: str) -> str:
        instance = self._instance(name)
        state = instance["State"]["Name"]
        if state not in states:
            raise InvalidState(NAME, f"cannot {what}: the instance is {state}", vm=name)
        return str(instance["InstanceId"])

    def start(self, name: str) -> None:
        """StartInstances."""
        instance_id = self._require(name, {"stopped"}, "start")
        with self._calls(name, "StartInstances"):
            self.ec2.start_instances(InstanceIds=[instance_id])

    def shutdown(self, name: str, timeout: float = 60.0) -> None:
        """StopInstances (the guest is asked first), then wait for stopped."""
        instance_id = self._require(name, {"running"}, "shut down")
        with self._calls(name, "StopInstances"):
            self.ec2.stop_instances(InstanceIds=[instance_id])
        self._wait_state(instance_id, {"stopped"}, name, timeout)

    def destroy(self, name: str) -> None:
        """StopInstances with Force (no guest shutdown; EBS volumes are kept)."""
        instance_id = self._require(name, {"pending", "running", "stopping"}, "power off")
        with self._calls(name, "StopInstances"):
            self.ec2.stop_instances(InstanceIds=[instance_id], Force=True)

    def reboot(self, name: str) -> None:
        """RebootInstances."""
        instance_id = self._require(name, {"running"}, "reboot")
        with self._calls(name, "RebootInstances"):
            self.ec2.reboot_instances(InstanceIds=[instance_id])

    # ---------------------------------------------------------- observation

    def _console_output(self, instance_id: str, name: str) -> str:
        with self._calls(name, "GetConsoleOutput"):
            return str(self.ec2.get_console_output(InstanceId=instance_id).get("Output") or "")

    def console(self, name: str, *, follow: bool = False) -> Iterator[str]:
        """GetConsoleOutput (botocore decodes its base64); with *follow*, poll while the instance runs."""
        instance_id = str(self._instance(name)["InstanceId"])
        return self._console(instance_id, name, follow)

    def _console(self, instance_id: str, name: str, follow: bool) -> Iterator[str]:
        seen = self._console_output(instance_id, name)
        if seen:
            yield seen
        while follow:
            if self._refresh(instance_id)["State"]["Name"] not in ("pending", "running"):
                return
            time.sleep(self.console_poll_interval)
            latest = self._console_output(instance_id, name)
            if latest == seen:
                continue
            # EC2 keeps the last 64 KiB: yield what follows the longest end of the old text it still starts with.
            overlap = next((n for n in range(min(len(seen), len(latest)), 0, -1)
                            if latest.startswith(seen[-n:])), 0)
            new = latest[overlap:]
            seen = latest
            if new:
                yield new

    # ------------------------------------------------------------ images

    def import_image(self, disk: Path, description: str = "", *, architecture: str = "x86_64",
                     firmware: Firmware = Firmware.BIOS, timeout: float = 3600.0,
                     progress: Callable[[int, int], None] | None = None) -> str:
        """Write *disk* into an EBS snapshot (:meth:`ex_upload_snapshot`) and ``RegisterImage`` it as an AMI
        booting from it; returns the AMI id."""
        disk = Path(disk)
        snapshot_id = self.ex_upload_snapshot(disk, description, timeout=timeout, progress=progress)
        name = f"polyvisor-{disk.stem}-{uuid.uuid4().hex[:12]}"
        with self._calls(None, "RegisterImage"):
            return str(self.ec2.register_image(
                Name=name, Description=description or f"imported by polyvisor from {disk.name}",
                Architecture=architecture, VirtualizationType="hvm", RootDeviceName="/dev/xvda",
                BootMode="uefi" if firmware == Firmware.UEFI else "legacy-bios",
                BlockDeviceMappings=[{"DeviceName": "/dev/xvda",
                                      "Ebs": {"SnapshotId": snapshot_id, "DeleteOnTermination": True}}],
            )["ImageId"])

    def ex_upload_snapshot(self, disk: Path, description: str = "", *, timeout: float = 3600.0,
                           progress: Callable[[int, int], None] | None = None) -> str:
        """A new EBS snapshot holding *disk*'s guest-visible contents (any format polyvisor reads); returns
        its id.  The snapshot is tagged ``polyvisor:source`` with the file name."""
        disk = Path(disk)
        try:
            with open_image(disk) as image:
                return self._upload_snapshot(image, image.virtual_size, description=description or disk.name,
                                             source=disk.name, timeout=timeout, progress=progress)
        except PolyvisorError as exc:
            if isinstance(exc, HypervisorError):
                raise
            raise UsageError(f"{disk}: {exc}") from None

    def _upload_snapshot(self, image: Any, size: int, *, description: str, source: str, timeout: float,
                         progress: Callable[[int, int], None] | None) -> str:
        """StartSnapshot, PutSnapshotBlock per non-zero block, CompleteSnapshot; wait for "completed"."""
        volume_gib = max(1, math.ceil(size / GiB))
        with self._calls(None, "StartSnapshot"):
            started = self.ebs.start_snapshot(VolumeSize=volume_gib, Description=description[:255],
                                              ClientToken=str(uuid.uuid4()), Timeout=60,
                                              Tags=[{"Key": "polyvisor:source", "Value": source}])
        snapshot_id = str(started["SnapshotId"])
        # Blocks are 512 KiB (EBS direct APIs, PutSnapshotBlock); StartSnapshot's BlockSize says so in bytes on
        # AWS, in KiB on moto: the documented constant is used.
        block_size = EBS_BLOCK
        changed = 0
        with self._calls(None, f"uploading to EBS snapshot {snapshot_id}"):
            for index in range(math.ceil(size / block_size)):
                offset = index * block_size
                data = image.read(offset, min(block_size, size - offset))
                if progress is not None:
                    progress(offset + len(data), size)
                if is_zero(data):
                    continue  # an EBS snapshot reads never-written blocks as zeros
                data = data.ljust(block_size, b"\0")
                checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
                self.ebs.put_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockData=data,
                                            DataLength=len(data), Checksum=checksum, ChecksumAlgorithm="SHA256")
                changed += 1
            self.ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=changed)
        deadline = time.monotonic() + timeout
        while True:
            with self._calls(None, "DescribeSnapshots"):
                state = self.ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["State"]
            if state == "completed":
                return snapshot_id
            if state == "error":
                raise HypervisorError(NAME, f"EBS snapshot {snapshot_id} failed")
            if time.monotonic() > deadline:
                raise OperationTimeout(NAME, f"EBS snapshot {snapshot_id} still {state} after {timeout:g} s")
            time.sleep(self.poll_interval)

    def ex_vm_import(self, disk: Path, description: str = "", *, bucket: str | None = None,
                     architecture: str = "x86_64", firmware: Firmware = Firmware.BIOS) -> str:
        """VM Import/Export: upload *disk* to S3 and request ``ImportImage``; returns the import task id.

        The image is uploaded as it is when ImportImage takes its format (streamOptimized VMDK, VHD,
        VHDX, raw), else converted to a streamOptimized VMDK first.  The bucket is the URI's
        ``bucket`` (created if missing); AWS also needs the ``vmimport`` service role.
        """
        disk = Path(disk)
        bucket = bucket or self.endpoint.bucket
        if not bucket:
            raise UsageError("VM Import needs an S3 bucket: ec2://REGION?bucket=NAME")
        with open_image(disk) as image:
            key = (image.format_name, image.subformat if image.format_name == "vmdk" else None)
        with tempfile.TemporaryDirectory(prefix="polyvisor-vm-import-") as tmp:
            upload = disk
            fmt = VM_IMPORT_FORMATS.get(key)
            if fmt is None:
                upload = Path(tmp) / f"{disk.stem}.vmdk"
                convert(disk, upload, "vmdk", CreateOptions(subformat="streamOptimized"))
                fmt = "VMDK"
            object_key = f"polyvisor-import/{uuid.uuid4().hex}/{upload.name}"
            with self._calls(None, f"uploading to s3://{bucket}"):
                self._ensure_bucket(bucket)
                self.s3.upload_file(str(upload), bucket, object_key)
        with self._calls(None, "ImportImage"):
            response = self.ec2.import_image(
                Description=description or f"imported by polyvisor from {disk.name}",
                Architecture=architecture, BootMode="uefi" if firmware == Firmware.UEFI else "legacy-bios",
                DiskContainers=[{"Description": disk.name, "Format": fmt,
                                 "UserBucket": {"S3Bucket": bucket, "S3Key": object_key}}])
        return str(response["ImportTaskId"])

    def _ensure_bucket(self, bucket: str) -> None:
        try:
            self.s3.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError:
            location = {} if self.endpoint.region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": self.endpoint.region}}
            self.s3.create_bucket(Bucket=bucket, **location)

    def ex_import_status(self, task_id: str) -> dict[str, Any]:
        """DescribeImportImageTasks for one task: status, progress, message and (once done) the AMI id."""
        with self._calls(None, "DescribeImportImageTasks"):
            tasks = self.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"]
        if not tasks:
            raise HypervisorError(NAME, f"no import task {task_id}")
        task = tasks[0]
        return {"status": task.get("Status"), "progress": task.get("Progress"),
                "message": task.get("StatusMessage"), "image_id": task.get("ImageId")}

