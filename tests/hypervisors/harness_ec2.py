"""moto in server mode on loopback, for the ec2 driver's tests.

One ``moto.server.ThreadedMotoServer`` (EC2, EBS direct APIs and S3 on one port) serves a whole
test process: started on first use on 127.0.0.1 with a free port, stopped at exit.  Fake
credentials are put in the environment first, and shared AWS config files are ignored, so no
test can reach a real account.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from moto.server import ThreadedMotoServer

from polyvisor.errors import HypervisorError
from polyvisor.hypervisors.ec2 import Ec2Driver
from polyvisor.vm.model import Cpu, MiB, VmModel
from tests.hypervisors.harness import Harness, harness

REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",  # moto accepts anything
    "AWS_SESSION_TOKEN": "testing",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}

_lock = threading.Lock()
_endpoint: str | None = None


def moto_endpoint() -> str:
    """http://127.0.0.1:PORT of the process's moto server (started on first use, stopped at exit)."""
    global _endpoint  # noqa: PLW0603 - one server per test process
    with _lock:
        if _endpoint is None:
            for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
                os.environ.pop(variable, None)
            os.environ.update(FAKE_CREDENTIALS)
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            atexit.register(server.stop)
            host, port = server.get_host_and_port()
            _endpoint = f"http://{host}:{port}"
        return _endpoint


def ec2_uri(**parameters: str) -> str:
    """An ec2:// URI for the moto server."""
    query = "&".join(f"{k}={v}" for k, v in {"endpoint": moto_endpoint(), **parameters}.items())
    return f"ec2://{REGION}?{query}"


def x86_64_ami(driver: Ec2Driver) -> str:
    """An x86_64 AMI from moto's catalogue of public images."""
    images = driver.ec2.describe_images(Filters=[{"Name": "architecture", "Values": ["x86_64"]}])["Images"]
    return str(sorted(i["ImageId"] for i in images)[0])


def guest_model(name: str, image_id: str) -> VmModel:
    """Two vCPUs and 1 GiB (t3.micro), booting *image_id*."""
    return VmModel(name=name, memory=1024 * MiB, cpu=Cpu(sockets=1, cores=2)).with_vendor(
        "ec2", {"image_id": image_id})


def remove_instance(driver: Ec2Driver, name: str) -> None:
    """Terminate *name* whatever its state."""
    with contextlib.suppress(HypervisorError):
        instance = driver._instance(name)
        driver.ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])


@contextlib.contextmanager
def ec2_driver(**parameters: str) -> Iterator[tuple[Ec2Driver, list[str]]]:
    """A connection to moto; instances recorded in the list are terminated afterwards."""
    defined: list[str] = []
    with Ec2Driver.connect(ec2_uri(**parameters)) as driver:
        driver.poll_interval = 0.05
        try:
            yield driver, defined
        finally:
            for name in defined:
                remove_instance(driver, name)


@harness("ec2")
@contextlib.contextmanager
def ec2_harness(tmp_path: Path) -> Iterator[Harness]:
    """moto's EC2."""
    with ec2_driver() as (driver, defined):
        image_id = x86_64_ami(driver)

        def make_vm(name: str) -> tuple[VmModel, dict[str, Path]]:
            defined.append(name)
            return guest_model(name, image_id), {}

        yield Harness(driver=driver, make_vm=make_vm, state_timeout=30.0)
