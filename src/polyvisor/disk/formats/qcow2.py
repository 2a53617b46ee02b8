"""qcow2: qemu's copy-on-write format, versions 2 (compat=0.10) and 3 (compat=1.1).

Layout (qemu ``docs/interop/qcow2.txt``): a header in cluster 0 followed by
header extensions; a two-level L1/L2 map from guest clusters to host
clusters; a two-level refcount table/refcount blocks counting the users of
every host cluster; optional internal snapshots (each with its own L1 table).

Reading covers every cluster size qemu opens (512 B - 2 MiB), refcount widths
of 1-64 bits, zero clusters, zlib and zstd compressed clusters, extended L2
entries (subclusters), backing files and dirty (lazy refcount) images.
Writing creates or reopens version 2 and 3 images with standard L2 entries:
the active L1, L2 tables and refcount blocks are cached in memory (bounded)
and written back on eviction and on flush/close, refcount blocks first.
Clusters shared with internal snapshots are copied on write, keeping the
COPIED flags and refcounts exactly as ``qemu-img check`` expects.

Compressed output (``convert -c``): every full guest cluster is compressed on
a small thread pool (zlib and zstandard release the GIL) and stored in
submission order, packed byte-granular like qemu.  A partially written cluster
is buffered (pre-filled with what the backing file shows, or zeros) until it
is complete or the image is closed, then compressed whole; a write to a
cluster already stored compressed turns it into a normal cluster, as qemu
does.  Memory stays bounded: at most ``COMPRESS_INFLIGHT_BYTES`` queued and
``PARTIAL_CLUSTER_BYTES`` buffered (the oldest buffered cluster is
compressed early, padded the same way, when the bound is reached).
"""

from __future__ import annotations

import functools
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from polyvisor.disk.fileio import ImageFile, OutputFiles
from polyvisor.disk.formats.qcow2_structs import (
    AUTOCLEAR_BITMAPS,
    BITMAP_DIRECTORY_ENTRY,
    BITMAPS_EXTENSION,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_TYPES,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    DEFAULT_CLUSTER_SIZE,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    EXTENSION_HEADER,
    HEADER_V2,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    INCOMPAT_KNOWN,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAGIC,
    MAX_BACKING_FILE_NAME,
    MAX_BACKING_FORMAT_NAME,
    MAX_BITMAP_DIRECTORY_BYTES,
    MAX_BITMAP_TABLE_ENTRIES,
    MAX_BITMAPS,
    MAX_CLUSTER_BITS,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOT_EXTRA_DATA,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    MIN_EXTENDED_L2_CLUSTER_BITS,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    SNAPSHOT_ENTRY,
    SUBCLUSTER_ALL,
    SUBCLUSTERS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    V3_MIN_HEADER_LENGTH,
    BitmapsExtension,
    CompressedLayout,
    CompressionError,
    Extensions,
    Header,
    RefcountCodec,
    compress_clusters,
    decompress_cluster,
    entries_from_bytes,
    entries_to_bytes,
    extension_bytes,
    feature_table_bytes,
    zstd_decompressor,
)
from polyvisor.disk.image import DiskImage, ExtentKind, ProbeSample, Run, file_run, is_zero
from polyvisor.disk.registry import register_format
from polyvisor.disk.structs import align_up, is_power_of_two
from polyvisor.errors import (
    CorruptImage,
    LimitExceeded,
    PolyvisorError,
    ReadOnlyImage,
    TruncatedImage,
    UnsupportedFeature,
    UnsupportedOption,
    UsageError,
)
from polyvisor.records import field, record

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from zstandard import ZstdDecompressor

    from polyvisor.disk.check import CheckResult
    from polyvisor.disk.registry import CreateOptions, Opener

#: Bytes of L2 tables kept in memory (32 MiB, like qemu's default: 256 GiB of guest space at 64 KiB clusters).
L2_CACHE_BYTES = 32 << 20
#: Bytes of refcount blocks kept in memory.
REFBLOCK_CACHE_BYTES = 8 << 20
#: Threads compressing clusters (the benchmark machine has 2 cores).
COMPRESS_WORKERS = 2
#: Uncompressed bytes queued for compression before the oldest result is waited for.
COMPRESS_INFLIGHT_BYTES = 16 << 20
#: Uncompressed bytes handed to a compression thread at once (many small clusters make one job).
COMPRESS_BATCH_BYTES = 256 << 10
#: Bytes of partially written clusters buffered in compressed mode.
PARTIAL_CLUSTER_BYTES = 32 << 20
#: Host clusters counted per pass of ``check`` (2 bytes each): one pass up to 2 TiB files at 64 KiB clusters.
CHECK_WINDOW_CLUSTERS = 1 << 25
#: Table entries ``check`` walks at most (L1 and L2 entries over the active table and every snapshot).
CHECK_MAX_ENTRIES = 1 << 28
#: L1 entries ``check`` deduplicates L2 tables over (bounding both its memory and repeated walks).
CHECK_L1_CHUNK = 1 << 16
#: L1 entries written per write-back unit.
L1_PAGE_ENTRIES = 512
#: The largest virtual size qemu can address: a 32 MiB L1 of 2 MiB clusters.
MAX_VIRTUAL_SIZE = (MAX_L1_BYTES // 8) << (MAX_CLUSTER_BITS + MAX_CLUSTER_BITS - 3)
#: polyvisor format names that qemu spells differently in a backing-format extension.
QEMU_DRIVER_NAMES = {"vhd": "vpc"}

_COMPAT_VERSIONS = {"1.1": 3, "v3": 3, "0.10": 2, "v2": 2}

_Piece = tuple[ExtentKind, int, int, int, "Callable[[], bytes] | None", int]


@record
class _PartialCluster:
    """A guest cluster of a compressed image written only in part so far."""

    data: bytearray
    #: Bytes of the cluster inside the virtual disk (less than a cluster only for the last one).
    limit: int
    covered: list[tuple[int, int]] = field(default_factory=list)

    def cover(self, start: int, end: int) -> bool:
        """Record that ``[start, end)`` was written; True once the whole cluster has been."""
        spans = sorted([*self.covered, (start, end)])
        merged: list[tuple[int, int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.covered = merged
        return merged[0][0] == 0 and merged[0][1] >= self.limit


@register_format
class Qcow2Image(DiskImage):
    """A qcow2 image (versions 2 and 3)."""

    format_name = "qcow2"
    create_options = frozenset({"compat", "cluster_size", "compression_type"})
    supports_compression = True
    supports_backing = True
    max_virtual_size = MAX_VIRTUAL_SIZE

    def __init__(
        self,
        path: Path,
        *,
        file: ImageFile,
        header: Header,
        extensions: Extensions,
        writable: bool,
        backing: DiskImage | None = None,
        backing_reference: str | None = None,
        outputs: OutputFiles | None = None,
    ) -> None:
        super().__init__(
            path,
            virtual_size=header.size,
            subformat="v3" if header.version >= 3 else "v2",
            files=[file],
            writable=writable,
            backing=backing,
            backing_reference=backing_reference,
            outputs=outputs,
        )
        self._file = file
        self.header = header
        self.extensions = extensions
        self._cluster_bits = cb = header.cluster_bits
        self._cluster_size = cs = 1 << cb
        self._extended = bool(header.incompatible_features & INCOMPAT_EXTL2)
        self._entry_words = 2 if self._extended else 1
        self._l2_bits = cb - 3 - (1 if self._extended else 0)
        self._l2_entries = 1 << self._l2_bits
        self._l1_shift = cb + self._l2_bits
        self._compressed = CompressedLayout(cb)
        self._refcounts = RefcountCodec(header.refcount_order, cs)
        self._zstd: ZstdDecompressor | None = None  #: made on the first zstd cluster
        self._last_decoded: tuple[int, bytes] | None = None
        self._read_only_size = -1 if writable else file.size
        self._l1 = array("Q")
        self._l1_dirty: set[int] = set()
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._l2_cache_tables = max(4, L2_CACHE_BYTES // cs)
        self._reftable: array[int] | None = None
        self._reftable_dirty = False
        self._refblocks: OrderedDict[int, array[int]] = OrderedDict()
        self._refblocks_dirty: set[int] = set()
        self._refblock_cache_blocks = max(4, REFBLOCK_CACHE_BYTES // cs)
        self._header_dirty = False
        self._end_cluster = 0
        self._compress_output = False
        self._pool: ThreadPoolExecutor | None = None
        self._batch: list[tuple[int, bytes]] = []
        self._queue: deque[tuple[list[tuple[int, bytes]], Future[list[bytes | None]]]] = deque()
        self._queued: set[int] = set()
        self._queued_bytes = 0
        self._partial: OrderedDict[int, _PartialCluster] = OrderedDict()
        self._compressed_cursor = 0
        self._metadata: list[tuple[int, int, str]] = []
        self._note_metadata()

    # ================================================================ probing

    @classmethod
    def probe(cls, sample: ProbeSample) -> int:
        """100 for the magic, a known version and a cluster size qemu opens; 50 for the magic alone."""
        head = sample.head
        if len(head) < 8 or head[:4] != MAGIC:
            return 0
        version = int.from_bytes(head[4:8], "big")
        if version in (2, 3) and len(head) >= 24:
            cluster_bits = int.from_bytes(head[20:24], "big")
            if MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
                return 100
        return 50

    # ================================================================ opening

    @classmethod
    def open(cls, path: Path, *, writable: bool, opener: Opener) -> Self:
        """Open an existing image; its backing file is opened through *opener*."""
        file = ImageFile.open(path, writable=writable)
        image: Self | None = None
        try:
            header, extensions, backing_name = _read_header(file)
            _refuse_unsupported(file, header, extensions, writable=writable)
            image = cls(path, file=file, header=header, extensions=extensions, writable=writable,
                        backing_reference=backing_name)
            image._load_l1()
            if writable:
                image._prepare_writing()
            if backing_name is not None:
                fmt = extensions.backing_format
                image.backing = opener.open_backing(path, backing_name, fmt)
        except BaseException:
            if image is not None:
                image._shutdown_pool()
                image._close_files()
            else:
                file.close()
            raise
        return image

    def _load_l1(self) -> None:
        """Read the active L1 table ("Cluster mapping"), already validated against the file."""
        header = self.header
        if header.l1_size:
            data = self._file.read(header.l1_table_offset, header.l1_size * 8, "qcow2 L1 table")
            self._l1 = entries_from_bytes(data)

    def _note_metadata(self) -> None:
        """The fixed metadata ranges data clusters and tables must never overlap (checked on use)."""
        header, cs = self.header, self._cluster_size
        ranges = [(0, cs, "the image header")]
        if header.l1_size:
            ranges.append((header.l1_table_offset, header.l1_table_offset + header.l1_size * 8, "the L1 table"))
        ranges.append((header.refcount_table_offset,
                       header.refcount_table_offset + header.refcount_table_clusters * cs, "the refcount table"))
        if header.nb_snapshots:
            ranges.append((header.snapshots_offset, header.snapshots_offset + cs, "the snapshot table"))
        self._metadata = ranges

    def _overlap(self, start: int, end: int) -> str | None:
        """The name of the fixed metadata that ``[start, end)`` overlaps, if any."""
        for m_start, m_end, name in self._metadata:
            if start < m_end and end > m_start:
                return name
        return None

    @property
    def _file_size(self) -> int:
        return self._read_only_size if self._read_only_size >= 0 else self._file.size

    # ================================================================ the map

    def _l2_offset(self, l1_index: int) -> int:
        """The validated L2 table offset of an L1 entry (0 when unallocated)."""
        entry = self._l1[l1_index]
        offset = entry & L1E_OFFSET_MASK
        if offset == 0:
            return 0
        where = self.header.l1_table_offset + 8 * l1_index
        if offset & (self._cluster_size - 1):
            raise CorruptImage(self.path, f"L1 entry {l1_index} points to an unaligned L2 table ({offset:#x})",
                               structure="qcow2 L1 table", offset=where)
        clash = self._overlap(offset, offset + self._cluster_size)
        if clash is not None:
            raise CorruptImage(self.path, f"L1 entry {l1_index} points into {clash} ({offset:#x})",
                               structure="qcow2 L1 table", offset=where)
        return offset

    def _l2_table(self, offset: int) -> array[int]:
        """One L2 table ("Cluster mapping"), through the bounded cache."""
        table = self._l2_cache.get(offset)
        if table is not None:
            self._l2_cache.move_to_end(offset)
            return table
        cs = self._cluster_size
        if offset + cs > self._file_size and offset not in self._l2_dirty:
            raise TruncatedImage(self._file.display_path,
                                 f"L2 table at {offset:#x} lies past the end of the file ({self._file_size} bytes)",
                                 structure="qcow2 L2 table", offset=offset)
        table = entries_from_bytes(self._file.read(offset, cs, "qcow2 L2 table"))
        self._cache_l2(offset, table)
        return table

    def _cache_l2(self, offset: int, table: array[int]) -> None:
        while len(self._l2_cache) >= self._l2_cache_tables:
            old_offset, old_table = self._l2_cache.popitem(last=False)
            if old_offset in self._l2_dirty:
                self._write_refblocks()  # the clusters it maps are counted before it is
                self._file.write(old_offset, entries_to_bytes(old_table))
                self._l2_dirty.discard(old_offset)
        self._l2_cache[offset] = table

    def _pieces(self, offset: int, end: int) -> Iterator[_Piece]:
        """(kind, start, length, host offset, decoder, unit offset) per cluster or subcluster, in order."""
        cb, cs = self._cluster_bits, self._cluster_size
        l2_mask = self._l2_entries - 1
        words = self._entry_words
        unallocated, zero, data = ExtentKind.UNALLOCATED, ExtentKind.ZERO, ExtentKind.DATA
        v2 = self.header.version < 3
        pos = offset
        while pos < end:
            l1_index = pos >> self._l1_shift
            span_end = min(end, (l1_index + 1) << self._l1_shift)
            l2_offset = self._l2_offset(l1_index)
            if l2_offset == 0 and not self._partial:
                yield (unallocated, pos, span_end - pos, 0, None, 0)
                pos = span_end
                continue
            table = self._l2_table(l2_offset) if l2_offset else None
            while pos < span_end:
                cluster = pos >> cb
                cluster_start = cluster << cb
                stop = min(cluster_start + cs, span_end)
                if self._partial and cluster in self._partial:
                    buffered = bytes(self._partial[cluster].data)
                    yield (data, pos, stop - pos, 0, functools.partial(_constant, buffered), cluster_start)
                    pos = stop
                    continue
                if table is None:
                    yield (unallocated, pos, stop - pos, 0, None, 0)
                    pos = stop
                    continue
                index = (cluster & l2_mask) * words
                entry = table[index]
                if entry & OFLAG_COMPRESSED:
                    decoder = functools.partial(self._decode_compressed, entry & ~OFLAG_COPIED)
                    yield (data, pos, stop - pos, 0, decoder, cluster_start)
                    pos = stop
                    continue
                host = entry & L2E_OFFSET_MASK
                if host & (cs - 1):
                    raise CorruptImage(self.path, f"L2 entry for guest offset {cluster_start:#x} points to an "
                                       f"unaligned cluster ({host:#x})", structure="qcow2 L2 table",
                                       offset=l2_offset + 8 * index)
                if words == 2:
                    yield from self._subcluster_pieces(entry, table[index + 1], pos, stop,
                                                       cluster_start=cluster_start, where=l2_offset + 8 * index)
                    pos = stop
                    continue
                if entry & OFLAG_ZERO:
                    if v2:
                        raise CorruptImage(self.path, f"zero cluster entry at guest offset {cluster_start:#x} in "
                                           "a version 2 image", structure="qcow2 L2 table",
                                           offset=l2_offset + 8 * index)
                    kind = zero
                elif host:
                    kind = data
                elif entry & OFLAG_COPIED:
                    raise CorruptImage(self.path, f"L2 entry for guest offset {cluster_start:#x} has the COPIED "
                                       "flag but points at offset 0, the image header", structure="qcow2 L2 table",
                                       offset=l2_offset + 8 * index)
                else:
                    kind = unallocated
                if not self._partial:  # whole runs of like entries at once
                    last = ((span_end - 1) >> cb) & l2_mask
                    run = _like_entries(table, index, last, entry, kind=kind, cs=cs)
                    stop = min(cluster_start + run * cs, span_end)
                yield (kind, pos, stop - pos, host + pos - cluster_start if host and kind is data else 0, None, 0)
                pos = stop

    def _subcluster_pieces(self, entry: int, bitmap: int, pos: int, stop: int, *, cluster_start: int,
                           where: int) -> Iterator[_Piece]:
        """Pieces of one cluster with an extended L2 entry ("Extended L2 Entries")."""
        host = entry & L2E_OFFSET_MASK
        allocated = bitmap & SUBCLUSTER_ALL
        zeros = bitmap >> 32
        if allocated & zeros:
            raise CorruptImage(self.path, f"subcluster bitmap {bitmap:#018x} marks subclusters both allocated "
                               "and zero", structure="qcow2 L2 table", offset=where)
        if allocated and not host:
            raise CorruptImage(self.path, "subclusters allocated in a cluster without a host offset",
                               structure="qcow2 L2 table", offset=where)
        if allocated == SUBCLUSTER_ALL:
            yield (ExtentKind.DATA, pos, stop - pos, host + pos - cluster_start, None, 0)
            return
        if zeros == SUBCLUSTER_ALL:
            yield (ExtentKind.ZERO, pos, stop - pos, 0, None, 0)
            return
        if not allocated and not zeros:
            yield (ExtentKind.UNALLOCATED, pos, stop - pos, 0, None, 0)
            return
        sub = self._cluster_size // SUBCLUSTERS
        first = (pos - cluster_start) // sub
        for i in range(first, SUBCLUSTERS):
            s_start = max(pos, cluster_start + i * sub)
            s_end = min(stop, cluster_start + (i + 1) * sub)
            if s_start >= s_end:
                break
            if allocated >> i & 1:
                yield (ExtentKind.DATA, s_start, s_end - s_start, host + s_start - cluster_start, None, 0)
            elif zeros >> i & 1:
                yield (ExtentKind.ZERO, s_start, s_end - s_start, 0, None, 0)
            else:
                yield (ExtentKind.UNALLOCATED, s_start, s_end - s_start, 0, None, 0)

    def _map(self, offset: int, length: int) -> Iterator[Run]:
        if self._queued:
            self._settle_compression()
        kind: ExtentKind | None = None
        start = host = 0
        pos = offset
        for p_kind, p_start, p_length, p_host, decoder, unit in self._pieces(offset, offset + length):
            if decoder is not None:
                if kind is not None:
                    yield from self._runs(kind, start, p_start - start, host)
                    kind = None
                yield Run(p_start, p_length, ExtentKind.DATA, decode=decoder, unit_offset=unit)
            elif p_kind is not kind or (p_kind is ExtentKind.DATA and host + (p_start - start) != p_host):
                if kind is not None:
                    yield from self._runs(kind, start, p_start - start, host)
                kind, start, host = p_kind, p_start, p_host
            pos = p_start + p_length
        if kind is not None:
            yield from self._runs(kind, start, pos - start, host)

    def _runs(self, kind: ExtentKind, start: int, length: int, host: int) -> Iterator[Run]:
        """One merged run; data is checked against the header, fixed metadata and the end of the file."""
        if kind is not ExtentKind.DATA:
            yield Run(start, length, kind)
            return
        clash = self._overlap(host, host + length)
        if clash is not None:
            raise CorruptImage(self.path, f"guest data at {start:#x} is mapped into {clash} (host offset "
                               f"{host:#x})", structure="qcow2 L2 table")
        file_size = self._file_size
        if host >= file_size:
            raise TruncatedImage(self._file.display_path, f"guest data at {start:#x} is mapped past the end of "
                                 f"the file (host offset {host:#x}, file size {file_size})",
                                 structure="qcow2 data cluster", offset=host)
        inside = min(length, file_size - host)
        yield file_run(self._file, host, inside, start)  # holes of a preallocated file are zeros
        if inside < length:  # a cluster cut by the end of the file reads as zeros past it, as in qemu
            yield Run(start + inside, length - inside, ExtentKind.ZERO)

    def _decode_compressed(self, entry: int) -> bytes:
        """The guest cluster a compressed L2 entry describes ("Compressed Clusters Descriptor")."""
        if self._last_decoded is not None and self._last_decoded[0] == entry:
            return self._last_decoded[1]
        offset, length = self._compressed.parse(entry)
        cs = self._cluster_size
        if offset < cs:
            raise CorruptImage(self.path, f"compressed cluster points into the image header ({offset:#x})",
                               structure="qcow2 compressed cluster", offset=offset)
        file_size = self._file_size
        if offset >= file_size:
            raise TruncatedImage(self._file.display_path, f"compressed cluster at {offset:#x} lies past the end "
                                 f"of the file ({file_size} bytes)", structure="qcow2 compressed cluster",
                                 offset=offset)
        raw = self._file.read_upto(offset, length)
        try:
            if self._zstd is None and self.header.compression_type == COMPRESSION_ZSTD:
                self._zstd = zstd_decompressor()
            data = decompress_cluster(raw, self.header.compression_type, cs, self._zstd)
        except CompressionError as exc:
            raise CorruptImage(self.path, str(exc), structure="qcow2 compressed cluster", offset=offset) from None
        self._last_decoded = (entry, data)
        return data

    # ================================================================ creation

    @classmethod
    def create(cls, path: Path, size: int, options: CreateOptions, opener: Opener,
               backing: DiskImage | None) -> Self:
        """A new, empty image: header, refcount table and L1 table; everything else grows on demand."""
        version = _COMPAT_VERSIONS.get(options.compat or "1.1")
        if version is None:
            raise UnsupportedOption(f"qcow2 compat {options.compat!r} unknown (known: 0.10, 1.1)")
        cs = options.cluster_size or DEFAULT_CLUSTER_SIZE
        if not is_power_of_two(cs) or not (1 << MIN_CLUSTER_BITS) <= cs <= (1 << MAX_CLUSTER_BITS):
            raise UsageError(f"{path}: qcow2 cluster_size must be a power of two from 512 to 2M, not {cs}")
        compression = COMPRESSION_TYPES.get(options.compression_type or "zlib")
        if compression is None:
            raise UnsupportedOption(f"qcow2 compression_type {options.compression_type!r} unknown "
                                    f"(known: {', '.join(COMPRESSION_TYPES)})")
        if compression != COMPRESSION_ZLIB and version < 3:
            raise UsageError(f"{path}: compression_type={options.compression_type} needs compat=1.1")
        cb = cs.bit_length() - 1
        coverage = cs * (cs // 8)
        l1_size = -(-size // coverage)
        if size > MAX_VIRTUAL_SIZE or l1_size * 8 > MAX_L1_BYTES:
            raise UsageError(f"{path}: {size} bytes need an L1 table larger than qemu's 32 MiB limit with "
                             f"{cs}-byte clusters; choose a larger cluster_size")

        # The header cluster: header, extensions, end marker, then the backing file name ("Header extensions").
        header_length = V3_HEADER_LENGTH if version >= 3 else V2_HEADER_LENGTH
        backing_name = (options.backing_file or "").encode()
        if len(backing_name) > MAX_BACKING_FILE_NAME:
            raise UsageError(f"{path}: backing file name longer than {MAX_BACKING_FILE_NAME} bytes")
        extensions = b""
        if backing_name and options.backing_fmt:
            fmt = QEMU_DRIVER_NAMES.get(options.backing_fmt, options.backing_fmt).encode()
            extensions += extension_bytes(EXT_BACKING_FORMAT, fmt)
        feature_table = extension_bytes(EXT_FEATURE_TABLE, feature_table_bytes()) if version >= 3 else b""
        fixed = header_length + len(extensions) + EXTENSION_HEADER.size + len(backing_name)
        if fixed + len(feature_table) <= cs:
            extensions += feature_table
        elif fixed > cs:
            raise UsageError(f"{path}: the backing file name does not fit in a {cs}-byte header cluster")
        extensions += EXTENSION_HEADER.pack(EXT_END, 0)
        l1_clusters = -(-l1_size * 8 // cs)
        reftable_clusters = _initial_reftable_clusters(cs, l1_clusters)
        metadata_end = 1 + reftable_clusters + l1_clusters
        header = Header(
            version=version,
            backing_file_offset=header_length + len(extensions) if backing_name else 0,
            backing_file_size=len(backing_name),
            cluster_bits=cb,
            size=size,
            crypt_method=0,
            l1_size=l1_size,
            l1_table_offset=(1 + reftable_clusters) * cs if l1_size else 0,
            refcount_table_offset=cs,
            refcount_table_clusters=reftable_clusters,
            nb_snapshots=0,
            snapshots_offset=0,
            incompatible_features=INCOMPAT_COMPRESSION if compression != COMPRESSION_ZLIB else 0,
            refcount_order=4,
            header_length=header_length,
            compression_type=compression,
        )
        head = header.pack()
        head += bytes(header_length - len(head)) + extensions + backing_name

        outputs = OutputFiles()
        try:
            file = outputs.create(path)
            file.write(0, head)
            file.truncate(metadata_end * cs)
            info = Extensions(backing_format=options.backing_fmt if backing_name else None)
            image = cls(path, file=file, header=header, extensions=info, writable=True, backing=backing,
                        backing_reference=options.backing_file or None, outputs=outputs)
        except BaseException:
            outputs.abort()
            raise
        try:
            image._l1 = array("Q", bytes(8 * l1_size))
            image._reftable = array("Q", bytes(reftable_clusters * cs))
            image._reftable_dirty = True
            image._header_dirty = True
            image._end_cluster = metadata_end
            image._count_new_clusters(0, image._end_cluster)
            image._compress_output = options.compress
        except BaseException:
            image.abort()
            raise
        return image

    # ============================================================ writable open

    def _prepare_writing(self) -> None:
        """Load the refcount table, validate it and find where new clusters go."""
        header, cs = self.header, self._cluster_size
        file_size = self._file.size
        table = self._read_reftable()
        seen: dict[int, int] = {}
        for index, entry in enumerate(table):
            offset = entry & REFT_OFFSET_MASK
            if not offset:
                continue
            problem = self._refblock_problem(offset, file_size)
            if problem is None and offset in seen:
                problem = f"is also refcount block {seen[offset]}"
            if problem is not None:
                raise CorruptImage(self.path, f"refcount block {index} at {offset:#x} {problem}",
                                   structure="qcow2 refcount table",
                                   offset=header.refcount_table_offset + 8 * index)
            seen[offset] = index
        self._reftable = table
        end = -(-file_size // cs)
        for index in range(len(table) - 1, -1, -1):
            if table[index] & REFT_OFFSET_MASK:
                block = self._refblock(index, create=False)
                last = -1 if block is None else _last_used(block)
                if last >= 0:
                    end = max(end, index * self._refcounts.entries + last + 1)
                    break
        self._end_cluster = end
        if header.autoclear_features:
            # Auto-clear features describe data polyvisor does not maintain: clear them before writing.
            header.autoclear_features = 0
            self._header_dirty = True
            self._write_header()

    def _read_reftable(self) -> array[int]:
        header = self.header
        data = self._file.read(header.refcount_table_offset,
                               header.refcount_table_clusters * self._cluster_size, "qcow2 refcount table")
        return entries_from_bytes(data)

    def _refblock_problem(self, offset: int, file_size: int) -> str | None:
        """Why a refcount block offset is unusable, or None."""
        cs = self._cluster_size
        if offset & (cs - 1):
            return "is not cluster aligned"
        if offset + cs > file_size:
            return "lies past the end of the file"
        clash = self._overlap(offset, offset + cs)
        if clash is not None:
            return f"overlaps {clash}"
        return None

    # ========================================================= refcount state

    def _refblock(self, index: int, *, create: bool) -> array[int] | None:
        """Refcount block *index*, from the cache, the file, or (with *create*) newly allocated."""
        block = self._refblocks.get(index)
        if block is not None:
            self._refblocks.move_to_end(index)
            return block
        table = self._reftable
        assert table is not None
        if index >= len(table):
            if not create:
                return None
            self._grow_reftable(index)  # may itself create this block (the new table's clusters need counting)
            return self._refblock(index, create=True)
        offset = table[index] & REFT_OFFSET_MASK
        if offset:
            data = self._file.read(offset, self._cluster_size, "qcow2 refcount block")
            block = self._refcounts.decode(data)
            self._cache_refblock(index, block)
            return block
        if not create:
            return None
        cluster = self._take_clusters(1)
        table[index] = cluster << self._cluster_bits
        self._reftable_dirty = True
        self._cache_refblock(index, self._refcounts.empty())
        self._refblocks_dirty.add(index)
        self._refcount_add(cluster, 1)
        return self._refblock(index, create=False)

    def _cache_refblock(self, index: int, block: array[int]) -> None:
        while len(self._refblocks) >= self._refblock_cache_blocks:
            old_index, old_block = self._refblocks.popitem(last=False)
            if old_index in self._refblocks_dirty:
                self._write_refblock(old_index, old_block)
        self._refblocks[index] = block

    def _write_refblock(self, index: int, block: array[int]) -> None:
        assert self._reftable is not None
        self._file.write(self._reftable[index] & REFT_OFFSET_MASK, self._refcounts.encode(block))
        self._refblocks_dirty.discard(index)

    def _write_refblocks(self) -> None:
        for index in sorted(self._refblocks_dirty):
            self._write_refblock(index, self._refblocks[index])

    def _take_clusters(self, count: int) -> int:
        """Reserve *count* clusters at the end of the image (their refcounts are set by the caller)."""
        first = self._end_cluster
        if (first + count) << self._cluster_bits > MAX_HOST_OFFSET:
            raise LimitExceeded(self.path, "the image would grow past the 64 PiB qcow2 can address",
                                structure="qcow2 allocation")
        self._end_cluster = first + count
        return first

    def _alloc_clusters(self, count: int) -> int:
        """*count* contiguous new clusters with refcount 1; returns the host offset of the first."""
        first = self._take_clusters(count)
        self._count_new_clusters(first, count)
        return first << self._cluster_bits

    def _count_new_clusters(self, first: int, count: int) -> None:
        """Set refcount 1 on clusters that had none (newly taken at the end of the image)."""
        per_block = self._refcounts.entries
        cluster = first
        while cluster < first + count:
            index = cluster // per_block
            stop = min(first + count, (index + 1) * per_block)
            block = self._refblock(index, create=True)
            assert block is not None
            start = cluster - index * per_block
            block[start : start + stop - cluster] = array(block.typecode, [1]) * (stop - cluster)
            self._refblocks_dirty.add(index)
            cluster = stop

    def _refcount_add(self, cluster: int, delta: int) -> int:
        """Change one cluster's refcount; returns the new value."""
        per_block = self._refcounts.entries
        index = cluster // per_block
        block = self._refblock(index, create=delta > 0)
        old = 0 if block is None else block[cluster - index * per_block]
        new = old + delta
        if new < 0:
            raise CorruptImage(self.path, f"refcount of cluster {cluster} would drop below zero",
                               structure="qcow2 refcount block", offset=cluster << self._cluster_bits)
        if new > self._refcounts.max_value:
            raise LimitExceeded(self.path, f"refcount of cluster {cluster} would overflow "
                                f"{self._refcounts.bits} bits", structure="qcow2 refcount block")
        block = self._refblock(index, create=False)  # fetched again: creating it may have evicted others
        assert block is not None
        block[cluster - index * per_block] = new
        self._refblocks_dirty.add(index)
        return new

    def _refcount(self, cluster: int) -> int:
        per_block = self._refcounts.entries
        block = self._refblock(cluster // per_block, create=False)
        return 0 if block is None else block[cluster % per_block]

    def _grow_reftable(self, needed: int) -> None:
        """Move the refcount table to a larger copy at the end of the image ("Host cluster management")."""
        assert self._reftable is not None
        cs = self._cluster_size
        per_cluster = cs // 8
        per_block = self._refcounts.entries
        entries = max(needed + 1, len(self._reftable) * 2)
        while True:
            clusters = -(-entries // per_cluster)
            # Room for the blocks counting the new table itself (and a few more for later growth).
            last = self._end_cluster + clusters + clusters // per_block + 4
            if last // per_block < entries:
                break
            entries = last // per_block + 1
        if clusters * cs > MAX_REFTABLE_BYTES:
            raise LimitExceeded(self.path, f"the refcount table would exceed qemu's {MAX_REFTABLE_BYTES >> 20} "
                                "MiB limit", structure="qcow2 refcount table")
        old_first = self.header.refcount_table_offset >> self._cluster_bits
        old_count = self.header.refcount_table_clusters
        start = self._take_clusters(clusters)
        table = array("Q", self._reftable)
        table.extend(array("Q", bytes(8 * (clusters * per_cluster - len(table)))))
        self._reftable = table
        self._reftable_dirty = True
        self.header.refcount_table_offset = start << self._cluster_bits
        self.header.refcount_table_clusters = clusters
        self._header_dirty = True
        self._note_metadata()
        for cluster in range(start, start + clusters):
            self._refcount_add(cluster, 1)
        for cluster in range(old_first, old_first + old_count):
            self._refcount_add(cluster, -1)

    def _release(self, entry: int) -> None:
        """Drop the references an L2 entry held (a normal cluster, or the span of a compressed one)."""
        if entry & OFLAG_COMPRESSED:
            offset, length = self._compressed.parse(entry)
            for cluster in range(offset >> self._cluster_bits, ((offset + length - 1) >> self._cluster_bits) + 1):
                self._refcount_add(cluster, -1)
            return
        host = entry & L2E_OFFSET_MASK
        if host:
            self._refcount_add(host >> self._cluster_bits, -1)

    # ============================================================ L2 for writes

    def _l2_for_write(self, l1_index: int) -> tuple[int, array[int]]:
        """The L2 table of an L1 entry, allocated or copied (if shared with a snapshot) so it can change."""
        entry = self._l1[l1_index]
        offset = self._l2_offset(l1_index)
        if offset and entry & OFLAG_COPIED:
            return offset, self._l2_table(offset)
        if offset:
            table = array("Q", self._l2_table(offset))
            self._refcount_add(offset >> self._cluster_bits, -1)
        else:
            table = array("Q", bytes(self._cluster_size))
        new = self._alloc_clusters(1)
        self._cache_l2(new, table)
        self._l2_dirty.add(new)
        self._l1[l1_index] = new | OFLAG_COPIED
        self._l1_dirty.add(l1_index // L1_PAGE_ENTRIES)
        return new, table

    def _l2_entry(self, cluster: int) -> int:
        """The current L2 entry of a guest cluster (0 when its L2 table is unallocated)."""
        offset = self._l2_offset(cluster >> self._l2_bits)
        if not offset:
            return 0
        return self._l2_table(offset)[cluster & (self._l2_entries - 1)]

    def _cluster_content(self, entry: int, cluster_start: int) -> bytes:
        """What a guest cluster reads as now, in this layer (for copy-on-write of partial writes)."""
        cs = self._cluster_size
        if entry & OFLAG_COMPRESSED:
            return self._decode_compressed(entry & ~OFLAG_COPIED)
        if entry & OFLAG_ZERO:
            return bytes(cs)
        host = entry & L2E_OFFSET_MASK
        if host:
            data = self._file.read_upto(host, cs)
            return data + bytes(cs - len(data))
        return self.read_backing(cluster_start, cs)

    def _check_host(self, host: int, cluster: int) -> None:
        """Refuse to write guest data over the header or fixed metadata."""
        clash = self._overlap(host, host + self._cluster_size)
        if clash is not None or host & (self._cluster_size - 1):
            raise CorruptImage(self.path, f"guest cluster {cluster} is mapped to {host:#x}, "
                               f"{'into ' + clash if clash else 'not cluster aligned'}; refusing to write",
                               structure="qcow2 L2 table")

    # ================================================================ writing

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store guest bytes: in place in owned clusters, in new clusters otherwise (copy-on-write)."""
        self._check_write(offset, len(data))
        if not len(data):
            return
        view = memoryview(data).cast("B")
        if self._compress_output:
            self._write_compressed(offset, view)
        else:
            if self._queued:
                self._settle_compression()
            self._write_plain(offset, view)

    def _write_plain(self, offset: int, view: memoryview) -> None:
        cb, cs = self._cluster_bits, self._cluster_size
        l2_mask = self._l2_entries - 1
        end = offset + len(view)
        pos = offset
        batch_host = -1
        batch: list[bytes | bytearray | memoryview] = []
        batch_length = 0
        slice_from = -1  # where in *view* the last batched piece starts, if it is a slice of it
        while pos < end:
            l1_index = pos >> self._l1_shift
            span_end = min(end, (l1_index + 1) << self._l1_shift)
            l2_offset, table = self._l2_for_write(l1_index)
            while pos < span_end:
                cluster = pos >> cb
                cluster_start = cluster << cb
                inside = pos - cluster_start
                n = min(cs - inside, span_end - pos)
                piece: bytes | bytearray | memoryview = view[pos - offset : pos - offset + n]
                index = cluster & l2_mask
                entry = table[index]
                host = entry & L2E_OFFSET_MASK
                run = self._unallocated_run(table, index, (span_end - pos) >> cb) if not (entry or inside) else 0
                if run > 1:  # whole clusters, none allocated yet (a fresh image): one allocation for all of them
                    target = self._alloc_clusters(run)
                    for j in range(run):
                        table[index + j] = (target + (j << cb)) | OFLAG_COPIED
                    self._l2_dirty.add(l2_offset)
                    n = run << cb
                    piece = view[pos - offset : pos - offset + n]
                elif host and entry & OFLAG_COPIED and not entry & OFLAG_COMPRESSED:
                    self._check_host(host, cluster)
                    if entry & OFLAG_ZERO:  # preallocated zero cluster: the rest of it must read as zeros
                        if n < cs:
                            filled = bytearray(cs)
                            filled[inside : inside + n] = piece
                            piece, inside = filled, 0
                        table[index] = entry & ~OFLAG_ZERO
                        self._l2_dirty.add(l2_offset)
                    target = host + inside
                else:
                    if n < cs:
                        filled = bytearray(self._cluster_content(entry, cluster_start))
                        filled[inside : inside + n] = piece
                        piece, inside = filled, 0
                    new = self._alloc_clusters(1)
                    table[index] = new | OFLAG_COPIED
                    self._l2_dirty.add(l2_offset)
                    self._release(entry)
                    target = new + inside
                from_view = isinstance(piece, memoryview)
                if batch and target == batch_host + batch_length:
                    if from_view and slice_from >= 0:  # extend the previous slice instead of joining later
                        batch[-1] = view[slice_from : pos - offset + n]
                    else:
                        batch.append(piece)
                        slice_from = pos - offset if from_view else -1
                    batch_length += len(piece)
                else:
                    self._write_batch(batch_host, batch)
                    batch, batch_host, batch_length = [piece], target, len(piece)
                    slice_from = pos - offset if from_view else -1
                pos += n
            self._write_batch(batch_host, batch)
            batch, batch_length, slice_from = [], 0, -1

    @staticmethod
    def _unallocated_run(table: array[int], index: int, most: int) -> int:
        """How many of the *most* L2 entries from *index* on are 0 (unallocated, no flags), in a row."""
        count = 0
        while count < most and not table[index + count]:
            count += 1
        return count

    def _write_batch(self, host: int, pieces: list[bytes | bytearray | memoryview]) -> None:
        if len(pieces) == 1:
            self._file.write(host, pieces[0])
        elif pieces:
            self._file.write(host, b"".join(pieces))

    # ------------------------------------------------------ compressed output

    def _write_compressed(self, offset: int, view: memoryview) -> None:
        """Writes to a compressed image: whole fresh clusters go to the compressor, parts are buffered."""
        cb, cs = self._cluster_bits, self._cluster_size
        end = offset + len(view)
        pos = offset
        while pos < end:
            cluster = pos >> cb
            cluster_start = cluster << cb
            inside = pos - cluster_start
            n = min(cs - inside, end - pos)
            piece = view[pos - offset : pos - offset + n]
            partial = self._partial.get(cluster)
            if partial is None:
                entry = 0 if cluster in self._queued else self._l2_entry(cluster)
                if cluster in self._queued or entry not in (0, OFLAG_ZERO):
                    # Compressed clusters are written once; later writes make a normal cluster, as in qemu.
                    self._settle_compression()
                    self._write_plain(pos, piece)
                    pos += n
                    continue
                limit = min(cs, self.virtual_size - cluster_start)
                if inside == 0 and n >= limit:
                    self._submit(cluster, bytes(piece) + bytes(cs - n))
                    pos += n
                    continue
                partial = _PartialCluster(bytearray(self._cluster_content(entry, cluster_start)), limit)
                self._partial[cluster] = partial
                if len(self._partial) * cs > PARTIAL_CLUSTER_BYTES:
                    oldest, buffered = self._partial.popitem(last=False)
                    self._submit(oldest, bytes(buffered.data))
            partial.data[inside : inside + n] = piece
            if partial.cover(inside, inside + n):
                del self._partial[cluster]
                self._submit(cluster, bytes(partial.data))
            pos += n

    def _submit(self, cluster: int, data: bytes) -> None:
        """Queue one whole cluster for compression (all-zero clusters need no data at all)."""
        if is_zero(data):
            if self.backing is None:
                return  # unallocated already reads as zeros
            if self.header.version >= 3:
                l2_offset, table = self._l2_for_write(cluster >> self._l2_bits)
                index = cluster & (self._l2_entries - 1)
                old = table[index]
                table[index] = OFLAG_ZERO
                self._l2_dirty.add(l2_offset)
                self._release(old)
                return
        self._batch.append((cluster, data))
        self._queued.add(cluster)
        if len(self._batch) * self._cluster_size >= COMPRESS_BATCH_BYTES:
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand the current batch to a compression thread; store the oldest results beyond the bound."""
        if not self._batch:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor  # only compressed output needs it

            self._pool = ThreadPoolExecutor(max_workers=COMPRESS_WORKERS, thread_name_prefix="qcow2-compress")
        blocks = [data for _, data in self._batch]
        self._queue.append((self._batch, self._pool.submit(compress_clusters, blocks,
                                                           self.header.compression_type)))
        self._queued_bytes += len(blocks) * self._cluster_size
        self._batch = []
        while self._queued_bytes > COMPRESS_INFLIGHT_BYTES:
            self._store_next()

    def _store_next(self) -> None:
        """Wait for the oldest job and store its clusters (results are stored in submission order)."""
        batch, future = self._queue.popleft()
        self._queued_bytes -= len(batch) * self._cluster_size
        for (cluster, data), compressed in zip(batch, future.result(), strict=True):
            self._queued.discard(cluster)
            l2_offset, table = self._l2_for_write(cluster >> self._l2_bits)
            index = cluster & (self._l2_entries - 1)
            old = table[index]
            if compressed is None:  # incompressible: stored as a normal cluster
                host = self._alloc_clusters(1)
                self._file.write(host, data)
                new = host | OFLAG_COPIED
            else:
                host = self._alloc_compressed(len(compressed))
                self._file.write(host, compressed)
                new = self._compressed.make(host, len(compressed))
            table[index] = new
            self._l2_dirty.add(l2_offset)
            self._release(old)

    def _alloc_compressed(self, length: int) -> int:
        """Byte-granular space for compressed data, packed after the previous cluster like qemu's allocator.

        Every host cluster a compressed cluster touches counts it once
        ("Compressed Clusters Descriptor": the data may continue in the next
        contiguous host cluster).
        """
        cb, cs = self._cluster_bits, self._cluster_size
        start = self._compressed_cursor
        current = start >> cb
        room = cs - (start & (cs - 1))
        if not start & (cs - 1) or self._refcount(current) >= self._refcounts.max_value or (
            length > room and self._end_cluster != current + 1
        ):
            start = self._alloc_clusters(-(-length // cs))  # a fresh run of clusters
        else:
            self._refcount_add(current, 1)  # shares the current cluster (and continues into new ones)
            if length > room:
                self._alloc_clusters(-(-(length - room) // cs))
        if start + length >= 1 << self._compressed.offset_bits:
            raise LimitExceeded(self.path, "compressed data would lie beyond what a compressed cluster "
                                "descriptor can address", structure="qcow2 compressed cluster")
        self._compressed_cursor = start + length
        return start

    def _settle_compression(self) -> None:
        """Store every queued compressed cluster."""
        self._dispatch()
        while self._queue:
            self._store_next()

    def _flush_partial_clusters(self) -> None:
        """Compress the clusters still partly written (the rest shows the backing file, or zeros)."""
        while self._partial:
            cluster, buffered = self._partial.popitem(last=False)
            self._submit(cluster, bytes(buffered.data))

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._batch.clear()
        self._queue.clear()
        self._queued.clear()
        self._queued_bytes = 0

    # ------------------------------------------------------------ zeroing

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range: zero clusters on version 3, unallocated clusters where nothing shows through."""
        self._check_write(offset, length)
        if not length:
            return
        self._settle_compression()
        cb, cs = self._cluster_bits, self._cluster_size
        end = offset + length
        full_start = align_up(offset, cs)
        full_end = end if end == self.virtual_size else end & ~(cs - 1)
        if full_start >= full_end:
            self._zero_part(offset, end)
            return
        if offset < full_start:
            self._zero_part(offset, full_start)
        self._zero_clusters(full_start >> cb, -(-full_end // cs))
        if full_end < end:
            self._zero_part(full_end, end)

    def _zero_part(self, start: int, end: int) -> None:
        """Zero part of one cluster: nothing to do if it reads as zeros in this layer already."""
        cluster = start >> self._cluster_bits
        if cluster not in self._partial:
            entry = self._l2_entry(cluster)
            if entry & OFLAG_ZERO and not entry & OFLAG_COMPRESSED:
                return
            if entry & (L2E_OFFSET_MASK | OFLAG_COMPRESSED) == 0 and self.backing is None:
                return
        self.write(start, bytes(end - start))

    def _zero_clusters(self, first: int, stop: int) -> None:
        """Make whole clusters ``[first, stop)`` read as zeros."""
        cb = self._cluster_bits
        l2_mask = self._l2_entries - 1
        v3 = self.header.version >= 3
        cluster = first
        while cluster < stop:
            l1_index = cluster >> self._l2_bits
            span_stop = min(stop, (l1_index + 1) << self._l2_bits)
            for pending in [c for c in self._partial if cluster <= c < span_stop]:
                del self._partial[pending]
            if self.backing is None and not self._l2_offset(l1_index):
                cluster = span_stop
                continue
            if self.backing is not None and not v3:
                # No zero clusters before version 3: the zeros are data hiding the backing file.
                chunk = 1 << 20
                pos, end = cluster << cb, min(span_stop << cb, self.virtual_size)
                while pos < end:
                    n = min(chunk, end - pos)
                    self._write_plain(pos, memoryview(bytes(n)))
                    pos += n
                cluster = span_stop
                continue
            l2_offset, table = self._l2_for_write(l1_index)
            changed = False
            for c in range(cluster, span_stop):
                index = c & l2_mask
                entry = table[index]
                host = entry & L2E_OFFSET_MASK
                if entry & OFLAG_COMPRESSED or (host and not entry & OFLAG_COPIED):
                    new = OFLAG_ZERO if v3 and self.backing is not None else 0
                    self._release(entry)
                elif host:
                    if v3:
                        new = host | OFLAG_COPIED | OFLAG_ZERO  # keep the cluster, preallocated
                    else:
                        new = 0
                        self._release(entry)
                elif entry & OFLAG_ZERO or self.backing is None:
                    continue
                else:
                    new = OFLAG_ZERO
                if new != entry:
                    table[index] = new
                    changed = True
            if changed:
                self._l2_dirty.add(l2_offset)
            cluster = span_stop

    # ============================================================ write-back

    def _write_header(self) -> None:
        self._file.write(0, self.header.pack())
        self._header_dirty = False

    def _flush_metadata(self) -> None:
        """Write cached metadata: refcount blocks, refcount table, L2 tables, L1 table, header."""
        if not self.writable or self._file.closed:
            return
        self._settle_compression()
        self._write_refblocks()
        if self._reftable_dirty and self._reftable is not None:
            self._file.write(self.header.refcount_table_offset, entries_to_bytes(self._reftable))
            self._reftable_dirty = False
        for offset in sorted(self._l2_dirty):
            self._file.write(offset, entries_to_bytes(self._l2_cache[offset]))
        self._l2_dirty.clear()
        for page in sorted(self._l1_dirty):
            first = page * L1_PAGE_ENTRIES
            entries = self._l1[first : first + L1_PAGE_ENTRIES]
            self._file.write(self.header.l1_table_offset + 8 * first, entries_to_bytes(entries))
        self._l1_dirty.clear()
        if self._header_dirty:
            self._write_header()

    def flush(self) -> None:
        """Write cached metadata, then push everything to stable storage."""
        if self.writable and not self.closed:
            self._flush_metadata()
        super().flush()

    def _finish(self) -> None:
        self._flush_partial_clusters()
        self._settle_compression()
        self._flush_metadata()
        tail = align_up(self._compressed_cursor, 512)
        if tail > self._file.size:  # the last compressed cluster's final sector is inside the file
            self._file.truncate(tail)

    def _close_files(self) -> None:
        self._shutdown_pool()
        super()._close_files()

    def abort(self) -> None:
        """Abandon a new image (its pending compression is cancelled first)."""
        self._shutdown_pool()
        super().abort()

    # ============================================================ description

    def _details(self) -> dict[str, Any]:
        header = self.header
        return {
            "cluster_size": self._cluster_size,
            "compat": "1.1" if header.version >= 3 else "0.10",
            "compression_type": COMPRESSION_NAMES.get(header.compression_type, str(header.compression_type)),
            "refcount_bits": 1 << header.refcount_order,
            "lazy_refcounts": bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "dirty": bool(header.incompatible_features & INCOMPAT_DIRTY),
            "corrupt": bool(header.incompatible_features & INCOMPAT_CORRUPT),
            "extended_l2": self._extended,
            "snapshots": header.nb_snapshots,
            "bitmaps": self.extensions.bitmaps.nb_bitmaps
            if self.extensions.bitmaps is not None and header.autoclear_features & AUTOCLEAR_BITMAPS else 0,
            "backing_format": self.extensions.backing_format,
        }

    # ================================================================ checking

    def check(self) -> CheckResult:
        """Rebuild every refcount from the metadata and compare (``qemu-img check``'s verdicts)."""
        result = self._new_check_result()
        result.total_units = -(-self.virtual_size // self._cluster_size)
        try:
            if self.writable:
                self._flush_metadata()
            _Checker(self, result).run()
        except PolyvisorError as exc:
            result.corruption("qcow2 check", f"check stopped: {exc}")
        return result


def _constant(data: bytes) -> bytes:
    return data


def _like_entries(table: array[int], index: int, last: int, entry: int, *, kind: ExtentKind, cs: int) -> int:
    """How many standard L2 entries from *index* (up to *last*) continue the same run: contiguous data,
    zero clusters, or unallocated clusters."""
    j = index + 1
    if kind is ExtentKind.DATA:
        expected = entry + cs
        while j <= last and table[j] == expected:
            j += 1
            expected += cs
    elif kind is ExtentKind.ZERO:
        while j <= last and table[j] & (OFLAG_ZERO | OFLAG_COMPRESSED) == OFLAG_ZERO:
            j += 1
    else:
        while j <= last and table[j] == 0:
            j += 1
    return j - index


def _initial_reftable_clusters(cs: int, l1_clusters: int) -> int:
    """Clusters of a new image's refcount table: enough to count the header, itself, the L1 table and the
    refcount blocks doing that counting, so that creating the image never has to move it."""
    per_block = cs * 8 // 16
    per_table_cluster = cs // 8
    clusters = 1
    while True:
        counted = 1 + clusters + l1_clusters
        blocks = -(-counted // (per_block - 1)) + 1
        if clusters * per_table_cluster > blocks:
            return clusters
        clusters = -(-(blocks + 1) // per_table_cluster)


# ==================================================================== header


def _read_header(file: ImageFile) -> tuple[Header, Extensions, str | None]:
    """Read and validate the header, its extensions and the backing file name ("Header")."""
    path = file.display_path
    size = file.size
    if size < HEADER_V2.size:
        raise TruncatedImage(path, f"file of {size} bytes is too short for a qcow2 header",
                             structure="qcow2 header", offset=0)
    head = file.read(0, min(size, 1 << MIN_CLUSTER_BITS), "qcow2 header")
    if head[:4] != MAGIC:
        raise CorruptImage(path, f"bad magic {head[:4]!r} (a qcow2 image starts with {MAGIC!r})",
                           structure="qcow2 header", offset=0)
    header = Header.unpack(head)

    def bad(message: str, offset: int) -> CorruptImage:
        return CorruptImage(path, message, structure="qcow2 header", offset=offset)

    if header.version not in (2, 3):
        raise UnsupportedFeature(path, f"qcow2 version {header.version} is not supported (only 2 and 3)",
                                 structure="qcow2 header", offset=4)
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(f"cluster_bits {header.cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}", 20)
    cs = 1 << header.cluster_bits
    if header.version == 2:
        header.header_length = V2_HEADER_LENGTH
        header.refcount_order = 4
    else:
        if len(head) < V3_MIN_HEADER_LENGTH:
            raise TruncatedImage(path, "file too short for a version 3 header", structure="qcow2 header",
                                 offset=0)
        if not V3_MIN_HEADER_LENGTH <= header.header_length <= cs:
            raise bad(f"header_length {header.header_length} outside {V3_MIN_HEADER_LENGTH}..{cs}", 100)
        if header.refcount_order > 6:
            raise bad(f"refcount_order {header.refcount_order} above 6", 96)
        if header.header_length <= V3_MIN_HEADER_LENGTH:
            header.compression_type = COMPRESSION_ZLIB
    head = file.read_upto(0, cs)
    extensions = _read_extensions(path, head, header)
    backing_name = _read_backing_name(file, header)

    coverage = cs * (cs // (16 if header.incompatible_features & INCOMPAT_EXTL2 else 8))
    if header.l1_size * 8 > MAX_L1_BYTES:
        raise LimitExceeded(path, f"L1 table of {header.l1_size} entries exceeds qemu's {MAX_L1_BYTES >> 20} MiB "
                            "limit", structure="qcow2 header", offset=36)
    if header.size > header.l1_size * coverage:
        raise bad(f"virtual size {header.size} needs more than the {header.l1_size} L1 entries present", 24)
    if header.l1_size:
        _check_table(path, header.l1_table_offset, header.l1_size * 8, cs=cs, file_size=size, what="L1 table",
                     field_at=40)
    if header.refcount_table_clusters == 0:
        raise bad("no refcount table", 56)
    if header.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise LimitExceeded(path, f"refcount table of {header.refcount_table_clusters} clusters exceeds qemu's "
                            f"{MAX_REFTABLE_BYTES >> 20} MiB limit", structure="qcow2 header", offset=56)
    reftable_bytes = header.refcount_table_clusters * cs
    _check_table(path, header.refcount_table_offset, reftable_bytes, cs=cs, file_size=size,
                 what="refcount table", field_at=48)
    if header.l1_size and header.refcount_table_offset < header.l1_table_offset + header.l1_size * 8 and (
        header.l1_table_offset < header.refcount_table_offset + reftable_bytes
    ):
        raise bad("the refcount table overlaps the L1 table", 48)
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise LimitExceeded(path, f"{header.nb_snapshots} snapshots exceed qemu's limit of {MAX_SNAPSHOTS}",
                            structure="qcow2 header", offset=60)
    if header.nb_snapshots:
        _check_table(path, header.snapshots_offset, 1, cs=cs, file_size=size, what="snapshot table",
                     field_at=64)
    return header, extensions, backing_name


def _check_table(path: Path, offset: int, length: int, *, cs: int, file_size: int, what: str,
                 field_at: int) -> None:
    """A table must be cluster aligned, after the header cluster and inside the file."""
    if offset & (cs - 1):
        raise CorruptImage(path, f"{what} offset {offset:#x} is not cluster aligned", structure="qcow2 header",
                           offset=field_at)
    if offset < cs:
        raise CorruptImage(path, f"{what} at {offset:#x} overlaps the image header", structure="qcow2 header",
                           offset=field_at)
    if offset + length > file_size:
        raise TruncatedImage(path, f"{what} at {offset:#x} ({length} bytes) runs past the end of the file "
                             f"({file_size} bytes)", structure="qcow2 header", offset=field_at)


def _read_extensions(path: Path, head: bytes, header: Header) -> Extensions:
    """Walk the header extensions ("Header extensions"), every length checked against the area's end."""
    cs = 1 << header.cluster_bits
    start = header.header_length
    end = header.backing_file_offset if header.backing_file_offset else cs
    extensions = Extensions()
    if header.backing_file_offset and not start <= header.backing_file_offset <= cs:
        raise CorruptImage(path, f"backing file name offset {header.backing_file_offset} outside the header "
                           f"cluster ({start}..{cs})", structure="qcow2 header", offset=8)
    pos = start
    while pos < end:
        if pos + EXTENSION_HEADER.size > end:
            raise CorruptImage(path, f"header extension at {pos} does not fit before {end}",
                               structure="qcow2 header extension", offset=pos)
        if pos + EXTENSION_HEADER.size > len(head):
            raise TruncatedImage(path, "header extensions run past the end of the file",
                                 structure="qcow2 header extension", offset=pos)
        kind, length = EXTENSION_HEADER.unpack_from(head, pos)
        data_start = pos + EXTENSION_HEADER.size
        if kind == EXT_END:
            break
        if length > end - data_start:
            raise CorruptImage(path, f"header extension {kind:#010x} claims {length} bytes, past the end of the "
                               f"header extension area at {end}", structure="qcow2 header extension", offset=pos)
        if data_start + length > len(head):
            raise TruncatedImage(path, f"header extension {kind:#010x} runs past the end of the file",
                                 structure="qcow2 header extension", offset=pos)
        payload = head[data_start : data_start + length]
        extensions.seen.append((kind, data_start))
        if kind == EXT_BACKING_FORMAT:
            if length > MAX_BACKING_FORMAT_NAME:
                raise CorruptImage(path, f"backing format name of {length} bytes is too long",
                                   structure="qcow2 backing format extension", offset=data_start)
            extensions.backing_format = _text(path, payload, "qcow2 backing format extension", data_start)
        elif kind == EXT_FEATURE_TABLE:
            for i in range(length // 48):
                entry = payload[48 * i : 48 * (i + 1)]
                name = entry[2:].split(b"\0", 1)[0].decode("utf-8", "replace")
                extensions.feature_names[(entry[0], entry[1])] = name
        elif kind == EXT_BITMAPS:
            if header.autoclear_features & AUTOCLEAR_BITMAPS:
                extensions.bitmaps = _bitmaps_extension(path, payload, cs, data_start)
        elif kind == EXT_CRYPTO:
            extensions.has_crypto_header = True
        elif kind == EXT_DATA_FILE:
            extensions.data_file = payload.decode("utf-8", "replace")
        pos = data_start + align_up(length, 8)
    return extensions


def _bitmaps_extension(path: Path, payload: bytes, cs: int, where: int) -> BitmapsExtension:
    """The bitmaps extension, validated as qemu does before it trusts it ("Bitmaps extension")."""
    if len(payload) < BITMAPS_EXTENSION.size:
        raise CorruptImage(path, f"bitmaps extension of {len(payload)} bytes is too short",
                           structure="qcow2 bitmaps extension", offset=where)
    ext = BITMAPS_EXTENSION.unpack(payload)
    if not 1 <= ext.nb_bitmaps <= MAX_BITMAPS:
        raise CorruptImage(path, f"bitmaps extension lists {ext.nb_bitmaps} bitmaps",
                           structure="qcow2 bitmaps extension", offset=where)
    if ext.directory_size > MAX_BITMAP_DIRECTORY_BYTES or ext.directory_offset & (cs - 1):
        raise CorruptImage(path, "bitmap directory too large or not cluster aligned",
                           structure="qcow2 bitmaps extension", offset=where)
    return ext


def _text(path: Path, data: bytes, structure: str, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptImage(path, "not valid UTF-8 text", structure=structure, offset=offset) from None


def _read_backing_name(file: ImageFile, header: Header) -> str | None:
    if not header.backing_file_offset:
        return None
    path = file.display_path
    if not 0 < header.backing_file_size <= MAX_BACKING_FILE_NAME:
        raise CorruptImage(path, f"backing file name length {header.backing_file_size} outside "
                           f"1..{MAX_BACKING_FILE_NAME}", structure="qcow2 header", offset=16)
    raw = file.read(header.backing_file_offset, header.backing_file_size, "qcow2 backing file name")
    return _text(path, raw, "qcow2 backing file name", header.backing_file_offset)


def _refuse_unsupported(file: ImageFile, header: Header, extensions: Extensions, *, writable: bool) -> None:
    """Features polyvisor cannot honour refuse the open (or only the writable open) with a clear reason."""
    path = file.display_path
    incompatible = header.incompatible_features
    unknown = incompatible & ~INCOMPAT_KNOWN
    if unknown:
        names = [extensions.feature_names.get((0, bit), f"bit {bit}") for bit in range(64) if unknown >> bit & 1]
        raise UnsupportedFeature(path, f"unknown incompatible qcow2 features: {', '.join(names)}",
                                 structure="qcow2 header", offset=72)
    if header.crypt_method:
        method = {1: "AES", 2: "LUKS"}.get(header.crypt_method, f"method {header.crypt_method}")
        raise UnsupportedFeature(path, f"encrypted qcow2 images ({method}) are not supported",
                                 structure="qcow2 header", offset=32)
    if incompatible & INCOMPAT_DATA_FILE or extensions.data_file is not None:
        raise UnsupportedFeature(path, "qcow2 images with an external data file are not supported",
                                 structure="qcow2 header", offset=72)
    if incompatible & INCOMPAT_COMPRESSION:
        if header.header_length <= V3_MIN_HEADER_LENGTH or header.compression_type == COMPRESSION_ZLIB:
            raise CorruptImage(path, "compression type feature set without a compression type",
                               structure="qcow2 header", offset=V3_MIN_HEADER_LENGTH)
    elif header.compression_type != COMPRESSION_ZLIB:
        raise CorruptImage(path, f"compression type {header.compression_type} set without its feature bit",
                           structure="qcow2 header", offset=V3_MIN_HEADER_LENGTH)
    if header.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise UnsupportedFeature(path, f"unknown compression type {header.compression_type}",
                                 structure="qcow2 header", offset=V3_MIN_HEADER_LENGTH)
    if incompatible & INCOMPAT_EXTL2 and header.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise CorruptImage(path, "extended L2 entries need clusters of at least 16 KiB",
                           structure="qcow2 header", offset=20)
    if not writable:
        return
    if incompatible & INCOMPAT_CORRUPT:
        raise ReadOnlyImage(path, "the image is marked corrupt: it can only be opened read-only (repair it "
                            "with qemu-img check -r all)", structure="qcow2 header", offset=72)
    if incompatible & INCOMPAT_DIRTY:
        raise UnsupportedFeature(path, "the image is dirty (lazy refcounts not yet written back): repair it "
                                 "with qemu-img check -r all before writing", structure="qcow2 header", offset=72)
    if incompatible & INCOMPAT_EXTL2:
        raise UnsupportedFeature(path, "writing images with extended L2 entries (subclusters) is not supported",
                                 structure="qcow2 header", offset=72)
    if extensions.bitmaps is not None:
        raise UnsupportedFeature(path, "the image has persistent dirty bitmaps, which polyvisor would leave "
                                 "stale; remove them (qemu-img bitmap --remove) before writing",
                                 structure="qcow2 bitmaps extension")


# =================================================================== check


class _Counter:
    """Rebuilt refcounts of the host clusters ``[low, high)`` (one window of a check pass)."""

    def __init__(self, low: int, high: int, cluster_bits: int, file_clusters: int) -> None:
        self.low, self.high = low, high
        self.cluster_bits = cluster_bits
        self.file_clusters = file_clusters
        self.counts = array("H", bytes(2 * (high - low)))
        self.more: dict[int, int] = {}
        self.highest = -1

    def add(self, cluster: int, times: int = 1) -> None:
        self.highest = max(self.highest, cluster)
        if self.low <= cluster < self.high:
            i = cluster - self.low
            value = self.counts[i] + times
            if value >= 0xFFFF:  # the array saturates; the rest is kept aside
                self.more[cluster] = self.more.get(cluster, 0) + value - 0xFFFF
                value = 0xFFFF
            self.counts[i] = value

    def add_range(self, offset: int, length: int, times: int = 1) -> None:
        if length > 0:
            for cluster in range(offset >> self.cluster_bits, ((offset + length - 1) >> self.cluster_bits) + 1):
                self.add(cluster, times)

    def value(self, cluster: int) -> int:
        return self.counts[cluster - self.low] + self.more.get(cluster, 0)


class _Checker:
    """``qemu-img check`` for one image: rebuild refcounts from every reference and compare."""

    def __init__(self, image: Qcow2Image, result: CheckResult) -> None:
        self.image = image
        self.result = result
        self.header = image.header
        self.cb = image._cluster_bits
        self.cs = image._cluster_size
        self.file_size = image._file.size
        self.file_clusters = -(-self.file_size // self.cs)
        self.codec = image._refcounts
        self.reporting = True
        self.allocated = 0
        self.walked = 0
        self.stored_cache: OrderedDict[int, array[int] | None] = OrderedDict()
        self.reftable = array("Q")
        self.snapshots: list[tuple[int, int, str]] = []
        self.snapshot_table_bytes = 0

    def corruption(self, structure: str, message: str, offset: int | None = None) -> None:
        if self.reporting:
            self.result.corruption(structure, message, offset)

    # ------------------------------------------------------------- stored

    def stored_block(self, index: int) -> array[int] | None:
        """Refcount block *index* as stored (None when absent or unusable)."""
        if index in self.stored_cache:
            return self.stored_cache[index]
        block: array[int] | None = None
        if index < len(self.reftable):
            offset = self.reftable[index] & REFT_OFFSET_MASK
            if offset and not offset & (self.cs - 1) and offset + self.cs <= self.file_size:
                block = self.codec.decode(self.image._file.read(offset, self.cs, "qcow2 refcount block"))
        if len(self.stored_cache) >= 64:
            self.stored_cache.popitem(last=False)
        self.stored_cache[index] = block
        return block

    def stored(self, cluster: int) -> int:
        block = self.stored_block(cluster // self.codec.entries)
        return 0 if block is None else block[cluster % self.codec.entries]

    # --------------------------------------------------------------- run

    def run(self) -> None:
        image, result = self.image, self.result
        self.reftable = image._read_reftable()
        self.read_snapshots()
        highest = -1
        first = True
        for low in range(0, max(1, self.file_clusters), CHECK_WINDOW_CLUSTERS):
            high = min(self.file_clusters, low + CHECK_WINDOW_CLUSTERS)
            counter = _Counter(low, high, self.cb, self.file_clusters)
            self.reporting = first
            self.walked = 0
            self.count_references(counter)
            highest = max(highest, counter.highest, self.compare(counter))
            first = False
        self.reporting = True
        result.allocated_units = self.allocated
        result.image_end_offset = (highest + 1) * self.cs

    def read_snapshots(self) -> None:
        """The snapshot table ("Snapshots"): each snapshot's L1 table, and the table's own size."""
        header, file = self.header, self.image._file
        pos = start = header.snapshots_offset
        for i in range(header.nb_snapshots):
            try:
                entry = SNAPSHOT_ENTRY.unpack(file.read(pos, SNAPSHOT_ENTRY.size, "qcow2 snapshot table"))
                if entry.extra_data_size > MAX_SNAPSHOT_EXTRA_DATA:
                    raise CorruptImage(self.image.path, f"snapshot {i} has {entry.extra_data_size} bytes of extra "
                                       "data", structure="qcow2 snapshot table", offset=pos)
                variable = entry.extra_data_size + entry.id_size + entry.name_size
                names = file.read(pos + SNAPSHOT_ENTRY.size, variable, "qcow2 snapshot table")
                name = names[entry.extra_data_size + entry.id_size :].decode("utf-8", "replace")
            except PolyvisorError as exc:
                self.corruption("qcow2 snapshot table", f"snapshot {i}: {exc}", pos)
                return
            pos += align_up(SNAPSHOT_ENTRY.size + variable, 8)
            if pos - start > MAX_SNAPSHOT_TABLE_BYTES:
                self.corruption("qcow2 snapshot table", "snapshot table larger than qemu's limit", start)
                return
            self.snapshots.append((entry.l1_table_offset, entry.l1_size, name))
        self.snapshot_table_bytes = pos - start

    def count_references(self, counter: _Counter) -> None:
        """Every reference to a host cluster: header, tables, data, snapshots, refcount structures, bitmaps."""
        header, cs = self.header, self.cs
        counter.add(0)
        if header.l1_size:
            counter.add_range(header.l1_table_offset, header.l1_size * 8)
        self.walk_l1(counter, header.l1_table_offset, header.l1_size, "active L1 table", active=True)
        for l1_offset, l1_size, name in self.snapshots:
            label = f"L1 table of snapshot {name!r}"
            if l1_size * 8 > MAX_L1_BYTES or l1_offset & (cs - 1) or l1_offset + l1_size * 8 > self.file_size:
                self.corruption("qcow2 snapshot table", f"{label} at {l1_offset:#x} ({l1_size} entries) is "
                                "misaligned, too large or past the end of the file", l1_offset)
                continue
            if l1_size:
                counter.add_range(l1_offset, l1_size * 8)
            self.walk_l1(counter, l1_offset, l1_size, label, active=False)
        if header.nb_snapshots:
            counter.add_range(header.snapshots_offset, self.snapshot_table_bytes)
        counter.add_range(header.refcount_table_offset, header.refcount_table_clusters * cs)
        self.count_bitmaps(counter)
        for index, entry in enumerate(self.reftable):
            offset = entry & REFT_OFFSET_MASK
            if not offset:
                continue
            where = header.refcount_table_offset + 8 * index
            if offset & (cs - 1):
                self.corruption("qcow2 refcount table", f"refcount block {index} at {offset:#x} is not cluster "
                                "aligned", where)
            elif offset >= self.file_size:
                self.corruption("qcow2 refcount table", f"refcount block {index} at {offset:#x} is outside the "
                                "image", where)
            else:
                cluster = offset >> self.cb
                counter.add(cluster)
                if counter.low <= cluster < counter.high and counter.value(cluster) != 1:
                    # Counted after everything else: a second user means it overlaps other metadata.
                    self.result.corruption("qcow2 refcount table", f"refcount block {index} at {offset:#x} is "
                                           f"also used elsewhere (reference={counter.value(cluster)})", where)

    def budget(self, entries: int) -> None:
        self.walked += entries
        if self.walked > CHECK_MAX_ENTRIES:
            raise LimitExceeded(self.image.path, f"more than {CHECK_MAX_ENTRIES} table entries to walk",
                                structure="qcow2 check")

    def walk_l1(self, counter: _Counter, l1_offset: int, l1_size: int, label: str, *, active: bool) -> None:
        """Count an L1 table's L2 tables and everything they map."""
        if not l1_size:
            return
        image, cs, cb = self.image, self.cs, self.cb
        self.budget(l1_size)
        if active:
            l1 = image._l1
        else:
            try:
                l1 = entries_from_bytes(image._file.read(l1_offset, l1_size * 8, "qcow2 L1 table"))
            except PolyvisorError as exc:
                self.corruption("qcow2 L1 table", f"{label}: {exc}", l1_offset)
                return
        for chunk in range(0, l1_size, CHECK_L1_CHUNK):
            # An L2 table listed several times (corrupt, or hostile) is read and walked once per chunk.
            tables: dict[int, int] = {}
            for index in range(chunk, min(l1_size, chunk + CHECK_L1_CHUNK)):
                entry = l1[index]
                l2_offset = entry & L1E_OFFSET_MASK
                if not l2_offset:
                    continue
                where = l1_offset + 8 * index
                if l2_offset & (cs - 1):
                    self.corruption("qcow2 L1 table", f"{label} entry {index}: L2 table {l2_offset:#x} is not "
                                    "cluster aligned", where)
                    counter.add_range(l2_offset, cs)  # counted all the same, as qemu-img check does
                    continue
                if l2_offset + cs > self.file_size:
                    self.corruption("qcow2 L1 table", f"{label} entry {index}: L2 table {l2_offset:#x} is past "
                                    "the end of the file", where)
                    continue
                counter.add(l2_offset >> cb)
                tables[l2_offset] = tables.get(l2_offset, 0) + 1
                if active and self.reporting:
                    refcount = self.stored(l2_offset >> cb)
                    if (refcount == 1) != bool(entry & OFLAG_COPIED):
                        self.corruption("qcow2 L1 table", f"OFLAG_COPIED L2 cluster: l1_entry={entry:#x} "
                                        f"refcount={refcount}", where)
            for l2_offset, times in tables.items():
                self.budget(image._l2_entries)
                try:
                    raw = image._file.read(l2_offset, cs, "qcow2 L2 table")
                except PolyvisorError as exc:
                    self.corruption("qcow2 L2 table", f"{label}: {exc}", l2_offset)
                    continue
                if raw.count(0) != len(raw):
                    self.walk_l2(counter, entries_from_bytes(raw), l2_offset, active=active, times=times)

    def walk_l2(self, counter: _Counter, table: array[int], l2_offset: int, *, active: bool, times: int) -> None:
        """Count what one L2 table maps, *times* over (once per reference to the table)."""
        cs, cb = self.cs, self.cb
        words = self.image._entry_words
        compressed = self.image._compressed
        active_here = active and self.reporting
        for i in range(0, len(table), words):
            entry = table[i]
            if not entry and (words == 1 or not table[i + 1]):
                continue
            where = l2_offset + 8 * i
            if entry & OFLAG_COMPRESSED:
                if entry & OFLAG_COPIED:
                    self.corruption("qcow2 L2 table", f"compressed cluster entry {entry:#x} has the COPIED flag",
                                    where)
                offset, length = compressed.parse(entry)
                if offset >= self.file_size or offset < cs:
                    self.corruption("qcow2 L2 table", f"compressed cluster at {offset:#x} lies outside the "
                                    "image's data area", where)
                    if offset >= self.file_size:
                        continue
                counter.add_range(offset, length, times)
                if active_here:
                    self.allocated += times
                continue
            host = entry & L2E_OFFSET_MASK
            if words == 2:
                bitmap = table[i + 1]
                if bitmap & SUBCLUSTER_ALL & (bitmap >> 32) or (bitmap & SUBCLUSTER_ALL and not host):
                    self.corruption("qcow2 L2 table", f"invalid subcluster allocation bitmap {bitmap:#018x}",
                                    where)
            if not host:
                continue
            if host & (cs - 1):
                self.corruption("qcow2 L2 table", f"cluster at {host:#x} is not properly aligned", where)
                counter.add_range(host, cs, times)  # counted all the same, as qemu-img check does
                if active_here:
                    self.allocated += times
                continue
            if host >= self.file_size:
                self.corruption("qcow2 L2 table", f"cluster at {host:#x} is past the end of the file", where)
                continue
            counter.add(host >> cb, times)
            if active_here:
                self.allocated += times
                refcount = self.stored(host >> cb)
                if (refcount == 1) != bool(entry & OFLAG_COPIED):
                    self.corruption("qcow2 L2 table", f"OFLAG_COPIED data cluster: l2_entry={entry:#x} "
                                    f"refcount={refcount}", where)

    def count_bitmaps(self, counter: _Counter) -> None:
        """Bitmap directory, tables and data clusters ("Bitmaps"), when the extension is valid."""
        ext = self.image.extensions.bitmaps
        if ext is None:
            return
        cs, file = self.cs, self.image._file
        counter.add_range(ext.directory_offset, ext.directory_size)
        try:
            directory = file.read(ext.directory_offset, ext.directory_size, "qcow2 bitmap directory")
        except PolyvisorError as exc:
            self.corruption("qcow2 bitmap directory", str(exc), ext.directory_offset)
            return
        pos = 0
        for _ in range(ext.nb_bitmaps):
            if pos + BITMAP_DIRECTORY_ENTRY.size > len(directory):
                self.corruption("qcow2 bitmap directory", "bitmap directory entries run past its size",
                                ext.directory_offset + pos)
                return
            entry = BITMAP_DIRECTORY_ENTRY.unpack(directory, pos)
            pos += align_up(BITMAP_DIRECTORY_ENTRY.size + entry.extra_data_size + entry.name_size, 8)
            if entry.table_size > MAX_BITMAP_TABLE_ENTRIES or entry.table_offset & (cs - 1):
                self.corruption("qcow2 bitmap directory", "bitmap table too large or not aligned",
                                entry.table_offset)
                continue
            counter.add_range(entry.table_offset, entry.table_size * 8)
            self.budget(entry.table_size)
            for chunk in range(0, entry.table_size, 1 << 16):
                count = min(1 << 16, entry.table_size - chunk)
                try:
                    table = entries_from_bytes(file.read(entry.table_offset + 8 * chunk, 8 * count,
                                                         "qcow2 bitmap table"))
                except PolyvisorError as exc:
                    self.corruption("qcow2 bitmap table", str(exc), entry.table_offset)
                    break
                for value in table:
                    offset = value & L2E_OFFSET_MASK
                    if offset and not offset & (cs - 1) and offset < self.file_size:
                        counter.add(offset >> self.cb)

    def compare(self, counter: _Counter) -> int:
        """Stored against rebuilt refcounts in the counter's window; returns the highest cluster in use."""
        per_block = self.codec.entries
        highest = -1
        result = self.result
        for index in range(counter.low // per_block, -(-counter.high // per_block)):
            block = self.stored_block(index)
            first = max(counter.low, index * per_block)
            stop = min(counter.high, (index + 1) * per_block)
            rebuilt = counter.counts[first - counter.low : stop - counter.low]
            if block is None:
                stored = array(rebuilt.typecode, bytes(rebuilt.itemsize * len(rebuilt)))
            else:
                stored = block[first - index * per_block : stop - index * per_block]
            if stored.tobytes().rstrip(b"\0") or rebuilt.tobytes().rstrip(b"\0"):
                last = max(_last_used(stored), _last_used(rebuilt))
                highest = max(highest, first + last)
            if not counter.more and (stored == rebuilt if stored.typecode == rebuilt.typecode
                                     else stored.tolist() == rebuilt.tolist()):
                continue
            for j in range(len(rebuilt)):
                cluster = first + j
                have = stored[j]
                want = counter.value(cluster)
                if have == want:
                    continue
                if have > want:
                    result.leak("qcow2 refcount block", f"leaked cluster {cluster} refcount={have} "
                                f"reference={want}", cluster << self.cb)
                else:
                    result.corruption("qcow2 refcount block", f"cluster {cluster} refcount={have} "
                                      f"reference={want}", cluster << self.cb)
        return highest


def _last_used(values: array[int]) -> int:
    """Index of the last non-zero value (-1 if none)."""
    used = len(values.tobytes().rstrip(b"\0"))
    return (used - 1) // values.itemsize if used else -1
