"""A synthetic vindex with the real Gemma 4 26B A4B dimensions, written in seconds.

Benchmarks need the real byte layout (2816-wide rows, 128 experts of 704, Q4_K blocks) but not
real weights, so this writes random yet valid blocks directly (random nibbles and 6-bit scales,
small finite f16 super-block scales) instead of quantising floats.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GEMMA4_26B_A4B, ModelConfig
from . import format as fm
from .writer import write_vindex


def _rand_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    # Generator.integers on uint64 is ~10x faster than Generator.bytes.
    words = rng.integers(0, np.iinfo(np.uint64).max, -(-n // 8), dtype=np.uint64, endpoint=True)
    return words.view(np.uint8)[:n]


def random_blocks(rng: np.random.Generator, fmt: int, rows: int, cols: int) -> np.ndarray:
    """rows x cols (cols padded to the block) of random but well-formed blocks, as uint8."""
    n_bytes = rows * fm.row_bytes(fmt, cols)
    if fmt in (fm.F32, fm.F16):
        n = n_bytes // (4 if fmt == fm.F32 else 2)
        bits = _rand_bytes(rng, n * 2).view(np.uint16)
        # sign + random mantissa with a fixed small exponent: values of magnitude ~0.008-0.016
        h = ((bits & 0x83FF) | 0x2000).view(np.float16)
        return (h if fmt == fm.F16 else h.astype(np.float32)).view(np.uint8)
    per = fm.BLOCKS[fmt][1]
    blocks = _rand_bytes(rng, n_bytes).reshape(-1, per)
    nb = blocks.shape[0]

    # Super-block scales chosen so values come out around +-0.05 like real projection weights.
    def f16(lo: float, hi: float) -> np.ndarray:
        return (
            (lo + (hi - lo) * rng.random(nb, dtype=np.float32))
            .astype(np.float16)
            .view(np.uint8)
            .reshape(nb, 2)
        )

    if fmt == fm.Q4_K:  # d, dmin at bytes 0..3; scales/mins and nibbles stay random
        blocks[:, 0:2] = f16(1e-4, 3e-4)
        blocks[:, 2:4] = f16(1e-4, 2e-4)
    elif fmt == fm.Q6_K:  # ql[128] qh[64] int8 scales[16] then f16 d at 208
        blocks[:, 192:208] = blocks[:, 192:208] & 0x3F  # positive, moderate sub-scales
        blocks[:, 208:210] = f16(2e-5, 6e-5)
    else:
        raise ValueError(f"no synthetic blocks for {fm.FORMAT_NAMES[fmt]}")
    return blocks.reshape(-1)


class SyntheticSource:
    def __init__(self, config: ModelConfig, seed: int) -> None:
        self.config = config
        self.seed = seed

    def _rng(self, *key: Any) -> np.random.Generator:
        return np.random.default_rng([self.seed, *[abs(hash(k)) % (1 << 31) for k in key]])

    def has(self, key: str) -> bool:
        return True

    def get(self, key: str) -> np.ndarray:
        c, rng = self.config, self._rng(key)
        if key.endswith("router.proj.weight"):
            return 0.02 * rng.standard_normal((c.num_experts, c.hidden_size), dtype=np.float32)
        if key.endswith("per_expert_scale"):
            return 0.5 + rng.random(c.num_experts, dtype=np.float32)
        if key.endswith("layer_scalar"):
            return np.array([0.5 + rng.random()], dtype=np.float32)
        if key.endswith(("q_norm.weight", "k_norm.weight")):
            layer = int(key.split(".")[1])
            return 1.0 + 0.1 * rng.standard_normal(c.layer_head_dim(layer), dtype=np.float32)
        return 1.0 + 0.1 * rng.standard_normal(c.hidden_size, dtype=np.float32)

    def encoded(self, key: str, fmt: int, rows: int, cols: int):
        rng = self._rng(key)
        if key == "embed_tokens.weight":  # chunked: never the whole table in memory
            return (random_blocks(rng, fmt, min(16384, rows - i), cols) for i in range(0, rows, 16384))
        return random_blocks(rng, fmt, rows, cols)

    def encoded_expert(self, layer: int, e: int, fmt_gu: int, fmt_down: int):
        c, rng = self.config, self._rng(layer, e)
        I, H = c.moe_intermediate_size, c.hidden_size
        return random_blocks(rng, fmt_gu, 2 * I, H), random_blocks(rng, fmt_down, H, I)

    def expert(self, layer: int, e: int):
        raise NotImplementedError("synthetic experts exist only as encoded blocks")


def synthetic_config(num_layers: int = 2, **dims: Any) -> ModelConfig:
    d = dict(GEMMA4_26B_A4B)
    d["num_layers"] = num_layers
    real = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)]
    d["layer_types"] = dims.pop("layer_types", real)
    unknown = set(dims) - set(d) - {"embed_scale"}
    if unknown:
        raise TypeError(f"unknown synthetic dims {sorted(unknown)}")
    d.update(dims)
    d["embed_scale"] = 0.0
    return ModelConfig(**d)


def write_synthetic_vindex(
    out: str | os.PathLike,
    num_layers: int = 2,
    quant: str = "q4k",
    seed: int = 0,
    progress: bool = False,
    lyrw_version: int = 2,
    lm_head: str | None = None,
    **dims: Any,
) -> Path:
    """Random but valid vindex; dims default to the real 26B A4B (pass vocab_size=... to shrink).
    `lm_head` as for write_vindex ("tied", "q4k", "q6k"; None: q4k for quant q4k): a separate
    head holds random blocks of its own, unrelated to the random embeddings."""
    config = synthetic_config(num_layers, **dims)
    return write_vindex(
        out,
        config,
        SyntheticSource(config, seed),
        quant=quant,
        progress=progress,
        lyrw_version=lyrw_version,
        lm_head=lm_head,
        model_name="synthetic-gemma4-26b-a4b-shapes",
        overwrite=True,
        source_info={"kind": "synthetic", "seed": seed},
    )
