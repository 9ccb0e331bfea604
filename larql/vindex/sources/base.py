"""What every checkpoint source is: the TensorSource protocol the writer reads, the SourceInfo
beside it, and ArraySource (in-memory arrays: random models, tests)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .. import format as fm
from ..format import VindexError


@runtime_checkable
class TensorSource(Protocol):
    """Weights by vindex key (HF name without `model.`/`model.language_model.`)."""

    def get(self, key: str) -> np.ndarray:
        """The tensor as a float array (any float dtype); VindexError naming the key if absent."""
        ...

    def has(self, key: str) -> bool: ...

    def expert(self, layer: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(gate_up [2I, H], down [H, I]) of one expert, as float arrays."""
        ...


# A source may also offer already-encoded bytes (GGUF blocks copied as they are, synthetic
# random blocks): `encoded(key, fmt, rows, cols) -> uint8 array | None` and
# `encoded_expert(layer, e, fmt_gu, fmt_down) -> (bytes, bytes) | None`.


def bf16_to_f32(x: np.ndarray) -> np.ndarray:
    y = x.astype(np.uint32)
    y <<= 16  # in place: one temporary, not two
    return y.view(np.float32)


@dataclass
class SourceInfo:
    model_name: str
    kind: str  # "safetensors" | "gguf"
    tokenizer_json: bytes | None = None
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ArraySource:
    """A TensorSource over a dict of HF-named (or already stripped) numpy arrays."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = {fm.strip_prefix(k): v for k, v in tensors.items()}

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> np.ndarray:
        try:
            return self.tensors[key]
        except KeyError:
            raise VindexError(f"source has no tensor {key!r}") from None

    def expert(self, layer: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        gu = self.get(f"layers.{layer}.experts.gate_up_proj")
        dn = self.get(f"layers.{layer}.experts.down_proj")
        return gu[e], dn[e]
