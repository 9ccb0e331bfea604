"""A random Gemma 4 MoE model as HF-named numpy tensors (no torch): for demos and tests.

The distributions mirror tests/tiny_models.py (norms around 1, projections ~N(0, 0.08)) so a
forward pass over them stays numerically tame.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from . import format as fm
from .sources import ArraySource


def tensor_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Gemma4ForCausalLM MoE model, by HF name, with its shape."""
    H, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
    s: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, H),
        "model.norm.weight": (H,),
    }
    for layer in range(c.num_layers):
        p = f"model.layers.{layer}."
        hd, kv = c.layer_head_dim(layer), c.layer_kv_heads(layer)
        s[p + "self_attn.q_proj.weight"] = (c.num_heads * hd, H)
        s[p + "self_attn.k_proj.weight"] = (kv * hd, H)
        if not c.layer_k_eq_v(layer):
            s[p + "self_attn.v_proj.weight"] = (kv * hd, H)
        s[p + "self_attn.o_proj.weight"] = (H, c.num_heads * hd)
        s[p + "self_attn.q_norm.weight"] = (hd,)
        s[p + "self_attn.k_norm.weight"] = (hd,)
        s[p + "mlp.gate_proj.weight"] = (c.intermediate_size, H)
        s[p + "mlp.up_proj.weight"] = (c.intermediate_size, H)
        s[p + "mlp.down_proj.weight"] = (H, c.intermediate_size)
        for n in fm.LAYER_NORMS:
            s[p + n + ".weight"] = (H,)
        s[p + "router.proj.weight"] = (E, H)
        s[p + "router.scale"] = (H,)
        s[p + "router.per_expert_scale"] = (E,)
        s[p + "experts.gate_up_proj"] = (E, 2 * I, H)
        s[p + "experts.down_proj"] = (E, H, I)
        s[p + "layer_scalar"] = (1,)
    return s


def random_tensors(config: ModelConfig, seed: int = 0) -> ArraySource:
    """HF-named f32 tensors of a random model (`.tensors` holds them, keys stripped of `model.`)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in tensor_shapes(config).items():
        if name.endswith(("norm.weight", "router.scale")):
            x = 1.0 + 0.3 * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("per_expert_scale"):
            x = 0.5 + rng.random(shape, dtype=np.float32)
        elif name.endswith("layer_scalar"):
            x = 0.6 + 0.8 * rng.random(shape, dtype=np.float32)
        else:
            x = 0.08 * rng.standard_normal(shape, dtype=np.float32)
        out[name] = x.astype(np.float32, copy=False)
    return ArraySource(out)
