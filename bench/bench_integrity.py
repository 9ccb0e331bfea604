"""What the expert-bytes integrity check costs a server, at the real Gemma 4 26B A4B shapes.

Writes a synthetic vindex (real expert shapes, small vocabulary) unless --vindex is given, then
for a shard owning half the experts (0-63) times, alternating the variants, median of --runs:
  prefault        the old warm-up: touch one byte per page of the owned experts (page cache cold)
  verify+prefault the new warm-up: hash the owned experts through the fd, then prefault (cold)
  verify warm     the check alone with the pages already cached (the CPU cost: sha256)
  verify cold     the check alone from a cold page cache (one layer: a lazy first-use check)
  file sha warm   the reference-compatible whole-file check ("files" basis) of the same layer
Ratios are against prefault (the warm-up a server already paid for). Run from the repo root:
    python3 bench/bench_integrity.py --layers 2 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larql.vindex import integrity, open_vindex  # noqa: E402
from larql.vindex.synthetic import write_synthetic_vindex  # noqa: E402


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vindex", type=Path, help="an existing vindex (default: write a synthetic one)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the synthetic vindex (default 2)")
    ap.add_argument("--experts", default="0-63", help="the shard's experts (default 0-63)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = None
    path = args.vindex
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="larql-bench-integrity-")
        path = write_synthetic_vindex(Path(tmp.name) / "v", num_layers=args.layers, vocab_size=4096,
                                      lm_head="tied")
    first, _, last = args.experts.partition("-")
    experts = list(range(int(first), int(last or first) + 1))
    v = open_vindex(path)
    layers = v.layers_present
    files = [v.expert_file(layer) for layer in layers]
    owned = sum(ef.entry(e).gate_up_len + ef.entry(e).down_len for ef in files for e in experts)

    def cold() -> None:
        for ef in files:
            drop_cache(ef.path)

    def prefault() -> None:
        # fresh mappings each run: pages already in this process's page tables cost nothing
        w = open_vindex(path)
        for layer in layers:
            w.expert_file(layer).prefault(experts)

    def verify_then_prefault() -> None:
        w = open_vindex(path)
        ver = integrity.Verifier(w, experts, layers)
        ver.check_all()
        ver.close()
        for layer in layers:
            w.expert_file(layer).prefault(experts)

    def verify_all() -> None:
        ver = integrity.Verifier(v, experts, layers)
        ver.check_all()
        ver.close()

    def verify_one_layer() -> None:
        ver = integrity.Verifier(v, experts, layers[:1])
        ver.check_all()
        ver.close()

    def file_sha() -> None:
        ef = files[0]
        integrity.hash_file(ef)

    times: dict[str, list[float]] = {k: [] for k in
                                     ("prefault", "verify+prefault", "verify warm", "verify cold 1 layer",
                                      "file sha warm 1 layer")}
    for _ in range(args.runs):
        cold()
        times["prefault"].append(timed(prefault))
        cold()
        times["verify+prefault"].append(timed(verify_then_prefault))
        times["verify warm"].append(timed(verify_all))
        cold()
        times["verify cold 1 layer"].append(timed(verify_one_layer))
        file_sha()
        times["file sha warm 1 layer"].append(timed(file_sha))
    med = {k: statistics.median(x) for k, x in times.items()}
    one_layer = owned / len(layers)
    rate = {
        "prefault": owned / med["prefault"],
        "verify+prefault": owned / med["verify+prefault"],
        "verify warm": owned / med["verify warm"],
        "verify cold 1 layer": one_layer / med["verify cold 1 layer"],
        "file sha warm 1 layer": files[0].size / med["file sha warm 1 layer"],
    }
    out = {
        "vindex": str(path), "layers": len(layers), "experts": args.experts, "owned_bytes": owned,
        "threads": integrity._threads(), "seconds": med,
        "MB_per_s": {k: round(r / 1e6, 1) for k, r in rate.items()},
        "warmup_ratio_verify_vs_prefault": round(med["verify+prefault"] / med["prefault"], 2),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{path}: {len(layers)} layers, experts {args.experts}, {owned / 2**20:.0f} MiB owned, "
              f"{out['threads']} hashing threads; medians of {args.runs}")
        for k, s in med.items():
            print(f"  {k:24s} {s:8.3f} s  {rate[k] / 1e6:8.0f} MB/s")
        print(f"  warm-up with the check / without: x{out['warmup_ratio_verify_vs_prefault']}")
    if tmp is not None:
        v.close()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
