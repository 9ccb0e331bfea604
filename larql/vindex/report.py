"""`larql info` and `larql verify`: what a vindex holds, and whether its bytes are intact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import ranges
from . import format as fm
from .format import VindexError
from .reader import open_vindex

COMPONENTS = (
    ("index", lambda n: n in (fm.INDEX_JSON,) or n.endswith("manifest.json")),
    ("embeddings", lambda n: n == fm.EMBEDDINGS_BIN),
    ("norms", lambda n: n == fm.NORMS_BIN),
    ("attention", lambda n: n.startswith("attn_weights")),
    ("dense_mlp", lambda n: n.startswith("interleaved")),
    ("experts", lambda n: n.startswith(fm.LAYERS_DIR + "/")),
    ("lm_head", lambda n: n.startswith("lm_head")),
    ("tokenizer", lambda n: n.startswith("tokenizer") or n == fm.CHAT_TEMPLATE),
)


def info(path: str | os.PathLike) -> dict[str, Any]:
    vindex = open_vindex(path)
    c = vindex.config
    problems = vindex.structure_problems()
    sizes = vindex.file_sizes()
    comp: dict[str, int] = {name: 0 for name, _ in COMPONENTS}
    comp["other"] = 0
    for name, size in sizes.items():
        for cname, match in COMPONENTS:
            if match(name):
                comp[cname] += size
                break
        else:
            comp["other"] += size
    formats: dict[str, Any] = {"embeddings": vindex.dtype, "lm_head": vindex.lm_head_format, "norms": "f32"}
    for label, table in (("attention", vindex._attn), ("dense_mlp", vindex._dense)):
        fs = sorted({fm.FORMAT_NAMES[e.fmt] for e in table.values()})
        if fs:
            formats[label] = fs
    expert_fmts: set[str] = set()
    lyrw_versions: set[int] = set()
    for layer in vindex.layers_present[:1] + vindex.layers_present[-1:]:
        try:
            ef = vindex.expert_file(layer)
        except VindexError:
            continue
        lyrw_versions.add(ef.version)
        for e in ef.present()[:1]:
            ent = ef.entry(e)
            expert_fmts |= {fm.FORMAT_NAMES[ent.gate_up_fmt], fm.FORMAT_NAMES[ent.down_fmt]}
    if expert_fmts:
        formats["experts"] = sorted(expert_fmts)
    return {
        "path": str(vindex.path),
        "model": vindex.index.get("model"),
        "family": vindex.index.get("family"),
        "architecture": c.model_type,
        "quant": vindex.quant,
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "num_experts": c.num_experts,
        "top_k": c.top_k,
        "moe_intermediate_size": c.moe_intermediate_size,
        "layer_types": c.layer_types,
        "lm_head": vindex.lm_head_format,
        "layers_present": ranges.text(vindex.layers_present),
        "experts_present": ranges.text(vindex.experts_present),
        "lyrw_versions": sorted(lyrw_versions),
        "formats": formats,
        "bytes": {k: v for k, v in comp.items() if v},
        "total_bytes": sum(sizes.values()),
        "slice": vindex.index.get("slice"),
        "expert_fingerprint": None if problems else vindex.expert_fingerprint(),
        "integrity_basis": vindex.integrity.basis,
        "has_checksums": bool(vindex.index.get("checksums")),
        "problems": problems,
    }


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_info(d: dict[str, Any]) -> str:
    lines = [
        f"{d['path']}",
        f"  model        {d['model']} ({d['architecture']}, family {d['family']})",
        f"  quant        {d['quant']}   formats: "
        + ", ".join(f"{k}={'/'.join(v) if isinstance(v, list) else v}" for k, v in d["formats"].items()),
        f"  dims         {d['num_layers']} layers, hidden {d['hidden_size']}, "
        f"dense MLP {d['intermediate_size']}, vocab {d['vocab_size']}",
        f"  experts      {d['num_experts']} x {d['moe_intermediate_size']}, top-{d['top_k']}",
        "  LM head      "
        + (
            f"tied to the embeddings ({d['formats']['embeddings']})"
            if d["lm_head"] == "tied"
            else f"separate, {d['lm_head']} (the embeddings stay {d['formats']['embeddings']})"
        ),
        f"  holds        layers {d['layers_present']}, experts {d['experts_present']}"
        + (f" (slice of preset {d['slice'].get('preset')})" if isinstance(d.get("slice"), dict) else ""),
        f"  LYRW         version {','.join(map(str, d['lyrw_versions'])) or '-'}",
        "  bytes        "
        + ", ".join(f"{k} {human(v)}" for k, v in d["bytes"].items())
        + f"; total {human(d['total_bytes'])}",
        f"  fingerprint  {(d['expert_fingerprint'] or '-')[:16]} (from {d['integrity_basis']} digests)",
    ]
    return "\n".join(lines)


def file_problems(root: Path, sums: dict[str, str], progress: bool = True) -> dict[str, str]:
    """name -> what is wrong ("missing", a sha256 mismatch) for each recorded file not intact."""
    present = {n: root / n for n in sums if (root / n).exists()}
    problems = {n: "missing" for n in sums if n not in present}
    total = sum(p.stat().st_size for p in present.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", dynamic_ncols=True)
    try:
        for name, p in present.items():
            got = fm.sha256_file(p, bar.update if bar else None)
            if got != sums[name]:
                problems[name] = f"sha256 {got[:16]}... != recorded {sums[name][:16]}..."
    finally:
        if bar:
            bar.close()
    return problems


def verify(path: str | os.PathLike, progress: bool = True) -> list[str]:
    """Check every file's sha256 against index.json; returns a list of problems (empty = intact).

    A slice records checksums only for the files it holds, so any recorded file missing is a problem."""
    root = Path(path)
    index = fm.read_json(root / fm.INDEX_JSON, "the vindex metadata")
    sums: dict[str, str] = index.get("checksums") or {}
    if not sums:
        raise VindexError(f"{root / fm.INDEX_JSON}: no checksums recorded; nothing to verify against")
    if not isinstance(sums, dict):
        raise VindexError(f"{root / fm.INDEX_JSON}: checksums must be an object {{file: sha256}}")
    for n in sums:
        fm.member_path(root, n, f"{root / fm.INDEX_JSON}: checksums")
    problems = [f"{name}: {why}" for name, why in file_problems(root, sums, progress).items()]
    # Opening validates structure too (manifests, sizes, every layer file's offset table),
    # and the fingerprint's record (norm digests against norms.bin).
    try:
        vindex = open_vindex(root)
        problems += vindex.structure_problems()
        vindex.expert_fingerprint()
        vindex.close()
    except VindexError as e:
        problems.append(str(e))
    return problems
