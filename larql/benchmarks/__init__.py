"""`larql bench WHAT`: benchmarks printed as ratios against a baseline measured in the same run.

Each module in BENCHES exposes `add_arguments(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

BENCHES = {
    "kernels": ("larql.benchmarks.kernels", "kernel GB/s vs read bandwidth, ggml and numpy"),
    "extract": ("larql.benchmarks.extract", "extraction weights/s and peak RSS at 26B A4B shapes"),
    "run": ("larql.benchmarks.run", "per-token decode time split by component, prefill tokens/s"),
    "server": ("larql.benchmarks.server", "expert-server round trips, throughput and end-to-end tok/s"),
    "warmup": ("larql.benchmarks.warmup", "serve --warmup GB/s vs the disk's sequential read, shard RSS"),
}


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark and print ratios against a baseline")
    bench_sub = p.add_subparsers(dest="bench", metavar="WHAT")
    for name, (module_name, help_text) in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        bp = bench_sub.add_parser(name, help=help_text)
        module.add_arguments(bp)
        bp.set_defaults(func=module.main)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def synthetic_vindex(directory: str | Path, layers: int, vocab: int, prefix: str = "synth",
                     lm_head: str = "q4k") -> Path:
    """A synthetic vindex with the real 26B-A4B shapes, written once and reused between runs
    (the path names everything that changes what is measured)."""
    from ..vindex.synthetic import write_synthetic_vindex

    path = Path(directory) / f"{prefix}-L{layers}-v{vocab}-head-{lm_head}"
    if not (path / "index.json").exists():
        print(f"writing a synthetic 26B-A4B-shaped vindex ({layers} layers, vocab {vocab}, "
              f"LM head {lm_head}) to {path} ...", flush=True)
        write_synthetic_vindex(path, num_layers=layers, quant="q4k", progress=True, vocab_size=vocab,
                               lm_head=lm_head)
    return path


def add_lm_head_argument(p) -> None:
    p.add_argument("--lm-head", choices=["q4k", "q6k", "tied"], default="q4k",
                   help="LM head of the synthetic vindex: quantised (the q4k default, as the "
                        "reference writes) or tied to the f16 embeddings")
