"""`larql slice`: presets copy the right files; --experts/--layers physically keep only those."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import make_config

from larql.cli import main as cli
from larql.config import ModelConfig
from larql.vindex import VindexError, open_vindex, write_vindex
from larql.vindex import format as fm
from larql.vindex.random_model import random_tensors
from larql.vindex.report import verify
from larql.vindex.slicing import slice_vindex


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    cfg = ModelConfig.from_hf(make_config("wide").to_dict())
    src = random_tensors(cfg, seed=5)
    out = tmp_path_factory.mktemp("full") / "m.vindex"
    from larql.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer().to_str().encode()
    write_vindex(out, cfg, src, quant="f16", progress=False, tokenizer_json=tok, chat_template="{{ x }}")
    return out, cfg, src


def _files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "preset,has,lacks",
    [
        (
            "client",
            ["embeddings.bin", "norms.bin", "attn_weights.bin", "interleaved.bin", "tokenizer.json"],
            ["layers/layer_00.weights"],
        ),
        (
            "attn",
            ["norms.bin", "attn_weights.bin", "attn_weights_manifest.json"],
            ["embeddings.bin", "tokenizer.json", "layers/layer_00.weights"],
        ),
        (
            "embed",
            ["embeddings.bin", "tokenizer.json", "chat_template.jinja"],
            ["norms.bin", "weight_manifest.json"],
        ),
        (
            "router",
            ["norms.bin", "tokenizer.json", "weight_manifest.json"],
            ["embeddings.bin", "attn_weights.bin"],
        ),
        (
            "expert-server",
            ["embeddings.bin", "norms.bin", "interleaved.bin", "layers/layer_02.weights", "tokenizer.json"],
            ["attn_weights.bin"],
        ),
        ("moe-server", ["layers/layer_00.weights"], ["attn_weights.bin"]),
        ("all", ["attn_weights.bin", "layers/layer_02.weights", "embeddings.bin"], []),
    ],
)
def test_presets(full, tmp_path, preset, has, lacks):
    src = full[0]
    dst = slice_vindex(src, tmp_path / "s.vindex", preset=preset, progress=False)
    files = _files(dst)
    assert "index.json" in files
    for f in has:
        assert f in files, f
    for f in lacks:
        assert f not in files, f
    assert verify(dst, progress=False) == []
    vindex = open_vindex(dst)
    assert vindex.expert_fingerprint() == open_vindex(src).expert_fingerprint()
    if "norms.bin" in has:
        assert np.array_equal(vindex.norm("norm.weight"), open_vindex(src).norm("norm.weight"))


def test_expert_shard_is_physically_half(full, tmp_path):
    src, cfg, tensors = full
    half = slice_vindex(src, tmp_path / "a.vindex", preset="expert-server", experts="0-7", progress=False)
    other = slice_vindex(src, tmp_path / "b.vindex", preset="expert-server", experts="8-15", progress=False)
    full_bytes = sum(p.stat().st_size for p in (src / "layers").iterdir())
    half_bytes = sum(p.stat().st_size for p in (half / "layers").iterdir())
    assert 0.45 < half_bytes / full_bytes < 0.55
    vindex, vo = open_vindex(half), open_vindex(other)
    assert vindex.experts_present == list(range(8)) and vo.experts_present == list(range(8, 16))
    assert vindex.index["slice"]["experts"] == "0-7"
    assert vindex.expert_fingerprint() == vo.expert_fingerprint() == open_vindex(src).expert_fingerprint()
    for layer in range(cfg.num_layers):
        ef = vindex.expert_file(layer)
        assert ef.present() == list(range(8))
        assert not ef.has(8) and ef.entry(12) is None
        for e in (0, 7):
            gu, dn = tensors.expert(layer, e)
            assert np.array_equal(ef.gate_up(e).view(np.float16).reshape(gu.shape), gu.astype(np.float16))
            assert np.array_equal(ef.down(e).view(np.float16).reshape(dn.shape), dn.astype(np.float16))
        with pytest.raises(VindexError, match="expert 9 is not in this file"):
            ef.prefault([9])
    assert verify(half, progress=False) == []
    # a shard cannot be re-sliced into experts it does not hold
    with pytest.raises(VindexError, match="does not hold experts 8-9"):
        slice_vindex(half, tmp_path / "c.vindex", experts="6-9", progress=False)


def test_layer_slice(full, tmp_path):
    src, cfg, _ = full
    dst = slice_vindex(
        src, tmp_path / "l.vindex", preset="expert-server", layers="1-2", experts="3", progress=False
    )
    vindex = open_vindex(dst)
    assert vindex.layers_present == [1, 2] and vindex.experts_present == [3]
    assert sorted(p.name for p in (dst / "layers").iterdir()) == ["layer_01.weights", "layer_02.weights"]
    with pytest.raises(VindexError, match="layer_00.weights: missing"):
        vindex.expert_file(0)


def test_cli_slice_and_errors(full, tmp_path, capsys):
    src = full[0]
    assert (
        cli(
            [
                "slice",
                str(src),
                "-o",
                str(tmp_path / "x.vindex"),
                "--preset",
                "expert_server",
                "--experts",
                "0-3",
                "-q",
            ]
        )
        == 0
    )
    assert open_vindex(tmp_path / "x.vindex").experts_present == [0, 1, 2, 3]
    assert cli(["slice", str(src), "-o", str(tmp_path / "x.vindex"), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["slice", str(src), "-o", str(tmp_path / "y.vindex"), "--experts", "0-99", "-q"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert cli(["info", str(tmp_path / "x.vindex"), "--json"]) == 0
    assert '"experts_present": "0-3"' in capsys.readouterr().out
    assert cli(["verify", "-q", str(tmp_path / "x.vindex")]) == 0
    assert fm.layer_file(3) == "layers/layer_03.weights"


def test_experts_preset_is_what_a_server_opens(tmp_path, tiny_checkpoint):
    """The `experts` preset holds only index, manifests, norms and layer files, and a server
    backend computes from it exactly what it computes from the full vindex."""
    import numpy as np

    from larql.experts import LocalExperts
    from larql.vindex import open_vindex
    from larql.vindex.extract import extract
    from larql.vindex.slicing import slice_vindex

    _, ckpt = tiny_checkpoint("small")
    full = tmp_path / "full.vindex"
    extract(ckpt, full, quant="q4k", progress=False)
    lean = tmp_path / "lean.vindex"
    slice_vindex(full, lean, preset="experts", progress=False)
    names = sorted(str(p.relative_to(lean)) for p in lean.rglob("*") if p.is_file())
    assert all(n == "index.json" or n.endswith("manifest.json") or n == "norms.bin"
               or n.startswith("layers/") for n in names), names
    assert any(n.startswith("layers/") for n in names) and "norms.bin" in names

    vf, vl = open_vindex(full), open_vindex(lean)
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, vf.config.hidden_size)).astype(np.float32)
    ids = np.array([[0, 1], [2, 3], [4, 5]], dtype=np.int32)
    w = rng.random((3, 2)).astype(np.float32)
    assert np.array_equal(LocalExperts(vf).forward(1, h, ids, w), LocalExperts(vl).forward(1, h, ids, w))
