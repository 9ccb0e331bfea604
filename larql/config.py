"""Model configuration: one dataclass read from a Hugging Face `config.json` or a vindex `index.json`.

Field names follow `transformers`' Gemma4TextConfig where they exist; `to_index_model_config`
and `from_index` translate to and from the reference vindex's `model_config` names.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import LarqlError

# Gemma 4 26B A4B: the family defaults a reader falls back on when a field is missing.
GEMMA4_26B_A4B: dict[str, Any] = {
    "model_type": "gemma4_text",
    "num_layers": 30,
    "hidden_size": 2816,
    "intermediate_size": 2112,
    "vocab_size": 262144,
    "num_heads": 16,
    "num_kv_heads": 8,
    "head_dim": 256,
    "global_head_dim": 512,
    "num_global_kv_heads": 2,
    "attention_k_eq_v": True,
    "sliding_window": 1024,
    "rope_theta_local": 10_000.0,
    "rope_theta_global": 1_000_000.0,
    "partial_rotary_factor_global": 0.25,
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "num_experts": 128,
    "top_k": 8,
    "moe_intermediate_size": 704,
    "hidden_activation": "gelu_pytorch_tanh",
    "bos_token_id": 2,
    "eos_token_ids": [1, 106],
    "pad_token_id": 0,
}


class ConfigError(LarqlError, ValueError):
    """A config file is missing a required field or holds an inconsistent value."""


@dataclass
class ModelConfig:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    global_head_dim: int
    num_global_kv_heads: int
    attention_k_eq_v: bool
    sliding_window: int
    layer_types: list[str]
    rope_theta_local: float
    rope_theta_global: float
    partial_rotary_factor_global: float
    rms_norm_eps: float
    final_logit_softcapping: float | None
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    hidden_activation: str = "gelu_pytorch_tanh"
    bos_token_id: int = 2
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0
    # sqrt(hidden_size) rounded to the checkpoint's dtype (bf16 gives 53.0 for 2816, not 53.07).
    embed_scale: float = 0.0

    def __post_init__(self) -> None:
        if not self.embed_scale:
            self.embed_scale = math.sqrt(self.hidden_size)
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
            )
        for t in self.layer_types:
            if t not in ("sliding_attention", "full_attention"):
                raise ConfigError(f"unknown layer type {t!r}")
        if self.num_experts and not (0 < self.top_k <= self.num_experts):
            raise ConfigError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")

    # Per-layer attention geometry -------------------------------------------------------
    def is_full(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    def layer_head_dim(self, layer: int) -> int:
        return self.global_head_dim if self.is_full(layer) else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        # transformers only overrides the KV head count on full layers when k_eq_v is on.
        if self.is_full(layer) and self.attention_k_eq_v:
            return self.num_global_kv_heads
        return self.num_kv_heads

    def layer_k_eq_v(self, layer: int) -> bool:
        return self.is_full(layer) and self.attention_k_eq_v

    @property
    def eos_ids(self) -> list[int]:
        return list(self.eos_token_ids)

    # Construction -----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, dtype: str | None = None) -> ModelConfig:
        """From a Hugging Face config.json dict (text-only or multimodal with `text_config`)."""
        text = cfg.get("text_config") or cfg
        try:
            hidden = int(text["hidden_size"])
            n_layers = int(text["num_hidden_layers"])
        except KeyError as e:
            raise ConfigError(f"config.json has no {e.args[0]!r}") from None
        layer_types = text.get("layer_types") or [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)
        ]
        rope = text.get("rope_parameters") or {}
        full_rope = rope.get("full_attention", {})
        slide_rope = rope.get("sliding_attention", {})
        eos = text.get("eos_token_id", cfg.get("eos_token_id", 1))
        eos_ids = list(eos) if isinstance(eos, list) else [int(eos)]
        dt = dtype or text.get("dtype") or text.get("torch_dtype") or cfg.get("torch_dtype") or "float32"
        scale = _round_to_dtype(math.sqrt(hidden), str(dt))
        if not text.get("enable_moe_block", bool(text.get("num_experts"))):
            raise ConfigError("only the Mixture-of-Experts Gemma 4 variant (enable_moe_block) is supported")
        if text.get("hidden_size_per_layer_input"):
            raise ConfigError(
                "per-layer input embeddings (hidden_size_per_layer_input > 0) are not supported"
            )
        if text.get("num_kv_shared_layers"):
            raise ConfigError("KV-shared layers (num_kv_shared_layers > 0) are not supported")
        # transformers >= 5.2x serialises the full-attention geometry as `per_layer_config`
        # ({"5": {"head_dim": 512, "num_key_value_heads": 2}}) instead of global_* fields.
        per_layer = text.get("per_layer_config") or {}
        for i, t in enumerate(layer_types):
            extra = per_layer.get(str(i)) or {}
            if t == "full_attention" and extra:
                text = {**text}
                text.setdefault("global_head_dim", extra.get("head_dim"))
                if "num_key_value_heads" in extra:
                    text.setdefault("num_global_key_value_heads", extra["num_key_value_heads"])
                break
        return cls(
            model_type=text.get("model_type", "gemma4_text"),
            num_layers=n_layers,
            hidden_size=hidden,
            intermediate_size=int(text["intermediate_size"]),
            vocab_size=int(text["vocab_size"]),
            num_heads=int(text["num_attention_heads"]),
            num_kv_heads=int(text["num_key_value_heads"]),
            head_dim=int(text.get("head_dim", 256)),
            global_head_dim=int(text.get("global_head_dim", 512)),
            num_global_kv_heads=int(
                text.get("num_global_key_value_heads") or text["num_key_value_heads"]
            ),
            attention_k_eq_v=bool(text.get("attention_k_eq_v", False)),
            sliding_window=int(text.get("sliding_window", 512)),
            layer_types=list(layer_types),
            rope_theta_local=float(slide_rope.get("rope_theta", 10_000.0)),
            rope_theta_global=float(full_rope.get("rope_theta", 1_000_000.0)),
            partial_rotary_factor_global=float(full_rope.get("partial_rotary_factor", 0.25)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=text.get("final_logit_softcapping"),
            num_experts=int(text.get("num_experts") or 0),
            top_k=int(text.get("top_k_experts") or 0),
            moe_intermediate_size=int(text.get("moe_intermediate_size") or 0),
            hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
            bos_token_id=int(text.get("bos_token_id", cfg.get("bos_token_id", 2)) or 2),
            eos_token_ids=eos_ids,
            pad_token_id=int(text.get("pad_token_id", 0) or 0),
            embed_scale=scale,
        )

    def to_index_model_config(self) -> dict[str, Any]:
        """The reference vindex's `model_config` block (plus our own exact fields)."""
        return {
            "model_type": self.model_type,
            "head_dim": self.head_dim,
            "num_q_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "rope_base": self.rope_theta_global,
            "rope_local_base": self.rope_theta_local,
            "sliding_window": self.sliding_window,
            "global_head_dim": self.global_head_dim,
            "num_global_kv_heads": self.num_global_kv_heads,
            "partial_rotary_factor": self.partial_rotary_factor_global,
            "sliding_window_pattern": _pattern(self.layer_types),
            "layer_types": list(self.layer_types),
            "attention_k_eq_v": self.attention_k_eq_v,
            "final_logit_softcapping": self.final_logit_softcapping,
            "query_pre_attn_scalar": 1.0,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": self.hidden_activation,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "moe": {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "moe_intermediate_size": self.moe_intermediate_size,
                "hybrid": True,
                "shared_expert": False,
                "router_type": "gemma4",
            },
        }

    @classmethod
    def from_index(cls, index: dict[str, Any]) -> ModelConfig:
        """From a vindex `index.json` dict; missing optional fields take the Gemma 4 defaults."""
        d = dict(GEMMA4_26B_A4B)
        mc = index.get("model_config") or {}
        moe = mc.get("moe") or {}
        for key in ("num_layers", "hidden_size", "intermediate_size", "vocab_size"):
            if key in index:
                d[key] = index[key]
        rename = {
            "model_type": "model_type",
            "head_dim": "head_dim",
            "num_q_heads": "num_heads",
            "num_kv_heads": "num_kv_heads",
            "rope_base": "rope_theta_global",
            "rope_local_base": "rope_theta_local",
            "sliding_window": "sliding_window",
            "global_head_dim": "global_head_dim",
            "num_global_kv_heads": "num_global_kv_heads",
            "partial_rotary_factor": "partial_rotary_factor_global",
            "attention_k_eq_v": "attention_k_eq_v",
            "final_logit_softcapping": "final_logit_softcapping",
            "rms_norm_eps": "rms_norm_eps",
            "hidden_activation": "hidden_activation",
            "bos_token_id": "bos_token_id",
            "eos_token_ids": "eos_token_ids",
            "pad_token_id": "pad_token_id",
        }
        for src, dst in rename.items():
            if mc.get(src) is not None:
                d[dst] = mc[src]
        for src, dst in (("num_experts", "num_experts"), ("top_k", "top_k"),
                         ("moe_intermediate_size", "moe_intermediate_size")):
            if moe.get(src) is not None:
                d[dst] = moe[src]
        n = int(d["num_layers"])
        types = mc.get("layer_types")
        if not types:
            pattern = int(mc.get("sliding_window_pattern") or 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        d["layer_types"] = list(types)
        if index.get("embed_scale"):
            d["embed_scale"] = float(index["embed_scale"])
        else:
            d["embed_scale"] = 0.0
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pattern(layer_types: list[str]) -> int:
    for i, t in enumerate(layer_types):
        if t == "full_attention":
            return i + 1
    return len(layer_types) + 1


def _round_to_dtype(value: float, dtype: str) -> float:
    """Round a float the way a tensor of the checkpoint's dtype would store it."""
    import numpy as np

    dtype = dtype.replace("torch.", "")
    if dtype in ("bfloat16", "bf16"):
        bits = np.array([value], dtype=np.float32).view(np.uint32)[0]
        # round to nearest even on the upper 16 bits
        bits = (int(bits) + 0x7FFF + ((int(bits) >> 16) & 1)) & 0xFFFF0000
        return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])
    if dtype in ("float16", "f16"):
        return float(np.float16(value))
    return float(np.float32(value))
