"""`larql extract`: a checkpoint (HF safetensors directory or GGUF) -> a vindex."""

from __future__ import annotations

import os
from pathlib import Path

from .sources import open_source
from .writer import write_vindex


def extract(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quant: str = "q4k",
    progress: bool = True,
    lyrw_version: int = 2,
    threads: int | None = None,
    overwrite: bool = False,
    lm_head: str | None = None,
) -> Path:
    """`lm_head`: "tied", "q4k" or "q6k"; None = q4k for --quant q4k (as the reference), else tied."""
    config, source, info = open_source(src)
    return write_vindex(
        out,
        config,
        source,
        quant=quant,
        tokenizer_json=info.tokenizer_json,
        chat_template=info.chat_template,
        progress=progress,
        lyrw_version=lyrw_version,
        model_name=info.model_name,
        threads=threads,
        overwrite=overwrite,
        lm_head=lm_head,
        source_info={"kind": info.kind, "path": str(Path(src).resolve()), **info.extra},
    )
