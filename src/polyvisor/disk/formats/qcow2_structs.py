"""qcow2 on-disk structures, limits and codecs (qemu ``docs/interop/qcow2.txt``).

Everything here is pure data: the header, header extensions, table-entry
bit layouts, refcount-block encodings and the compressed-cluster codecs.
:mod:`polyvisor.disk.formats.qcow2` builds the image on top of it.
"""

from __future__ import annotations

import struct
import sys
import threading
import zlib
from array import array
from typing import TYPE_CHECKING

from polyvisor.disk.structs import Layout
from polyvisor.records import field, record

if TYPE_CHECKING:
    import zstandard

#: "QFI\xfb" (spec "Header", bytes 0-3).
MAGIC = b"QFI\xfb"
MIN_CLUSTER_BITS = 9
#: qemu refuses clusters above 2 MiB ("Header", cluster_bits note).
MAX_CLUSTER_BITS = 21
#: Extended L2 entries need 16 KiB clusters at least ("Header", cluster_bits note).
MIN_EXTENDED_L2_CLUSTER_BITS = 14
DEFAULT_CLUSTER_SIZE = 64 << 10

#: qemu's implementation limits (block/qcow2.h).
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA_DATA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_SNAPSHOT_TABLE_BYTES = 1024 * MAX_SNAPSHOTS  # QCOW_MAX_SNAPSHOTS_SIZE
MAX_BACKING_FILE_NAME = 1023
MAX_BACKING_FORMAT_NAME = 15  # qemu keeps it in a char[16]
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
MAX_BITMAP_TABLE_ENTRIES = 0x8000000  # BME_MAX_TABLE_SIZE
#: Host offsets must fit in bits 9-55 of the table entries ("Cluster mapping").
MAX_HOST_OFFSET = 1 << 56

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
#: qemu writes version 3 headers up to and including the compression type byte, padded to 8.
V3_HEADER_LENGTH = 112

# Header feature bits ("Header", bytes 72-95).
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Header extension types ("Header extensions").
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Table entries ("Cluster mapping", "Host cluster management").
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
#: Bits of a standard cluster descriptor that must be zero (1-8 and 56-61).
L2E_STD_RESERVED = 0x3F00_0000_0000_01FE
#: Bits of an L1 entry that must be zero (0-8 and 56-62).
L1E_RESERVED = 0x7F00_0000_0000_01FF
SUBCLUSTERS = 32
SUBCLUSTER_ALL = 0xFFFF_FFFF

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}
COMPRESSION_TYPES = {name: value for value, name in COMPRESSION_NAMES.items()}

#: The feature name table qemu writes ("Feature name table"): (type, bit, name).
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


@record(slots=True)
class HeaderV2:
    """The 72 bytes every qcow2 header starts with ("Header", bytes 0-71)."""

    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int


HEADER_V2 = Layout(HeaderV2, ">4sIQIIQIIQQIIQ", "qcow2 header")


@record(slots=True)
class HeaderV3:
    """Version 3 header fields ("Header", bytes 72-103)."""

    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int


HEADER_V3 = Layout(HeaderV3, ">QQQII", "qcow2 version 3 header")


@record(slots=True)
class Header:
    """A whole qcow2 header, version 2 fields defaulted as the spec says."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Decode from the first bytes of the file (the caller checked the magic and the length)."""
        v2 = HEADER_V2.unpack(data)
        header = cls(
            version=v2.version,
            backing_file_offset=v2.backing_file_offset,
            backing_file_size=v2.backing_file_size,
            cluster_bits=v2.cluster_bits,
            size=v2.size,
            crypt_method=v2.crypt_method,
            l1_size=v2.l1_size,
            l1_table_offset=v2.l1_table_offset,
            refcount_table_offset=v2.refcount_table_offset,
            refcount_table_clusters=v2.refcount_table_clusters,
            nb_snapshots=v2.nb_snapshots,
            snapshots_offset=v2.snapshots_offset,
        )
        if header.version >= 3 and len(data) >= V3_MIN_HEADER_LENGTH:
            v3 = HEADER_V3.unpack(data, HEADER_V2.size)
            header.incompatible_features = v3.incompatible_features
            header.compatible_features = v3.compatible_features
            header.autoclear_features = v3.autoclear_features
            header.refcount_order = v3.refcount_order
            header.header_length = v3.header_length
            if header.header_length > V3_MIN_HEADER_LENGTH and len(data) > V3_MIN_HEADER_LENGTH:
                header.compression_type = data[V3_MIN_HEADER_LENGTH]
        return header

    def pack(self) -> bytes:
        """The fixed fields: 72 bytes for version 2; 104, plus the compression type byte, for version 3."""
        out = HEADER_V2.pack(HeaderV2(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size, self.cluster_bits,
            self.size, self.crypt_method, self.l1_size, self.l1_table_offset, self.refcount_table_offset,
            self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset,
        ))
        if self.version < 3:
            return out
        out += HEADER_V3.pack(HeaderV3(
            self.incompatible_features, self.compatible_features, self.autoclear_features,
            self.refcount_order, self.header_length,
        ))
        if self.header_length > V3_MIN_HEADER_LENGTH:
            out += bytes([self.compression_type])
        return out


#: A header extension's type and length ("Header extensions").
EXTENSION_HEADER = struct.Struct(">II")


@record(slots=True)
class BitmapsExtension:
    """The bitmaps extension ("Bitmaps extension")."""

    nb_bitmaps: int
    reserved: int
    directory_size: int
    directory_offset: int


BITMAPS_EXTENSION = Layout(BitmapsExtension, ">IIQQ", "qcow2 bitmaps extension")


@record(slots=True)
class BitmapDirectoryEntry:
    """The fixed part of a bitmap directory entry ("Bitmap directory")."""

    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name_size: int
    extra_data_size: int


BITMAP_DIRECTORY_ENTRY = Layout(BitmapDirectoryEntry, ">QIIBBHI", "qcow2 bitmap directory entry")


@record(slots=True)
class SnapshotEntry:
    """The fixed part of a snapshot table entry ("Snapshots")."""

    l1_table_offset: int
    l1_size: int
    id_size: int
    name_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data_size: int


SNAPSHOT_ENTRY = Layout(SnapshotEntry, ">QIHHIIQII", "qcow2 snapshot table entry")


@record
class Extensions:
    """What the header extension area holds (only the parts polyvisor uses)."""

    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps: BitmapsExtension | None = None
    has_crypto_header: bool = False
    data_file: str | None = None
    #: (type, offset of the data) of every extension, for ``info``.
    seen: list[tuple[int, int]] = field(default_factory=list)


def feature_table_bytes() -> bytes:
    """The feature name table extension payload qemu writes for version 3 images."""
    return b"".join(struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_NAMES)


def extension_bytes(kind: int, payload: bytes) -> bytes:
    """One header extension, padded to a multiple of 8 ("Header extensions")."""
    padded = payload + bytes(-len(payload) % 8)
    return EXTENSION_HEADER.pack(kind, len(payload)) + padded


# ------------------------------------------------------------ table arrays


def entries_from_bytes(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian 64-bit table entries (L1, L2, refcount table) as native integers."""
    table = array("Q")
    table.frombytes(data)
    if _LITTLE_ENDIAN_HOST:
        table.byteswap()
    return table


def entries_to_bytes(table: array[int]) -> bytes:
    """The big-endian on-disk form of a table of 64-bit entries."""
    if not _LITTLE_ENDIAN_HOST:
        return table.tobytes()
    swapped = array("Q", table)
    swapped.byteswap()
    return swapped.tobytes()


# ------------------------------------------------------- refcount blocks

#: array typecode of refcount blocks for byte-sized widths (refcount_order 3-6).
_REFCOUNT_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


class RefcountCodec:
    """Decodes and encodes refcount blocks of one refcount_order ("Host cluster management").

    Blocks become arrays of native integers: one per cluster.  Widths below a
    byte pack their entries least significant bits first.
    """

    def __init__(self, order: int, cluster_size: int) -> None:
        self.order = order
        self.bits = 1 << order
        self.max_value = (1 << self.bits) - 1
        self.entries = cluster_size * 8 // self.bits
        self.cluster_size = cluster_size
        self.typecode = _REFCOUNT_TYPECODES.get(order, "B")
        if order >= 3 and array(self.typecode).itemsize * 8 != self.bits:
            raise RuntimeError(f"no array type holds {self.bits}-bit refcounts on this platform")

    def empty(self) -> array[int]:
        """A block of zero refcounts."""
        return array(self.typecode, bytes(self.entries * array(self.typecode).itemsize))

    def decode(self, data: bytes) -> array[int]:
        """One block's refcounts."""
        if self.order >= 3:
            block = array(self.typecode)
            block.frombytes(data)
            if _LITTLE_ENDIAN_HOST and self.order > 3:
                block.byteswap()
            return block
        per_byte = 8 // self.bits
        packed = int.from_bytes(data, "little")
        lane_mask = int.from_bytes(bytes([self.max_value]) * len(data), "little")
        block = array("B", bytes(self.entries))
        for lane in range(per_byte):
            values = ((packed >> (lane * self.bits)) & lane_mask).to_bytes(len(data), "little")
            block[lane::per_byte] = array("B", values)
        return block

    def encode(self, block: array[int]) -> bytes:
        """The on-disk bytes of a block."""
        if self.order >= 3:
            if _LITTLE_ENDIAN_HOST and self.order > 3:
                swapped = array(self.typecode, block)
                swapped.byteswap()
                return swapped.tobytes()
            return block.tobytes()
        per_byte = 8 // self.bits
        packed = 0
        for lane in range(per_byte):
            packed |= int.from_bytes(block[lane::per_byte].tobytes(), "little") << (lane * self.bits)
        return packed.to_bytes(self.cluster_size, "little")


# ----------------------------------------------------- compressed clusters


class CompressedLayout:
    """Bit layout of compressed cluster descriptors for one cluster size ("Compressed Clusters Descriptor")."""

    def __init__(self, cluster_bits: int) -> None:
        self.offset_bits = 62 - (cluster_bits - 8)
        self.offset_mask = (1 << self.offset_bits) - 1
        self.sectors_mask = (1 << (cluster_bits - 8)) - 1

    def parse(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes to read) of a compressed L2 entry: the data runs to the end of its last sector."""
        offset = entry & self.offset_mask
        sectors = ((entry >> self.offset_bits) & self.sectors_mask) + 1
        return offset, sectors * 512 - (offset & 511)

    def make(self, offset: int, length: int) -> int:
        """The L2 entry for *length* compressed bytes stored at host *offset*."""
        extra_sectors = ((offset + length - 1) >> 9) - (offset >> 9)
        return OFLAG_COMPRESSED | (extra_sectors << self.offset_bits) | offset


class CompressionError(Exception):
    """Compressed data that does not decode to exactly one cluster (the caller names the file)."""


#: Largest zstd window a compressed cluster may ask for (clusters are at most 2 MiB).
ZSTD_MAX_WINDOW = 8 << 20
_thread_state = threading.local()


def compress_cluster(data: bytes, compression_type: int) -> bytes | None:
    """Compress one cluster as qemu does (raw deflate with a 4 KiB window, or a zstd frame).

    Returns None when the result would not be smaller than the cluster: such
    clusters are stored uncompressed (block/qcow2.c, qcow2_co_pwritev_compressed_task).
    Runs in worker threads: both libraries release the GIL while compressing.
    """
    if compression_type == COMPRESSION_ZSTD:
        import zstandard  # loaded only where zstd is used

        compressor = getattr(_thread_state, "zstd", None)
        if compressor is None:
            compressor = _thread_state.zstd = zstandard.ZstdCompressor(level=3)
        out: bytes = compressor.compress(data)
    else:
        out = zlib.compress(data, zlib.Z_DEFAULT_COMPRESSION, -12)
    return out if len(out) < len(data) else None


def compress_clusters(blocks: list[bytes], compression_type: int) -> list[bytes | None]:
    """:func:`compress_cluster` over a batch (one thread-pool job for many small clusters)."""
    return [compress_cluster(block, compression_type) for block in blocks]


def decompress_cluster(data: bytes, compression_type: int, cluster_size: int,
                       zstd_context: zstandard.ZstdDecompressor | None) -> bytes:
    """Exactly one cluster from compressed data; the input may run past the stream's end (sector padding)."""
    if compression_type == COMPRESSION_ZSTD:
        import zstandard  # loaded only where zstd is used

        if zstd_context is None:
            zstd_context = zstd_decompressor()
        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"not a zstd frame ({exc})") from None
        if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, cluster_size):
            raise CompressionError(f"zstd frame holds {params.content_size} bytes, not one cluster of "
                                   f"{cluster_size}")
        if params.window_size > ZSTD_MAX_WINDOW:
            raise CompressionError(f"zstd frame asks for a {params.window_size}-byte window")
        try:
            out: bytes = zstd_context.decompress(data, max_output_size=cluster_size)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"zstd data does not decode to one cluster ({exc})") from None
    else:
        inflater = zlib.decompressobj(-15)
        try:
            out = inflater.decompress(data, cluster_size)
        except zlib.error as exc:
            raise CompressionError(f"deflate data is damaged ({exc})") from None
        if len(out) == cluster_size and not inflater.eof:
            try:
                beyond = inflater.decompress(inflater.unconsumed_tail, 1)
            except zlib.error:
                beyond = b""  # qemu stops once the cluster is full; what follows is not looked at
            if beyond:
                raise CompressionError(f"deflate data inflates beyond the {cluster_size}-byte cluster")
    if len(out) != cluster_size:
        raise CompressionError(f"compressed data decodes to {len(out)} bytes, not one cluster of {cluster_size}")
    return out


def zstd_decompressor() -> zstandard.ZstdDecompressor:
    """A decompression context refusing windows larger than any cluster needs."""
    import zstandard  # loaded only where zstd is used

    return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
