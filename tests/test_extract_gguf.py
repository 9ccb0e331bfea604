"""GGUF input: a GGUF written with the `gguf` package from a tiny random model, named the way
llama.cpp's gemma4 converter names tensors, quantised like a Q4_K_M file (Q4_K, Q6_K for V and
the dense down projection, Q8_0 where rows are not a multiple of 256)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from larql import kernels
from larql.vindex import VindexError, open_vindex
from larql.vindex import format as fm
from larql.vindex.extract import extract
from larql.vindex.format import strip_prefix
from larql.vindex.sources.gguf import gguf_name

Q = gguf.GGMLQuantizationType


def _choose(key: str, shape) -> Q:
    if len(shape) == 1 or key.endswith(("layer_scalar", "router.proj.weight")):
        return Q.F32  # llama.cpp keeps norms and the router (ffn_gate_inp) in f32
    if key == "embed_tokens.weight":
        return Q.Q8_0
    if shape[-1] % 256:
        return Q.Q8_0  # e.g. expert down: 160-value rows
    if key.endswith(("v_proj.weight", "mlp.down_proj.weight")):
        return Q.Q6_K
    return Q.Q4_K


def write_gguf(model, tokenizer, path,
               rope_freqs: np.ndarray | None = None) -> dict[str, tuple[Q, np.ndarray]]:
    """The tiny model as a llama.cpp-style gemma4 GGUF; returns {vindex key: (type, raw data)}."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(**model.config.to_dict())  # plain values (per-layer fields are ambiguous)
    n = cfg.num_hidden_layers
    swa = [t == "sliding_attention" for t in cfg.layer_types]
    plc = {int(k): v for k, v in (cfg.per_layer_config or {}).items()}
    full_hd = next((v["head_dim"] for k, v in plc.items() if not swa[k]), cfg.head_dim)
    kv = [
        cfg.num_key_value_heads if s else plc.get(i, {}).get("num_key_value_heads", cfg.num_key_value_heads)
        for i, s in enumerate(swa)
    ]
    w = gguf.GGUFWriter(str(path), "gemma4")
    w.add_name("tiny-gemma4")
    w.add_block_count(n)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(kv)
    w.add_key_length(full_hd)
    w.add_value_length(full_hd)
    w.add_key_length_swa(cfg.head_dim)
    w.add_value_length_swa(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern(swa)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.top_k_experts)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    w.add_token_merges([])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_chat_template("{{ messages }}")
    stored = {}
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for hf, p in model.state_dict().items():
        key = strip_prefix(hf)
        if key == "lm_head.weight":
            continue  # tied
        x = p.detach().float().numpy()
        qt = _choose(key, x.shape)
        if qt == Q.F32:
            data = x.astype(np.float32)
        elif qt == Q.Q8_0:
            data = gguf.quants.quantize(x, Q.Q8_0)
        else:
            fmt = fm.Q4_K if qt == Q.Q4_K else fm.Q6_K
            rows = int(np.prod(x.shape[:-1]))
            data = kernels.quantize(x.reshape(rows, x.shape[-1]), fmt).reshape(*x.shape[:-1], -1)
        w.add_tensor(gguf_name(key), data, raw_dtype=qt)
        stored[key] = (qt, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def gguf_model(tiny_checkpoint, tmp_path_factory):
    # hidden 256 (Q4_K rows) and expert width 160 (like 704: not a multiple of 256 -> Q8_0 in GGUF)
    model, _ = tiny_checkpoint("wide", moe_intermediate_size=160)
    from larql.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    stored = write_gguf(model, tok, path)
    return model, tok, path, stored


def test_gguf_extract(gguf_model, tmp_path):
    model, tok, path, stored = gguf_model
    vindex = open_vindex(extract(path, tmp_path / "g.vindex", quant="q4k", progress=False))
    c, hc = vindex.config, model.config.to_dict()
    assert (c.num_layers, c.hidden_size, c.num_experts, c.top_k, c.moe_intermediate_size) == (
        hc["num_hidden_layers"],
        hc["hidden_size"],
        hc["num_experts"],
        hc["top_k_experts"],
        160,
    )
    assert c.layer_types == hc["layer_types"] and c.attention_k_eq_v
    assert c.layer_kv_heads(2) == 1 and c.layer_head_dim(2) == 128 and c.layer_head_dim(0) == 64
    sd = {strip_prefix(k): v.detach().float().numpy() for k, v in model.state_dict().items()}
    for layer in range(c.num_layers):
        # Q4_K / Q6_K blocks are copied byte for byte
        a, d = vindex.attn(layer), vindex.dense_mlp(layer)
        for qm, key in (
            (a.q, "self_attn.q_proj.weight"),
            (a.o, "self_attn.o_proj.weight"),
            (d.gate, "mlp.gate_proj.weight"),
            (d.down, "mlp.down_proj.weight"),
        ):
            assert np.array_equal(qm.data, stored[f"layers.{layer}.{key}"][1].reshape(-1).view(np.uint8)), key
        ef = vindex.expert_file(layer)
        gu_raw = stored[f"layers.{layer}.experts.gate_up_proj"][1]
        dn_q8 = stored[f"layers.{layer}.experts.down_proj"]
        assert dn_q8[0] == Q.Q8_0
        for e in (0, c.num_experts - 1):
            assert np.array_equal(ef.gate_up(e), gu_raw[e].reshape(-1).view(np.uint8))
            # Q8_0 down: decoded, zero-padded to 256 and re-encoded as Q4_K
            dn = gguf.quants.dequantize(np.asarray(ef.down(e)).reshape(c.hidden_size, -1), Q.Q4_K)
            assert dn.shape == (c.hidden_size, 256)
            want = sd[f"layers.{layer}.experts.down_proj"][e]
            err = np.sqrt(np.mean((dn[:, :160] - want) ** 2) / np.mean(want**2))
            assert 1e-4 < err < 0.12
        for key in (
            "router.scale",
            "router.per_expert_scale",
            "layer_scalar",
            "pre_feedforward_layernorm_2.weight",
        ):
            assert np.array_equal(
                vindex.norm(f"layers.{layer}.{key}"), sd[f"layers.{layer}.{key}"].reshape(-1)
            ), key
        assert np.array_equal(
            vindex.norm(f"layers.{layer}.router.proj.weight"), sd[f"layers.{layer}.router.proj.weight"]
        )
    # Q8_0 embeddings decoded then stored as f16
    emb = vindex.embeddings().astype(np.float32)
    assert np.abs(emb - sd["embed_tokens.weight"]).max() < 0.01
    # tokenizer rebuilt from GGUF metadata with `tokenizers` alone
    from tokenizers import Tokenizer

    rebuilt = Tokenizer.from_file(str(vindex.tokenizer_path))
    text = "Hello, vindex! \u00e9\u4e16"
    assert rebuilt.encode(text).ids == tok.encode(text).ids
    assert rebuilt.decode(rebuilt.encode(text).ids) == text
    assert vindex.chat_template == "{{ messages }}"
    assert vindex.index["source"]["kind"] == "gguf"


def test_gguf_errors(gguf_model, tmp_path):
    _, _, path, _ = gguf_model
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(VindexError, match="bad.gguf"):
        extract(bad, tmp_path / "x.vindex", progress=False)
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VindexError, match="'llama', expected 'gemma4'"):
        extract(tmp_path / "llama.gguf", tmp_path / "y.vindex", progress=False)
    assert not (tmp_path / "x.vindex").exists() and not (tmp_path / "y.vindex").exists()


@pytest.mark.parametrize("rotated", [0, 16, 64])
def test_rope_freqs_sets_the_partial_rotary_factor(gguf_model, tmp_path, rotated):
    """rope_freqs.weight: 1.0 for each rotated frequency, 1e30 (no rotation) for the rest."""
    model, tok, _, _ = gguf_model
    half = 128 // 2  # the full layers' head_dim is 128
    path = tmp_path / "r.gguf"
    write_gguf(model, tok, path, rope_freqs=np.array([1.0] * rotated + [1e30] * (half - rotated)))
    vindex = open_vindex(extract(path, tmp_path / "r.vindex", quant="f32", progress=False))
    assert vindex.config.partial_rotary_factor_global == rotated / half


@pytest.mark.parametrize("freqs", [[1.0] * 16 + [1e30] * 47,  # not head_dim / 2 values
                                   [1.0] * 16 + [1e30] * 40 + [1.0] * 8,  # not a prefix
                                   [2.0] * 16 + [1e30] * 48])  # a real frequency scaling
def test_unsupported_rope_freqs_are_refused(gguf_model, tmp_path, freqs):
    model, tok, _, _ = gguf_model
    path = tmp_path / "bad-rope.gguf"
    write_gguf(model, tok, path, rope_freqs=np.array(freqs))
    with pytest.raises(VindexError, match="rope_freqs.weight .* not supported"):
        extract(path, tmp_path / "x.vindex", progress=False)
    assert not (tmp_path / "x.vindex").exists()
