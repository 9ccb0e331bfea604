"""Shard-only downloads: `larql pull REPO --experts 64-127` and the container boot.

A shard serving half the experts needs half of each layer file. The Hub serves files over
HTTP with Range support, so this reads each LYRW header + offset table (a few KiB), then
fetches only the owned experts' byte ranges and writes a page-aligned LYRW v2 file holding
just those experts (the layout `larql slice --experts` writes: the same bytes). The small
files of the preset (index, manifests, norms) are downloaded whole with `hf_hub_download`.
It reads the reference's published layout (v1 packed files, no larql fields in index.json)
and repos written by `larql publish` alike.

Nothing is ever rewritten in place (a running server may map the files): every file is
written under a temporary name and renamed into place, and index.json, written last, marks
the vindex complete. An interrupted pull resumes: `hf_hub_download` continues its
`.incomplete` files, and a layer file continues from the length of its `.part` file, since
its bytes are written in order (the state file records which repo commit and experts they
belong to). `only=` re-downloads just the named files (repairing what `verify` found bad).

Integrity: whole files are checked against the source's recorded sha256 (when it records
one). A rewritten layer file is new, so no source checksum covers it: the transport (TCP, TLS)
protects the ranges, its header and table are validated, and its sha256 is computed from the
finished file and recorded, so `larql verify` detects any later change on disk.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig
from ..ranges import text as ranges_text
from . import format as fm
from .format import VindexError

STATE_FILE = ".cache/larql/pull.json"
REQUEST_BYTES = 64 << 20   # largest single range request: the unit of retry and progress
MERGE_GAP = 64 << 10       # source gaps up to this are fetched rather than split into two requests
RESUME_GRANULE = 1 << 20   # a resumed layer file re-fetches from a MiB boundary
RETRIES = 5
TABLE_PROBE = 64 << 10     # first read of a layer file: header + table of any real model


@dataclass
class RemoteVindex:
    """What a repo holds, read before downloading anything big."""

    repo: str
    commit: str
    index: dict[str, Any]
    config: ModelConfig
    files: list[str]
    token: str | None

    @property
    def experts_present(self) -> list[int]:
        ep = self.index.get("experts_present")
        return sorted(int(x) for x in ep) if isinstance(ep, list) else list(range(self.config.num_experts))

    @property
    def layers_present(self) -> list[int]:
        lp = self.index.get("layers_present")
        if isinstance(lp, list):
            return sorted(int(x) for x in lp)
        names = set(self.files)
        return [x for x in range(self.config.num_layers) if fm.layer_file(x) in names]

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, name, revision=self.commit)


def _headers(token: str | None) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    h = build_hf_headers(token=token)
    h["Accept-Encoding"] = "identity"  # byte ranges of the stored bytes, never of a gzip stream
    return h


def fetch_range(url: str, token: str | None, first: int, last: int,
                sink: Callable[[memoryview], None]) -> None:
    """Stream bytes [first, last] of `url` into `sink`, resuming after a dropped connection
    (RETRIES attempts, backing off) from the byte where it stopped."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

    pos = first
    for attempt in range(RETRIES):
        try:
            headers = {**_headers(token), "Range": f"bytes={pos}-{last}"}
            with http_stream_backoff("GET", url, headers=headers,
                                     timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                hf_raise_for_status(r)
                if r.status_code != 206:
                    raise VindexError(f"{url}: the server ignored a Range request (HTTP {r.status_code}); "
                                      "it cannot serve shard-only downloads")
                for chunk in r.iter_bytes(1 << 20):
                    if pos > last:
                        break
                    view = memoryview(chunk)[: last + 1 - pos]
                    sink(view)
                    pos += len(view)
            if pos > last:
                return
            raise ConnectionError(f"{url}: response ended at byte {pos}, {last + 1 - pos} short")
        except (httpx2.TransportError, ConnectionError) as e:
            if attempt == RETRIES - 1:
                raise ConnectionError(f"{url}: download failed after {RETRIES} attempts: {e}") from e
            time.sleep(min(8.0, 0.5 * 2**attempt))


def fetch_bytes(url: str, token: str | None, first: int, last: int) -> bytes:
    out = bytearray()
    fetch_range(url, token, first, last, out.extend)
    return bytes(out)


def remote_vindex(repo: str, revision: str | None = None, token: str | None = None) -> RemoteVindex:
    """index.json and the file list of `repo` (pinned to one commit for everything after)."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    if "/" not in repo:
        raise VindexError(f"repo {repo!r}: expected OWNER/NAME")
    meta = get_hf_file_metadata(hf_hub_url(repo, fm.INDEX_JSON, revision=revision), token=token)
    commit = meta.commit_hash or revision or "main"
    if not meta.size:
        raise VindexError(f"{repo}: {fm.INDEX_JSON} is empty")
    raw = bytearray()
    # Whole small file; the Range form keeps one download path (and the byte accounting).
    fetch_range(meta.location, token, 0, meta.size - 1, raw.extend)
    try:
        index = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VindexError(f"{repo}: {fm.INDEX_JSON} is not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise VindexError(f"{repo}: {fm.INDEX_JSON} is not a JSON object")
    try:
        config = ModelConfig.from_index(index)
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise VindexError(f"{repo}: {fm.INDEX_JSON}: {e}") from None
    files = HfApi(token=token).list_repo_files(repo, revision=commit)
    return RemoteVindex(repo, commit, index, config, sorted(files), token)


# ------------------------------------------------------------------------------------------
# One layer file, by ranges


@dataclass(frozen=True)
class Piece:
    """`length` bytes at source offset `src` go to offset `dst` of the new file."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class LayerPlan:
    name: str
    location: str           # where the source file's bytes are served (after the Hub's redirect)
    header: bytes           # the new file's header + table
    pieces: tuple[Piece, ...]
    size: int               # the new file's length

    @property
    def payload(self) -> int:
        return sum(p.length for p in self.pieces)


def source_table(remote: RemoteVindex, layer: int) -> tuple[bytes, fm.LyrwHeader, list, str]:
    """A layer file's header + offset table (fetched by range), parsed and validated, and the
    URL its bytes are served from."""
    from huggingface_hub import get_hf_file_metadata

    name = fm.layer_file(layer)
    meta = get_hf_file_metadata(remote.url(name), token=remote.token)
    size = int(meta.size or 0)
    if size < fm.LYRW_HEADER.size:
        raise VindexError(f"{remote.repo}/{name}: {size} bytes, too short for a LYRW header")
    head = fetch_bytes(meta.location, remote.token, 0, min(size, TABLE_PROBE) - 1)
    _, version, qf, n, inter, hidden = fm.LYRW_HEADER.unpack_from(head, 0)
    need = fm.LyrwHeader(version, qf, n, inter, hidden).table_bytes if version in (1, 2) else 0
    if len(head) < need <= size:
        head += fetch_bytes(meta.location, remote.token, len(head), need - 1)
    c = remote.config
    hdr, entries = fm.parse_lyrw(head, f"{remote.repo}/{name}", size,
                                 (c.num_experts, c.moe_intermediate_size, c.hidden_size))
    return head[: hdr.table_bytes], hdr, entries, meta.location


def plan_layer(name: str, location: str, hdr: fm.LyrwHeader, entries: list, experts: list[int]) -> LayerPlan:
    """The new file for `experts`: LYRW v2, every expert page-aligned (as `larql slice`)."""
    missing = [e for e in experts if entries[e] is None]
    if missing:
        raise VindexError(f"{name}: the repo's file does not hold experts {ranges_text(missing)}")
    fmts = {(entries[e].gate_up_fmt, entries[e].down_fmt) for e in experts}
    if len(fmts) != 1:
        raise VindexError(f"{name}: experts mix formats {sorted(fmts)}; shard pulls need one format per file")
    (fmt_gu, fmt_down), = fmts
    _, new_entries, size = fm.layout_lyrw(2, fmt_gu, fmt_down, experts, hdr.num_entries, hdr.inter,
                                          hdr.hidden)
    # The header's quant_format stays the source's (as `larql slice` writes it).
    new_hdr = fm.LyrwHeader(2, hdr.quant_format, hdr.num_entries, hdr.inter, hdr.hidden)
    pieces = []
    for e in experts:
        s, d = entries[e], new_entries[e]
        pieces.append(Piece(s.gate_up_off, d.gate_up_off, s.gate_up_len))
        pieces.append(Piece(s.down_off, d.down_off, s.down_len))
    pieces.sort(key=lambda p: p.dst)
    return LayerPlan(name, location, fm.pack_lyrw(new_hdr, new_entries), tuple(pieces), size)


def _requests(pieces: list[Piece]) -> list[tuple[int, int, list[Piece]]]:
    """Group pieces (in destination order) into range requests [first, last] of the source:
    neighbours in the source within MERGE_GAP share a request, none exceeds REQUEST_BYTES."""
    out: list[tuple[int, int, list[Piece]]] = []
    for p in pieces:
        if out:
            first, last, group = out[-1]
            if 0 <= p.src - (last + 1) <= MERGE_GAP and p.src + p.length - first <= REQUEST_BYTES:
                out[-1] = (first, p.src + p.length - 1, [*group, p])
                continue
        out.append((p.src, p.src + p.length - 1, [p]))
    return out


def _split(p: Piece, skip: int) -> list[Piece]:
    """What remains of a piece after its first `skip` bytes, cut into REQUEST_BYTES parts."""
    out = []
    pos = skip
    while pos < p.length:
        n = min(REQUEST_BYTES, p.length - pos)
        out.append(Piece(p.src + pos, p.dst + pos, n))
        pos += n
    return out


def download_layer(remote: RemoteVindex, plan: LayerPlan, out: Path, bar) -> str:
    """Write the plan's file into `out` (via NAME.part, resumed if present); returns its sha256."""
    from huggingface_hub import get_hf_file_metadata

    # Asked again right before the download: the Hub redirects large files to signed CDN URLs
    # that expire, and planning every layer first may have taken a while on a slow link.
    location = get_hf_file_metadata(remote.url(plan.name), token=remote.token).location or plan.location
    dst = out / plan.name
    part = dst.with_name(dst.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    done = part.stat().st_size if part.exists() else 0
    done = min(done - done % RESUME_GRANULE, plan.size)
    todo: list[Piece] = []
    for p in plan.pieces:
        if p.dst + p.length > done:
            todo += _split(p, max(0, done - p.dst))
    if bar is not None:
        bar.update(plan.payload - sum(p.length for p in todo))  # resumed bytes
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, done)  # drop a partial MiB: it is fetched again
        os.pwrite(fd, plan.header, 0)
        for first, last, group in _requests(todo):
            cursor = [first]

            def sink(view: memoryview, group=group, cursor=cursor) -> None:
                # Bytes of [first, last] of the source: keep those of the group's pieces.
                start = cursor[0]
                end = start + len(view)
                kept = 0
                for p in group:
                    a, b = max(start, p.src), min(end, p.src + p.length)
                    if a < b:
                        os.pwrite(fd, view[a - start : b - start], p.dst + (a - p.src))
                        kept += b - a
                cursor[0] = end
                if bar is not None:
                    bar.update(kept)

            fetch_range(location, remote.token, first, last, sink)
        os.ftruncate(fd, plan.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    sha = fm.sha256_file(part)
    # Validate what was written before it takes the real name.
    with open(part, "rb") as f:
        fm.parse_lyrw(f.read(len(plan.header)), part, part.stat().st_size)
    os.replace(part, dst)
    return sha


# ------------------------------------------------------------------------------------------
# The whole pull


def _load_state(out: Path, key: dict[str, Any]) -> dict[str, Any]:
    p = out / STATE_FILE
    try:
        state = json.loads(p.read_text())
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("key") != key:
        # Another commit, expert set or preset: partial layer files are not ours to continue.
        for part in (out / fm.LAYERS_DIR).glob("*.part") if (out / fm.LAYERS_DIR).is_dir() else []:
            part.unlink()
        state = {"key": key, "done": {}}
    return state


def _save_state(out: Path, state: dict[str, Any]) -> None:
    p = out / STATE_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, p)


def _download_whole(remote: RemoteVindex, name: str, out: Path, force: bool) -> str:
    """One file through hf_hub_download (temp + rename, resumable); returns its sha256, checked
    against the source's record when it has one."""
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(remote.repo, name, revision=remote.commit, local_dir=str(out),
                                token=remote.token, force_download=force))
    sha = fm.sha256_file(path)
    want = (remote.index.get("checksums") or {}).get(name)
    if want and sha != want:
        path.unlink()
        raise VindexError(f"{remote.repo}/{name}: downloaded sha256 {sha[:16]}... != the repo's "
                          f"recorded {want[:16]}... (deleted; run the pull again)")
    return sha


def select_names(remote: RemoteVindex, preset: str, layers: list[int]) -> list[str]:
    from .slicing import preset_patterns

    patterns = preset_patterns(preset, layers)
    return [n for n in remote.files if n != fm.INDEX_JSON and any(fnmatch(n, pat) for pat in patterns)]


def check_selection(remote: RemoteVindex, experts: list[int] | None, layers: list[int] | None,
                    experts_what: str = "--experts",
                    layers_what: str = "--layers") -> tuple[list[int], list[int]]:
    """The experts and layers to pull, checked against what the repo holds."""
    c = remote.config
    have_e, have_l = remote.experts_present, remote.layers_present
    want_e = have_e if experts is None else experts
    want_l = have_l if layers is None else layers
    for what, want, limit in ((experts_what, want_e, c.num_experts), (layers_what, want_l, c.num_layers)):
        bad = [x for x in want if not 0 <= x < limit]
        if bad:
            raise VindexError(f"{what} {ranges_text(want)}: {ranges_text(bad)} is outside "
                              f"0-{limit - 1} ({remote.repo} has {limit})")
    if miss := sorted(set(want_e) - set(have_e)):
        raise VindexError(f"{experts_what}: {remote.repo} does not hold experts {ranges_text(miss)} "
                          f"(it holds {ranges_text(have_e)})")
    if miss := sorted(set(want_l) - set(have_l)):
        raise VindexError(f"{layers_what}: {remote.repo} does not hold layers {ranges_text(miss)} "
                          f"(it holds {ranges_text(have_l)})")
    return sorted(set(want_e)), sorted(set(want_l))


def pull_shard(
    repo: str | RemoteVindex,
    out: str | os.PathLike,
    *,
    experts: list[int] | None = None,
    layers: list[int] | None = None,
    preset: str = "experts",
    revision: str | None = None,
    token: str | None = None,
    only: set[str] | None = None,
    progress: bool = True,
) -> Path:
    """Download `preset`'s files of `repo` into `out`, each layer file holding only `experts`
    (None: all the repo holds; then layer files are downloaded whole). `only`: re-download just
    these files (the rest must be there already). Returns `out`."""
    remote = repo if isinstance(repo, RemoteVindex) else remote_vindex(repo, revision, token)
    out = Path(out)
    want_e, want_l = check_selection(remote, experts, layers)
    by_range = want_e != remote.experts_present
    names = select_names(remote, preset, want_l)
    key = {"repo": remote.repo, "commit": remote.commit, "preset": preset,
           "experts": ranges_text(want_e), "layers": ranges_text(want_l)}
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, key)
    done: dict[str, str] = state["done"]
    if only is not None:
        for n in only:
            done.pop(n, None)
    whole = [n for n in names if not (by_range and n.startswith(fm.LAYERS_DIR + "/"))]
    for n in whole:
        if n in done and (out / n).exists():
            continue
        done[n] = _download_whole(remote, n, out, force=only is not None and n in only)
        _save_state(out, state)

    tables: dict[int, bytes] = {}
    fingerprint = remote.index.get("expert_fingerprint")
    if by_range or not fingerprint:
        # The header + table of every layer the repo holds (a few KiB each): the new files'
        # layouts, and the fingerprint of a repo that records none (it covers all its layers,
        # so a layer-restricted shard still matches the client's full vindex).
        plans: list[LayerPlan] = []
        for layer in remote.layers_present:
            if layer not in want_l and fingerprint:
                continue
            table, hdr, entries, location = source_table(remote, layer)
            tables[layer] = table
            if by_range and layer in want_l:
                plans.append(plan_layer(fm.layer_file(layer), location, hdr, entries, want_e))
        todo = [p for p in plans if not (p.name in done and (out / p.name).exists())]
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=sum(p.payload for p in todo), unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"experts {ranges_text(want_e)}", dynamic_ncols=True)
        try:
            for plan in todo:
                done[plan.name] = download_layer(remote, plan, out, bar)
                _save_state(out, state)
        finally:
            if bar is not None:
                bar.close()
        if not fingerprint:
            from .reader import fingerprint_of_tables

            fingerprint = fingerprint_of_tables(remote.index, [tables[x] for x in remote.layers_present])

    index = dict(remote.index)
    index["checksums"] = {n: done[n] for n in names}
    index["layers_present"] = want_l
    index["experts_present"] = want_e
    index["expert_fingerprint"] = fingerprint
    index["slice"] = {"preset": preset, "experts": ranges_text(want_e),
                      "layers": ranges_text(want_l), "files": names,
                      "pulled_from": {"repo": remote.repo, "revision": remote.commit}}
    tmp = out / (fm.INDEX_JSON + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out / fm.INDEX_JSON)
    # Files of the preset that a previous pull with other layers left behind are not ours now.
    for stale in (out / fm.LAYERS_DIR).glob("layer_*.weights") if (out / fm.LAYERS_DIR).is_dir() else []:
        if str(stale.relative_to(out)) not in index["checksums"]:
            stale.unlink()
    return out

