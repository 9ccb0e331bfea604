"""Expert-weight integrity: per-expert digests recorded at extraction, the fingerprint derived
from them, and the check a server runs on the bytes it serves.

The fingerprint is never read from index.json: it is a hash over the recorded digests (and the
bytes of each layer's `pre_feedforward_layernorm_2` vector, which a server also applies), and a
server checks that the bytes it maps match the digests before serving them. Three bases, in
order of preference (docs/FORMAT.md, "Integrity and the fingerprint"):

- "experts" (ours): index.json `expert_integrity.experts[layer file]` holds one sha256 per
  expert of the extraction (over its formats and its gate_up and down bytes, so the value does
  not depend on the file's layout). Slices copy the whole table, so every shard and client
  slice of one extraction derives the same fingerprint while each shard checks only the
  experts it holds.
- "files": the reference's `checksums {file: sha256}` of every layer file (or our
  `expert_integrity.files`, which keeps them when a slice rewrites the files). A server holding
  the original file hashes all of it; a rewritten (sliced) file is checked against the
  per-expert digests its slicer recorded for the experts it kept.
- "tables": nothing recorded (a reference vindex without checksums). The fingerprint covers the
  layer files' headers and offset tables only, and nothing can be verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .. import ranges
from . import format as fm
from .format import VindexError

log = logging.getLogger("larql.vindex")

FIELD = "expert_integrity"
RECORD_VERSION = 1
BASES = ("experts", "files", "tables")
FINGERPRINT_TAG = b"larql expert fingerprint v1\n"
DIGEST_TAG = b"LXPD"
CHUNK = 4 << 20  # bytes per pread while hashing
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def expert_digest(gate_up_fmt: int, down_fmt: int, gate_up, down) -> str:
    """sha256 of one expert: its two formats, then its gate_up bytes, then its down bytes."""
    h = hashlib.sha256(struct.pack("<4sII", DIGEST_TAG, gate_up_fmt, down_fmt))
    h.update(memoryview(gate_up).cast("B"))
    h.update(memoryview(down).cast("B"))
    return h.hexdigest()


@dataclass
class Record:
    """What index.json says the expert bytes of the extraction are."""

    basis: str
    files: dict[str, str] = field(default_factory=dict)  # layer file -> sha256 of the original file
    experts: dict[str, list[str | None]] = field(default_factory=dict)  # layer file -> per expert
    tables: dict[str, str] = field(default_factory=dict)  # layer file -> sha256 of header + table
    # per layer: sha256 of the f32 bytes of pre_feedforward_layernorm_2, which a shard applies
    norms: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": RECORD_VERSION, "basis": self.basis}
        if self.files:
            out["files"] = dict(sorted(self.files.items()))
        if self.tables:
            out["tables"] = dict(sorted(self.tables.items()))
        if self.experts:
            out["experts"] = dict(sorted(self.experts.items()))
        if self.norms:
            out["norms"] = list(self.norms)
        return out


def _check_hex(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise VindexError(f"{where}: {str(value)[:80]!r} is not a sha256 hex digest")
    return value


def read_record(index: dict[str, Any], num_layers: int, num_experts: int, where: str) -> Record:
    """The integrity record of an index.json (validated), or the one implied by the reference's
    `checksums`, or basis "tables" when nothing is recorded."""
    names = [fm.layer_file(layer) for layer in range(num_layers)]
    raw = index.get(FIELD)
    if raw is None:
        sums = index.get("checksums") or {}
        if isinstance(sums, dict) and all(isinstance(sums.get(n), str) for n in names):
            return Record("files", {n: _check_hex(sums[n], f"{where}: checksums[{n!r}]") for n in names})
        return Record("tables")
    if not isinstance(raw, dict) or raw.get("version") != RECORD_VERSION:
        raise VindexError(f"{where}: {FIELD} must be an object with version {RECORD_VERSION}")
    basis = raw.get("basis")
    if basis not in BASES:
        raise VindexError(f"{where}: {FIELD}.basis {str(basis)[:40]!r} is not one of {', '.join(BASES)}")
    rec = Record(basis)
    files, experts, tables = raw.get("files") or {}, raw.get("experts") or {}, raw.get("tables") or {}
    if not all(isinstance(x, dict) for x in (files, experts, tables)):
        raise VindexError(f"{where}: {FIELD}.files, .experts and .tables must be objects")
    for label, src, dst in (("files", files, rec.files), ("tables", tables, rec.tables)):
        for name, sha in src.items():
            if name not in names:
                raise VindexError(f"{where}: {FIELD}.{label} names {str(name)[:80]!r}, not a layer file")
            dst[name] = _check_hex(sha, f"{where}: {FIELD}.{label}[{name!r}]")
    for name, digests in experts.items():
        if name not in names:
            raise VindexError(f"{where}: {FIELD}.experts names {str(name)[:80]!r}, not a layer file")
        if not isinstance(digests, list) or len(digests) != num_experts:
            raise VindexError(f"{where}: {FIELD}.experts[{name!r}] must list {num_experts} digests")
        rec.experts[name] = [None if d is None else _check_hex(d, f"{where}: {FIELD}.experts[{name!r}]")
                             for d in digests]
    norms = raw.get("norms") or []
    if not isinstance(norms, list) or (norms and len(norms) != num_layers):
        raise VindexError(f"{where}: {FIELD}.norms must list {num_layers} digests")
    rec.norms = [_check_hex(d, f"{where}: {FIELD}.norms") for d in norms]
    need = {"experts": rec.experts, "files": rec.files, "tables": rec.tables}[basis]
    if missing := [n for n in names if n not in need or (basis == "experts" and None in need[n])]:
        raise VindexError(f"{where}: {FIELD} (basis {basis}) lacks the digests of {missing[0]}"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return rec


def table_digest(table: bytes) -> str:
    return hashlib.sha256(table).hexdigest()


def norm_digest(vector) -> str:
    return hashlib.sha256(memoryview(vector).cast("B")).hexdigest()


def fingerprint(rec: Record, identity: dict[str, int], norm_digests: list[str]) -> str:
    """sha256 over the basis digests in layer order, the model's expert dimensions and the
    per-layer norm digests (rec.tables must be complete for basis "tables")."""
    h = hashlib.sha256(FINGERPRINT_TAG)
    h.update(f"basis {rec.basis}\n".encode())
    h.update("".join(f"{k}={identity[k]}\n" for k in sorted(identity)).encode())
    for layer, norm in enumerate(norm_digests):
        name = fm.layer_file(layer)
        if rec.basis == "experts":
            body = ",".join(str(d) for d in rec.experts[name])
        elif rec.basis == "files":
            body = rec.files[name]
        else:
            body = rec.tables[name]
        h.update(f"{name} {body} norm {norm}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Hashing the bytes of a file with ExpertFile.pread (the descriptor, or the mapping through
# process_vm_readv): a file truncated under us then gives a short read (an error naming it),
# never the SIGBUS a load from the mmap would.


def _hash_range(ef, h, start: int, length: int, buf: bytearray) -> None:
    view = memoryview(buf)
    pos, end = start, start + length
    while pos < end:
        n = ef.pread(view[: min(len(buf), end - pos)], pos)
        if n <= 0:
            raise VindexError(f"{ef.path}: truncated: ends at byte {pos}, the offset table needs {end}")
        h.update(view[:n])
        pos += n


def hash_expert(ef, ent: fm.ExpertEntry) -> str:
    """An expert's digest, its bytes read with the ExpertFile's pread."""
    buf = bytearray(min(CHUNK, max(ent.gate_up_len, ent.down_len, 1)))
    h = hashlib.sha256(struct.pack("<4sII", DIGEST_TAG, ent.gate_up_fmt, ent.down_fmt))
    _hash_range(ef, h, ent.gate_up_off, ent.gate_up_len, buf)
    _hash_range(ef, h, ent.down_off, ent.down_len, buf)
    return h.hexdigest()


def hash_file(ef) -> str:
    """An ExpertFile's whole-file sha256, read with its pread."""
    h = hashlib.sha256()
    _hash_range(ef, h, 0, ef.size, bytearray(CHUNK))
    return h.hexdigest()


def _threads() -> int:
    # hashlib and preadv release the GIL; past the core count threads only contend.
    return max(1, min(4, os.cpu_count() or 1))


def verify_layer(vindex, layer: int, experts: list[int], pool: ThreadPoolExecutor | None = None) -> str:
    """Check the bytes of `experts` in `layer`'s file against the vindex's record. Returns how
    ("experts", "file" or "unverified"); raises VindexError naming the file and expert."""
    rec: Record = vindex.integrity
    ef = vindex.expert_file(layer)
    name = fm.layer_file(layer)
    digests = rec.experts.get(name)
    held = [e for e in experts if ef.has(e)]
    ef.advise_huge(held)        # read into 2 MiB folios where Linux can (ExpertFile.pread)
    if digests is not None and all(digests[e] is not None for e in held):
        def one(e: int) -> tuple[int, str]:
            return e, hash_expert(ef, ef.entry(e))

        got = pool.map(one, held) if pool is not None else map(one, held)
        bad = [e for e, d in got if d != digests[e]]
        if bad:
            raise VindexError(
                f"{ef.path}: the bytes of expert{'s' if len(bad) > 1 else ''} {ranges.text(bad)} differ "
                f"from the digests recorded in index.json ({FIELD}): this file does not hold the "
                "weights its index.json describes (replaced or corrupted); re-download or re-slice it")
        return "experts"
    want = rec.files.get(name)
    if want is not None:
        # The whole file is read, other shards' experts too: those are dropped from the page
        # cache again afterwards (a shard holds only its own experts in memory).
        got_sha = hash_file(ef)
        ef.evict_outside(held)
        if got_sha != want:
            raise VindexError(
                f"{ef.path}: sha256 {got_sha[:16]}... differs from the {want[:16]}... recorded for "
                f"{name} in index.json: this file does not hold the weights its index.json "
                "describes (replaced, corrupted or rewritten); re-download it")
        return "file"
    return "unverified"


class Verifier:
    """Checks each served layer once, on a background thread or on demand, and remembers the
    outcome: `wait(layer)` blocks until that layer is checked and raises its error if it failed.

    A compute for a layer that is not yet checked waits for it (the first requests after a
    start without warm-up pay for it: measured in docs/FORMAT.md)."""

    def __init__(self, vindex, experts: list[int], layers: list[int]) -> None:
        self.vindex = vindex
        self.experts = list(experts)
        self.layers = list(layers)
        self._locks = {layer: threading.Lock() for layer in layers}
        self._done: dict[int, str | VindexError] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        n = _threads()
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="larql-verify") if n > 1 else None
        self.seconds = 0.0
        self.bytes = 0

    @property
    def basis(self) -> str:
        return self.vindex.integrity.basis

    def check(self, layer: int) -> str:
        """Verify `layer` now unless already done; returns the method, raises its VindexError."""
        with self._locks[layer]:
            got = self._done.get(layer)
            if got is None:
                t0 = time.perf_counter()
                try:
                    got = verify_layer(self.vindex, layer, self.experts, self._pool)
                except VindexError as e:
                    got = e
                except OSError as e:
                    got = VindexError(f"{fm.layer_file(layer)}: cannot be read to verify it: {e}")
                self.seconds += time.perf_counter() - t0
                self.bytes += self._layer_bytes(layer, got)
                self._done[layer] = got
        if isinstance(got, VindexError):
            raise got
        return got

    def _layer_bytes(self, layer: int, how) -> int:
        ef = self.vindex.expert_file(layer)
        if how == "file":
            return ef.size
        return sum(ef.entry(e).gate_up_len + ef.entry(e).down_len for e in self.experts if ef.has(e))

    def check_all(self, progress=None) -> dict[str, int]:
        """Verify every layer in order (warm-up); returns {method: layers}."""
        out: dict[str, int] = {}
        for layer in self.layers:
            how = self.check(layer)
            out[how] = out.get(how, 0) + 1
            if progress is not None:
                progress(layer)
        return out

    def start_background(self) -> None:
        if self._thread is not None:
            return

        def run() -> None:
            for layer in self.layers:
                if self._stop.is_set():
                    return
                try:
                    self.check(layer)
                except VindexError as e:
                    log.error("integrity: %s", e)
            failed = [la for la, r in self._done.items() if isinstance(r, VindexError)]
            log.log(logging.ERROR if failed else logging.INFO,
                    "integrity: %d layers checked (%s) in %.2f s, %.0f MB/s%s",
                    len(self._done), self.basis, self.seconds, self.bytes / max(self.seconds, 1e-9) / 1e6,
                    f"; layers {ranges.text(sorted(failed))} FAILED and will not be served" if failed else "")

        self._thread = threading.Thread(target=run, name="larql-verify", daemon=True)
        self._thread.start()

    def failed_layers(self) -> list[int]:
        """The layers whose check failed so far, ascending."""
        return sorted(la for la, r in list(self._done.items()) if isinstance(r, VindexError))

    def status(self) -> str:
        """"verified", "verifying", "unverified" (nothing recorded) or "failed: <first error>"."""
        for layer in self.layers:
            r = self._done.get(layer)
            if isinstance(r, VindexError):
                return f"failed: {r}"
        if len(self._done) < len(self.layers):
            return "verifying"
        return "unverified" if all(r == "unverified" for r in self._done.values()) else "verified"

    def close(self) -> None:
        self._stop.set()  # the layer being hashed finishes; the rest are skipped
        if self._thread is not None:
            self._thread.join(60)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
