"""The optional quantised LM head (`lm_head_q4.bin`, Q4_K, as the reference writes it; our
`lm_head_q6k.bin`): bytes the `gguf` decoder reads back as the quantised embedding rows, logits
within the head's quantisation error of the tied head's, the float path left exact, slices and
bad manifests."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from larql import kernels
from larql.models.gemma4 import Gemma4Model
from larql.vindex import VindexError, open_vindex
from larql.vindex import format as fm
from larql.vindex.extract import extract
from larql.vindex.report import format_info, info, verify
from larql.vindex.slicing import slice_vindex
from larql.vindex.synthetic import write_synthetic_vindex

GG = {fm.Q4_K: gguf.GGMLQuantizationType.Q4_K, fm.Q6_K: gguf.GGMLQuantizationType.Q6_K}
# Relative RMS weight error of N(0, s) rows (as in test_extract_q4k): Q4_K ~0.07-0.09, Q6_K ~0.02.
MAX_REL_ERR = {fm.Q4_K: 0.12, fm.Q6_K: 0.035}


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2)))


@pytest.fixture(scope="module")
def heads(tiny_checkpoint, tmp_path_factory):
    """f32 extractions of one tiny model (hidden 64: rows padded to 256) with each head choice,
    so the LM head is the only thing that differs between them."""
    model, ckpt = tiny_checkpoint("small")
    emb = model.state_dict()["model.embed_tokens.weight"].float().numpy()
    root = tmp_path_factory.mktemp("lm-head")
    out = {h: extract(ckpt, root / f"{h}.vindex", quant="f32", lm_head=h, progress=False) for h in
           ("tied", "q4k", "q6k")}
    return emb, out


@pytest.mark.parametrize("head,fmt", [("q4k", fm.Q4_K), ("q6k", fm.Q6_K)])
def test_head_bytes_are_the_quantised_embedding_rows(heads, head, fmt):
    emb, paths = heads
    vindex = open_vindex(paths[head])
    V, H = emb.shape
    name = fm.LM_HEAD_FILES[fmt]
    # the manifest entry the reference writes: last in weight_manifest.json, whole file
    entry = json.loads((vindex.path / fm.WEIGHT_MANIFEST).read_text())[-1]
    assert entry == {
        "key": "lm_head.weight",
        "kind": {fm.Q4_K: "tensor_q4k", fm.Q6_K: "tensor_q6k"}[fmt],
        "shape": [V, 256],
        "format": fm.FORMAT_NAMES[fmt],
        "offset": 0,
        "length": V * fm.row_bytes(fmt, 256),
        "file": name,
    }
    raw = np.fromfile(vindex.path / name, dtype=np.uint8)
    assert raw.size == entry["length"]
    # exactly what our quantiser makes of the source rows (zero-padded to 256 per row) ...
    assert np.array_equal(raw, kernels.quantize(emb, fmt))
    # ... which the reference decoder reads back as the embeddings, within the format's error
    dec = gguf.quants.dequantize(raw.reshape(V, -1), GG[fmt])
    assert dec.shape == (V, 256)
    np.testing.assert_allclose(kernels.dequantize(raw, fmt, V, 256), dec, rtol=1e-6, atol=1e-7)
    assert 1e-4 < _rel(dec[:, :H], emb) < MAX_REL_ERR[fmt]
    assert np.abs(dec[:, H:]).max() <= 0.05 * np.abs(dec).max()  # the padding decodes to ~0
    qm = vindex.lm_head()
    assert (qm.fmt, qm.rows, qm.cols, qm.logical_cols) == (fmt, V, 256, H)
    assert vindex.lm_head_format == fm.FORMAT_NAMES[fmt]
    assert np.array_equal(vindex.embeddings(), emb)  # the embeddings themselves stay exact
    assert info(vindex.path)["formats"]["lm_head"] == fm.FORMAT_NAMES[fmt]
    assert f"separate, {fm.FORMAT_NAMES[fmt]}" in format_info(info(vindex.path))
    assert verify(vindex.path, progress=False) == []  # the head file is checksummed


@pytest.mark.parametrize("head,fmt", [("q4k", fm.Q4_K), ("q6k", fm.Q6_K)])
def test_logits_with_the_quantised_head(heads, head, fmt):
    """Everything but the head is f32 here, so a quantised head's logits differ from the tied
    ones by the head's own rounding: (W_q - W) x, whose rms relative to W x is the weight's
    relative error (the rows' errors are independent of x) plus Q8_K's rounding of x (amax/rms
    of a normed vector ~3: ~3/440 < 1%). Against numpy on the dequantised head with x rounded
    to Q8_K the same way, it is exact up to float summation order."""
    emb, paths = heads
    tied, quant = Gemma4Model(open_vindex(paths["tied"])), Gemma4Model(open_vindex(paths[head]))
    assert tied.lm_head.fmt == fm.F32 and quant.lm_head.fmt == fmt
    V, H = emb.shape
    h = np.random.default_rng(3).standard_normal((6, H)).astype(np.float32)
    x = kernels.rms_norm(h, quant.final_norm, quant.eps)
    cap = tied.cfg.final_logit_softcapping
    got = kernels.matmul(quant.lm_head, x)  # pre-cap logits
    want = x @ emb.T
    np.testing.assert_allclose(quant.logits(h), cap * np.tanh(got / cap), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tied.logits(h), cap * np.tanh(want / cap), rtol=1e-4, atol=1e-5)
    err = _rel(got, want)
    assert 1e-4 < err < MAX_REL_ERR[fmt] + 0.01, err
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.5
    # numpy on what the file holds, with x rounded to Q8_K as the kernel rounds it
    xq = kernels.dequantize(kernels.quantize_q8k(x), kernels.Q8_K, x.shape[0], 256)[:, :H]
    w = gguf.quants.dequantize(quant.lm_head.data.reshape(V, -1), GG[fmt])[:, :H]
    np.testing.assert_allclose(got, xq.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-5)


def test_float_vindexes_stay_tied_and_q4k_defaults_to_a_q4k_head(heads, tiny_checkpoint, tmp_path):
    emb, paths = heads
    vindex = open_vindex(paths["tied"])
    assert vindex.lm_head() is None and vindex.lm_head_format == "tied"
    assert not any(p.name.startswith("lm_head") for p in vindex.path.iterdir())
    manifest = json.loads((vindex.path / fm.WEIGHT_MANIFEST).read_text())
    assert all(e["key"] != "lm_head.weight" for e in manifest)
    assert "tied to the embeddings (f32)" in format_info(info(vindex.path))
    model, ckpt = tiny_checkpoint("small")
    # defaults: f16 tied (exact path), q4k with lm_head_q4.bin like the reference
    assert open_vindex(extract(ckpt, tmp_path / "f16.vindex", quant="f16", progress=False)).lm_head() is None
    q = open_vindex(extract(ckpt, tmp_path / "q4k.vindex", quant="q4k", progress=False))
    assert q.lm_head_format == "Q4_K" and (q.path / "lm_head_q4.bin").exists()
    # the q4k vindex quantises the source rows (not its own f16 copy), like the reference
    assert np.array_equal(np.fromfile(q.path / "lm_head_q4.bin", np.uint8), kernels.quantize(emb, fm.Q4_K))
    q_tied = extract(ckpt, tmp_path / "q4k-t.vindex", quant="q4k", lm_head="tied", progress=False)
    assert open_vindex(q_tied).lm_head() is None


def test_cli_lm_head_option(tiny_checkpoint, tmp_path, capsys):
    from larql.cli import main as cli

    _, ckpt = tiny_checkpoint("small")
    out = tmp_path / "c.vindex"
    assert cli(["extract", str(ckpt), "-o", str(out), "--quant", "f16", "--lm-head", "q6k", "-q"]) == 0
    assert open_vindex(out).lm_head_format == "Q6_K"
    assert cli(["info", str(out)]) == 0
    assert "LM head      separate, Q6_K" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["extract", str(ckpt), "-o", str(tmp_path / "d.vindex"), "--lm-head", "q8"])
    with pytest.raises(VindexError, match="unknown --lm-head"):
        extract(ckpt, tmp_path / "e.vindex", lm_head="q8", progress=False)
    assert not (tmp_path / "e.vindex").exists()


def test_slices_carry_the_head_to_our_client(heads, tmp_path):
    _, paths = heads
    src = paths["q4k"]
    client = slice_vindex(src, tmp_path / "client", preset="client", progress=False)
    server = slice_vindex(src, tmp_path / "server", preset="expert-server", progress=False)
    assert (client / "lm_head_q4.bin").exists() and not (server / "lm_head_q4.bin").exists()
    assert verify(client, progress=False) == [] and verify(server, progress=False) == []
    head = open_vindex(client).lm_head()
    assert np.array_equal(head.data, open_vindex(src).lm_head().data)
    # a slice that keeps the manifest naming the head but not its file (the reference's own
    # client preset does this) falls back to the tie, as the reference does: always valid
    # for Gemma 4, whose head is a quantised copy of the embeddings
    sv = open_vindex(server)
    assert sv.lm_head() is None and sv.lm_head_format == "tied"
    assert json.loads((server / fm.WEIGHT_MANIFEST).read_text())[-1]["file"] == "lm_head_q4.bin"


def test_bad_head_entries_are_refused(heads, tmp_path):
    _, paths = heads
    d = tmp_path / "bad.vindex"

    def with_entry(**change) -> None:
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(paths["q4k"], d)
        wm = json.loads((d / fm.WEIGHT_MANIFEST).read_text())
        wm[-1].update(change)
        (d / fm.WEIGHT_MANIFEST).write_text(json.dumps(wm))

    V = open_vindex(paths["q4k"]).config.vocab_size
    with_entry(shape=[V - 1, 256], length=(V - 1) * 144)
    with pytest.raises(VindexError, match="lm_head.weight.*shape"):
        open_vindex(d)
    with_entry(length=V * 144 - 1)
    with pytest.raises(VindexError, match="lm_head.weight.*length"):
        open_vindex(d)
    with_entry(format="Q4_0", kind="tensor_q4_0", shape=[V, 64], length=V * 36)
    with pytest.raises(VindexError, match="Q4_0, which larql cannot compute"):
        open_vindex(d)
    # a reference-style entry: kind only, no format field -> read as Q4_K
    with_entry(format=None)
    assert open_vindex(d).lm_head().fmt == fm.Q4_K
    # a truncated file is caught at open, before any mapping
    with_entry()
    raw = (d / "lm_head_q4.bin").read_bytes()
    (d / "lm_head_q4.bin").write_bytes(raw[:-1])
    with pytest.raises(VindexError, match="past the end"):
        open_vindex(d)


def test_synthetic_vindex_head_option(tmp_path):
    dims = dict(num_layers=1, vocab_size=512, num_experts=4, top_k=2)
    tied = open_vindex(write_synthetic_vindex(tmp_path / "t", lm_head="tied", **dims))
    q4 = open_vindex(write_synthetic_vindex(tmp_path / "q", **dims))  # q4k vindex: Q4_K head
    assert tied.lm_head() is None and q4.lm_head_format == "Q4_K"
    head = q4.lm_head()
    dec = gguf.quants.dequantize(head.data.reshape(head.rows, -1), GG[fm.Q4_K])
    assert dec.shape == (512, 2816) and np.isfinite(dec).all() and 0 < np.abs(dec).max() < 1.0
    assert verify(q4.path, progress=False) == []


@pytest.mark.parametrize("embd", ["Q8_0", "Q4_K"])
def test_gguf_source_head(tiny_checkpoint, tmp_path, monkeypatch, embd):
    """A GGUF's token_embd in another format is decoded and quantised row chunk by row chunk;
    one already in Q4_K (256-multiple rows) is copied byte for byte, as the reference does."""
    import test_extract_gguf as tg

    from larql.tokenizer import byte_level_tokenizer

    choose = tg._choose
    embd_type = gguf.GGMLQuantizationType[embd]
    monkeypatch.setattr(
        tg, "_choose", lambda key, shape: embd_type if key == "embed_tokens.weight" else choose(key, shape)
    )
    model, _ = tiny_checkpoint("wide", moe_intermediate_size=160)  # hidden 256
    path = tmp_path / "tiny.gguf"
    qt, data = tg.write_gguf(model, byte_level_tokenizer(), path)["embed_tokens.weight"]
    assert qt.name == embd
    vindex = open_vindex(extract(path, tmp_path / "g.vindex", quant="q4k", progress=False))
    head = vindex.lm_head()
    V, H = vindex.config.vocab_size, vindex.config.hidden_size
    rows = gguf.quants.dequantize(np.asarray(data).reshape(V, -1), qt)
    assert np.array_equal(vindex.embeddings(), rows.astype(np.float16))
    want = np.asarray(data).reshape(-1).view(np.uint8) if embd == "Q4_K" else kernels.quantize(rows, fm.Q4_K)
    assert (head.fmt, head.rows, head.cols) == (fm.Q4_K, V, H) and np.array_equal(head.data, want)


def test_bf16_checkpoint_head(tiny_checkpoint, tmp_path):
    """Real checkpoints are bf16: the head quantises the exact bf16 values (widened to f32)."""
    model, ckpt = tiny_checkpoint("small", dtype="bfloat16")
    import torch

    emb = model.state_dict()["model.embed_tokens.weight"].to(torch.bfloat16).float().numpy()
    vindex = open_vindex(extract(ckpt, tmp_path / "b.vindex", quant="q4k", progress=False))
    assert np.array_equal(vindex.lm_head().data, kernels.quantize(emb, fm.Q4_K))
