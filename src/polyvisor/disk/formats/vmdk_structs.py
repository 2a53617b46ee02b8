"""VMDK on-disk structures and the text descriptor (VMware "Virtual Disk Format 5.0").

Section names refer to the VMware technical note *Virtual Disk Format 5.0*
("VDF"): "The Descriptor File", "Hosted Sparse Extents" and "Stream-Optimized
Compressed Sparse Extents".  Behaviour that the note leaves open follows
qemu's ``block/vmdk.c`` (the reference peer of the tests).
"""

from __future__ import annotations

import codecs
import re
import secrets
from pathlib import Path

from polyvisor.disk.structs import Layout
from polyvisor.errors import CorruptImage, LimitExceeded, UnsupportedFeature
from polyvisor.records import field, record

SECTOR = 512

#: "KDMV": the magic of a hosted sparse extent (VDF "Hosted Sparse Extents").
SPARSE_MAGIC = b"KDMV"
#: "COWD": the magic of an ESX Server sparse extent (VDF "ESXi Host Sparse Extents"), not supported.
COWD_MAGIC = b"COWD"

# SparseExtentHeader.flags (VDF "Hosted Sparse Extent Header").  The low 16 bits are
# compatible features a reader may ignore, the high 16 bits incompatible ones.
FLAG_VALID_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT_GD = 1 << 1
FLAG_ZEROED_GRAIN_GTE = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
KNOWN_INCOMPATIBLE_FLAGS = FLAG_COMPRESSED | FLAG_MARKERS
INCOMPATIBLE_FLAGS_MASK = 0xFFFF0000

COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1

#: gdOffset of a stream-optimized header whose grain directory is found through the footer.
GD_AT_END = 0xFFFFFFFFFFFFFFFF
#: A grain table entry meaning "this grain reads as zeros" (VDF 5.0, version 2 extents with flag bit 2).
GTE_ZEROED = 1
#: singleEndLineChar, nonEndLineChar, doubleEndLineChar1/2: detect text-mode transfer damage.
NEWLINE_CHECK = b"\n \r\n"

# Metadata marker types of stream-optimized extents (VDF "Stream-Optimized ... Markers").
MARKER_EOS = 0
MARKER_GRAIN_TABLE = 1
MARKER_GRAIN_DIRECTORY = 2
MARKER_FOOTER = 3

#: Descriptors longer than this are refused (qemu reads at most 1 MiB - 1 of one).
MAX_DESCRIPTOR_BYTES = 1 << 20
#: Extent lines polyvisor follows in one descriptor (a 32 TiB twoGbMaxExtent disk has 16 384).
MAX_EXTENTS = 16384

ADAPTER_TYPES = ("ide", "lsilogic", "buslogic", "legacyESX")
ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
EXTENT_TYPES = ("FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE")
NO_PARENT_CID = 0xFFFFFFFF
UTF8_BOM = b"\xef\xbb\xbf"


@record(slots=True)
class SparseHeader:
    """SparseExtentHeader: sector 0 of a hosted sparse extent (VDF "Hosted Sparse Extent Header").

    Sizes and offsets are in sectors; ``overhead`` is where grains may start.
    """

    magic: bytes
    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: int
    newline_check: bytes
    compress_algorithm: int
    pad: bytes


SPARSE_HEADER = Layout(SparseHeader, "<4sIIQQQQIQQQB4sH433s", "VMDK sparse extent header")


@record(slots=True)
class GrainMarker:
    """The 12 bytes before a compressed grain: its first sector in the extent and the deflate size."""

    lba: int
    size: int


GRAIN_MARKER = Layout(GrainMarker, "<QI", "VMDK grain marker")


@record(slots=True)
class MetadataMarker:
    """A sector announcing stream metadata: a grain table, the grain directory, the footer or the end."""

    num_sectors: int
    size: int
    type: int
    pad: bytes


METADATA_MARKER = Layout(MetadataMarker, "<QII496s", "VMDK metadata marker")


def metadata_marker(kind: int, num_sectors: int) -> bytes:
    """One marker sector of *kind* announcing *num_sectors* of metadata."""
    return METADATA_MARKER.pack(MetadataMarker(num_sectors, 0, kind, bytes(496)))


# ---------------------------------------------------------------- descriptor


@record
class ExtentLine:
    """One extent description line: ``ACCESS SECTORS TYPE ["FILE" [OFFSET]]`` (VDF "Extent Descriptions")."""

    access: str
    sectors: int
    type: str
    filename: str | None = None
    offset: int = 0
    extra: str = ""

    def render(self) -> str:
        """The line as written in a descriptor."""
        text = f"{self.access} {self.sectors} {self.type}"
        if self.filename is not None:
            text += f' "{self.filename}"'
            if self.type in ("FLAT", "VMFS") and (self.offset or self.type == "FLAT"):
                text += f" {self.offset}"
        if self.extra:
            text += f" {self.extra}"
        return text


@record
class Descriptor:
    """The text descriptor: header keys, extent lines and the disk database (VDF "The Descriptor File")."""

    version: int = 1
    encoding: str = "UTF-8"
    cid: int = NO_PARENT_CID
    parent_cid: int = NO_PARENT_CID
    create_type: str = "monolithicSparse"
    parent_hint: str | None = None
    #: Every ``key=value`` line outside the disk database, in order, values unquoted.
    header: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)
    #: Every ``ddb.*`` key, in order, values unquoted (unknown keys kept).
    ddb: dict[str, str] = field(default_factory=dict)

    @property
    def adapter_type(self) -> str | None:
        """``ddb.adapterType``."""
        return self.ddb.get("ddb.adapterType")

    def render(self) -> str:
        """The descriptor text, in the order VMware products write it."""
        lines = ["# Disk DescriptorFile", f"version={self.version}", f'encoding="{self.encoding}"',
                 f"CID={self.cid:08x}", f"parentCID={self.parent_cid:08x}"]
        written = {"version", "encoding", "CID", "parentCID", "createType", "parentFileNameHint"}
        for key, value in self.header.items():
            if key not in written:
                lines.append(f'{key}="{value}"')
        lines.append(f'createType="{self.create_type}"')
        if self.parent_hint is not None:
            lines.append(f'parentFileNameHint="{self.parent_hint}"')
        lines += ["", "# Extent description", *(e.render() for e in self.extents), "",
                  "# The Disk Data Base", "#DDB", ""]
        lines += [f'{key} = "{value}"' for key, value in self.ddb.items()]
        return "\n".join(lines) + "\n"

    def encode(self) -> bytes:
        """The rendered text in the descriptor's encoding."""
        return self.render().encode(python_codec(self.encoding))


_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*(.*)$'
)
_KEY_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_.:-]*)\s*=\s*(.*)$")
_ENCODING_RE = re.compile(rb'^\s*encoding\s*=\s*"?([A-Za-z0-9_.:-]+)"?\s*$', re.MULTILINE)


def python_codec(encoding: str) -> str:
    """The Python codec for a descriptor ``encoding`` (VMware writes e.g. UTF-8, windows-1252, GBK).

    Unknown names fall back to UTF-8; :func:`parse_descriptor` refuses them first.
    """
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        return "utf-8"


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _hex32(path: Path, key: str, value: str) -> int:
    try:
        number = int(value, 16)
    except ValueError:
        raise CorruptImage(path, f"{key}={value!r} is not a hexadecimal content ID",
                           structure="VMDK descriptor") from None
    if not 0 <= number <= 0xFFFFFFFF:
        raise CorruptImage(path, f"{key}={value!r} does not fit in 32 bits", structure="VMDK descriptor")
    return number


def parse_descriptor(raw: bytes, path: Path) -> Descriptor:
    """Parse descriptor text (an embedded one is cut at its first NUL).

    Lines that are neither comments, ``key=value`` pairs nor extent lines are
    ignored, as VMware products do; missing CIDs or createType are errors.
    """
    if len(raw) > MAX_DESCRIPTOR_BYTES:
        raise LimitExceeded(path, f"descriptor of {len(raw)} bytes is longer than {MAX_DESCRIPTOR_BYTES}",
                            structure="VMDK descriptor")
    raw = raw.split(b"\x00", 1)[0].removeprefix(UTF8_BOM)
    match = _ENCODING_RE.search(raw)
    encoding = match.group(1).decode("ascii") if match else "UTF-8"
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise UnsupportedFeature(path, f"unknown descriptor encoding {encoding!r}",
                                 structure="VMDK descriptor") from None
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise CorruptImage(path, f"descriptor is not valid {encoding}: {exc.reason}",
                           structure="VMDK descriptor", offset=exc.start) from None
    desc = Descriptor(encoding=encoding)
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        extent = _EXTENT_RE.match(line)
        if extent:
            if len(desc.extents) >= MAX_EXTENTS:
                raise LimitExceeded(path, f"descriptor lists more than {MAX_EXTENTS} extents",
                                    structure="VMDK descriptor")
            access, sectors, kind, filename, offset, extra = extent.groups()
            kind = kind.upper()
            if kind not in EXTENT_TYPES:
                raise UnsupportedFeature(path, f"line {number}: unknown extent type {kind!r}",
                                         structure="VMDK descriptor")
            if kind != "ZERO" and filename is None:
                raise CorruptImage(path, f"line {number}: {kind} extent without a file name",
                                   structure="VMDK descriptor")
            desc.extents.append(ExtentLine(access, int(sectors), kind, filename,
                                           int(offset) if offset else 0, extra.strip()))
            continue
        pair = _KEY_RE.match(line)
        if not pair:
            continue
        key, value = pair.group(1), _unquote(pair.group(2))
        if key.startswith("ddb."):
            desc.ddb[key] = value
            continue
        desc.header[key] = value
        seen.add(key)
        if key == "version":
            if value not in ("1", "2", "3"):
                raise UnsupportedFeature(path, f"descriptor version {value!r} (known: 1, 2, 3)",
                                         structure="VMDK descriptor")
            desc.version = int(value)
        elif key == "CID":
            desc.cid = _hex32(path, key, value)
        elif key == "parentCID":
            desc.parent_cid = _hex32(path, key, value)
        elif key == "createType":
            desc.create_type = value
        elif key == "parentFileNameHint":
            desc.parent_hint = value
    for required in ("version", "CID", "parentCID", "createType"):
        if required not in seen:
            raise CorruptImage(path, f"descriptor has no {required} line", structure="VMDK descriptor")
    return desc


def looks_like_descriptor(head: bytes) -> bool:
    """Whether a file starts like a text descriptor: comments or blanks, then ``version=N``, and a createType."""
    for line in head[:4096].removeprefix(UTF8_BOM).split(b"\n"):
        stripped = line.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        return re.match(rb"^version\s*=\s*[123]$", stripped) is not None and b"createType" in head
    return False


def new_cid() -> int:
    """A random content ID (never the "no parent" value)."""
    while True:
        cid = secrets.randbits(32)
        if cid not in (NO_PARENT_CID, 0):
            return cid


def geometry(size: int, adapter_type: str) -> tuple[int, int, int]:
    """(cylinders, heads, sectors) as VMware computes them: 16 heads for IDE, 255 for SCSI, 63 sectors.

    IDE geometry is capped at 16 383 cylinders, the ATA CHS limit.
    """
    heads = 16 if adapter_type == "ide" else 255
    cylinders = size // (heads * 63 * SECTOR)
    if adapter_type == "ide":
        cylinders = min(cylinders, 16383)
    return max(cylinders, 1), heads, 63


def new_ddb(size: int, adapter_type: str, cid: int) -> dict[str, str]:
    """The disk database polyvisor writes: what ESXi and OVF importers expect to find."""
    cylinders, heads, sectors = geometry(size, adapter_type)
    uuid = secrets.token_bytes(16)
    long_cid = secrets.token_hex(12) + f"{cid:08x}"
    return {
        "ddb.adapterType": adapter_type,
        "ddb.geometry.cylinders": str(cylinders),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": str(sectors),
        "ddb.longContentID": long_cid,
        "ddb.toolsInstallType": "4",
        "ddb.toolsVersion": "2147483647",
        "ddb.uuid": " ".join(f"{b:02x}" for b in uuid[:8]) + "-" + " ".join(f"{b:02x}" for b in uuid[8:]),
        "ddb.virtualHWVersion": "4",
    }


def with_new_cid(text: str, cid: int) -> str:
    """Descriptor *text* with its CID (and the low 32 bits of ddb.longContentID) replaced.

    Done textually so that lines polyvisor does not model stay byte-for-byte.
    """
    text = re.sub(r"(?m)^(\s*CID\s*=\s*)[0-9A-Fa-f]+", lambda m: f"{m.group(1)}{cid:08x}", text, count=1)
    return re.sub(r'(?m)^(\s*ddb\.longContentID\s*=\s*"[0-9A-Fa-f]*?)[0-9A-Fa-f]{8}"',
                  lambda m: f'{m.group(1)}{cid:08x}"', text, count=1)
