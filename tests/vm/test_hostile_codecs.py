"""Hostile packages for the xl, vbox, proxmox, XVA, Hyper-V and EC2 codecs: refused clearly, nothing written."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from polyvisor.errors import DescriptorTooLarge, ManifestMismatch, PackageError, UnsafePackage
from polyvisor.vm.codecs import ReadOptions, get_codec, read_package, write_package
from polyvisor.vm.codecs.xva import CHUNK
from tests.vm.helpers import CORPUS, adapt
from tests.vm.test_hostile import LAUGHS, XXE

GOLDEN = Path(__file__).parent / "golden"


def _listing(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def refused(path: Path, codec: str, error: type[Exception], match: str,
            options: ReadOptions | None = None) -> None:
    """Reading *path* raises *error* naming the file, and writes nothing anywhere under its directory."""
    before = _listing(path.parent)
    with pytest.raises(error, match=match) as caught:
        read_package(path, codec, options)
    assert str(path.name) in str(caught.value), "the error names the file"
    assert _listing(path.parent) == before, "reading a hostile package wrote something"


def _entity(data: bytes, root: bytes) -> bytes:
    """The shared XXE / billion-laughs documents with another root element."""
    return data.replace(b"<domain", b"<" + root).replace(b"</domain>", b"</" + root + b">") \
        .replace(b"DOCTYPE domain", b"DOCTYPE " + root)


# ------------------------------------------------------------------ XML entity tricks


@pytest.mark.parametrize("kind", ["xxe", "laughs"])
@pytest.mark.parametrize(("codec", "root", "suffix"), [
    ("vbox", b"VirtualBox", ".vbox"), ("hyperv", b"configuration", ".xml"), ("xva", b"value", ".xva")])
def test_entity_tricks_refused(kind: str, codec: str, root: bytes, suffix: str, tmp_path: Path) -> None:
    document = _entity(XXE if kind == "xxe" else LAUGHS, root)
    path = tmp_path / f"evil{suffix}"
    if codec == "xva":
        _write_tar(path, [("ova.xml", document)])
    else:
        path.write_bytes(document)
    refused(path, codec, UnsafePackage, "DOCTYPE")


# ------------------------------------------------------------------ oversized descriptors


@pytest.mark.parametrize(("codec", "name"), [("xl", "big.cfg"), ("vbox", "big.vbox"), ("proxmox", "big.conf"),
                                             ("hyperv", "big.xml"), ("hyperv", "big.ps1"), ("ec2", "big.json"),
                                             ("xva", "big.xva")])
def test_oversized_descriptor_refused(codec: str, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    if codec == "xva":
        _write_tar(path, [("ova.xml", b"<value>" + b" " * 9000 + b"</value>")])
    else:
        path.write_bytes(b"#" * 9000)
    refused(path, codec, DescriptorTooLarge, "limit|larger than", ReadOptions(max_descriptor=8192))


# ------------------------------------------------------------------ disks outside the package


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / "pkg" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.img"])
def test_xl_disk_outside_refused(target: str, tmp_path: Path) -> None:
    path = _write(tmp_path, "vm.cfg", f'name = "x"\nmemory = 512\ndisk = [ "format=raw,vdev=xvda,target={target}" ]\n')
    refused(path, "xl", UnsafePackage, r"outside the package|\.\.")


def test_xl_is_parsed_not_evaluated(tmp_path: Path) -> None:
    path = _write(tmp_path, "vm.cfg", 'name = __import__("os").system("touch pwned")\nmemory = 512\n')
    refused(path, "xl", PackageError, "line 1")
    assert not (tmp_path / "pkg" / "pwned").exists()


@pytest.mark.parametrize("location", ["/etc/passwd", "../../outside.vdi"])
def test_vbox_location_outside_refused(location: str, tmp_path: Path) -> None:
    text = (GOLDEN / "vbox" / "virtualbox7-debian.vbox").read_text().replace('location="debian12.vdi"',
                                                                             f'location="{location}"')
    refused(_write(tmp_path, "vm.vbox", text), "vbox", UnsafePackage, r"outside the package|\.\.")


@pytest.mark.parametrize("volume", ["/etc/passwd", "local:../../etc/shadow"])
def test_proxmox_volume_outside_refused(volume: str, tmp_path: Path) -> None:
    path = _write(tmp_path, "100.conf", f"memory: 512\nname: x\nscsi0: {volume},size=1G\nscsihw: lsi\n")
    refused(path, "proxmox", UnsafePackage, r"outside the package|\.\.")


def test_hyperv_relative_pathname_outside_refused(tmp_path: Path) -> None:
    text = (GOLDEN / "hyperv" / "ws2012r2-app01.xml").read_bytes().decode("utf-16")
    text = text.replace("D:\\Hyper-V\\APP01\\Virtual Hard Disks\\APP01-system.vhdx", "..\\..\\etc\\shadow")
    path = tmp_path / "pkg" / "vm.xml"
    path.parent.mkdir()
    path.write_bytes(text.encode("utf-16"))
    refused(path, "hyperv", UnsafePackage, r"\.\.")


@pytest.mark.parametrize(("line", "match"), [
    ("Remove-Item -Path 'C:\\' -Recurse", "not one of the cmdlets"),
    ("Add-VMHardDiskDrive -VM $vm -ControllerType IDE -Path 'C:\\secret.vhdx'", "Join-Path"),
    ("Add-VMHardDiskDrive -VM $vm -Path (Join-Path $here '../../etc/shadow')", r"\.\."),
    ("Set-VM -VM $vm -Notes ('a' + (Invoke-Expression 'calc'))", "not a statement"),
    ("New-VM -Name 'x'; Invoke-WebRequest http://example.invalid", "not a statement"),
])
def test_hyperv_script_outside_its_grammar_refused(line: str, match: str, tmp_path: Path) -> None:
    path = _write(tmp_path, "vm.ps1", "$vm = New-VM -Name 'x' -Generation 1 -MemoryStartupBytes 536870912\n"
                                      f"{line}\n")
    refused(path, "hyperv", UnsafePackage, match)


def test_ec2_disk_key_outside_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "vm.json", '{"DiskContainers": [{"Format": "vmdk", "UserBucket": '
                                       '{"S3Bucket": "b", "S3Key": "exports/.."}}]}')
    refused(path, "ec2", UnsafePackage, "not a file name|contains")


# ------------------------------------------------------------------ XVA archives


def _write_tar(path: Path, members: list[tuple[str, bytes]], *, links: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def _good_xva(tmp_path: Path) -> tuple[Path, list[tuple[str, bytes]]]:
    codec_model = adapt(CORPUS["linux-bios-lsilogic"], get_codec("xva"))
    images: dict[str, Path] = {}
    (tmp_path / "src").mkdir()
    for disk in codec_model.disks:
        if disk.path:
            image = tmp_path / "src" / disk.path
            with open(image, "wb") as handle:
                handle.write(b"boot" * 128)
                handle.seek(3 * CHUNK + 5)
                handle.write(b"tail")
            images[disk.path] = image
    written = write_package(codec_model, "xva", tmp_path / "good", images)
    with tarfile.open(written[0]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]  # type: ignore[union-attr]
    return written[0], members


def test_xva_round_trip_skips_zero_chunks_and_extracts_sparse(tmp_path: Path) -> None:
    path, members = _good_xva(tmp_path)
    names = [n for n, _ in members]
    assert names[0] == "ova.xml"
    chunks = [n for n in names if n.endswith(("0", "3"))]
    assert "Ref:3/00000001" not in names, "a zero chunk was written"
    assert chunks
    assert all(n + ".checksum" in names for n in names if n != "ova.xml" and not n.endswith(".checksum"))
    package = read_package(path)
    out = package.extract(tmp_path / "extracted")
    for name, image in out.items():
        assert image.read_bytes() == (tmp_path / "src" / name).read_bytes()


def test_xva_xxhash_checksums_are_verified(tmp_path: Path) -> None:
    import xxhash
    _, members = _good_xva(tmp_path)
    rewritten: list[tuple[str, bytes]] = []
    for name, data in members:
        if name.endswith(".checksum"):
            chunk = dict(members)[name[:-len(".checksum")]]
            rewritten.append((name[:-len(".checksum")] + ".xxhash", f"{xxhash.xxh64_intdigest(chunk):016X}".encode()))
        else:
            rewritten.append((name, data))
    path = _write_tar(tmp_path / "xx.xva", rewritten)
    assert read_package(path).model.name == "web01"
    bad = [(n, b"0" * 16) if n.endswith(".xxhash") else (n, d) for n, d in rewritten]
    (tmp_path / "bad").mkdir()
    refused(_write_tar(tmp_path / "bad" / "xx.xva", bad), "xva", ManifestMismatch, "xxh64 checksum")


WRONG_SHA1 = hashlib.sha1(b"other", usedforsecurity=False).hexdigest().encode()
EVIL: dict[str, Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]] = {
    "dotdot": lambda m: [*m, ("../evil", b"x")],
    "absolute": lambda m: [*m, ("/tmp/evil", b"x")],
    "unknown-member": lambda m: [*m, ("README", b"x")],
    "checksum": lambda m: [(n, WRONG_SHA1) if n.endswith("00000000.checksum") else (n, d) for n, d in m],
    "chunk-without-checksum": lambda m: [(n, d) for n, d in m if not n.endswith("00000000.checksum")],
    "out-of-order": lambda m: [m[0], *reversed(m[1:])],
}


@pytest.mark.parametrize(("change", "error", "match"), [
    ("dotdot", UnsafePackage, r"contains '\.\.'"),
    ("absolute", UnsafePackage, "absolute"),
    ("unknown-member", UnsafePackage, "neither ova.xml nor"),
    ("checksum", ManifestMismatch, "sha1 checksum"),
    ("chunk-without-checksum", PackageError, "no checksum"),
    ("out-of-order", PackageError, "first member|does not follow|out of order"),
])
def test_hostile_xva_refused(change: str, error: type[Exception], match: str, tmp_path: Path) -> None:
    _, members = _good_xva(tmp_path)
    (tmp_path / "evil").mkdir()
    path = _write_tar(tmp_path / "evil" / f"{change}.xva", EVIL[change](members))
    refused(path, "xva", error, match)


@pytest.mark.parametrize(("kind", "match"), [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link")])
def test_xva_links_refused(kind: bytes, match: str, tmp_path: Path) -> None:
    _, members = _good_xva(tmp_path)
    (tmp_path / "evil").mkdir()
    path = _write_tar(tmp_path / "evil" / "link.xva", members, links={"Ref:9/00000000": kind})
    refused(path, "xva", UnsafePackage, match)
