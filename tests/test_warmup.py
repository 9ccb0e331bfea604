"""Warm-up at disk speed: owned ranges, readahead + MADV_POPULATE_READ on a thread pool, the
fallback for kernels without it, and the disk-rate measurement that must not warm anything."""

from __future__ import annotations

import os

import pytest

import larql.vindex.reader as reader
from larql.demo import build_demo_vindex, demo_config
from larql.server import ExpertServer
from larql.vindex import open_vindex

E = 16


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a freshly written file's dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory):
    # f32 experts of ~1 MiB each (hundreds of pages), v2 page-aligned, and a v1 packed copy
    cfg = demo_config(num_layers=2, hidden=256, num_experts=E, top_k=2)
    return build_demo_vindex(tmp_path_factory.mktemp("warmup") / "v", quant="f32", config=cfg)


def cold_files(vx):
    files = [vx.expert_file(layer) for layer in vx.layers_present]
    for ef in files:
        evict(ef.path)
    if max(ef.resident() for ef in files) > 0.05:
        pytest.fail("could not evict the test files from the page cache")
    return files


def test_page_ranges_merge_and_cover_exactly_the_experts(vindex_path):
    vx = open_vindex(vindex_path)
    ef = vx.expert_file(0)
    ranges = ef.page_ranges([3, 4, 5, 9])
    assert len(ranges) == 2  # 3-5 touch once page-aligned; 9 is apart
    for a, b in ranges:
        assert a % 4096 == 0 and b % 4096 == 0 and a < b
    assert ranges[0][0] == ef.entry(3).start and ranges[0][1] >= ef.entry(5).end
    assert ranges[1][0] == ef.entry(9).start and ranges[1][1] < ef.entry(10).start + 4096
    e7 = ef.entry(7)
    assert ef.page_ranges([7]) == [(e7.start, e7.start + -(-(e7.end - e7.start) // 4096) * 4096)]


@pytest.mark.parametrize("populate_read", [True, False], ids=["MADV_POPULATE_READ", "touch-fallback"])
def test_warmup_makes_exactly_the_owned_pages_resident(vindex_path, monkeypatch, populate_read):
    if not populate_read:  # as on a kernel before 5.14: the first EINVAL selects the fallback
        monkeypatch.setattr(reader, "MADV_POPULATE_READ", -1)
        monkeypatch.setattr(reader, "_populate_read_ok", None)
    vx = open_vindex(vindex_path)
    files = cold_files(vx)
    srv = ExpertServer(vx, experts=range(4, 12))
    nbytes, secs = srv.warmup(progress=False, threads=3)
    assert nbytes == srv.owned_bytes() > 0 and secs > 0
    for ef in files:
        assert ef.resident(range(4, 12)) == 1.0
        assert ef.resident([*range(0, 4), *range(12, E)]) < 0.02
    if not populate_read:
        assert reader._populate_read_ok is False
    else:
        assert reader._populate_read_ok is True, "this kernel (>= 5.14) has MADV_POPULATE_READ"


def test_disk_read_rate_measures_then_evicts(vindex_path):
    vx = open_vindex(vindex_path)
    files = cold_files(vx)
    srv = ExpertServer(vx, experts=range(0, 8))
    rate = srv.disk_read_rate()
    assert rate is not None and rate > 0
    # what it read is gone again, so the warm-up after it is measured cold
    assert max(ef.resident() for ef in files) < 0.05
    srv.warmup(progress=False)
    assert srv.disk_read_rate() is None  # already cached: not measured, nothing evicted
    assert files[0].resident(range(0, 8)) == 1.0


def test_prefault_advises_huge_pages_inside_the_owned_ranges_only(vindex_path):
    """prefault asks for huge pages (MADV_HUGEPAGE) only on whole 2 MiB pieces inside the named
    experts' ranges: a fault there reads a 2 MiB folio, and still no byte of another expert."""
    vx = open_vindex(vindex_path)
    files = cold_files(vx)
    owned = range(4, 12)
    for ef in files:
        ef.prefault(owned)
        assert ef._huge, "the kernel refused MADV_HUGEPAGE on a file mapping"
        spans = ef.page_ranges(owned)
        for lo, hi in ef._huge:
            assert lo % reader.HUGE_PAGE == 0 and hi % reader.HUGE_PAGE == 0 and lo < hi
            assert any(a <= lo and hi <= b for a, b in spans)
        assert ef.resident(owned) == 1.0
        assert ef.resident([*range(0, 4), *range(12, E)]) < 0.02


def test_warmup_verifies_the_huge_pages_through_the_mapping(vindex_path, tmp_path):
    """The warm-up's digest check reads the 2 MiB-page inside of the owned ranges through the
    mapping (process_vm_readv) and the rest through the descriptor: a byte changed in either
    is found and named, and no byte of an unowned expert is read."""
    import shutil

    from larql.vindex import VindexError

    for where in ("inside", "edge"):
        copy = tmp_path / where
        shutil.copytree(vindex_path, copy)
        vx = open_vindex(copy)
        ef = vx.expert_file(0)
        lo = -(-ef.page_ranges(range(4, 12))[0][0] // reader.HUGE_PAGE) * reader.HUGE_PAGE
        victim = next(e for e in range(4, 12) if ef.entry(e).gate_up_off > lo) if where == "inside" else 4
        off = ef.entry(victim).gate_up_off + (0 if where == "edge" else 4096)
        assert (off >= lo) == (where == "inside")
        with open(ef.path, "r+b") as f:
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0xFF]))
        vx = open_vindex(copy)
        files = cold_files(vx)
        srv = ExpertServer(vx, experts=range(4, 12))
        with pytest.raises(VindexError, match=f"expert {victim} "):
            srv.warmup(progress=False, threads=2)
        assert reader._vm_read_ok is True
        for f in files:
            assert f.resident([*range(0, 4), *range(12, E)]) < 0.02


def test_a_whole_file_digest_check_leaves_other_experts_out_of_memory(vindex_path, tmp_path):
    """A reference vindex has one sha256 per layer file: warm-up must read all of it to check it,
    and then drops the experts the shard does not own from the page cache again."""
    import json
    import shutil

    from larql.vindex import format as fm
    from larql.vindex import integrity

    def reference_copy(name: str):
        copy = tmp_path / name
        shutil.copytree(vindex_path, copy)
        idx = json.loads((copy / fm.INDEX_JSON).read_text())
        ours = (integrity.FIELD, "expert_fingerprint", "layers_present", "experts_present", "larql_format")
        for key in ours:
            idx.pop(key, None)
        (copy / fm.INDEX_JSON).write_text(json.dumps(idx))
        vx = open_vindex(copy)
        assert vx.integrity.basis == "files"
        return vx, cold_files(vx)

    vx, files = reference_copy("warm")
    srv = ExpertServer(vx, experts=range(4, 12))
    srv.warmup(progress=False, threads=2)
    assert {srv.integrity.check(layer) for layer in srv.layers} == {"file"}
    for ef in files:
        assert ef.resident(range(4, 12)) == 1.0
        assert ef.resident([*range(0, 4), *range(12, E)]) < 0.02
    # without --warmup: the check a layer's first request waits for does the same
    vx, files = reference_copy("lazy")
    srv = ExpertServer(vx, experts=range(4, 12))
    assert srv.integrity.check(0) == "file"
    assert files[0].resident([*range(0, 4), *range(12, E)]) < 0.02
