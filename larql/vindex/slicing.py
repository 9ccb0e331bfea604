"""`larql slice`: copy the parts of a vindex one machine needs, optionally only some experts/layers.

Presets name file groups (the reference's names). `--experts`/`--layers` go further than the
reference: the layer files are rewritten to hold only the named experts (other rows of the
offset table are zero), so a shard serving experts 0-63 downloads and stores half the bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .. import ranges
from . import format as fm
from . import integrity
from .format import VindexError
from .reader import open_vindex
from .writer import _HashingFile, replace_dir, write_index

# group -> predicate on a relative file name
GROUPS = {
    "index": lambda n: n == fm.INDEX_JSON,
    "manifests": lambda n: n.endswith("manifest.json"),
    "embeddings": lambda n: n == fm.EMBEDDINGS_BIN,
    "norms": lambda n: n == fm.NORMS_BIN,
    "attention": lambda n: n.startswith("attn_weights") and n.endswith(".bin"),
    "dense": lambda n: n.startswith("interleaved") and n.endswith(".bin"),
    "lm_head": lambda n: n.startswith("lm_head"),
    "layers": lambda n: n.startswith(fm.LAYERS_DIR + "/"),
    "tokenizer": lambda n: (
        n.startswith("tokenizer")
        or n in (fm.CHAT_TEMPLATE, "generation_config.json", "special_tokens_map.json")
    ),
}

PRESETS: dict[str, tuple[str, ...]] = {
    # Our client also runs the dense MLP locally (the reference's client preset leaves it out).
    "client": ("embeddings", "norms", "attention", "dense", "lm_head", "tokenizer", "manifests"),
    "attn": ("norms", "attention", "manifests"),
    "embed": ("embeddings", "tokenizer"),
    "router": ("norms", "tokenizer", "manifests"),
    "expert-server": ("embeddings", "norms", "dense", "layers", "tokenizer", "manifests"),
    # Ours: exactly what `larql serve` opens. The reference's expert-server preset also carries
    # embeddings and the dense MLP (~1.8 GB for 26B A4B) that a server never reads.
    "experts": ("norms", "layers", "manifests"),
    "all": tuple(GROUPS),
}
ALIASES = {"expert_server": "expert-server", "moe-server": "expert-server", "moe_server": "expert-server"}


def preset_groups(preset: str) -> tuple[str, ...]:
    name = ALIASES.get(preset, preset)
    if name not in PRESETS:
        raise VindexError(f"unknown preset {preset!r} (choose from {', '.join([*PRESETS, *ALIASES])})")
    return ("index", *PRESETS[name])


def preset_patterns(preset: str, layers: list[int] | None = None) -> list[str]:
    """Glob patterns (huggingface_hub allow_patterns) for the files of a preset."""
    pats = {
        "index": [fm.INDEX_JSON],
        "manifests": ["*manifest.json"],
        "embeddings": [fm.EMBEDDINGS_BIN],
        "norms": [fm.NORMS_BIN],
        "attention": ["attn_weights*.bin"],
        "dense": ["interleaved*.bin"],
        "lm_head": ["lm_head*"],
        "tokenizer": ["tokenizer*", fm.CHAT_TEMPLATE, "generation_config.json", "special_tokens_map.json"],
        "layers": [f"{fm.LAYERS_DIR}/*"] if layers is None else [fm.layer_file(x) for x in layers],
    }
    out: list[str] = []
    for g in preset_groups(preset):
        out += pats[g]
    return out


def select_files(names, preset: str) -> list[str]:
    groups = preset_groups(preset)
    return sorted(n for n in names if any(GROUPS[g](n) for g in groups))


def _copy(src: Path, dst: Path, bar, want: str | None) -> str:
    """Copy src to dst, hashing on the way; refuses a source whose sha256 is not `want`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(1 << 22):
            fo.write(chunk)
            h.update(chunk)
            if bar:
                bar.update(len(chunk))
    got = h.hexdigest()
    if want is not None and got != want:
        raise VindexError(f"{src}: sha256 {got[:16]}... != {want[:16]}... recorded in its index.json: "
                          "the source is corrupt or was changed (run `larql verify` on it)")
    return got


def _rewrite_layer(ef, experts: list[int], dst: Path, bar, want: list[str | None] | None
                   ) -> tuple[str, list[str | None]]:
    """A LYRW v2 file holding only `experts` (page-aligned), same header dims. Returns its
    sha256 and the digest of each kept expert (None for the others), each checked against
    `want` (the source's recorded digests) where recorded."""
    hdr = fm.LyrwHeader(2, ef.header.quant_format, ef.num_experts, ef.inter, ef.hidden)
    entries: list[fm.ExpertEntry | None] = [None] * ef.num_experts
    pos = hdr.table_bytes
    for e in experts:
        src = ef.entry(e)
        pos = fm.align(pos)
        entries[e] = fm.ExpertEntry(
            pos, src.gate_up_len, pos + src.gate_up_len, src.down_len, src.gate_up_fmt, src.down_fmt
        )
        pos += src.gate_up_len + src.down_len
    f = _HashingFile(dst)
    f.write(fm.pack_lyrw(hdr, entries))
    digests: list[str | None] = [None] * ef.num_experts
    buf = ef.buffer
    for e in experts:
        src, new = ef.entry(e), entries[e]
        f.pad_to(new.gate_up_off)
        gu = buf[src.gate_up_off : src.gate_up_off + src.gate_up_len]
        dn = buf[src.down_off : src.down_off + src.down_len]
        digests[e] = integrity.expert_digest(src.gate_up_fmt, src.down_fmt, gu, dn)
        if want is not None and want[e] is not None and digests[e] != want[e]:
            f.close()
            raise VindexError(f"{ef.path}: expert {e}'s bytes differ from the digest recorded in its "
                              "index.json: the source is corrupt or was changed (run `larql verify` on it)")
        f.write(gu)
        f.write(dn)
        if bar:
            bar.update(src.gate_up_len + src.down_len)
    return f.close(), digests


def _kept_bytes(ef, experts: list[int]) -> int:
    return sum(ef.entry(e).gate_up_len + ef.entry(e).down_len for e in experts)


def slice_vindex(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    preset: str = "all",
    experts: str | list[int] | None = None,
    layers: str | list[int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    vindex = open_vindex(src)
    c = vindex.config
    src, dst = Path(src), Path(dst)
    groups = preset_groups(preset)
    want_e = (
        fm.parse_ranges(experts, c.num_experts, "--experts") if isinstance(experts, str | None) else experts
    )
    want_l = fm.parse_ranges(layers, c.num_layers, "--layers") if isinstance(layers, str | None) else layers
    have_e = vindex.experts_present if want_e is None else want_e
    have_l = vindex.layers_present if want_l is None else want_l
    if "layers" in groups:
        missing_e = sorted(set(have_e) - set(vindex.experts_present))
        missing_l = sorted(set(have_l) - set(vindex.layers_present))
        if missing_e or missing_l:
            raise VindexError(
                f"{src}: does not hold "
                + "; ".join(
                    x
                    for x in (
                        f"experts {ranges.text(missing_e)}" if missing_e else "",
                        f"layers {ranges.text(missing_l)}" if missing_l else "",
                    )
                    if x
                )
            )
    else:
        have_e, have_l = [], []
    if dst.exists() and not overwrite:
        raise VindexError(f"{dst}: already exists (pass --force to replace it)")
    names = [n for n in vindex.file_sizes() if n != fm.INDEX_JSON]
    chosen = [
        n
        for n in select_files(names, preset)
        if not GROUPS["layers"](n) or n in {fm.layer_file(x) for x in have_l}
    ]
    rewrite = want_e is not None and sorted(want_e) != vindex.experts_present
    sums_src: dict[str, str] = dict(vindex.index.get("checksums") or {})
    sizes = vindex.file_sizes()
    # What the bar counts: whole files, but only the kept experts' bytes of a rewritten layer
    # file (counting its whole size left the bar at 50% with --experts 0-7 of 16).
    total = sum(_kept_bytes(vindex.expert_file(int(n[len(fm.LAYERS_DIR) + 7: -8])), have_e)
                if GROUPS["layers"](n) and rewrite else sizes[n] for n in chosen)
    # The slice keeps the source's record (so every slice derives the same fingerprint) and
    # adds the digests of the experts it rewrites, which its servers check their bytes against.
    rec = vindex.integrity
    if rec.basis == "tables" and len(rec.tables) < c.num_layers:
        vindex.expert_fingerprint()  # fills rec.tables from the layer files when all are here
        if len(rec.tables) < c.num_layers and "layers" in groups:
            raise VindexError(f"{src}: records no checksums and lacks some layer files: a slice of it "
                              "could not be matched to its other shards")
    out_rec = integrity.Record(rec.basis, dict(rec.files), {k: list(v) for k, v in rec.experts.items()},
                               dict(rec.tables), list(rec.norms or vindex.norm_digests() or []))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"slice {preset}", dynamic_ncols=True)
    tmp = dst.parent / f"{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sums: dict[str, str] = {}
        for n in chosen:
            if GROUPS["layers"](n) and rewrite:
                layer = int(n[len(fm.LAYERS_DIR) + 7 : -8])
                recorded = rec.experts.get(n)
                if recorded is None and n in rec.files:
                    # Only whole-file checksums: check the source file before trusting its bytes.
                    ef = vindex.expert_file(layer)
                    got = integrity.hash_file(ef)
                    if got != rec.files[n]:
                        raise VindexError(
                            f"{src / n}: sha256 {got[:16]}... != recorded {rec.files[n][:16]}...: "
                            "the source is corrupt or was changed (run `larql verify` on it)")
                sums[n], kept = _rewrite_layer(vindex.expert_file(layer), have_e, tmp / n, bar, recorded)
                if recorded is None:
                    out_rec.experts[n] = kept
            else:
                sums[n] = _copy(src / n, tmp / n, bar, sums_src.get(n))
        index = dict(vindex.index)
        index["checksums"] = sums
        index["layers_present"] = list(have_l)
        index["experts_present"] = list(have_e)
        index[integrity.FIELD] = out_rec.to_json()
        index["slice"] = {
            "preset": ALIASES.get(preset, preset),
            "experts": ranges.text(have_e),
            "layers": ranges.text(have_l),
            "files": chosen,
        }
        write_index(tmp, index)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar:
            bar.close()
        vindex.close()
    return dst
