"""Tiny random Gemma 4 MoE checkpoints built with `transformers` (test-only: torch lives here).

Every parameter and buffer is randomised, norms and `layer_scalar` included, so a forward pass
that forgets a norm, a scale or a scalar cannot agree with `transformers` by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

# name -> Gemma4TextConfig overrides. Together they cover sliding + full layers, k_eq_v on
# and off, 4-16 experts, top-k 1-4, hidden sizes that are and are not multiples of 256.
CONFIGS: dict[str, dict] = {
    "small": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=8, num_experts=8, top_k_experts=2,
        moe_intermediate_size=48,
    ),
    "no_keqv": dict(
        hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
        attention_k_eq_v=False, sliding_window=6, num_experts=4, top_k_experts=1,
        moe_intermediate_size=40, layer_types=["sliding_attention", "full_attention",
                                              "sliding_attention", "full_attention"],
    ),
    "wide": dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=16, num_experts=16, top_k_experts=4,
        moe_intermediate_size=176,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
}

COMMON = dict(
    vocab_size=512, hidden_size_per_layer_input=0, enable_moe_block=True,
    final_logit_softcapping=30.0, rms_norm_eps=1e-6, max_position_embeddings=4096,
    bos_token_id=2, eos_token_id=1, pad_token_id=0,
)


def make_config(name: str = "small", **overrides):
    from transformers import Gemma4TextConfig

    kw = {**COMMON, **CONFIGS[name], **overrides}
    return Gemma4TextConfig(**kw)


def build_model(name: str = "small", seed: int = 0, **overrides):
    """A random Gemma4ForCausalLM in eval mode, f32."""
    import torch
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(make_config(name, **overrides)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname or pname.endswith("router.scale"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
        for bname, b in model.named_buffers():
            if bname.endswith("layer_scalar"):
                b.copy_(0.6 + 0.8 * torch.rand(b.shape, generator=gen))
    return model


def save_checkpoint(model, out: Path, dtype: str = "float32", tokenizer: bool = True) -> Path:
    """save_pretrained (safetensors) plus a byte-level tokenizer.json."""
    import torch

    out = Path(out)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer:
        from larql.tokenizer import byte_level_tokenizer

        byte_level_tokenizer().save(str(out / "tokenizer.json"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("model_type") == "gemma4_text", cfg.get("model_type")
    return out
