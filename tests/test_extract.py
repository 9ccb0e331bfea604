"""Extraction from tiny random transformers checkpoints: f32/f16 read back exactly, bf16 input,
the multimodal prefix, atomic output, bad checkpoints."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from larql.vindex import VindexError, open_vindex
from larql.vindex.extract import extract
from larql.vindex.format import strip_prefix


def _state(model) -> dict[str, np.ndarray]:
    sd = {strip_prefix(k): v.detach().float().numpy() for k, v in model.state_dict().items()}
    sd.update(
        {
            strip_prefix(k): v.detach().float().numpy()
            for k, v in model.named_buffers()
            if k.endswith("layer_scalar")
        }
    )
    # tied: the vindex keeps one copy (embeddings.bin) and lm_head() is None
    lm = sd.pop("lm_head.weight", None)
    assert lm is None or np.array_equal(lm, sd["embed_tokens.weight"])
    return sd


def _f(qm) -> np.ndarray:
    dt = {0: np.float32, 1: np.float16}[qm.fmt]
    return qm.data.view(dt).reshape(qm.rows, qm.cols).astype(np.float32)


def check_all_tensors(vindex, sd: dict[str, np.ndarray], exact: bool) -> int:
    """Every tensor of the checkpoint is in the vindex, equal (f32) or f16-rounded (f16)."""
    cmp = (
        (lambda a, b: np.array_equal(a, b))
        if exact
        else (lambda a, b: np.array_equal(a, b.astype(np.float16).astype(np.float32)))
    )
    c = vindex.config
    n = 0
    for key, want in sd.items():
        if key == "embed_tokens.weight":
            got = np.asarray(vindex.embeddings(), dtype=np.float32)
        elif ".self_attn." in key and key.endswith("_proj.weight"):
            layer, proj = int(key.split(".")[1]), key.split(".")[3][0]
            got = _f(getattr(vindex.attn(layer), proj))
        elif ".mlp." in key:
            layer, proj = int(key.split(".")[1]), key.split(".")[3].split("_")[0]
            got = _f(getattr(vindex.dense_mlp(layer), proj))
        elif ".experts." in key:
            layer = int(key.split(".")[1])
            ef = vindex.expert_file(layer)
            dt = np.float32 if ef.quant_format == 0 else np.float16
            part = ef.gate_up if "gate_up" in key else ef.down
            got = np.stack([part(e).view(dt).reshape(want.shape[1:]) for e in range(c.num_experts)])
            got = got.astype(np.float32)
        else:
            got = vindex.norm(key)
            # norms.bin stays f32 whatever the precision of the big matrices
            assert np.array_equal(got.reshape(want.shape), want), key
            n += 1
            continue
        assert got.shape == want.shape, key
        assert cmp(got, want), key
        n += 1
    return n


@pytest.mark.parametrize("name", ["small", "no_keqv", "wide"])
def test_f32_extract_is_bit_exact(tiny_checkpoint, tmp_path, name):
    model, ckpt = tiny_checkpoint(name)
    out = extract(ckpt, tmp_path / "m.vindex", quant="f32", progress=False)
    vindex = open_vindex(out)
    assert vindex.quant == "f32" and vindex.dtype == "f32"
    sd = _state(model)
    assert check_all_tensors(vindex, sd, exact=True) == len(sd)
    c = vindex.config
    assert c.num_layers == model.config.num_hidden_layers
    assert vindex.layers_present == list(range(c.num_layers))
    assert vindex.experts_present == list(range(c.num_experts))
    for layer in range(c.num_layers):
        assert (vindex.attn(layer).v is None) == c.layer_k_eq_v(layer)
    assert vindex.tokenizer_path is not None
    assert vindex.lm_head() is None
    assert vindex.index["ffn_layout"] == "per_layer"
    assert set(vindex.index["checksums"]) >= {"embeddings.bin", "norms.bin", "layers/layer_00.weights"}


def test_f16_extract_rounds_once(tiny_checkpoint, tmp_path):
    model, ckpt = tiny_checkpoint("small")
    vindex = open_vindex(extract(ckpt, tmp_path / "m.vindex", quant="f16", progress=False))
    assert vindex.embeddings().dtype == np.float16
    check_all_tensors(vindex, _state(model), exact=False)


def test_bf16_checkpoint(tiny_checkpoint, tmp_path):
    model, ckpt = tiny_checkpoint("small", dtype="bfloat16")
    vindex = open_vindex(extract(ckpt, tmp_path / "m.vindex", quant="f32", progress=False))
    # bf16 -> f32 is exact, so the f32 vindex holds exactly the bf16 values
    import torch

    sd = {
        strip_prefix(k): v.detach().to(torch.bfloat16).float().numpy()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    check_all_tensors(vindex, sd, exact=True)
    # embed_scale is rounded the way the bf16 checkpoint stores it
    assert vindex.config.embed_scale == float(torch.tensor(64**0.5, dtype=torch.bfloat16))


def _multimodal_copy(ckpt, dst):
    """The same text weights as Gemma4ForConditionalGeneration stores them, plus a vision tensor."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(ckpt / "model.safetensors"))
    mm = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
    mm["model.vision_tower.encoder.weight"] = np.ones((3, 3), np.float32)
    save_file(mm, str(dst / "model.safetensors"))
    text = json.loads((ckpt / "config.json").read_text())
    cfg = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": {"hidden_size": 3},
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    shutil.copy(ckpt / "tokenizer.json", dst / "tokenizer.json")


def test_multimodal_prefix(tiny_checkpoint, tmp_path):
    model, ckpt = tiny_checkpoint("small")
    _multimodal_copy(ckpt, tmp_path / "mm")
    vindex = open_vindex(extract(tmp_path / "mm", tmp_path / "m.vindex", quant="f32", progress=False))
    assert check_all_tensors(vindex, _state(model), exact=True) > 0


def test_existing_output_is_refused_and_failures_leave_nothing(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint("small")
    out = extract(ckpt, tmp_path / "m.vindex", quant="f32", progress=False)
    with pytest.raises(VindexError, match="already exists"):
        extract(ckpt, out, quant="f32", progress=False)
    # a checkpoint missing one tensor fails mid-way and leaves no output, no temp dir
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(str(ckpt / "model.safetensors"))
    del t["model.layers.3.mlp.up_proj.weight"]
    save_file(t, str(bad / "model.safetensors"))
    shutil.copy(ckpt / "config.json", bad / "config.json")
    with pytest.raises(VindexError, match="layers.3.mlp.up_proj.weight"):
        extract(bad, tmp_path / "bad.vindex", quant="f32", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "m.vindex"]


def test_corrupt_safetensors_header(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint("small")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(ckpt / "config.json", bad / "config.json")
    data = (ckpt / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(VindexError, match="header length"):
        extract(bad, tmp_path / "x.vindex", quant="f32", progress=False)
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VindexError, match="data_offsets"):
        extract(bad, tmp_path / "x.vindex", quant="f32", progress=False)
    with pytest.raises(VindexError, match="no such file"):
        extract(tmp_path / "nope", tmp_path / "x.vindex")


def test_cli_extract_info_verify(tiny_checkpoint, tmp_path, capsys):
    from larql.cli import main as cli

    _, ckpt = tiny_checkpoint("no_keqv")
    out = tmp_path / "c.vindex"
    assert cli(["extract", str(ckpt), "-o", str(out), "--quant", "f16", "--lyrw-version", "1", "-q"]) == 0
    assert open_vindex(out).expert_file(0).version == 1
    assert cli(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "experts 0-3" in text and "LYRW         version 1" in text
    assert cli(["verify", "-q", str(out)]) == 0
    (out / "norms.bin").write_bytes(b"\0" * (out / "norms.bin").stat().st_size)
    assert cli(["verify", "-q", str(out)]) == 1
    assert "norms.bin: sha256" in capsys.readouterr().err
    assert cli(["extract", str(tmp_path / "missing"), "-o", str(tmp_path / "m.vindex"), "-q"]) == 1
    assert "no such file or directory" in capsys.readouterr().err
