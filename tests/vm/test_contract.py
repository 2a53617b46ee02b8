"""The codec contract, over every registered codec: read(write(model)) == model, except declared lossy fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyvisor.vm.codecs import drop_fields, read_package, registered_codecs, write_package
from polyvisor.vm.mapping import TARGETS
from tests.vm.helpers import CORPUS, adapt, placeholder_disks, validate_libvirt, validate_ovf

CODECS = [name for name, codec in registered_codecs().items() if codec.can_read and codec.can_write]


@pytest.mark.parametrize("model_name", sorted(CORPUS))
@pytest.mark.parametrize("codec_name", CODECS)
def test_round_trip(codec_name: str, model_name: str, tmp_path: Path) -> None:
    codec = registered_codecs()[codec_name]
    model = adapt(CORPUS[model_name], codec)
    files = placeholder_disks(model, tmp_path / "src")
    written = write_package(model, codec_name, tmp_path / "out", files)
    assert written
    assert all(p.exists() for p in written)
    assert not list((tmp_path / "out").rglob("*.part")), "temporary files left behind"
    descriptor = next(p for p in written if p.suffix in codec.suffixes)
    if codec_name == "libvirt":
        validate_libvirt(descriptor)
    if codec_name == "ovf":
        validate_ovf(descriptor)
    package = read_package(descriptor)
    assert package.codec == codec_name
    expected = drop_fields(model, codec.lossy)
    actual = drop_fields(package.model, codec.lossy)
    assert actual == expected, f"{codec_name} lost more than its declared lossy fields {sorted(codec.lossy)}"
    assert set(package.disks) == {d.path for d in expected.disks if d.path}


@pytest.mark.parametrize("codec_name", CODECS)
def test_extract_copies_images(codec_name: str, tmp_path: Path) -> None:
    codec = registered_codecs()[codec_name]
    model = adapt(CORPUS["linux-bios-lsilogic"], codec)
    files = placeholder_disks(model, tmp_path / "src")
    written = write_package(model, codec_name, tmp_path / "out", files)
    descriptor = next(p for p in written if p.suffix in codec.suffixes)
    package = read_package(descriptor)
    extracted = package.extract(tmp_path / "extracted")
    for name, path in extracted.items():
        assert path.read_bytes() == files[name].read_bytes()


def test_every_codec_declares_itself() -> None:
    for name, codec in registered_codecs().items():
        assert codec.name == name
        assert codec.description
        assert codec.suffixes
        assert codec.disk_formats
        assert codec.target in TARGETS
