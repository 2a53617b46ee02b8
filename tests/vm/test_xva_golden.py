"""An XCP-ng-shaped XVA: its ova.xml (golden_xva/, written from xapi's export format) packed with chunks of a
4 MiB disk whose zero chunks are left out, read into the expected model; and read back after polyvisor writes it."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from polyvisor.vm.codecs import drop_fields, get_codec, read_package, write_package

GOLDEN = Path(__file__).parent / "golden_xva"
REGENERATE = os.environ.get("POLYVISOR_REGENERATE_GOLDEN") == "1"
MiB = 1 << 20


def _pack(path: Path, ova_xml: bytes, chunks: dict[int, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("ova.xml", ova_xml)] + [
                (f"Ref:4/{n:08d}{suffix}", body) for n, chunk in sorted(chunks.items())
                for suffix, body in (("", chunk), (".checksum", hashlib.sha1(chunk, usedforsecurity=False)
                                                   .hexdigest().encode()))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_xcpng_export_reads_and_round_trips(tmp_path: Path) -> None:
    source = GOLDEN / "xcpng82-debian12-uefi.ova.xml"
    first, last = b"\xeb\x63" + b"\x00" * (MiB - 2), b"end".ljust(MiB, b"\x00")
    archive = tmp_path / "debian12-web.xva"
    _pack(archive, source.read_bytes(), {0: first, 3: last})
    package = read_package(archive)
    expected = source.with_name(source.name + ".expected.json")
    if REGENERATE or not expected.exists():
        assert REGENERATE, f"{expected} is missing; run with POLYVISOR_REGENERATE_GOLDEN=1"
        expected.write_text(package.model.to_json(), encoding="utf-8")
    assert package.model.to_json() == expected.read_text(encoding="utf-8")
    disk = package.extract(tmp_path / "out")["debian12-web-root"]
    assert disk.read_bytes() == first + bytes(2 * MiB) + last
    written = write_package(package.model, "xva", tmp_path / "again", {"debian12-web-root": disk})
    again = read_package(written[0])
    lossy = get_codec("xva").lossy
    assert drop_fields(again.model, lossy) == drop_fields(package.model, lossy)
    with tarfile.open(written[0]) as tar:
        names = tar.getnames()
    assert names[0] == "ova.xml"
    assert [n for n in names if not n.endswith(".checksum")][1:] == ["Ref:3/00000000", "Ref:3/00000003"]
