"""`larql bench extract`: extraction throughput and peak memory at the real 26B A4B shapes.

Writes a synthetic bf16 safetensors checkpoint with the real tensor shapes (hidden 2816, 128
experts x 704, vocab 262144; `--layers` of them), then extracts it in a child process (so its
peak RSS is its own) and reports, as ratios against baselines measured in the same run:
  - extraction time vs one sequential read of the checkpoint (I/O floor),
  - peak RSS vs the largest single tensor (the streaming claim: a small multiple of it),
  - multi-threaded vs single-threaded quantisation,
and projects the time for the full 25.2 B-parameter conversion from the measured weights/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL_PARAMS = 25.2e9


def checkpoint_shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    from ..vindex.random_model import tensor_shapes
    from ..vindex.synthetic import synthetic_config

    return tensor_shapes(synthetic_config(layers, vocab_size=vocab))


def write_bf16_checkpoint(root: Path, layers: int, vocab: int, seed: int = 0) -> tuple[int, int]:
    """A Gemma4ForCausalLM-shaped safetensors checkpoint of random bf16 (written in chunks).
    Returns (parameters, largest tensor bytes)."""
    from ..vindex.synthetic import synthetic_config

    shapes = checkpoint_shapes(layers, vocab)
    root.mkdir(parents=True, exist_ok=True)
    header, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(seed)
    with open(root / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            norm = name.endswith(("norm.weight", "scale", "layer_scalar"))
            for i in range(0, n, 1 << 24):
                m = min(1 << 24, n - i)
                if norm:
                    x = 1.0 + 0.1 * rng.standard_normal(m, dtype=np.float32)
                else:
                    x = 0.02 * rng.standard_normal(m, dtype=np.float32)
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    c = synthetic_config(layers, vocab_size=vocab)
    cfg = {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "dtype": "bfloat16",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "global_head_dim": c.global_head_dim,
        "num_global_key_value_heads": c.num_global_kv_heads,
        "attention_k_eq_v": True,
        "sliding_window": c.sliding_window,
        "layer_types": c.layer_types,
        "vocab_size": vocab,
        "enable_moe_block": True,
        "num_experts": c.num_experts,
        "top_k_experts": c.top_k,
        "moe_intermediate_size": c.moe_intermediate_size,
        "hidden_size_per_layer_input": 0,
        "final_logit_softcapping": 30.0,
        "rms_norm_eps": 1e-6,
        "eos_token_id": [1, 106],
        "bos_token_id": 2,
    }
    (root / "config.json").write_text(json.dumps(cfg))
    params = sum(int(np.prod(s)) for s in shapes.values())
    largest = max(int(np.prod(s)) for s in shapes.values()) * 2
    return params, largest


def _child(src: str, out: str, quant: str, threads: int) -> None:
    from ..vindex.extract import extract

    t = time.perf_counter()
    extract(src, out, quant=quant, progress=False, threads=threads, overwrite=True)
    dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": dt, "peak_rss": rss}))


def run_extract(src: Path, out: Path, quant: str, threads: int) -> dict:
    cmd = [
        sys.executable,
        "-c",
        "import sys; from larql.benchmarks.extract import _child; "
        "_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))",
        str(src),
        str(out),
        quant,
        str(threads),
    ]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def read_baseline(path: Path) -> float:
    """Seconds for one sequential read of the checkpoint (drop nothing: same cache state as extract)."""
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t


def quantiser_baseline(threads: int) -> float:
    """Weights/s of the C Q4_K quantiser alone on one expert's gate_up ([1408, 2816])."""
    from .. import kernels

    prev = kernels.num_threads()
    kernels.set_num_threads(threads)
    try:
        x = 0.02 * np.random.default_rng(0).standard_normal((1408, 2816), dtype=np.float32)
        kernels.quantize(x, kernels.Q4_K)
        t = time.perf_counter()
        for _ in range(3):
            kernels.quantize(x, kernels.Q4_K)
        return 3 * x.size / (time.perf_counter() - t)
    finally:
        kernels.set_num_threads(prev)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=1, help="decoder layers in the synthetic checkpoint (1-2)")
    p.add_argument("--vocab", type=int, default=262144, help="vocabulary size (262144 = real)")
    p.add_argument("--quant", default="q4k", choices=["q4k", "f16", "f32"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-single-thread", action="store_true", help="skip the 1-thread comparison run")
    p.add_argument("--workdir", default=None, help="where to write the checkpoint (default: a temp dir)")


def main(args) -> int:
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="larql-bench-extract-"))
    try:
        src, out = work / "ckpt", work / "out.vindex"
        t = time.perf_counter()
        params, largest = write_bf16_checkpoint(src, args.layers, args.vocab)
        print(
            f"synthetic bf16 checkpoint: {args.layers} layer(s), {params / 1e9:.2f} B params, "
            f"{(src / 'model.safetensors').stat().st_size / 2**30:.2f} GiB, largest tensor "
            f"{largest / 2**20:.0f} MiB (written in {time.perf_counter() - t:.1f} s)"
        )
        base = read_baseline(src / "model.safetensors")
        qbase = quantiser_baseline(args.threads) if args.quant == "q4k" else None
        res = run_extract(src, out, args.quant, args.threads)
        wps = params / res["seconds"]
        print(
            f"extract --quant {args.quant} ({args.threads} threads): {res['seconds']:.1f} s, "
            f"{wps / 1e6:.0f} M weights/s, peak RSS {res['peak_rss'] / 2**30:.2f} GiB"
        )
        print(
            f"  vs sequential read of the checkpoint ({base:.2f} s): "
            f"{res['seconds'] / base:.1f}x the I/O floor"
        )
        print(f"  peak RSS / largest tensor: {res['peak_rss'] / largest:.2f}x")
        if qbase:
            print(
                f"  C Q4_K quantiser alone: {qbase / 1e6:.0f} M weights/s -> extraction runs at "
                f"{wps / qbase:.2f}x the quantiser's rate (embeddings are converted, not quantised)"
            )
        if args.threads > 1 and not args.no_single_thread:
            one = run_extract(src, out, args.quant, 1)
            print(
                f"  1 thread: {one['seconds']:.1f} s -> {args.threads} threads are "
                f"{one['seconds'] / res['seconds']:.2f}x faster"
            )
        print(
            f"projected full 26B A4B ({FULL_PARAMS / 1e9:.1f} B params) at this rate: "
            f"{FULL_PARAMS / wps / 60:.1f} min"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
