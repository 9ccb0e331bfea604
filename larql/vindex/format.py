"""On-disk constants and byte layouts of the vindex: file names, block sizes, LYRW headers.

Everything here is pure layout (no mmap, no model logic) so the reader, the writer, the
slicer and the checksum tools agree on one definition. See docs/FORMAT.md.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from .. import kernels as K
from .. import ranges
from ..errors import LarqlError

PAGE = 4096

INDEX_JSON = "index.json"
WEIGHT_MANIFEST = "weight_manifest.json"
NORMS_BIN = "norms.bin"
EMBEDDINGS_BIN = "embeddings.bin"
TOKENIZER_JSON = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"
LAYERS_DIR = "layers"

# The per-layer RMSNorm weights of a Gemma 4 MoE decoder layer (norms.bin keys
# `layers.{L}.{name}.weight`), besides the attention's q_norm and k_norm.
LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "post_feedforward_layernorm_1",
    "pre_feedforward_layernorm_2",
    "post_feedforward_layernorm_2",
)
LM_HEAD_Q4 = "lm_head_q4.bin"  # the reference's name; it holds Q4_K (not Q4_0) despite the name
LM_HEAD_Q6K = "lm_head_q6k.bin"  # ours: a file the reference does not look for (it then uses the tie)

# (blob, manifest) per precision. q4k names are the reference's; the float names are ours.
ATTN_FILES = {
    "q4k": ("attn_weights_q4k.bin", "attn_weights_q4k_manifest.json"),
    "f16": ("attn_weights.bin", "attn_weights_manifest.json"),
    "f32": ("attn_weights.bin", "attn_weights_manifest.json"),
}
DENSE_FILES = {
    "q4k": ("interleaved_q4k.bin", "interleaved_q4k_manifest.json"),
    "f16": ("interleaved.bin", "interleaved_manifest.json"),
    "f32": ("interleaved.bin", "interleaved_manifest.json"),
}
# Newer reference writers name the q4k files *_kquant (and may write quant "kquant"); they
# still read the *_q4k names, which the published slices use. We write the legacy names and
# read both.
KQUANT_ATTN_FILES = ("attn_weights_kquant.bin", "attn_weights_kquant_manifest.json")
KQUANT_DENSE_FILES = ("interleaved_kquant.bin", "interleaved_kquant_manifest.json")

# Format ids, names and block layouts are the kernels' (csrc/larql.h through larql.kernels): the
# LYRW quant_format numbering. Here only which of them may stand in a file.
F32, F16, BF16, Q4_0, Q4_K, Q6_K, Q8_0, FP4, Q5_K = (K.F32, K.F16, K.BF16, K.Q4_0, K.Q4_K, K.Q6_K, K.Q8_0,
                                                    K.FP4, K.Q5_K)
FILE_FORMATS = (F32, F16, BF16, Q4_0, Q4_K, Q6_K, Q8_0, FP4, Q5_K)
FORMAT_NAMES = {f: K.FORMAT_NAMES[f] for f in FILE_FORMATS}
FORMAT_IDS = {v.lower(): k for k, v in FORMAT_NAMES.items()}
# fmt -> (values per block, bytes per block), for the formats whose layout is known (not FP4)
BLOCKS = {f: (K.block_size(f), K.row_bytes(f, K.block_size(f))) for f in FILE_FORMATS if K.block_size(f)}
# A separate (untied) LM head: file and weight_manifest.json `kind` per format. "tensor_q4k" is
# the reference's kind; "tensor_q6k" is ours.
LM_HEAD_FILES = {Q4_K: LM_HEAD_Q4, Q6_K: LM_HEAD_Q6K}
LM_HEAD_KINDS = {Q4_K: "tensor_q4k", Q6_K: "tensor_q6k"}
# What this implementation can compute with (the others are recognised but not served).
SUPPORTED = set(K.WEIGHT_FORMATS)

LYRW_MAGIC = 0x4C595257
LYRW_HEADER = struct.Struct("<6I")  # magic, version, quant_format, num_entries, inter, hidden
LYRW_ROW_V1 = struct.Struct("<4Q")  # gate_up_off, gate_up_len, down_off, down_len
LYRW_ROW_V2 = struct.Struct("<2I4Q")  # gate_up_fmt, down_fmt, then as v1


class VindexError(LarqlError, ValueError):
    """A vindex (or a source checkpoint) is malformed or incomplete; names the file and field."""


def format_id(name: str | int) -> int:
    if isinstance(name, int):
        return name
    try:
        return FORMAT_IDS[str(name).lower()]
    except KeyError:
        raise VindexError(f"unknown tensor format {name!r}") from None


def block_values(fmt: int) -> int:
    return BLOCKS[fmt][0]


def padded_cols(fmt: int, cols: int) -> int:
    return K.padded_cols(fmt, cols)


def row_bytes(fmt: int, cols: int) -> int:
    """Bytes of one stored row of `cols` values (cols padded up to the block size)."""
    return K.row_bytes(fmt, K.padded_cols(fmt, cols))


def align(n: int, a: int = PAGE) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class ExpertEntry:
    gate_up_off: int
    gate_up_len: int
    down_off: int
    down_len: int
    gate_up_fmt: int
    down_fmt: int

    @property
    def start(self) -> int:
        return min(self.gate_up_off, self.down_off)

    @property
    def end(self) -> int:
        return max(self.gate_up_off + self.gate_up_len, self.down_off + self.down_len)


@dataclass(frozen=True)
class LyrwHeader:
    version: int
    quant_format: int
    num_entries: int
    inter: int
    hidden: int

    @property
    def table_bytes(self) -> int:
        row = LYRW_ROW_V1.size if self.version == 1 else LYRW_ROW_V2.size
        return LYRW_HEADER.size + row * self.num_entries


def expert_lengths(fmt_gu: int, fmt_down: int, inter: int, hidden: int) -> tuple[int, int]:
    """Bytes of one expert's gate_up [2I, H] and down [H, I] (rows padded to the block)."""
    return 2 * inter * row_bytes(fmt_gu, hidden), hidden * row_bytes(fmt_down, inter)


def parse_lyrw(
    buf,
    path: Path | str,
    file_size: int,
    expect: tuple[int, int, int] | None = None,
) -> tuple[LyrwHeader, list[ExpertEntry | None]]:
    """Parse and validate a LYRW header + offset table; zero-length rows are absent experts.
    `expect` = (num_entries, intermediate, hidden) from index.json."""
    name = str(path)
    if file_size < LYRW_HEADER.size:
        raise VindexError(f"{name}: truncated: {file_size} bytes, header needs {LYRW_HEADER.size}")
    magic, version, qf, n, inter, hidden = LYRW_HEADER.unpack_from(buf, 0)
    if magic != LYRW_MAGIC:
        raise VindexError(f"{name}: bad magic 0x{magic:08X} (expected 0x{LYRW_MAGIC:08X} 'LYRW')")
    if version not in (1, 2):
        raise VindexError(f"{name}: unsupported format_version {version} (supported: 1, 2)")
    if qf not in BLOCKS:
        raise VindexError(f"{name}: unknown quant_format {qf}")
    if n <= 0 or inter <= 0 or hidden <= 0:
        raise VindexError(f"{name}: header has num_entries={n} intermediate={inter} hidden={hidden}")
    hdr = LyrwHeader(version, qf, n, inter, hidden)
    if expect is not None:
        for label, got, want in zip(
            ("num_entries", "intermediate", "hidden"), (n, inter, hidden), expect, strict=True
        ):
            if got != want:
                raise VindexError(f"{name}: header {label}={got} but index.json says {want}")
    if file_size < hdr.table_bytes:
        raise VindexError(
            f"{name}: truncated: offset table needs {hdr.table_bytes} bytes, file has {file_size}"
        )
    entries: list[ExpertEntry | None] = []
    pos = LYRW_HEADER.size
    for e in range(n):
        if version == 1:
            gu_off, gu_len, d_off, d_len = LYRW_ROW_V1.unpack_from(buf, pos)
            gu_fmt = d_fmt = qf
            pos += LYRW_ROW_V1.size
        else:
            gu_fmt, d_fmt, gu_off, gu_len, d_off, d_len = LYRW_ROW_V2.unpack_from(buf, pos)
            pos += LYRW_ROW_V2.size
        if gu_len == 0 and d_len == 0:
            entries.append(None)
            continue
        for label, f in (("gate_up_fmt", gu_fmt), ("down_fmt", d_fmt)):
            if f not in BLOCKS:
                raise VindexError(f"{name}: expert {e}: unknown {label} {f}")
        want_gu, want_d = expert_lengths(gu_fmt, d_fmt, inter, hidden)
        if gu_len != want_gu:
            raise VindexError(
                f"{name}: expert {e}: gate_up_len {gu_len} != {want_gu} "
                f"(2*{inter} rows of {hidden} in {FORMAT_NAMES[gu_fmt]})"
            )
        if d_len != want_d:
            raise VindexError(
                f"{name}: expert {e}: down_len {d_len} != {want_d} "
                f"({hidden} rows of {inter} in {FORMAT_NAMES[d_fmt]})"
            )
        for label, off, ln in (("gate_up_off", gu_off, gu_len), ("down_off", d_off, d_len)):
            if off < hdr.table_bytes or off + ln > file_size:
                why = ""
                if off >= hdr.table_bytes and off + ln > file_size:
                    why = f": the file is truncated ({file_size} bytes) or its offset table is corrupt"
                raise VindexError(
                    f"{name}: expert {e}: {label} {off}+{ln} lies outside the data "
                    f"region [{hdr.table_bytes}, {file_size}){why}"
                )
        entries.append(ExpertEntry(gu_off, gu_len, d_off, d_len, gu_fmt, d_fmt))
    return hdr, entries


def pack_lyrw(hdr: LyrwHeader, entries: list[ExpertEntry | None]) -> bytes:
    out = [
        LYRW_HEADER.pack(LYRW_MAGIC, hdr.version, hdr.quant_format, hdr.num_entries, hdr.inter, hdr.hidden)
    ]
    for ent in entries:
        if ent is None:
            if hdr.version == 1:
                out.append(LYRW_ROW_V1.pack(0, 0, 0, 0))
            else:
                out.append(LYRW_ROW_V2.pack(hdr.quant_format, hdr.quant_format, 0, 0, 0, 0))
        elif hdr.version == 1:
            out.append(LYRW_ROW_V1.pack(ent.gate_up_off, ent.gate_up_len, ent.down_off, ent.down_len))
        else:
            out.append(
                LYRW_ROW_V2.pack(
                    ent.gate_up_fmt,
                    ent.down_fmt,
                    ent.gate_up_off,
                    ent.gate_up_len,
                    ent.down_off,
                    ent.down_len,
                )
            )
    return b"".join(out)


def layout_lyrw(
    version: int, fmt_gu: int, fmt_down: int, experts: list[int], num_entries: int, inter: int, hidden: int
) -> tuple[LyrwHeader, list[ExpertEntry | None], int]:
    """Offsets for the named experts, in order. v2 starts every expert on a 4 KiB page (so a
    shard's prefault/madvise ranges are page-exact); v1 packs them like the reference.
    Returns (header, entries, total file size)."""
    hdr = LyrwHeader(version, fmt_gu, num_entries, inter, hidden)
    gu_len, d_len = expert_lengths(fmt_gu, fmt_down, inter, hidden)
    entries: list[ExpertEntry | None] = [None] * num_entries
    pos = hdr.table_bytes
    for e in experts:
        if version == 2:
            pos = align(pos)
        entries[e] = ExpertEntry(pos, gu_len, pos + gu_len, d_len, fmt_gu, fmt_down)
        pos += gu_len + d_len
    return hdr, entries, pos


def layer_file(layer: int) -> str:
    return f"{LAYERS_DIR}/layer_{layer:02d}.weights"


def strip_prefix(name: str) -> str:
    """HF parameter name -> vindex key (drop `model.language_model.` or `model.`)."""
    for p in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(p):
            return name[len(p) :]
    return name


def member_path(root: Path, name: Any, where: str) -> Path:
    """`root / name` for a file name taken from a manifest or index.json, refusing any name that
    could leave the vindex folder: absolute paths, `..` components, empty or NUL-containing
    names. The check is lexical (symlinks are not followed: old huggingface_hub versions fill a
    pulled folder with symlinks into their cache)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise VindexError(f"{where}: file name {str(name)[:80]!r} is not a non-empty string")
    win = PureWindowsPath(name)  # splits on both separators, knows drives ("C:x") and UNC names
    if name.startswith(("/", "\\")) or win.drive or win.is_absolute():
        raise VindexError(f"{where}: file {name[:200]!r} is an absolute path; files must lie inside "
                          f"the vindex folder {root}")
    if ".." in win.parts:
        raise VindexError(f"{where}: file {name[:200]!r} contains '..'; files must lie inside "
                          f"the vindex folder {root}")
    return Path(root) / name


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise VindexError(f"{path}: missing ({what})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VindexError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def parse_ranges(spec: str | None, limit: int | None = None, what: str = "range") -> list[int] | None:
    """'0-63' / '0-3,8,10-11' -> sorted ids (ranges.parse); None, '' or 'all' -> None (everything).
    Errors are VindexErrors, as for everything else about a vindex."""
    if spec is None or str(spec).strip() in ("", "all"):
        return None
    try:
        return ranges.parse(str(spec), limit, what)
    except ranges.RangeError as e:
        raise VindexError(str(e)) from None
