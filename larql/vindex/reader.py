"""Open a vindex: validate its metadata, map its files read-only, hand out zero-copy views.

Files are mapped lazily, on first use, so a slice holding only some files (an expert server
has no attention weights, an embed slice no layers) opens fine; asking for a part whose file
is absent raises VindexError naming that file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import ranges
from ..config import ConfigError, ModelConfig
from . import format as fm
from . import integrity
from .format import VindexError


@dataclass(frozen=True)
class AttnWeights:
    q: Any
    k: Any
    v: Any  # None when the layer reuses K as V (attention_k_eq_v on a full layer)
    o: Any


@dataclass(frozen=True)
class DenseWeights:
    gate: Any
    up: Any
    down: Any


def _qmatrix(fmt: int, rows: int, cols: int, data: np.ndarray, logical_cols: int):
    from ..kernels import QMatrix

    return QMatrix(fmt=fmt, rows=rows, cols=cols, data=data, logical_cols=logical_cols)


class _Mapped:
    """One read-only mmap of a whole file, plus a uint8 numpy view of it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # The descriptor stays open: fstat on it tells whether the mapped file shrank under us
        # (`check`), and hashing reads through it, where a truncated file gives a short read
        # instead of the SIGBUS a read through the mapping would.
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self.fd).st_size
            self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ) if self.size else None
        except BaseException:
            os.close(self.fd)
            raise
        if self.mm is None:
            self.array = np.zeros(0, dtype=np.uint8)
            return
        self.array = np.frombuffer(self.mm, dtype=np.uint8)
        self.array.flags.writeable = False

    def check(self) -> None:
        """Raise VindexError if the file is now shorter than what is mapped (it was truncated or
        rewritten in place): touching the missing pages would kill the process with SIGBUS.
        One fstat (~12 us on the test sandbox). A file replaced by rename keeps our old inode
        and stays valid."""
        now = os.fstat(self.fd).st_size
        if now < self.size:
            raise VindexError(
                f"{self.path}: shrank from {self.size} to {now} bytes while mapped (truncated or "
                "rewritten in place); its weights cannot be served until the server restarts. "
                "Update vindex files by writing a new file and renaming it into place."
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    @property
    def address(self) -> int:
        return int(self.array.ctypes.data) if self.size else 0

    def madvise(self, advice: int, start: int = 0, length: int | None = None) -> None:
        if self.mm is None:
            return
        length = self.size - start if length is None else length
        a = start - start % mmap.PAGESIZE
        self.mm.madvise(advice, a, min(self.size - a, length + (start - a)))


_libc = None

# madvise(2) advice Python's mmap module (3.11) does not name. MADV_POPULATE_READ (Linux 5.14+)
# faults a range into the page tables in one call; older kernels answer EINVAL.
MADV_POPULATE_READ = 22
_populate_read_ok: bool | None = None  # None: not tried yet on this kernel
# Readahead request size for warm-up: Linux's default read_ahead_kb, so no request is cut
# short whatever the device (the kernel limits one to max(read_ahead_kb, max_sectors_kb)).
READAHEAD_STEP = 128 << 10
# The PMD size with 4 KiB base pages (x86-64, AArch64 Linux): what one huge-page TLB entry maps.
HUGE_PAGE = 2 << 20


def _c():
    """libc through ctypes: its calls release the GIL, so several warm-up threads overlap."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = lib
    return _libc


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_vm_read_ok: bool | None = None  # None: not tried yet (a seccomp filter may refuse the call)


def _read_mapped(dst: int, src: int, n: int) -> int:
    """process_vm_readv of this process's own memory: n bytes from src (in a file mapping) to
    dst. Returns the bytes copied, 0 if the mapping has no page there (the file shrank: the
    call answers EFAULT where a load would raise SIGBUS), -1 if this system refuses the call."""
    global _vm_read_ok
    if _vm_read_ok is False:
        return -1
    lib = _c()
    if _vm_read_ok is None:
        lib.process_vm_readv.restype = ctypes.c_ssize_t
        lib.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                         ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
    local, remote = _IoVec(dst, n), _IoVec(src, n)
    got = lib.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got >= 0:
        _vm_read_ok = True
        return got
    err = ctypes.get_errno()
    if err == errno.EFAULT:
        return 0
    if err in (errno.ENOSYS, errno.EPERM) and not _vm_read_ok:
        _vm_read_ok = False
        return -1
    raise OSError(err, f"process_vm_readv: {os.strerror(err)}")


def _mincore(addr: int, length: int) -> np.ndarray:
    """One byte per page of [addr, addr+length) (addr page-aligned): bit 0 set = resident."""
    pages = -(-length // mmap.PAGESIZE)
    vec = np.zeros(max(pages, 1), dtype=np.uint8)
    if _c().mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec.ctypes.data_as(ctypes.c_void_p)):
        raise OSError(ctypes.get_errno(), "mincore failed")
    return vec[:pages]


def _madvise(addr: int, length: int, advice: int) -> int:
    """madvise(2) on [addr, addr+length) (addr page-aligned); returns 0 or the errno."""
    if _c().madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) == 0:
        return 0
    return ctypes.get_errno()


def sequential_read_rate(path: Path, start: int, end: int) -> float:
    """Bytes/s of reading file bytes [start, end) front to back with read(2), as `cat` would
    (kernel readahead, 8 MiB reads): the disk's sequential rate, to compare warm-up against in
    the same run. The pages read are evicted again afterwards (posix_fadvise DONTNEED, which
    leaves pages that some process maps alone) so that the warm-up that follows is not flattered;
    callers measure only ranges that were not cached to begin with."""
    start -= start % mmap.PAGESIZE
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        end = min(end, os.fstat(fd).st_size)
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
        view = memoryview(bytearray(8 << 20))
        pos, t0 = start, time.perf_counter()
        while pos < end:
            n = os.preadv(fd, [view[: min(len(view), end - pos)]], pos)
            if n <= 0:
                break
            pos += n
        secs = time.perf_counter() - t0
        # Readahead runs a little past `end`: evict that too.
        os.posix_fadvise(fd, start, end + (32 << 20) - start, os.POSIX_FADV_DONTNEED)
    return (pos - start) / secs if secs > 0 else 0.0


class ExpertFile:
    """One layer's LYRW file: every expert of that layer, mapped once."""

    def __init__(self, path: Path, layer: int, num_experts: int, inter: int, hidden: int) -> None:
        self.path = path
        self.layer = layer
        self._map = _Mapped(path)
        # Before the header is read: default read-ahead would pull in the first expert's pages
        # with it, and a shard that does not own that expert must never hold them.
        self._map.madvise(mmap.MADV_RANDOM)
        # The same for reads through the descriptor (the integrity check hashes through it):
        # a block device's read-ahead (8 MiB here) would pull unowned experts into the page cache.
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._map.fd, 0, 0, os.POSIX_FADV_RANDOM)
        hdr, entries = fm.parse_lyrw(self._map.array, path, self._map.size, (num_experts, inter, hidden))
        for e, ent in enumerate(entries):
            for f in (ent.gate_up_fmt, ent.down_fmt) if ent else ():
                if f not in fm.SUPPORTED:
                    raise VindexError(
                        f"{path}: expert {e} uses {fm.FORMAT_NAMES[f]}, which larql cannot compute"
                    )
        self._huge: list[tuple[int, int]] = []   # ranges under MADV_HUGEPAGE (advise_huge)
        self.header = hdr
        self.version = hdr.version
        self.quant_format = hdr.quant_format
        self.num_experts = hdr.num_entries
        self.inter = hdr.inter
        self.hidden = hdr.hidden
        self._entries = entries

    @property
    def fd(self) -> int:
        """The open descriptor of the mapped file (for fstat and pread)."""
        return self._map.fd

    def check_intact(self) -> None:
        """Raise VindexError (naming the file) if it shrank since it was mapped."""
        self._map.check()

    @property
    def buffer(self):
        """The whole mapped file (for kernels: absolute offsets index into it)."""
        return self._map.array

    @property
    def size(self) -> int:
        return self._map.size

    def entry(self, e: int) -> fm.ExpertEntry | None:
        if not 0 <= e < self.num_experts:
            return None
        return self._entries[e]

    def has(self, e: int) -> bool:
        return self.entry(e) is not None

    def present(self) -> list[int]:
        return [e for e, ent in enumerate(self._entries) if ent is not None]

    def _entries_for(self, experts) -> list[tuple[int, fm.ExpertEntry]]:
        ids = self.present() if experts is None else [int(e) for e in experts]
        out = []
        for e in ids:
            ent = self.entry(e)
            if ent is None:
                raise VindexError(
                    f"{self.path}: expert {e} is not in this file (holds {ranges.text(self.present())})"
                )
            out.append((e, ent))
        return out

    def gate_up(self, e: int) -> np.ndarray:
        """Raw bytes of expert e's gate_up matrix (a view)."""
        ent = self._entries_for([e])[0][1]
        return self._map.array[ent.gate_up_off : ent.gate_up_off + ent.gate_up_len]

    def down(self, e: int) -> np.ndarray:
        ent = self._entries_for([e])[0][1]
        return self._map.array[ent.down_off : ent.down_off + ent.down_len]

    def table(self, experts=None):
        """A kernels.ExpertTable over the mmap holding only the named experts (None: all held)."""
        from ..kernels import ExpertTable

        slots: list[tuple | None] = [None] * self.num_experts
        for e, ent in self._entries_for(experts):
            slots[e] = (self._map.array, ent.gate_up_off, ent.gate_up_fmt, ent.down_off, ent.down_fmt)
        return ExpertTable(self.hidden, self.inter, slots)

    # Access hints ----------------------------------------------------------------------
    def advise_random(self) -> None:
        self._map.madvise(mmap.MADV_RANDOM)

    def advise_huge(self, experts=None) -> int:
        """MADV_HUGEPAGE on the 2 MiB-aligned inside of the named experts' ranges; returns the
        bytes advised (0 where the kernel refuses it).

        Under it a page fault reads and maps a whole aligned 2 MiB folio, MADV_RANDOM or not
        (Linux maps file THP where the filesystem has large folios, ext4 and xfs today): one TLB
        entry for 512 pages, and a fault reads 2 MiB instead of 4 KiB. Only whole 2 MiB pieces
        inside the ranges are advised, so nothing outside them is ever read. Measured on the dev
        VM (ext4, Linux 6.18), top-8 expert FFN at T=1 on a prefaulted 2-layer bank, the two
        mappings alternated call by call: 1774 us against 1879 us on 4 KiB pages (1.06x).

        Pages already cached as small folios (read through a descriptor before) stay small, so
        the server's warm-up faults the owned bytes in first and checks their digests after,
        through `pread`. (Reading a huge folio through a descriptor would also start that
        descriptor's readahead past it, MADV_RANDOM or not, into experts the shard does not own.)"""
        total = 0
        for a, b in self.page_ranges(experts):
            lo, hi = -(-a // HUGE_PAGE) * HUGE_PAGE, b // HUGE_PAGE * HUGE_PAGE
            if hi <= lo or (lo, hi) in self._huge:
                continue
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE, lo, hi - lo)
            except (OSError, AttributeError):   # no file THP here (or no MADV_HUGEPAGE name)
                return total
            self._huge.append((lo, hi))
            total += hi - lo
        return total

    def pread(self, buf: bytearray, pos: int) -> int:
        """File bytes at pos into buf (at most len(buf)); returns how many, 0 at or past the end
        of the file. Inside the MADV_HUGEPAGE ranges the bytes come through the mapping
        (process_vm_readv, which a truncated file fails with EFAULT, never SIGBUS), so they are
        cached as huge folios; through the descriptor they would be cached as small ones, and a
        descriptor read over a huge folio starts readahead past it into unowned experts."""
        n = len(buf)
        for lo, hi in self._huge:
            if lo <= pos < hi:
                dst = np.frombuffer(buf, dtype=np.uint8)   # a writable buffer's address
                got = _read_mapped(dst.ctypes.data, self._map.address + pos, min(n, hi - pos))
                if got >= 0:
                    return got
                break                           # refused here: the descriptor
            if pos < lo < pos + n:
                n = lo - pos                    # stop where a huge range starts
        return os.preadv(self._map.fd, [memoryview(buf)[:n]], pos)

    def evict_outside(self, experts=None) -> None:
        """Drop from the page cache what lies outside the named experts' page ranges (pages
        this process has mapped stay): after a whole-file digest check read them."""
        if not hasattr(os, "posix_fadvise"):
            return
        pos = 0
        for a, b in [*self.page_ranges(experts), (self.size, self.size)]:
            if a > pos:
                os.posix_fadvise(self._map.fd, pos, a - pos, os.POSIX_FADV_DONTNEED)
            pos = max(pos, b)

    def _outside_huge(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) less the MADV_HUGEPAGE ranges."""
        out = [(start, end)]
        for lo, hi in self._huge:
            out = [piece for a, b in out for piece in ((a, min(b, lo)), (max(a, hi), b))
                   if piece[0] < piece[1]]
        return out

    def page_ranges(self, experts=None) -> list[tuple[int, int]]:
        """The named experts' bytes as page-aligned [start, end) file ranges, adjacent ones merged
        (experts 64-127 of a packed v1 file are one range)."""
        page = mmap.PAGESIZE
        spans = sorted((ent.start - ent.start % page, min(self.size, -(-ent.end // page) * page))
                       for _, ent in self._entries_for(experts))
        out: list[tuple[int, int]] = []
        for a, b in spans:
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        return out

    def prefetch(self, experts=None) -> int:
        """Start reading the named experts' pages into the page cache (MADV_WILLNEED: large
        asynchronous reads, whatever the mapping's MADV_RANDOM says); returns the bytes."""
        total = 0
        for a, b in self.page_ranges(experts):
            self._map.madvise(mmap.MADV_WILLNEED, a, b - a)
            total += b - a
        return total

    def populate(self, start: int, end: int) -> None:
        """Map file bytes [start, end) (page-aligned start) into this process and wait for them.

        WILLNEED first: under MADV_RANDOM a page fault reads one 4 KiB page and nothing around
        it, so faulting alone runs at a tenth of the disk's rate (measured: 0.12 vs 2.3 GB/s);
        readahead issues large reads. Then MADV_POPULATE_READ maps the range in one call where
        the kernel has it (Linux 5.14+), else one byte per page is touched."""
        global _populate_read_ok
        if self._map.mm is None or end <= start:
            return
        # One WILLNEED reads at most max(read_ahead_kb, max_sectors_kb) of its range (measured:
        # 8 MiB of a 210 MiB range), so it is issued per READAHEAD_STEP: all of them queue
        # asynchronous reads at once, the disk works at depth, and nothing past `end` is read.
        # Not inside the MADV_HUGEPAGE ranges: readahead would fill them with small folios,
        # which are then mapped 4 KiB at a time; there the faults below read 2 MiB each.
        step = READAHEAD_STEP
        for a, b in self._outside_huge(start, end):
            for pos in range(a, b, step):
                self._map.madvise(mmap.MADV_WILLNEED, pos, min(step, b - pos))
        if _populate_read_ok is not False:
            err = _madvise(self._map.address + start, end - start, MADV_POPULATE_READ)
            if err == 0:
                _populate_read_ok = True
                return
            if err != errno.EINVAL or _populate_read_ok:
                raise OSError(err, f"{self.path}: madvise(MADV_POPULATE_READ) failed")
            _populate_read_ok = False
        # A strided sum reads exactly one byte in every page of the range (numpy drops the GIL).
        int(self._map.array[start:end:mmap.PAGESIZE].sum(dtype=np.uint64))

    def prefault(self, experts=None) -> int:
        """Read the named experts' pages into this process (huge pages where the kernel maps
        them: advise_huge; then populate each range); returns the bytes of the experts."""
        self.advise_huge(experts)
        for a, b in self.page_ranges(experts):
            self.populate(a, b)
        return sum(ent.end - ent.start for _, ent in self._entries_for(experts))

    def resident(self, experts=None) -> float:
        """Fraction of the named experts' pages that are in memory (mincore)."""
        return self.resident_fraction([(ent.start, ent.end) for _, ent in self._entries_for(experts)])

    def resident_fraction(self, ranges: list[tuple[int, int]]) -> float:
        """Fraction of the pages of file byte ranges [start, end) that are in memory (mincore)."""
        if self._map.size == 0:
            return 0.0
        base = self._map.address
        res = tot = 0
        for start, end in ranges:
            first = start - start % mmap.PAGESIZE
            vec = _mincore(base + first, end - first)
            res += int(np.count_nonzero(vec & 1))
            tot += vec.size
        return res / tot if tot else 0.0

    def close(self) -> None:
        # The mmap stays valid while any numpy view or ExpertTable references it; dropping
        # our references lets Python unmap it once those are gone (the descriptor closes then).
        self._map = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ManifestEntry:
    key: str
    shape: tuple[int, ...]
    fmt: int
    offset: int
    length: int
    file: str


class Vindex:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise VindexError(f"{self.path}: not a vindex directory")
        self.index: dict[str, Any] = fm.read_json(self.path / fm.INDEX_JSON, "the vindex metadata")
        if not isinstance(self.index, dict):
            raise VindexError(f"{self.path / fm.INDEX_JSON}: expected a JSON object")
        self._check_index()
        try:
            self.config: ModelConfig = ModelConfig.from_index(self.index)
        except (ConfigError, TypeError, ValueError) as e:
            raise VindexError(f"{self.path / fm.INDEX_JSON}: {e}") from None
        q = str(self.index.get("quant") or "none").lower()
        q = "q4k" if q == "kquant" else q  # the reference's newer name for the same formats
        dtype = str(self.index.get("dtype") or "f32").lower()
        if q in ("none", ""):
            q = dtype
        if q not in ("q4k", "f16", "f32"):
            raise VindexError(f"{self.path / fm.INDEX_JSON}: quant {q!r} is not one of q4k, f16, f32")
        if dtype not in ("f16", "f32"):
            raise VindexError(f"{self.path / fm.INDEX_JSON}: dtype {dtype!r} is not f16 or f32")
        self.quant: str = q
        self.dtype: str = dtype
        self._maps: dict[str, _Mapped] = {}
        self._expert_files: dict[int, ExpertFile] = {}
        self._vectors: dict[str, ManifestEntry] = {}
        self._attn: dict[str, ManifestEntry] = {}
        self._dense: dict[str, ManifestEntry] = {}
        self._lm_head: ManifestEntry | None = None
        self._integrity: integrity.Record | None = None
        self._load_manifests()
        self.layers_present: list[int] = self._layers_present()
        self.experts_present: list[int] = self._experts_present()

    # Metadata ------------------------------------------------------------------------------
    def _check_index(self) -> None:
        idx = self.index
        name = self.path / fm.INDEX_JSON
        v = idx.get("version", 2)
        if not isinstance(v, int) or v > 2 or v < 1:
            raise VindexError(f"{name}: unsupported version {v!r} (supported: 1, 2)")
        for key in ("num_layers", "hidden_size", "vocab_size"):
            if not isinstance(idx.get(key), int) or idx[key] <= 0:
                raise VindexError(f"{name}: field {key!r} missing or not a positive integer")

    def _manifest(self, name: str) -> list[dict] | None:
        p = self.path / name
        if not p.exists():
            return None
        data = fm.read_json(p, "a weight manifest")
        if not isinstance(data, list):
            raise VindexError(f"{p}: expected a JSON array of entries")
        return data

    def _entry(
        self, manifest: str, raw: Any, default_file: str | None, default_fmt: str | None
    ) -> ManifestEntry:
        where = f"{self.path / manifest}"
        if not isinstance(raw, dict):
            raise VindexError(f"{where}: entry {raw!r} is not an object")
        key = raw.get("key")
        try:
            shape = tuple(int(s) for s in raw["shape"])
            offset, length = int(raw["offset"]), int(raw["length"])
        except (KeyError, TypeError, ValueError) as e:
            raise VindexError(f"{where}: entry {key!r}: bad or missing field {e}") from None
        fmt_name = raw.get("format") or default_fmt
        if fmt_name is None:
            kind = raw.get("kind", "")
            fmt_name = {"tensor_q4k": "Q4_K", "tensor_q6k": "Q6_K", "tensor_f16": "f16"}.get(
                kind, self.dtype if kind == "tensor" else "f32"
            )
        fmt = fm.format_id(fmt_name)
        file = raw.get("file") or default_file
        if not file:
            raise VindexError(f"{where}: entry {key!r} names no file")
        fp = fm.member_path(self.path, file, f"{where}: entry {key!r}")
        if offset < 0 or length < 0:
            raise VindexError(f"{where}: entry {key!r}: negative offset/length")
        n = int(np.prod(shape)) if shape else 1
        if len(shape) == 2:
            want = shape[0] * fm.row_bytes(fmt, shape[1])
            if shape[1] % fm.block_values(fmt):
                raise VindexError(
                    f"{where}: entry {key!r}: {fm.FORMAT_NAMES[fmt]} row length {shape[1]} "
                    f"is not a multiple of {fm.block_values(fmt)} (rows must be zero-padded "
                    "to whole blocks; a tensor quantised flat across rows cannot be served)"
                )
        else:
            want = fm.row_bytes(fmt, n)
        if length != want:
            raise VindexError(
                f"{where}: entry {key!r}: length {length} != {want} expected for "
                f"shape {list(shape)} in {fm.FORMAT_NAMES[fmt]}"
            )
        if fp.exists() and offset + length > fp.stat().st_size:
            raise VindexError(
                f"{fp}: entry {key!r} ({where}) spans {offset}+{length}, past the end "
                f"of the file ({fp.stat().st_size} bytes)"
            )
        return ManifestEntry(str(key), shape, fmt, offset, length, file)

    def _load_manifests(self) -> None:
        wm = self._manifest(fm.WEIGHT_MANIFEST) or []
        for raw in wm:
            ent = self._entry(fm.WEIGHT_MANIFEST, raw, None, None)
            if ent.file == fm.NORMS_BIN or ent.fmt in (fm.F32,) and len(ent.shape) == 1:
                self._vectors[ent.key] = ent
            elif ent.key == "lm_head.weight":
                self._lm_head = ent
        seen: set[str] = set()
        for q in (self.quant, *[k for k in fm.ATTN_FILES if k != self.quant]):
            for names, kquant_names, target in ((fm.ATTN_FILES, fm.KQUANT_ATTN_FILES, self._attn),
                                                (fm.DENSE_FILES, fm.KQUANT_DENSE_FILES, self._dense)):
                for blob, man in [names[q], kquant_names] if q == "q4k" else [names[q]]:
                    if man in seen:
                        continue
                    seen.add(man)
                    for raw in self._manifest(man) or []:
                        ent = self._entry(man, raw, blob, None)
                        target[ent.key] = ent
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Manifest shapes must agree with index.json (checked once, at open)."""
        c = self.config
        for key, ent in {**self._attn, **self._dense}.items():
            parts = key.split(".")
            if len(parts) < 4 or parts[0] != "layers" or not parts[1].isdigit():
                continue
            layer = int(parts[1])
            if layer >= c.num_layers:
                raise VindexError(
                    f"{self.path / ent.file}: entry {key!r} names layer {layer} "
                    f"but num_layers is {c.num_layers}"
                )
            want = self._expected_shape(layer, parts[-2])
            if want is None:
                continue
            rows, cols = want
            if (
                len(ent.shape) != 2
                or ent.shape[0] != rows
                or ent.shape[1] not in (cols, fm.padded_cols(ent.fmt, cols))
            ):
                raise VindexError(
                    f"{self.path / ent.file}: entry {key!r} has shape {list(ent.shape)}, "
                    f"index.json implies [{rows}, {cols}]"
                )
        head = self._lm_head
        if head is not None:
            where = f"{self.path / fm.WEIGHT_MANIFEST}: entry 'lm_head.weight' ({head.file})"
            if head.fmt not in fm.SUPPORTED:
                raise VindexError(f"{where} is {fm.FORMAT_NAMES[head.fmt]}, which larql cannot compute")
            H = c.hidden_size
            cols_ok = (H, fm.padded_cols(head.fmt, H))
            if len(head.shape) != 2 or head.shape[0] != c.vocab_size or head.shape[1] not in cols_ok:
                raise VindexError(
                    f"{where} has shape {list(head.shape)}, index.json implies [{c.vocab_size}, {H}]"
                )
        for key, ent in self._vectors.items():
            n = int(np.prod(ent.shape))
            want = None
            if key.endswith("router.proj.weight"):
                want = c.num_experts * c.hidden_size
            elif key.endswith("per_expert_scale"):
                want = c.num_experts
            elif key.endswith("layer_scalar"):
                want = 1
            elif (
                key.endswith(("layernorm.weight", "layernorm_1.weight", "layernorm_2.weight", "router.scale"))
                or key == "norm.weight"
            ):
                want = c.hidden_size
            if want is not None and n != want:
                raise VindexError(
                    f"{self.path / ent.file}: vector {key!r} has {n} values, index.json implies {want}"
                )

    def _expected_shape(self, layer: int, proj: str) -> tuple[int, int] | None:
        c = self.config
        hd, kv, H = c.layer_head_dim(layer), c.layer_kv_heads(layer), c.hidden_size
        return {
            "q_proj": (c.num_heads * hd, H),
            "k_proj": (kv * hd, H),
            "v_proj": (kv * hd, H),
            "o_proj": (H, c.num_heads * hd),
            "gate_proj": (c.intermediate_size, H),
            "up_proj": (c.intermediate_size, H),
            "down_proj": (H, c.intermediate_size),
        }.get(proj)

    def _layers_present(self) -> list[int]:
        lp = self.index.get("layers_present")
        if isinstance(lp, list):
            return sorted(int(x) for x in lp)
        d = self.path / fm.LAYERS_DIR
        if not d.is_dir():
            return []
        out = []
        for p in d.glob("layer_*.weights"):
            try:
                out.append(int(p.name[6:-8]))
            except ValueError:
                continue
        return sorted(x for x in out if x < self.config.num_layers)

    def _experts_present(self) -> list[int]:
        ep = self.index.get("experts_present")
        if isinstance(ep, list):
            return sorted(int(x) for x in ep)
        return list(range(self.config.num_experts)) if self.layers_present else []

    # Files ----------------------------------------------------------------------------------
    def _file(self, name: str, what: str) -> _Mapped:
        m = self._maps.get(name)
        if m is None:
            p = self.path / name
            if not p.exists():
                raise VindexError(f"{p}: missing ({what}); this vindex slice does not hold it")
            m = self._maps[name] = _Mapped(p)
        return m

    def has(self, key: str) -> bool:
        return key in self._vectors

    def norm(self, key: str) -> np.ndarray:
        ent = self._vectors.get(key)
        if ent is None:
            raise VindexError(f"{self.path / fm.WEIGHT_MANIFEST}: no vector {key!r}")
        m = self._file(ent.file, "norms and router vectors")
        if ent.fmt != fm.F32:
            raise VindexError(
                f"{self.path / ent.file}: vector {key!r} is {fm.FORMAT_NAMES[ent.fmt]}, expected f32"
            )
        arr = m.array[ent.offset : ent.offset + ent.length].view(np.float32)
        if key.endswith("router.proj.weight"):
            return arr.reshape(self.config.num_experts, self.config.hidden_size)
        return arr.reshape(ent.shape) if len(ent.shape) > 1 else arr

    def embeddings(self) -> np.ndarray:
        c = self.config
        m = self._file(fm.EMBEDDINGS_BIN, "token embeddings")
        dt = np.float16 if self.dtype == "f16" else np.float32
        want = c.vocab_size * c.hidden_size * np.dtype(dt).itemsize
        if m.size != want:
            raise VindexError(
                f"{m.path}: {m.size} bytes, expected {want} "
                f"(vocab_size {c.vocab_size} x hidden_size {c.hidden_size} {self.dtype})"
            )
        return m.array.view(dt).reshape(c.vocab_size, c.hidden_size)

    def _qm(self, ent: ManifestEntry, logical_cols: int):
        m = self._file(ent.file, "weights")
        rows, cols = ent.shape
        return _qmatrix(
            ent.fmt,
            rows,
            cols,
            m.array[ent.offset : ent.offset + ent.length],
            min(logical_cols, cols) if logical_cols else cols,
        )

    def lm_head(self):
        """The separate LM head named by weight_manifest.json, or None: tied to the embeddings.

        Gemma 4 ties the head, so a separate one is a quantised copy of the embeddings and the
        tie is always a valid (exact) fallback. Like the reference, a head whose file is not in
        this slice (its `client` preset leaves lm_head_q4.bin out but keeps the manifest) falls
        back to the tie; `lm_head_format` says which one is used. A head file without a manifest
        entry (very old reference writers) is ignored too: its size cannot tell Q4_K from Q4_0."""
        ent = self._lm_head
        if ent is None or not (self.path / ent.file).exists():
            return None
        return self._qm(ent, self.config.hidden_size)

    @property
    def lm_head_format(self) -> str:
        """Either "tied" (logits from embeddings.bin) or the separate head's format, e.g. "Q4_K"."""
        ent = self._lm_head
        if ent is None or not (self.path / ent.file).exists():
            return "tied"
        return fm.FORMAT_NAMES[ent.fmt]

    def attn(self, layer: int) -> AttnWeights:
        c = self.config
        if not 0 <= layer < c.num_layers:
            raise VindexError(f"layer {layer} out of range 0-{c.num_layers - 1}")
        blob = fm.ATTN_FILES[self.quant][0]
        out = {}
        for p in ("q", "k", "v", "o"):
            key = f"layers.{layer}.self_attn.{p}_proj.weight"
            if p == "v" and c.layer_k_eq_v(layer):
                out[p] = None  # the reference writes K again here; the model uses raw K
                continue
            ent = self._attn.get(key)
            if ent is None:
                raise VindexError(f"{self.path / blob}: no entry {key!r} (attention weights missing)")
            logical = c.num_heads * c.layer_head_dim(layer) if p == "o" else c.hidden_size
            out[p] = self._qm(ent, logical)
        return AttnWeights(**out)

    def dense_mlp(self, layer: int) -> DenseWeights:
        c = self.config
        blob = fm.DENSE_FILES[self.quant][0]
        out = {}
        for p in ("gate", "up", "down"):
            key = f"layers.{layer}.mlp.{p}_proj.weight"
            ent = self._dense.get(key)
            if ent is None:
                raise VindexError(f"{self.path / blob}: no entry {key!r} (dense MLP weights missing)")
            out[p] = self._qm(ent, c.intermediate_size if p == "down" else c.hidden_size)
        return DenseWeights(**out)

    def expert_file(self, layer: int) -> ExpertFile:
        ef = self._expert_files.get(layer)
        if ef is None:
            c = self.config
            p = self.path / fm.layer_file(layer)
            if not 0 <= layer < c.num_layers:
                raise VindexError(f"layer {layer} out of range 0-{c.num_layers - 1}")
            if not p.exists():
                raise VindexError(
                    f"{p}: missing (experts of layer {layer}); this vindex holds layers "
                    f"{ranges.text(self.layers_present)}"
                )
            ef = ExpertFile(p, layer, c.num_experts, c.moe_intermediate_size, c.hidden_size)
            self._expert_files[layer] = ef
        return ef

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / fm.TOKENIZER_JSON
        return p if p.exists() else None

    @property
    def chat_template(self) -> str | None:
        p = self.path / fm.CHAT_TEMPLATE
        if p.exists():
            return p.read_text()
        tc = self.path / "tokenizer_config.json"
        if tc.exists():
            try:
                t = json.loads(tc.read_text()).get("chat_template")
                return t if isinstance(t, str) else None
            except json.JSONDecodeError:
                return None
        return None

    @property
    def eos_ids(self) -> list[int]:
        return list(self.config.eos_token_ids)

    @property
    def integrity(self) -> integrity.Record:
        """What index.json records about the expert bytes (see vindex/integrity.py)."""
        if self._integrity is None:
            c = self.config
            self._integrity = integrity.read_record(self.index, c.num_layers, c.num_experts,
                                                    str(self.path / fm.INDEX_JSON))
        return self._integrity

    def norm_digests(self) -> list[str] | None:
        """sha256 of each layer's pre_feedforward_layernorm_2 vector (the one a shard applies
        to f32 inputs), from the bytes of norms.bin; None when this slice has no norms."""
        out = []
        for layer in range(self.config.num_layers):
            key = f"layers.{layer}.pre_feedforward_layernorm_2.weight"
            if not self.has(key) or not (self.path / self._vectors[key].file).exists():
                return None
            out.append(integrity.norm_digest(np.ascontiguousarray(self.norm(key))))
        return out

    def expert_fingerprint(self) -> str | None:
        """Equal across every shard and slice of one extraction, and derived from what this
        vindex records about its expert bytes (never read from index.json's
        `expert_fingerprint`, which is informational): the per-expert digests, or the
        reference's per-file checksums, plus the bytes of the norms a shard applies. A server
        checks the bytes it maps against the same record (integrity.Verifier), so a shard whose
        layer files were swapped under a copied index.json is refused. None when it cannot be
        derived here: no norms.bin, or nothing recorded and no layer files to read."""
        c = self.config
        rec = self.integrity
        norms = self.norm_digests()
        if rec.norms:
            if norms is not None and norms != rec.norms:
                bad = [layer for layer, (a, b) in enumerate(zip(norms, rec.norms, strict=True)) if a != b]
                raise VindexError(
                    f"{self.path / fm.NORMS_BIN}: pre_feedforward_layernorm_2 of layers {ranges.text(bad)} "
                    f"differs from the digests recorded in index.json ({integrity.FIELD}.norms): "
                    "replaced or corrupted")
            norms = rec.norms
        if norms is None:
            return None
        if rec.basis == "tables" and len(rec.tables) < c.num_layers:
            # Nothing recorded (a reference vindex without checksums): the layout is all there
            # is to compare, read from the files when every layer is here.
            if self.layers_present != list(range(c.num_layers)):
                return None
            for layer in self.layers_present:
                ef = self.expert_file(layer)
                rec.tables[fm.layer_file(layer)] = integrity.table_digest(
                    bytes(ef.buffer[: ef.header.table_bytes]))
        ident = {"num_layers": c.num_layers, "hidden_size": c.hidden_size, "num_experts": c.num_experts,
                 "moe_intermediate_size": c.moe_intermediate_size}
        return integrity.fingerprint(rec, ident, norms)

    def check_intact(self, layer: int) -> None:
        """Before computing `layer`: raise VindexError if its expert file or norms.bin shrank
        since they were mapped (two fstat calls: 25 us measured on the test sandbox)."""
        self.expert_file(layer).check_intact()
        m = self._maps.get(fm.NORMS_BIN)
        if m is not None:
            m.check()

    def mapped_files(self, layer: int) -> list[tuple[int, int]]:
        """(descriptor, size when mapped) of the files `check_intact(layer)` checks: the layer's
        expert file, then norms.bin if mapped (for checks made outside Python, csrc/wire.c)."""
        ef = self.expert_file(layer)
        out = [(ef._map.fd, ef._map.size)]
        m = self._maps.get(fm.NORMS_BIN)
        if m is not None:
            out.append((m.fd, m.size))
        return out

    def structure_problems(self) -> list[str]:
        """Everything checkable without hashing, each problem naming its file and why: the
        embeddings' size, every layer file's header and offset table against its size (so a
        truncated file is reported), the manifests (checked at open). Empty: structurally sound."""
        problems = []
        c = self.config
        p = self.path / fm.EMBEDDINGS_BIN
        if p.exists():
            want = c.vocab_size * c.hidden_size * (2 if self.dtype == "f16" else 4)
            got = p.stat().st_size
            if got != want:
                why = "truncated: " if got < want else ""
                problems.append(f"{p}: {why}{got} bytes, expected {want} (vocab_size {c.vocab_size} "
                                f"x hidden_size {c.hidden_size} {self.dtype})")
        for layer in self.layers_present:
            try:
                self.expert_file(layer)
            except VindexError as e:
                problems.append(str(e))
        return problems

    def file_sizes(self) -> dict[str, int]:
        out = {}
        for p in sorted(self.path.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(self.path))] = p.stat().st_size
        return out

    def close(self) -> None:
        for ef in self._expert_files.values():
            ef.close()
        self._expert_files.clear()
        self._maps.clear()

    def __enter__(self) -> Vindex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Vindex({str(self.path)!r}, quant={self.quant}, layers={ranges.text(self.layers_present)}, "
            f"experts={ranges.text(self.experts_present)})"
        )


def fingerprint_of_tables(index: dict[str, Any], tables: list[bytes]) -> str:
    """The expert fingerprint of a vindex that records none (the reference's): a hash of the
    model identity in index.json and each layer file's header + offset table, in layer order.
    A shard pulled by byte ranges computes it from the tables it fetched, so it matches."""
    h = hashlib.sha256()
    ident = {k: index.get(k) for k in ("model", "num_layers", "hidden_size", "vocab_size", "quant")}
    ident["moe"] = (index.get("model_config") or {}).get("moe")
    h.update(json.dumps(ident, sort_keys=True).encode())
    for table in tables:
        h.update(table)
    return h.hexdigest()


def open_vindex(path: str | os.PathLike) -> Vindex:
    return Vindex(path)
