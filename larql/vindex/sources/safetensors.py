"""A Hugging Face model directory (safetensors shards, config.json, tokenizer) as a TensorSource."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ...config import ConfigError, ModelConfig
from .. import format as fm
from ..format import VindexError
from .base import SourceInfo, bf16_to_f32

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class _SafetensorsFile:
    """One .safetensors file: its JSON header parsed and validated; tensors (or row ranges of
    them) are read with pread into fresh buffers. Not mmapped on purpose: touched pages of a
    mapping count in RSS until unmapped, so streaming a 50 GB checkpoint through a mapping
    would look (and, under pressure, behave) like holding it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise VindexError(f"{path}: truncated safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise VindexError(f"{path}: header length {n} is past the end of the file")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise VindexError(f"{path}: safetensors header is not JSON ({e})") from None
        self.fd = os.open(path, os.O_RDONLY)
        self.base = 8 + n
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dt, shape, (a, b) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise VindexError(f"{path}: tensor {name!r}: malformed header entry") from None
            if dt not in _ST_DTYPES:
                raise VindexError(f"{path}: tensor {name!r} has dtype {dt}; only F32/F16/BF16 are supported")
            want = int(np.prod(shape)) * np.dtype(_ST_DTYPES[dt]).itemsize
            if b - a != want or self.base + b > size or a < 0:
                raise VindexError(
                    f"{path}: tensor {name!r}: data_offsets [{a}, {b}) do not fit shape "
                    f"{list(shape)} {dt} inside the file"
                )
            self.tensors[name] = (dt, shape, a, b)

    def raw(self, name: str, start: int | None = None, stop: int | None = None) -> tuple[str, np.ndarray]:
        """The tensor (or rows [start, stop) along its first axis) in its stored dtype."""
        dt, shape, a, b = self.tensors[name]
        item = np.dtype(_ST_DTYPES[dt]).itemsize
        row = int(np.prod(shape[1:])) * item if shape else item
        if start is not None:
            stop = min(shape[0], stop if stop is not None else shape[0])
            a, shape = a + start * row, (max(0, stop - start), *shape[1:])
            b = a + shape[0] * row
        data = os.pread(self.fd, b - a, self.base + a)
        if len(data) != b - a:
            raise VindexError(f"{self.path}: tensor {name!r}: short read (file truncated while reading?)")
        return dt, np.frombuffer(data, dtype=_ST_DTYPES[dt]).reshape(shape)

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


class SafetensorsSource:
    """A Hugging Face model directory (Gemma4ForCausalLM or Gemma4ForConditionalGeneration)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise VindexError(f"{root}: no *.safetensors files")
        idx = root / "model.safetensors.index.json"
        if idx.exists():
            wm = fm.read_json(idx, "safetensors index").get("weight_map", {})
            for name in set(wm.values()):
                if not (root / name).exists():
                    raise VindexError(f"{root / name}: missing shard named by {idx.name}")
        self.files = [_SafetensorsFile(p) for p in files]
        self.keymap: dict[str, tuple[_SafetensorsFile, str]] = {}
        for f in self.files:
            for name in f.tensors:
                if "vision" in name or "audio" in name or "multi_modal" in name or "embed_vision" in name:
                    continue
                self.keymap[fm.strip_prefix(name)] = (f, name)

    def has(self, key: str) -> bool:
        return key in self.keymap

    def _raw(self, key: str, start: int | None = None, stop: int | None = None) -> tuple[str, np.ndarray]:
        try:
            f, name = self.keymap[key]
        except KeyError:
            raise VindexError(
                f"{self.root}: checkpoint has no tensor {key!r} "
                f"(looked for model.{key} / model.language_model.{key})"
            ) from None
        return f.raw(name, start, stop)

    def get(self, key: str) -> np.ndarray:
        dt, x = self._raw(key)
        return bf16_to_f32(x) if dt == "BF16" else x

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor as floats (only those rows are converted)."""
        dt, x = self._raw(key, start, stop)
        return bf16_to_f32(x) if dt == "BF16" else x

    def expert(self, layer: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for part in ("gate_up_proj", "down_proj"):
            dt, x = self._raw(f"layers.{layer}.experts.{part}", e, e + 1)
            x = x[0]
            out.append(bf16_to_f32(x) if dt == "BF16" else x)
        return out[0], out[1]

    def dtype(self) -> str:
        dts = {f.tensors[n][0] for f, n in self.keymap.values()}
        return "bfloat16" if "BF16" in dts else "float16" if "F16" in dts else "float32"


def open_hf_dir(root: Path) -> tuple[ModelConfig, SafetensorsSource, SourceInfo]:
    cfg_path = root / "config.json"
    raw = fm.read_json(cfg_path, "the model's Hugging Face config")
    archs = raw.get("architectures") or []
    if archs and not any(a.startswith("Gemma4") for a in archs):
        raise VindexError(f"{cfg_path}: architectures {archs} is not a Gemma 4 model")
    source = SafetensorsSource(root)
    try:
        config = ModelConfig.from_hf(
            raw, dtype=(raw.get("text_config") or raw).get("dtype") or source.dtype()
        )
    except ConfigError as e:
        raise VindexError(f"{cfg_path}: {e}") from None
    tok = root / "tokenizer.json"
    template = None
    if (root / "chat_template.jinja").exists():
        template = (root / "chat_template.jinja").read_text()
    elif (root / "tokenizer_config.json").exists():
        t = fm.read_json(root / "tokenizer_config.json", "tokenizer config").get("chat_template")
        template = t if isinstance(t, str) else None
    name = raw.get("_name_or_path") or root.name
    info = SourceInfo(
        model_name=str(name),
        kind="safetensors",
        tokenizer_json=tok.read_bytes() if tok.exists() else None,
        chat_template=template,
    )
    return config, source, info
