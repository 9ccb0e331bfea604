"""Checkpoints to extract from: a Hugging Face directory (safetensors) or a GGUF file.

Each source reads its files read-only and hands the writer one tensor (or one expert) at a
time, converting bf16/f16 to f32 only for that tensor, so peak memory stays a small multiple
of the largest single tensor rather than the model.

    base.py         TensorSource (the protocol the writer reads), SourceInfo, ArraySource
    safetensors.py  SafetensorsSource, open_hf_dir
    gguf.py         GGUFSource, open_gguf
"""

from __future__ import annotations

from pathlib import Path

from ...config import ModelConfig
from ..format import VindexError
from .base import ArraySource, SourceInfo, TensorSource, bf16_to_f32
from .gguf import GGUFSource, open_gguf
from .safetensors import SafetensorsSource, open_hf_dir

__all__ = ["ArraySource", "GGUFSource", "SafetensorsSource", "SourceInfo", "TensorSource", "bf16_to_f32",
           "open_gguf", "open_hf_dir", "open_source"]


def open_source(path: str | Path) -> tuple[ModelConfig, TensorSource, SourceInfo]:
    """A checkpoint directory or a .gguf file -> (config, TensorSource, info)."""
    path = Path(path)
    if path.is_dir():
        return open_hf_dir(path)
    if path.suffix == ".gguf" and path.is_file():
        return open_gguf(path)
    if not path.exists():
        raise VindexError(f"{path}: no such file or directory")
    raise VindexError(f"{path}: expected a Hugging Face model directory or a .gguf file")
