"""Write a vindex from a TensorSource, one tensor at a time.

The writer never holds more than one layer's attention/dense tensors and a bounded batch of
experts in memory. Everything goes into `OUT.tmp-<pid>` and is renamed to OUT at the end, so an
interrupted extract never leaves a directory that looks like a complete vindex.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..config import ModelConfig
from . import format as fm
from . import integrity
from .format import VindexError
from .sources.base import TensorSource

QUANTS = ("q4k", "f16", "f32")
# --lm-head choice -> format of the separate LM head file (None: tied to the embeddings)
LM_HEADS: dict[str, int | None] = {"tied": None, "q4k": fm.Q4_K, "q6k": fm.Q6_K}
EMBED_CHUNK = 16384  # embedding rows converted at a time (16384 x 2816 f32 = 185 MB)


def default_lm_head(quant: str) -> str:
    """The reference writes a Q4_K head for every q4k vindex; float vindexes stay exact (tied)."""
    return "q4k" if quant == "q4k" else "tied"


def plan(quant: str) -> dict[str, int]:
    """Which format each role is stored in."""
    if quant == "q4k":
        # The reference's mix: Q4_K everywhere but V and the dense down projection (Q6_K).
        return dict(
            q=fm.Q4_K,
            k=fm.Q4_K,
            v=fm.Q6_K,
            o=fm.Q4_K,
            gate=fm.Q4_K,
            up=fm.Q4_K,
            down=fm.Q6_K,
            expert_gu=fm.Q4_K,
            expert_down=fm.Q4_K,
            embed=fm.F16,
        )
    f = fm.F16 if quant == "f16" else fm.F32
    return dict(q=f, k=f, v=f, o=f, gate=f, up=f, down=f, expert_gu=f, expert_down=f, embed=f)


def encode(x: np.ndarray, fmt: int) -> np.ndarray:
    """A float matrix [rows, cols] -> its bytes (uint8) in fmt; K-quant rows zero-padded to 256."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if fmt == fm.F32:
        return np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint8)
    if fmt == fm.F16:
        return np.ascontiguousarray(x, dtype=np.float16).reshape(-1).view(np.uint8)
    from .. import kernels

    out = kernels.quantize(np.ascontiguousarray(x, dtype=np.float32), fmt)
    want = x.shape[0] * fm.row_bytes(fmt, x.shape[1])
    if out.nbytes != want:
        raise VindexError(
            f"quantiser returned {out.nbytes} bytes for {x.shape} in {fm.FORMAT_NAMES[fmt]}, expected {want}"
        )
    return out.reshape(-1).view(np.uint8)


class _HashingFile:
    """Sequential writer that hashes what it writes (checksums without a second read)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "wb")
        self.h = hashlib.sha256()
        self.pos = 0

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        self.f.write(mv)
        self.h.update(mv)
        self.pos += mv.nbytes
        return mv.nbytes

    def pad_to(self, pos: int) -> None:
        if pos < self.pos:
            raise AssertionError("writer moved backwards")
        if pos > self.pos:
            self.write(bytes(pos - self.pos))

    def close(self) -> str:
        self.f.close()
        return self.h.hexdigest()


class _Blob:
    """A manifest-described blob file (attention or dense MLP)."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.out = _HashingFile(root / name)
        self.entries: list[dict[str, Any]] = []

    def add(self, key: str, data: np.ndarray, fmt: int, rows: int, cols: int) -> None:
        off = self.out.pos
        n = self.out.write(data)
        self.entries.append(
            {
                "key": key,
                "shape": [rows, fm.padded_cols(fmt, cols)],
                "format": fm.FORMAT_NAMES[fmt],
                "offset": off,
                "length": n,
            }
        )


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True)


def write_vindex(
    out: str | os.PathLike,
    config: ModelConfig,
    source: TensorSource,
    *,
    quant: str = "q4k",
    tokenizer_json: str | os.PathLike | bytes | None = None,
    chat_template: str | None = None,
    progress: bool = True,
    lyrw_version: int = 2,
    model_name: str = "",
    source_info: dict | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
    lm_head: str | None = None,
) -> Path:
    """Write a complete vindex for `config` from `source` into `out` (atomically).

    `tokenizer_json` is a path to a tokenizer.json or its bytes; `threads` sizes the C quantiser's
    pool for q4k (default: its current size); `overwrite` replaces an existing `out`.
    `lm_head`: "tied" (no separate head: logits use embeddings.bin), "q4k" (lm_head_q4.bin, as
    the reference writes for its q4k vindexes) or "q6k" (lm_head_q6k.bin, ours); None picks
    `default_lm_head(quant)`."""
    if quant not in QUANTS:
        raise VindexError(f"unknown --quant {quant!r} (choose from {', '.join(QUANTS)})")
    lm_head = default_lm_head(quant) if lm_head is None else lm_head
    if lm_head not in LM_HEADS:
        raise VindexError(f"unknown --lm-head {lm_head!r} (choose from {', '.join(LM_HEADS)})")
    if lyrw_version not in (1, 2):
        raise VindexError(f"LYRW version must be 1 or 2, not {lyrw_version}")
    out = Path(out)
    if out.exists() and not overwrite and any(out.iterdir() if out.is_dir() else [out]):
        raise VindexError(f"{out}: already exists (pass --force to replace it)")
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        checksums, record = _write_all(
            tmp, config, source, quant, progress, lyrw_version, threads, LM_HEADS[lm_head]
        )
        if tokenizer_json is not None:
            data = tokenizer_json if isinstance(tokenizer_json, bytes) else Path(tokenizer_json).read_bytes()
            (tmp / fm.TOKENIZER_JSON).write_bytes(data)
        if chat_template:
            (tmp / fm.CHAT_TEMPLATE).write_text(chat_template)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for name in [fm.TOKENIZER_JSON, fm.CHAT_TEMPLATE, *(extra_files or {})]:
            if (tmp / name).exists():
                checksums[name] = fm.sha256_file(tmp / name)
        index = build_index(config, quant, model_name, source_info, checksums, record)
        write_index(tmp, index)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_index(root: Path, index: dict[str, Any]) -> None:
    """index.json, with `expert_fingerprint` set to the value readers derive from the record
    (informational: readers never trust the field). Written last, by rename."""
    from .reader import open_vindex

    index.pop("expert_fingerprint", None)
    replace_file(root / fm.INDEX_JSON, json.dumps(index, indent=2).encode())
    with open_vindex(root) as vindex:
        fingerprint = vindex.expert_fingerprint()
    if fingerprint is not None:
        index["expert_fingerprint"] = fingerprint
        replace_file(root / fm.INDEX_JSON, json.dumps(index, indent=2).encode())


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` as a new file and rename it into place: a process that has the old file
    mapped keeps reading the old bytes, never a half-written or truncated file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished directory `new` to `out`. An existing `out` is renamed aside first and
    deleted after, never rewritten: a server mapping its files keeps its (unlinked) inodes."""
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        new.rename(out)


def build_index(
    config: ModelConfig,
    quant: str,
    model_name: str,
    source_info: dict | None,
    checksums: dict[str, str],
    record: integrity.Record,
) -> dict[str, Any]:
    dtype = "f32" if quant == "f32" else "f16"
    return {
        "version": 2,
        "model": model_name or "gemma4",
        "family": "gemma4",
        "source": {
            "huggingface_repo": None,
            "huggingface_revision": None,
            "safetensors_sha256": None,
            "extracted_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "larql_version": f"larql-py {__version__}",
            **(source_info or {}),
        },
        "checksums": dict(sorted(checksums.items())),
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "embed_scale": config.embed_scale,
        "extract_level": "all",
        "dtype": dtype,
        "quant": quant,
        "layers": [],
        "down_top_k": 0,
        "has_model_weights": True,
        "ffn_layout": "per_layer",
        "model_config": config.to_index_model_config(),
        "layers_present": list(range(config.num_layers)),
        "experts_present": list(range(config.num_experts)),
        integrity.FIELD: record.to_json(),
        "larql_format": 1,
    }


def _get(source: TensorSource, key: str, fmt: int, rows: int, cols: int) -> np.ndarray:
    enc = getattr(source, "encoded", None)
    if enc is not None:
        data = enc(key, fmt, rows, cols)
        if data is not None:
            return np.asarray(data, dtype=np.uint8).reshape(-1)
    x = source.get(key)
    if tuple(x.shape) != (rows, cols):
        raise VindexError(f"source tensor {key!r} has shape {list(x.shape)}, config implies [{rows}, {cols}]")
    return encode(x, fmt)


def _embedding_chunks(source: TensorSource, c: ModelConfig, fmt: int):
    """(bytes in fmt, floats or None) per block of rows of the embedding table, in order.

    A source with `encoded` may hand over the table's bytes (whole or in chunks); otherwise
    rows are converted EMBED_CHUNK at a time (a source with `rows()` never materialises the
    whole table: the bf16 table of the real model would be a 3 GB f32 temporary)."""
    V, H = c.vocab_size, c.hidden_size
    enc = getattr(source, "encoded", None)
    raw = enc("embed_tokens.weight", fmt, V, H) if enc else None
    if raw is not None:
        for chunk in [raw] if isinstance(raw, np.ndarray | bytes) else raw:  # an array or chunks of one
            yield np.asarray(chunk, dtype=np.uint8).reshape(-1), None
        return
    rows = getattr(source, "rows", None)
    full = None if rows is not None else source.get("embed_tokens.weight")
    if full is not None and tuple(full.shape) != (V, H):
        raise VindexError(f"source embed_tokens has shape {list(full.shape)}, config implies [{V}, {H}]")
    for i in range(0, V, EMBED_CHUNK):
        j = i + EMBED_CHUNK
        chunk = full[i:j] if full is not None else rows("embed_tokens.weight", i, j)
        if chunk.shape != (min(EMBED_CHUNK, V - i), H):
            raise VindexError(
                f"source embed_tokens rows {i}.. have shape {list(chunk.shape)}, config implies [{V}, {H}]"
            )
        yield encode(chunk, fmt), chunk


def _write_embeddings(
    root: Path,
    c: ModelConfig,
    source: TensorSource,
    fmt: int,
    head_fmt: int | None,
    checksums: dict[str, str],
) -> dict[str, Any] | None:
    """embeddings.bin, and the quantised LM head (Gemma 4 ties it to the embeddings) in the same
    pass over the rows. Returns the head's weight_manifest.json entry (None when tied)."""
    V, H = c.vocab_size, c.hidden_size
    emb = _HashingFile(root / fm.EMBEDDINGS_BIN)
    head = _HashingFile(root / fm.LM_HEAD_FILES[head_fmt]) if head_fmt is not None else None
    enc = getattr(source, "encoded", None)
    # Already-encoded head blocks (a GGUF whose token_embd is Q4_K, synthetic random blocks).
    head_raw = enc("embed_tokens.weight", head_fmt, V, H) if enc and head else None
    if head is not None and head_raw is not None:
        for chunk in [head_raw] if isinstance(head_raw, np.ndarray | bytes) else head_raw:
            head.write(np.asarray(chunk, dtype=np.uint8))
    ftype = np.float16 if fmt == fm.F16 else np.float32
    for data, floats in _embedding_chunks(source, c, fmt):
        emb.write(data)
        if head is None or head_raw is not None:
            continue
        if floats is None:  # bytes handed over as they are: quantise what embeddings.bin holds
            floats = data.view(ftype).reshape(-1, H)
        for i in range(0, floats.shape[0], EMBED_CHUNK):
            head.write(encode(floats[i : i + EMBED_CHUNK], head_fmt))
    checksums[fm.EMBEDDINGS_BIN] = emb.close()
    if head is None:
        return None
    length = head.pos
    name = fm.LM_HEAD_FILES[head_fmt]
    checksums[name] = head.close()
    if length != V * fm.row_bytes(head_fmt, H):
        raise VindexError(
            f"{name}: wrote {length} bytes, expected {V} rows of {H} in {fm.FORMAT_NAMES[head_fmt]}"
        )
    return {
        "key": "lm_head.weight",
        "kind": fm.LM_HEAD_KINDS[head_fmt],
        "shape": [V, fm.padded_cols(head_fmt, H)],
        "format": fm.FORMAT_NAMES[head_fmt],
        "offset": 0,
        "length": length,
        "file": name,
    }


def _write_all(
    root: Path,
    c: ModelConfig,
    source: TensorSource,
    quant: str,
    progress: bool,
    lyrw_version: int,
    threads: int | None,
    head_fmt: int | None,
) -> tuple[dict[str, str], integrity.Record]:
    p = plan(quant)
    checksums: dict[str, str] = {}
    L = c.num_layers
    per_layer = 9 + c.num_experts
    bar = _progress(L * per_layer + 2, f"extract {quant}", progress)
    tick: Callable[[int], None] = (lambda n=1: bar.update(n)) if bar else (lambda n=1: None)

    head_entry = _write_embeddings(root, c, source, p["embed"], head_fmt, checksums)
    tick()

    attn = _Blob(root, fm.ATTN_FILES[quant][0])
    dense = _Blob(root, fm.DENSE_FILES[quant][0])
    norms = _HashingFile(root / fm.NORMS_BIN)
    vectors: list[dict[str, Any]] = []

    def add_vector(key: str, required: bool = True) -> None:
        if not source.has(key):
            if required:
                raise VindexError(f"source has no tensor {key!r}")
            return
        v = np.ascontiguousarray(source.get(key), dtype=np.float32).reshape(-1)
        if key.endswith(".pre_feedforward_layernorm_2.weight"):  # the norm every shard applies
            record.norms.append(integrity.norm_digest(v))
        off = norms.pos
        n = norms.write(v.view(np.uint8))
        vectors.append(
            {
                "key": key,
                "kind": "vector",
                "shape": [int(v.size)],
                "offset": off,
                "length": n,
                "file": fm.NORMS_BIN,
            }
        )

    record = integrity.Record("experts")
    # The C quantiser spreads each matrix over its own thread pool (sized by `threads`), so one
    # worker thread encodes while the main thread hashes and writes the previous expert.
    restore = None
    if quant == "q4k" and threads:
        from .. import kernels

        restore = kernels.num_threads()
        kernels.set_num_threads(threads)
    try:
        _write_layers(
            root, c, source, quant, p, lyrw_version, attn, dense, add_vector, checksums, record, tick
        )
    finally:
        if restore is not None:
            from .. import kernels

            kernels.set_num_threads(restore)
    add_vector("norm.weight")
    if head_entry is not None:  # last in weight_manifest.json, where the reference puts it
        vectors.append(head_entry)
    tick()
    checksums[attn.name] = attn.out.close()
    checksums[dense.name] = dense.out.close()
    checksums[fm.NORMS_BIN] = norms.close()
    man_a, man_d = fm.ATTN_FILES[quant][1], fm.DENSE_FILES[quant][1]
    (root / man_a).write_text(json.dumps(attn.entries, indent=1))
    (root / man_d).write_text(json.dumps(dense.entries, indent=1))
    (root / fm.WEIGHT_MANIFEST).write_text(json.dumps(vectors, indent=1))
    for name in (man_a, man_d, fm.WEIGHT_MANIFEST):
        checksums[name] = fm.sha256_file(root / name)
    if bar:
        bar.close()
    return checksums, record


def _write_layers(
    root: Path,
    c: ModelConfig,
    source: TensorSource,
    quant: str,
    p: dict[str, int],
    lyrw_version: int,
    attn: _Blob,
    dense: _Blob,
    add_vector,
    checksums: dict[str, str],
    record: integrity.Record,
    tick,
) -> None:
    H, L = c.hidden_size, c.num_layers
    with ThreadPoolExecutor(max_workers=1) as pool:
        for layer in range(L):
            hd, kv = c.layer_head_dim(layer), c.layer_kv_heads(layer)
            pre = f"layers.{layer}"
            shapes = {
                "q": (c.num_heads * hd, H),
                "k": (kv * hd, H),
                "v": (kv * hd, H),
                "o": (H, c.num_heads * hd),
            }
            for proj in ("q", "k", "v", "o"):
                key = f"{pre}.self_attn.{proj}_proj.weight"
                rows, cols = shapes[proj]
                if proj == "v" and c.layer_k_eq_v(layer):
                    if quant != "q4k":
                        tick()
                        continue
                    # The reference keeps 4 entries per layer: K's values, as Q6_K, in V's slot.
                    data = _get(source, f"{pre}.self_attn.k_proj.weight", p["v"], rows, cols)
                else:
                    data = _get(source, key, p[proj], rows, cols)
                attn.add(key, data, p[proj], rows, cols)
                tick()
            shapes = {
                "gate": (c.intermediate_size, H),
                "up": (c.intermediate_size, H),
                "down": (H, c.intermediate_size),
            }
            for proj in ("gate", "up", "down"):
                key = f"{pre}.mlp.{proj}_proj.weight"
                rows, cols = shapes[proj]
                dense.add(key, _get(source, key, p[proj], rows, cols), p[proj], rows, cols)
                tick()
            for name in fm.LAYER_NORMS:
                add_vector(f"{pre}.{name}.weight")
            add_vector(f"{pre}.self_attn.q_norm.weight")
            add_vector(f"{pre}.self_attn.k_norm.weight")
            add_vector(f"{pre}.layer_scalar")
            add_vector(f"{pre}.router.proj.weight")
            add_vector(f"{pre}.router.scale")
            add_vector(f"{pre}.router.per_expert_scale")
            tick()
            digest, experts = _write_layer(root, c, source, layer, p, lyrw_version, pool, tick)
            checksums[fm.layer_file(layer)] = digest
            record.experts[fm.layer_file(layer)] = experts
            release = getattr(source, "release", None)
            if release is not None:  # e.g. drop a mapped source's touched pages from our RSS
                release()


def _write_layer(
    root: Path,
    c: ModelConfig,
    source: TensorSource,
    layer: int,
    p: dict[str, int],
    version: int,
    pool: ThreadPoolExecutor,
    tick,
) -> tuple[str, list[str]]:
    """One LYRW file; experts are encoded in parallel batches and written in order.
    Returns the file's sha256 and each expert's digest."""
    E, I, H = c.num_experts, c.moe_intermediate_size, c.hidden_size
    fgu, fdn = p["expert_gu"], p["expert_down"]
    hdr, entries, size = fm.layout_lyrw(version, fgu, fdn, list(range(E)), E, I, H)
    f = _HashingFile(root / fm.layer_file(layer))
    f.write(fm.pack_lyrw(hdr, entries))
    enc = getattr(source, "encoded_expert", None)

    def one(e: int) -> tuple[np.ndarray, np.ndarray, str]:
        gu, dn = encoded(e)
        # Hashed on the worker thread too (hashlib releases the GIL): the digest the
        # fingerprint and every shard's check are built on (vindex/integrity.py).
        return gu, dn, integrity.expert_digest(fgu, fdn, gu, dn)

    def encoded(e: int) -> tuple[np.ndarray, np.ndarray]:
        got = enc(layer, e, fgu, fdn) if enc is not None else None
        got = got or (None, None)  # either part may come pre-encoded; the rest is encoded here
        if got[0] is not None and got[1] is not None:
            return np.asarray(got[0], np.uint8).reshape(-1), np.asarray(got[1], np.uint8).reshape(-1)
        part = getattr(source, "expert_part", None)
        if part is not None:  # decode only the parts that were not pre-encoded
            gu = part(layer, e, "gate_up_proj") if got[0] is None else np.zeros((2 * I, H), np.float32)
            dn = part(layer, e, "down_proj") if got[1] is None else np.zeros((H, I), np.float32)
        else:
            gu, dn = source.expert(layer, e)
        if tuple(gu.shape) != (2 * I, H) or tuple(dn.shape) != (H, I):
            raise VindexError(
                f"source expert {e} of layer {layer}: gate_up {list(gu.shape)} / down "
                f"{list(dn.shape)}, config implies [{2 * I}, {H}] / [{H}, {I}]"
            )
        return (
            np.asarray(got[0], np.uint8).reshape(-1) if got[0] is not None else encode(gu, fgu),
            np.asarray(got[1], np.uint8).reshape(-1) if got[1] is not None else encode(dn, fdn),
        )

    digests: list[str] = []
    batch = max(1, (pool._max_workers or 1) * 2)
    for start in range(0, E, batch):
        ids = list(range(start, min(E, start + batch)))
        for e, (gu, dn, digest) in zip(ids, pool.map(one, ids), strict=True):
            digests.append(digest)
            ent = entries[e]
            assert ent is not None
            f.pad_to(ent.gate_up_off)
            if gu.nbytes != ent.gate_up_len or dn.nbytes != ent.down_len:
                raise VindexError(
                    f"expert {e} of layer {layer}: encoded to {gu.nbytes}+{dn.nbytes} bytes, "
                    f"expected {ent.gate_up_len}+{ent.down_len}"
                )
            f.write(gu)
            f.write(dn)
            tick()
    if f.pos != size:
        raise AssertionError(f"layer file size {f.pos} != planned {size}")
    return f.close(), digests
