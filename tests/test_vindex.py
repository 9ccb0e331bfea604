"""The vindex format itself: LYRW v1/v2, lazy opening, access hints, and malformed inputs."""

from __future__ import annotations

import json
import mmap
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_config

from larql import ranges
from larql.config import ModelConfig
from larql.vindex import VindexError, open_vindex, write_vindex
from larql.vindex import format as fm
from larql.vindex.random_model import random_tensors
from larql.vindex.report import info, verify


@pytest.fixture(scope="module")
def small():
    cfg = ModelConfig.from_hf(make_config("small").to_dict())
    return cfg, random_tensors(cfg, seed=3)


@pytest.fixture(scope="module")
def built(small, tmp_path_factory):
    cfg, src = small
    root = tmp_path_factory.mktemp("vindex")
    v2 = write_vindex(root / "v2.vindex", cfg, src, quant="f32", progress=False)
    v1 = write_vindex(root / "v1.vindex", cfg, src, quant="f32", progress=False, lyrw_version=1)
    return v1, v2


@pytest.fixture
def copy(built, tmp_path):
    def make(which: int = 2) -> Path:
        dst = tmp_path / f"c{which}.vindex"
        shutil.copytree(built[which - 1], dst)
        return dst

    return make


def _expert(src, layer, e):
    gu, dn = src.expert(layer, e)
    return gu, dn


@pytest.mark.parametrize("version", [1, 2])
def test_lyrw_versions_read_back(built, small, version):
    cfg, src = small
    vindex = open_vindex(built[version - 1])
    for layer in (0, 5):
        ef = vindex.expert_file(layer)
        assert ef.version == version and ef.quant_format == fm.F32
        assert (ef.num_experts, ef.inter, ef.hidden) == (
            cfg.num_experts,
            cfg.moe_intermediate_size,
            cfg.hidden_size,
        )
        for e in range(cfg.num_experts):
            gu, dn = _expert(src, layer, e)
            assert np.array_equal(ef.gate_up(e).view(np.float32).reshape(gu.shape), gu)
            assert np.array_equal(ef.down(e).view(np.float32).reshape(dn.shape), dn)
            ent = ef.entry(e)
            if version == 2:
                assert ent.gate_up_off % mmap.PAGESIZE == 0  # page-exact expert starts
            assert ent.down_off == ent.gate_up_off + ent.gate_up_len
        if version == 1:  # the reference's packing: data right after the table, no gaps
            assert ef.entry(0).gate_up_off == 24 + 32 * cfg.num_experts
            assert ef.entry(1).gate_up_off == ef.entry(0).end
    # the two layouts hold identical weights, so the fingerprints (over content) agree
    assert open_vindex(built[0]).expert_fingerprint() != ""


def test_zero_copy_views_and_norm_shapes(built, small):
    cfg, src = small
    vindex = open_vindex(built[1])
    emb = vindex.embeddings()
    assert not emb.flags.writeable and not emb.flags.owndata
    assert np.array_equal(emb, src.get("embed_tokens.weight"))
    r = vindex.norm("layers.2.router.proj.weight")
    assert r.shape == (cfg.num_experts, cfg.hidden_size)
    assert vindex.norm("layers.2.layer_scalar").shape == (1,)
    assert vindex.has("layers.5.self_attn.k_norm.weight")
    assert not vindex.has("layers.5.self_attn.v_norm.weight")
    a = vindex.attn(5)
    assert a.v is None and a.q.rows == cfg.num_heads * cfg.global_head_dim
    assert vindex.eos_ids == cfg.eos_token_ids
    with pytest.raises(VindexError, match="no vector"):
        vindex.norm("layers.2.nonexistent.weight")


def test_access_hints(built, small):
    cfg, _ = small
    vindex = open_vindex(built[1])
    ef = vindex.expert_file(1)
    ef.advise_random()
    ef.prefetch([0, 1])
    touched = ef.prefault([2, 3])
    assert touched == sum(ef.entry(e).end - ef.entry(e).start for e in (2, 3))
    assert ef.resident([2, 3]) == 1.0  # just touched: every page is in memory
    assert 0.0 <= ef.resident() <= 1.0
    with pytest.raises(VindexError, match="expert 99"):
        ef.prefault([99])


def test_open_with_only_expert_server_files(copy):
    """A server's vindex: index.json, manifests, norms.bin and layers/ only."""
    d = copy()
    for name in ("embeddings.bin", "attn_weights.bin", "interleaved.bin"):
        (d / name).unlink()
    vindex = open_vindex(d)
    assert vindex.expert_file(0).num_experts == 8
    assert vindex.norm("layers.0.pre_feedforward_layernorm_2.weight").shape == (64,)
    with pytest.raises(VindexError, match="embeddings.bin"):
        vindex.embeddings()
    with pytest.raises(VindexError, match="attn_weights.bin"):
        vindex.attn(0).q.data.sum()


def _patch(path: Path, offset: int, data: bytes) -> None:
    b = bytearray(path.read_bytes())
    b[offset : offset + len(data)] = data
    path.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "case,match",
    [
        ("bad_magic", "bad magic"),
        ("bad_version", "format_version 7"),
        ("truncated", "outside the data region"),
        ("truncated_header", "truncated"),
        ("offset_past_end", "outside the data region"),
        ("wrong_len", "gate_up_len"),
        ("wrong_hidden", "hidden=65"),
        ("unknown_fmt", "quant_format 99"),
    ],
)
def test_malformed_layer_file(copy, case, match):
    d = copy()
    p = d / fm.layer_file(2)
    size = p.stat().st_size
    if case == "bad_magic":
        _patch(p, 0, b"XXXX")
    elif case == "bad_version":
        _patch(p, 4, struct.pack("<I", 7))
    elif case == "truncated":
        with open(p, "r+b") as f:
            f.truncate(size - 100)
    elif case == "truncated_header":
        with open(p, "r+b") as f:
            f.truncate(10)
    elif case == "offset_past_end":
        _patch(p, 24 + 40 * 3 + 8, struct.pack("<Q", size))  # expert 3 gate_up_off
    elif case == "wrong_len":
        _patch(p, 24 + 40 * 1 + 16, struct.pack("<Q", 1234))  # expert 1 gate_up_len
    elif case == "wrong_hidden":
        _patch(p, 20, struct.pack("<I", 65))
    elif case == "unknown_fmt":
        _patch(p, 8, struct.pack("<I", 99))
    vindex = open_vindex(d)  # layer files are validated when first used
    with pytest.raises(VindexError, match=match) as ei:
        vindex.expert_file(2)
    assert "layer_02.weights" in str(ei.value)
    assert verify(d, progress=False)  # and verify reports it


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_index", "index.json: missing"),
        ("bad_json", "not valid JSON"),
        ("bad_field", "num_layers"),
        ("future_version", "unsupported version 9"),
        ("manifest_past_end", "past the end"),
        ("manifest_wrong_shape", "index.json implies"),
        ("manifest_bad_length", "length 7"),
        ("norm_wrong_size", "vector 'layers.0.router.scale'"),
        ("bad_quant", "quant 'q3'"),
    ],
)
def test_malformed_metadata(copy, case, match):
    d = copy()
    idx = json.loads((d / "index.json").read_text())
    man = json.loads((d / "attn_weights_manifest.json").read_text())
    wm = json.loads((d / "weight_manifest.json").read_text())
    if case == "missing_index":
        (d / "index.json").unlink()
    elif case == "bad_json":
        (d / "index.json").write_text("{nope")
    elif case == "bad_field":
        idx["num_layers"] = "six"
    elif case == "future_version":
        idx["version"] = 9
    elif case == "manifest_past_end":
        man[-1]["offset"] += 4096
    elif case == "manifest_wrong_shape":
        n = man[0]["shape"][0] * 2
        man[0]["shape"] = [n // 4, man[0]["shape"][1] * 2]
    elif case == "manifest_bad_length":
        man[0]["length"] = 7
    elif case == "norm_wrong_size":
        for e in wm:
            if e["key"] == "layers.0.router.scale":
                e["shape"], e["length"] = [32], 128
    elif case == "bad_quant":
        idx["quant"] = "q3"
    if case not in ("missing_index", "bad_json"):
        (d / "index.json").write_text(json.dumps(idx))
    (d / "attn_weights_manifest.json").write_text(json.dumps(man))
    (d / "weight_manifest.json").write_text(json.dumps(wm))
    with pytest.raises(VindexError, match=match):
        open_vindex(d)


def test_truncated_embeddings_and_missing_layer(copy):
    d = copy()
    with open(d / "embeddings.bin", "r+b") as f:
        f.truncate(1000)
    (d / fm.layer_file(4)).unlink()
    vindex = open_vindex(d)
    with pytest.raises(VindexError, match="embeddings.bin: 1000 bytes"):
        vindex.embeddings()
    with pytest.raises(VindexError, match="layer_04.weights: missing"):
        vindex.expert_file(4)
    problems = verify(d, progress=False)
    assert any("embeddings.bin: sha256" in p for p in problems)
    assert any("layer_04.weights: missing" in p for p in problems)


def test_verify_detects_a_flipped_byte(copy):
    d = copy()
    assert verify(d, progress=False) == []
    p = d / fm.layer_file(1)
    b = bytearray(p.read_bytes())
    b[-5] ^= 0x40  # inside expert data: structure still valid
    p.write_bytes(bytes(b))
    problems = verify(d, progress=False)
    assert len(problems) == 1 and problems[0].startswith("layers/layer_01.weights: sha256")


def test_info_reports_components(built):
    d = info(built[1])
    assert d["num_experts"] == 8 and d["layers_present"] == "0-5" and d["experts_present"] == "0-7"
    assert d["formats"]["experts"] == ["f32"] and d["lyrw_versions"] == [2]
    assert d["bytes"]["experts"] == sum(p.stat().st_size for p in (built[1] / "layers").iterdir())


def test_interrupted_write_leaves_nothing(small, tmp_path):
    cfg, src = small

    class Failing:
        def has(self, k):
            return src.has(k)

        def get(self, k):
            return src.get(k)

        def expert(self, layer, e):
            if layer == 3:
                raise KeyboardInterrupt
            return src.expert(layer, e)

    with pytest.raises(KeyboardInterrupt):
        write_vindex(tmp_path / "x.vindex", cfg, Failing(), quant="f32", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ranges():
    assert fm.parse_ranges("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert ranges.text([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert fm.parse_ranges(None) is None
    for bad in ("3-1", "a-b", "0-200"):
        with pytest.raises(VindexError):
            fm.parse_ranges(bad, 128)


def test_reference_style_vindex_opens(small, tmp_path):
    """What the reference writes: LYRW v1, index.json with only its own fields, weight_manifest
    entries without `format`, lm_head_q4.bin named in the manifest. It must open and serve."""
    cfg, src = small
    d = write_vindex(tmp_path / "ref.vindex", cfg, src, quant="q4k", progress=False, lyrw_version=1)
    idx = json.loads((d / "index.json").read_text())
    for ours in ("layers_present", "experts_present", "expert_fingerprint", "larql_format", "checksums"):
        idx.pop(ours)
    idx["source"] = {"extracted_at": "2026-01-01T00:00:00Z", "larql_version": "0.4.0"}
    (d / "index.json").write_text(json.dumps(idx))
    wm = json.loads((d / "weight_manifest.json").read_text())
    for e in wm:
        e.pop("format", None)
    from larql import kernels

    lm = kernels.quantize(src.get("embed_tokens.weight"), kernels.Q4_K)
    (d / "lm_head_q4.bin").write_bytes(lm.tobytes())
    wm.append(
        {
            "key": "lm_head.weight",
            "kind": "tensor_q4k",
            "shape": [cfg.vocab_size, 256],
            "offset": 0,
            "length": int(lm.nbytes),
            "file": "lm_head_q4.bin",
        }
    )
    (d / "weight_manifest.json").write_text(json.dumps(wm))
    vindex = open_vindex(d)
    assert vindex.layers_present == list(range(cfg.num_layers))  # discovered from layers/
    assert vindex.experts_present == list(range(cfg.num_experts))
    assert vindex.expert_file(0).version == 1 and vindex.expert_file(0).entry(0).gate_up_off == 24 + 32 * 8
    fp = vindex.expert_fingerprint()
    assert len(fp) == 64 and fp == open_vindex(d).expert_fingerprint()
    assert vindex.attn(5).v is None and vindex.attn(0).v.fmt == fm.Q6_K
    assert np.array_equal(vindex.norm("layers.1.router.scale"), src.get("layers.1.router.scale"))
    head = vindex.lm_head()
    assert head is not None and head.fmt == fm.Q4_K and head.rows == cfg.vocab_size
    with pytest.raises(VindexError, match="no checksums"):
        verify(d, progress=False)


def test_kquant_named_vindex_opens(small, tmp_path):
    """Newer reference writers name the q4k files *_kquant (quant "kquant"): the same tensors
    must come back from them as from the legacy names we write."""
    cfg, src = small
    d = write_vindex(tmp_path / "legacy.vindex", cfg, src, quant="q4k", progress=False)
    legacy = open_vindex(d)
    want_attn, want_dense = legacy.attn(0), legacy.dense_mlp(5)

    renamed = tmp_path / "kquant.vindex"
    shutil.copytree(d, renamed)
    for old_pair, new_pair in ((fm.ATTN_FILES["q4k"], fm.KQUANT_ATTN_FILES),
                               (fm.DENSE_FILES["q4k"], fm.KQUANT_DENSE_FILES)):
        (renamed / old_pair[0]).rename(renamed / new_pair[0])
        entries = json.loads((renamed / old_pair[1]).read_text())
        for e in entries:
            if e.get("file") == old_pair[0]:
                e["file"] = new_pair[0]
        (renamed / new_pair[1]).write_text(json.dumps(entries))
        (renamed / old_pair[1]).unlink()
    idx = json.loads((renamed / "index.json").read_text())
    idx["quant"] = "kquant"
    (renamed / "index.json").write_text(json.dumps(idx))

    vindex = open_vindex(renamed)
    assert vindex.quant == "q4k"
    got_attn, got_dense = vindex.attn(0), vindex.dense_mlp(5)
    for p in "qkvo":
        assert np.array_equal(getattr(got_attn, p).data, getattr(want_attn, p).data), p
    for p in ("gate", "up", "down"):
        assert np.array_equal(getattr(got_dense, p).data, getattr(want_dense, p).data), p
