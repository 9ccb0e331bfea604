"""q4k extraction: every block decodes the same through the `gguf` package's reference decoder
and through larql's kernels, and stays within Q4_K/Q6_K error of the original weights."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from larql import kernels
from larql.vindex import format as fm
from larql.vindex import open_vindex
from larql.vindex.extract import extract
from larql.vindex.format import strip_prefix

GG = {fm.Q4_K: gguf.GGMLQuantizationType.Q4_K, fm.Q6_K: gguf.GGMLQuantizationType.Q6_K}
# Relative RMS error bounds for N(0, s) weights: Q4_K ~ 0.07-0.09, Q6_K ~ 0.02.
MAX_REL_ERR = {fm.Q4_K: 0.12, fm.Q6_K: 0.035}


def _decode(data: np.ndarray, fmt: int, rows: int, logical: int) -> np.ndarray:
    """Decode with gguf's reference decoder; check larql's dequantize agrees; drop the padding."""
    ref = gguf.quants.dequantize(np.asarray(data).reshape(rows, -1), GG[fmt])
    cols = ref.shape[1]
    ours = kernels.dequantize(data, fmt, rows, cols)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    # padded columns were zeros before quantisation: they decode to 0 up to one quantisation step
    # (a 32-value sub-block straddling the end shares its min with real values); x's tail is
    # zero in every matmul (logical_cols), so they never contribute
    assert np.abs(ref[:, logical:]).max(initial=0.0) <= 0.05 * np.abs(ref).max()
    return ref[:, :logical]


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2)))


@pytest.mark.parametrize("name", ["small", "wide"])  # hidden 64 (padded to 256) and 256
def test_q4k_extract_matches_gguf_decoder(tiny_checkpoint, tmp_path, name):
    model, ckpt = tiny_checkpoint(name)
    sd = {strip_prefix(k): v.detach().float().numpy() for k, v in model.state_dict().items()}
    vindex = open_vindex(extract(ckpt, tmp_path / "m.vindex", quant="q4k", progress=False))
    c = vindex.config
    assert vindex.quant == "q4k" and vindex.dtype == "f16"
    assert np.array_equal(vindex.embeddings(), sd["embed_tokens.weight"].astype(np.float16))
    errs: dict[int, list[float]] = {fm.Q4_K: [], fm.Q6_K: []}
    for layer in range(c.num_layers):
        a, d = vindex.attn(layer), vindex.dense_mlp(layer)
        mats = {"q": a.q, "k": a.k, "o": a.o, "gate": d.gate, "up": d.up, "down": d.down}
        if a.v is not None:
            mats["v"] = a.v
        else:
            assert c.layer_k_eq_v(layer)
        for proj, qm in mats.items():
            key = (
                f"layers.{layer}.self_attn.{proj}_proj.weight"
                if proj in "qkvo"
                else f"layers.{layer}.mlp.{proj}_proj.weight"
            )
            want = sd[key]
            assert qm.fmt == (fm.Q6_K if proj in ("v", "down") else fm.Q4_K), key
            assert qm.cols == fm.padded_cols(qm.fmt, want.shape[1]) and qm.logical_cols == want.shape[1]
            got = _decode(qm.data, qm.fmt, qm.rows, want.shape[1])
            errs[qm.fmt].append(_rel_err(got, want))
        ef = vindex.expert_file(layer)
        assert ef.quant_format == fm.Q4_K
        gu_all, dn_all = sd[f"layers.{layer}.experts.gate_up_proj"], sd[f"layers.{layer}.experts.down_proj"]
        for e in range(c.num_experts):
            ent = ef.entry(e)
            assert ent.gate_up_fmt == ent.down_fmt == fm.Q4_K
            gu = _decode(ef.gate_up(e), fm.Q4_K, 2 * c.moe_intermediate_size, c.hidden_size)
            dn = _decode(ef.down(e), fm.Q4_K, c.hidden_size, c.moe_intermediate_size)
            errs[fm.Q4_K] += [_rel_err(gu, gu_all[e]), _rel_err(dn, dn_all[e])]
        for key in (
            f"layers.{layer}.router.proj.weight",
            f"layers.{layer}.layer_scalar",
            f"layers.{layer}.pre_feedforward_layernorm_2.weight",
        ):
            assert np.array_equal(
                vindex.norm(key).reshape(sd[key].shape) if key in sd else vindex.norm(key),
                sd.get(key, vindex.norm(key)),
            ), key
    for fmt, es in errs.items():
        assert es and max(es) < MAX_REL_ERR[fmt], (fm.FORMAT_NAMES[fmt], max(es))
        assert min(es) > 1e-4  # really quantised, not stored as floats
    # reference compatibility: four attention entries per layer, V slot of k_eq_v layers holds K as Q6_K
    man = json.loads((vindex.path / "attn_weights_q4k_manifest.json").read_text())
    assert len(man) == 4 * c.num_layers
    assert [e["key"].split(".")[-2] for e in man[:4]] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    full = [i for i in range(c.num_layers) if c.layer_k_eq_v(i)]
    if full:
        v = next(e for e in man if e["key"] == f"layers.{full[0]}.self_attn.v_proj.weight")
        assert v["format"] == "Q6_K"
        k_dec = gguf.quants.dequantize(
            np.frombuffer(
                (vindex.path / "attn_weights_q4k.bin").read_bytes()[v["offset"] : v["offset"] + v["length"]],
                np.uint8,
            ).reshape(v["shape"][0], -1),
            GG[fm.Q6_K],
        )
        want = sd[f"layers.{full[0]}.self_attn.k_proj.weight"]
        assert _rel_err(k_dec[:, : want.shape[1]], want) < MAX_REL_ERR[fm.Q6_K]


def test_q4k_experts_feed_the_kernel_table(tiny_checkpoint, tmp_path):
    """ExpertFile.table builds a kernels.ExpertTable over the mmap for just the named experts."""
    model, ckpt = tiny_checkpoint("small")
    vindex = open_vindex(extract(ckpt, tmp_path / "m.vindex", quant="q4k", progress=False))
    ef = vindex.expert_file(0)
    table = ef.table([0, 3])
    assert table is not None
    x = np.random.default_rng(0).standard_normal((2, vindex.config.hidden_size)).astype(np.float32)
    ids = np.array([[0, 3], [3, 0]], dtype=np.int32)
    w = np.array([[0.7, 0.3], [0.5, 0.5]], dtype=np.float32)
    y = kernels.moe_ffn(table, x, ids, w)
    # the same FFN done in numpy from gguf-decoded weights
    c = vindex.config
    I = c.moe_intermediate_size
    ref = np.zeros_like(y)
    for t in range(2):
        for j in range(2):
            e = int(ids[t, j])
            gu = _decode(ef.gate_up(e), fm.Q4_K, 2 * I, c.hidden_size)
            dn = _decode(ef.down(e), fm.Q4_K, c.hidden_size, I)
            g, u = gu[:I] @ x[t], gu[I:] @ x[t]
            gelu = 0.5 * g * (1 + np.tanh(0.7978845608 * (g + 0.044715 * g**3)))
            ref[t] += w[t, j] * (dn @ (gelu * u))
    np.testing.assert_allclose(y, ref, rtol=0.05, atol=0.05 * np.abs(ref).max())
