"""Benchmarks printed as ratios against a baseline measured in the same run (`larql bench WHAT`,
registered by larql/commands/bench.py).

Each module in BENCHES exposes `add_arguments(parser)` and `main(args) -> int`, so that the
scripts in bench/ can run the same code without the `larql` command.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

BENCHES = {
    "kernels": ("larql.benchmarks.kernels", "kernel GB/s vs read bandwidth, ggml and numpy"),
    "extract": ("larql.benchmarks.extract", "extraction weights/s and peak RSS at 26B A4B shapes"),
    "run": ("larql.benchmarks.run", "per-token decode time split by component, prefill tokens/s"),
    "server": ("larql.benchmarks.server", "expert-server round trips, throughput and end-to-end tok/s"),
    "warmup": ("larql.benchmarks.warmup", "serve --warmup GB/s vs the disk's sequential read, shard RSS"),
    "wan": ("larql.benchmarks.wan", "tok/s behind a delay proxy (--rtt MS): exact, batch and "
                                    "speculative dispatch"),
}


def synthetic_vindex(directory: str | Path, layers: int, vocab: int, prefix: str = "synth",
                     lm_head: str = "q4k") -> Path:
    """A synthetic vindex with the real 26B-A4B shapes, written once and reused between runs
    (the path names everything that changes what is measured)."""
    from ..vindex.synthetic import write_synthetic_vindex

    path = Path(directory) / f"{prefix}-L{layers}-v{vocab}-head-{lm_head}"
    if not (path / "index.json").exists():
        print(f"writing a synthetic 26B-A4B-shaped vindex ({layers} layers, vocab {vocab}, "
              f"LM head {lm_head}) to {path} ...", file=sys.stderr, flush=True)  # stdout: --json
        write_synthetic_vindex(path, num_layers=layers, quant="q4k", progress=True, vocab_size=vocab,
                               lm_head=lm_head)
    return path


def add_synthetic_vindex_arguments(p, layers: int, vocab_help: str) -> None:
    """--dir, --layers and --vocab: where and how big the synthetic vindex is."""
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "larql-bench"),
                   help="where the synthetic vindex is written (reused between runs)")
    p.add_argument("--layers", type=int, default=layers,
                   help=f"layers of the synthetic vindex (default {layers})")
    p.add_argument("--vocab", type=int, default=262144, help=vocab_help)


def add_lm_head_argument(p) -> None:
    p.add_argument("--lm-head", choices=["q4k", "q6k", "tied"], default="q4k",
                   help="LM head of the synthetic vindex: quantised (the q4k default, as the "
                        "reference writes) or tied to the f16 embeddings")
