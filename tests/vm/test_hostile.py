"""Hostile packages are refused with a clear PolyvisorError, and reading them writes nothing."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from polyvisor.errors import DescriptorTooLarge, ManifestMismatch, PackageError, UnsafePackage
from polyvisor.vm.codecs import get_codec, read_package, write_package
from tests.vm.helpers import CORPUS, adapt, placeholder_disks

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<domain type="kvm"><name>&x;</name><memory>1024</memory><os><type>hvm</type></os></domain>
"""
LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<domain type="kvm"><name>&lol3;</name></domain>
"""


def _listing(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.mark.parametrize(("name", "data"), [("xxe.xml", XXE), ("laughs.xml", LAUGHS)])
def test_entity_tricks_refused(name: str, data: bytes, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    before = _listing(tmp_path)
    with pytest.raises(UnsafePackage, match="DOCTYPE"):
        read_package(path, "libvirt")
    assert _listing(tmp_path) == before


def test_oversized_descriptor_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.ovf"
    with open(path, "wb") as handle:
        handle.truncate(16 * 1024 * 1024 + 1)
    with pytest.raises(DescriptorTooLarge, match="larger than"):
        read_package(path, "ovf")


def test_libvirt_disk_outside_package_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.xml"
    path.write_text('<domain type="kvm"><name>x</name><memory>1048576</memory><os><type>hvm</type></os>'
                    '<devices><disk type="file" device="disk"><source file="/etc/passwd"/>'
                    '<target dev="vda" bus="virtio"/></disk></devices></domain>')
    with pytest.raises(UnsafePackage, match="outside the package directory"):
        read_package(path)


def test_vmx_disk_outside_package_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.vmx"
    path.write_text('config.version = "8"\ndisplayName = "x"\nmemsize = "1024"\nscsi0.present = "TRUE"\n'
                    'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "../outside.vmdk"\n')
    with pytest.raises(UnsafePackage, match=r"\.\."):
        read_package(path)


def _ova(tmp_path: Path) -> tuple[Path, list[tuple[tarfile.TarInfo, bytes]]]:
    """A valid OVA written by polyvisor, and its members."""
    codec = get_codec("ova")
    model = adapt(CORPUS["linux-bios-lsilogic"], codec)
    written = write_package(model, "ova", tmp_path / "good", placeholder_disks(model, tmp_path / "src"))
    members = []
    with tarfile.open(written[0]) as tar:
        for member in tar:
            handle = tar.extractfile(member)
            assert handle is not None
            members.append((member, handle.read()))
    return written[0], members


def _rewrite(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _evil(tmp_path: Path, change: str) -> Path:
    _, members = _ova(tmp_path)
    if change == "dotdot":
        members[2][0].name = "../" + members[2][0].name
    elif change == "absolute":
        members[2][0].name = "/tmp/" + members[2][0].name
    elif change in ("symlink", "hardlink", "device"):
        info = tarfile.TarInfo("link")
        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[change]
        info.linkname = "/etc/passwd"
        members.append((info, b""))
    elif change == "digest":
        info, data = members[2]
        members[2] = (info, b"X" + data[1:])
    elif change == "missing-entry":
        info, data = members[1]
        lines = data.decode().splitlines(keepends=True)
        new = "".join(lines[:-1]).encode()
        info.size = len(new)
        members[1] = (info, new)
    return _rewrite(tmp_path / f"{change}.ova", members)


@pytest.mark.parametrize(("change", "error", "message"), [
    ("dotdot", UnsafePackage, r"contains '\.\.'"),
    ("absolute", UnsafePackage, "absolute"),
    ("symlink", UnsafePackage, "symbolic link"),
    ("hardlink", UnsafePackage, "hard link"),
    ("device", UnsafePackage, "device"),
    ("digest", ManifestMismatch, "does not match"),
    ("missing-entry", ManifestMismatch, "no entry"),
])
def test_hostile_ova_refused(change: str, error: type[Exception], message: str, tmp_path: Path) -> None:
    path = _evil(tmp_path, change)
    before = _listing(tmp_path)
    with pytest.raises(error, match=message) as caught:
        read_package(path, "ova")
    assert str(path) in str(caught.value), "the error names the file"
    assert _listing(tmp_path) == before, "reading a hostile OVA wrote something"


def test_ovf_href_outside_refused(tmp_path: Path) -> None:
    source = Path(__file__).parent / "golden" / "ovf" / "ovftool-rhel9-efi.ovf"
    path = tmp_path / "x.ovf"
    path.write_text(source.read_text().replace('ovf:href="web01-disk2.vmdk"', 'ovf:href="../../etc/shadow"'))
    with pytest.raises(UnsafePackage, match=r"\.\."):
        read_package(path)


def test_good_ova_reads_and_verifies(tmp_path: Path) -> None:
    path, members = _ova(tmp_path)
    assert members[0][0].name.endswith(".ovf")
    assert members[1][0].name.endswith(".mf")
    manifest = members[1][1].decode()
    assert f"SHA256({members[0][0].name})= {hashlib.sha256(members[0][1]).hexdigest()}" in manifest
    package = read_package(path)
    assert package.codec == "ova"
    assert all(src.digest for src in package.disks.values())


def test_not_a_package(tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(PackageError):
        read_package(path, "libvirt")
