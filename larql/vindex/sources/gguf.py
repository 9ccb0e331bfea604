"""A Gemma 4 GGUF (llama.cpp's `gemma4` architecture) as a TensorSource.

Blocks already in the format the vindex wants (Q4_K experts/attention, Q6_K V and dense down,
rows a multiple of 256) are copied byte for byte. Everything else is decoded with the `gguf`
package's reference decoder and re-encoded: in particular the expert down projections, whose
704-value rows are not a multiple of 256, so llama.cpp stores them in a 32-block format
(Q5_0/Q8_0/...); they become zero-padded Q4_K rows like the reference's (one extra
quantisation, measured in the tests). Norms are stored unshifted (llama.cpp's gemma4 converter
has norm_shift 0), router.scale as `ffn_gate_inp.scale`, per_expert_scale as `ffn_down_exps.scale`.
The full layers' partial rotary factor comes from `rope_freqs.weight`.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from ...config import GEMMA4_26B_A4B, ModelConfig
from .. import format as fm
from ..format import VindexError
from .base import SourceInfo, bf16_to_f32

ARCH = "gemma4"
# GGML type ids for the two formats we can copy.
_COPYABLE = {fm.Q4_K: 12, fm.Q6_K: 14}

_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "layer_scalar": "layer_output_scale.weight",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
}


def gguf_name(key: str) -> str:
    """Vindex key (HF name minus `model.`) -> the tensor name llama.cpp's converter writes."""
    if key == "embed_tokens.weight":
        return "token_embd.weight"
    if key == "norm.weight":
        return "output_norm.weight"
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"blk.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise VindexError(f"no GGUF name for {key!r}")


class GGUFSource:
    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise VindexError(f"{path}: not a readable GGUF file ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._gguf = gguf

    def release(self) -> None:
        """Drop the pages read so far from this process's mapping (they stay in the page cache):
        called after each layer, so a 16 GB GGUF never shows up as 16 GB of RSS."""
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is not None:
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    # Metadata ---------------------------------------------------------------------------
    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key.format(arch=ARCH))
        if f is None:
            return default
        v = f.contents()
        return v

    def has(self, key: str) -> bool:
        try:
            return gguf_name(key) in self.tensors
        except VindexError:
            return False

    def _tensor(self, key: str):
        name = gguf_name(key)
        t = self.tensors.get(name)
        if t is None:
            raise VindexError(f"{self.path}: GGUF has no tensor {name!r} (for {key!r})")
        return t

    def _decode(self, t) -> np.ndarray:
        q = self._gguf.GGMLQuantizationType
        if t.tensor_type in (q.F32, q.F16):
            return np.asarray(t.data)
        if t.tensor_type == q.BF16:
            return bf16_to_f32(np.asarray(t.data).view(np.uint16))
        return self._gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)

    def get(self, key: str) -> np.ndarray:
        x = self._decode(self._tensor(key))
        if key.endswith(("norm.weight", "router.scale", "per_expert_scale", "layer_scalar")):
            return x.reshape(-1)
        return x

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor, decoding only those rows."""
        t = self._tensor(key)
        data = np.asarray(t.data)[start:stop]
        q = self._gguf.GGMLQuantizationType
        if t.tensor_type in (q.F32, q.F16):
            return data
        return self._gguf.quants.dequantize(data, t.tensor_type)

    def encoded(self, key: str, fmt: int, rows: int, cols: int) -> np.ndarray | None:
        """The GGUF's bytes as they are, when they already are `fmt` rows of `cols`."""
        if fmt not in _COPYABLE or cols % 256:
            return None
        t = self._tensor(key)
        if int(t.tensor_type) != _COPYABLE[fmt] or [int(s) for s in t.shape] != [cols, rows]:
            return None
        return np.asarray(t.data).reshape(-1).view(np.uint8)

    def _expert_part(self, key: str, e: int, fmt: int, rows: int, cols: int) -> np.ndarray | None:
        t = self._tensor(key)
        if fmt not in _COPYABLE or cols % 256 or int(t.tensor_type) != _COPYABLE[fmt]:
            return None
        data = np.asarray(t.data)
        if data.ndim != 3 or data.shape[1] != rows:
            return None
        return data[e].reshape(-1).view(np.uint8)

    def encoded_expert(self, layer: int, e: int, fmt_gu: int, fmt_down: int):
        c = self.config
        I, H = c.moe_intermediate_size, c.hidden_size
        gu = self._expert_part(f"layers.{layer}.experts.gate_up_proj", e, fmt_gu, 2 * I, H)
        dn = self._expert_part(f"layers.{layer}.experts.down_proj", e, fmt_down, H, I)
        return gu, dn

    def expert_part(self, layer: int, e: int, part: str) -> np.ndarray:
        """One expert's gate_up_proj or down_proj, decoded to floats (only that expert's rows)."""
        t = self._tensor(f"layers.{layer}.experts.{part}")
        data = np.asarray(t.data)
        q = self._gguf.GGMLQuantizationType
        if t.tensor_type in (q.F32, q.F16):
            return data[e]
        return self._gguf.quants.dequantize(data[e], t.tensor_type)

    def expert(self, layer: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        return self.expert_part(layer, e, "gate_up_proj"), self.expert_part(layer, e, "down_proj")

    # Config --------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        arch = self.field("general.architecture")
        if arch != ARCH:
            raise VindexError(f"{self.path}: general.architecture is {arch!r}, expected {ARCH!r}")

        def need(key: str) -> Any:
            v = self.field(key)
            if v is None:
                raise VindexError(f"{self.path}: GGUF metadata has no {key.format(arch=ARCH)!r}")
            return v

        n = int(need("{arch}.block_count"))
        hidden = int(need("{arch}.embedding_length"))
        swa = self.field("{arch}.attention.sliding_window_pattern")
        if swa is None:
            swa = [(i + 1) % 6 != 0 for i in range(n)]
        layer_types = ["sliding_attention" if s else "full_attention" for s in swa]
        kv = need("{arch}.attention.head_count_kv")
        kv = list(kv) if isinstance(kv, list) else [int(kv)] * n
        kv_swa = next((int(k) for k, s in zip(kv, swa, strict=True) if s), int(kv[0]))
        kv_full = next((int(k) for k, s in zip(kv, swa, strict=True) if not s), kv_swa)
        ff = need("{arch}.feed_forward_length")
        ff = int(ff[0] if isinstance(ff, list) else ff)
        full = [i for i, s in enumerate(swa) if not s]
        k_eq_v = bool(full) and all(f"blk.{i}.attn_v.weight" not in self.tensors for i in full)
        tokens = self.field("tokenizer.ggml.tokens") or []
        vocab = (
            int(self.tensors["token_embd.weight"].shape[1])
            if "token_embd.weight" in self.tensors
            else len(tokens)
        )
        eos = self.field("tokenizer.ggml.eos_token_id", 1)
        cfg = ModelConfig(
            model_type="gemma4_text",
            num_layers=n,
            hidden_size=hidden,
            intermediate_size=ff,
            vocab_size=vocab,
            num_heads=int(need("{arch}.attention.head_count")),
            num_kv_heads=kv_swa,
            head_dim=int(self.field("{arch}.attention.key_length_swa") or 256),
            global_head_dim=int(self.field("{arch}.attention.key_length") or 512),
            num_global_kv_heads=kv_full,
            attention_k_eq_v=k_eq_v,
            sliding_window=int(self.field("{arch}.attention.sliding_window") or 1024),
            layer_types=layer_types,
            rope_theta_local=float(self.field("{arch}.rope.freq_base_swa") or 10_000.0),
            rope_theta_global=float(self.field("{arch}.rope.freq_base") or 1_000_000.0),
            partial_rotary_factor_global=self._partial_rotary_factor(
                int(self.field("{arch}.attention.key_length") or 512)),
            rms_norm_eps=float(self.field("{arch}.attention.layer_norm_rms_epsilon") or 1e-6),
            final_logit_softcapping=self.field("{arch}.final_logit_softcapping"),
            num_experts=int(need("{arch}.expert_count")),
            top_k=int(need("{arch}.expert_used_count")),
            moe_intermediate_size=int(need("{arch}.expert_feed_forward_length")),
            bos_token_id=int(self.field("tokenizer.ggml.bos_token_id", 2)),
            eos_token_ids=[int(eos)],
            pad_token_id=int(self.field("tokenizer.ggml.padding_token_id", 0) or 0),
            # llama.cpp computes sqrt(n_embd) in f32; the HF bf16 checkpoint rounds it to bf16.
            embed_scale=float(np.float32(math.sqrt(hidden))),
        )
        self.config = cfg
        return cfg

    def _partial_rotary_factor(self, full_head_dim: int) -> float:
        """The full-attention layers' rotary fraction, read from `rope_freqs.weight`.

        llama.cpp's gemma4 converter writes "proportional" partial RoPE as per-frequency
        divisors over the full head: 1.0 for the `factor * d / 2` rotated frequencies, 1e30 (a
        frequency of zero) for the rest. Files without the tensor (older converters, our own
        test writer) get Gemma 4's 0.25."""
        t = self.tensors.get("rope_freqs.weight")
        if t is None:
            return float(GEMMA4_26B_A4B["partial_rotary_factor_global"])
        divisors = np.asarray(self._decode(t), dtype=np.float64).reshape(-1)
        rotated = int(np.count_nonzero(divisors < 1e20))
        if (divisors.size != full_head_dim // 2 or not np.all(divisors[:rotated] == 1.0)
                or not np.all(divisors[rotated:] >= 1e20)):
            raise VindexError(
                f"{self.path}: rope_freqs.weight ({divisors.size} values, {rotated} finite) is not "
                f"proportional partial RoPE over a {full_head_dim}-wide head (1.0 then 1e30): "
                "other frequency scalings are not supported")
        return 2 * rotated / full_head_dim

    # Tokenizer -----------------------------------------------------------------------------
    def tokenizer_json(self) -> bytes | None:
        """Rebuild a Hugging Face tokenizer.json from GGUF metadata with `tokenizers` alone."""
        tokens = self.field("tokenizer.ggml.tokens")
        if not tokens:
            return None
        model = self.field("tokenizer.ggml.model")
        merges = self.field("tokenizer.ggml.merges") or []
        types = self.field("tokenizer.ggml.token_type") or [1] * len(tokens)
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        specials = [
            t for t, ty in zip(tokens, types, strict=False) if int(ty) in (3, 4)
        ]  # CONTROL, USER_DEFINED
        if model == "gpt2":
            tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
            tok.decoder = decoders.ByteLevel()
        else:
            # SentencePiece-style BPE (Gemma): spaces are U+2581, unknown bytes fall back to <0xNN>.
            unk = self.field("tokenizer.ggml.unknown_token_id")
            tok = Tokenizer(
                models.BPE(
                    vocab=vocab,
                    merges=pairs,
                    byte_fallback=True,
                    fuse_unk=True,
                    unk_token=tokens[int(unk)] if unk is not None else None,
                )
            )
            tok.normalizer = normalizers.Replace(" ", "\u2581")
            tok.decoder = decoders.Sequence(
                [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            )
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        return tok.to_str().encode()


def open_gguf(path: Path) -> tuple[ModelConfig, GGUFSource, SourceInfo]:
    src = GGUFSource(path)
    config = src.model_config()
    name = src.field("general.name") or path.stem
    template = src.field("tokenizer.chat_template")
    types = {str(src._gguf.GGMLQuantizationType(int(t.tensor_type)).name) for t in src.tensors.values()}
    info = SourceInfo(
        model_name=str(name),
        kind="gguf",
        tokenizer_json=src.tokenizer_json(),
        chat_template=template if isinstance(template, str) else None,
        extra={"gguf_tensor_types": sorted(types), "tokenizer_model": src.field("tokenizer.ggml.model")},
    )
    return config, src, info
