"""`larql bench warmup`: how fast `larql serve --warmup` brings a shard's experts into memory,
as a ratio against the disk's sequential read rate measured in the same run.

On a synthetic vindex with the real Gemma 4 26B A4B shapes (default 6 layers, a shard owning
experts 0-63), each trial runs in a fresh child process with the layer files evicted from the
page cache first (posix_fadvise DONTNEED on those files only: nothing else on the machine is
touched):

  disk      a `cat`-style sequential read of one layer's owned bytes (read(2), readahead),
            evicted again afterwards; the same measurement `larql serve --warmup` logs. Taken
            just before every warm-up trial: each trial's ratio is against its own disk rate
  fault     the old warm-up: MADV_RANDOM, one byte touched per page, one thread
  prefetch  ExpertServer.warmup: MADV_WILLNEED + MADV_POPULATE_READ, several pieces in flight

Each warm-up child also reports the process RSS, the owned bytes, and mincore's resident
fraction of the owned and of the unowned experts, i.e. the memory a shard costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import synthetic_vindex


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "larql-bench"),
                   help="where the synthetic vindex is written (reused between runs)")
    p.add_argument("--layers", type=int, default=6, help="layers of the synthetic vindex (default 6)")
    p.add_argument("--experts", default="0-63", help="the shard's experts (default 0-63)")
    p.add_argument("--repeats", type=int, default=2, help="trials of each method, alternated (default 2)")
    p.add_argument("--threads", type=int, default=0, help="warm-up threads (default: the server's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--child", default=None, choices=["fault", "prefetch"], help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages of a just-written vindex cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(args) -> int:
    import mmap

    import numpy as np

    from ..ranges import parse as parse_range
    from ..server import ExpertServer
    from ..vindex import open_vindex

    vindex = open_vindex(args.path)
    experts = parse_range(args.experts, vindex.config.num_experts, "--experts")
    srv = ExpertServer(vindex, experts)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    if args.child == "fault":  # what warm-up did before: 4 KiB faults under MADV_RANDOM
        for layer in srv.layers:
            ef = vindex.expert_file(layer)
            ef.advise_random()
            for a, b in ef.page_ranges(experts):
                int(ef.buffer[a:b:mmap.PAGESIZE].sum(dtype=np.uint64))
        secs = time.perf_counter() - t0
        nbytes = srv.owned_bytes()
    else:
        nbytes, secs = srv.warmup(progress=False, threads=args.threads or None)
    unowned = sorted(set(vindex.experts_present) - set(experts))
    files = [vindex.expert_file(layer) for layer in srv.layers]
    print(json.dumps({
        "bytes": nbytes, "seconds": secs,
        "rss_before": rss0, "rss_after": rss_bytes(),
        "owned_resident": min(ef.resident(experts) for ef in files),
        "unowned_resident": max(ef.resident(unowned) for ef in files) if unowned else 0.0,
    }))
    return 0


def main(args) -> int:
    if args.child:
        return _child(args)
    from ..ranges import parse as parse_range
    from ..vindex import open_vindex
    from ..vindex.reader import sequential_read_rate

    path = synthetic_vindex(args.dir, args.layers, 512, prefix="warmup", lm_head="tied")
    vindex = open_vindex(path)
    experts = parse_range(args.experts, vindex.config.num_experts, "--experts")
    files = [vindex.expert_file(layer).path for layer in vindex.layers_present]
    ef0 = vindex.expert_file(vindex.layers_present[0])
    first, last = ef0.page_ranges(experts)[0]
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    trials: dict[str, list[dict]] = {"fault": [], "prefetch": []}
    for _ in range(max(1, args.repeats)):
        for method in trials:
            # Each trial is paired with a disk measurement taken just before it, from the same
            # cold cache: on a shared machine the disk's rate drifts between minutes.
            evict(files)
            disk = sequential_read_rate(files[0], first, last)
            evict(files)
            cmd = [sys.executable, "-m", "larql", "bench", "warmup", "--child", method, "--path", str(path),
                   "--experts", args.experts, "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
            t = json.loads(out.stdout.strip().splitlines()[-1])
            t["GBps"] = t["bytes"] / t["seconds"] / 1e9
            t["disk_GBps"] = disk / 1e9
            t["vs_disk"] = t["GBps"] / t["disk_GBps"]
            trials[method].append(t)
    evict(files)

    res = {"vindex": str(path), "layers": len(files), "experts": args.experts,
           "owned_bytes": trials["prefetch"][0]["bytes"], "trials": trials, "methods": {}}
    for m, ts in trials.items():
        best = max(ts, key=lambda t: t["GBps"])
        res["methods"][m] = {"GBps": best["GBps"],
                             "vs_disk_median": float(np.median([t["vs_disk"] for t in ts])),
                             "vs_disk": [round(t["vs_disk"], 3) for t in ts],
                             "disk_GBps": [round(t["disk_GBps"], 3) for t in ts],
                             "rss_after": best["rss_after"],
                             "overhead_bytes": best["rss_after"] - best["bytes"],
                             "owned_resident": min(t["owned_resident"] for t in ts),
                             "unowned_resident": max(t["unowned_resident"] for t in ts)}
    res["prefetch_vs_fault"] = res["methods"]["prefetch"]["GBps"] / res["methods"]["fault"]["GBps"]
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    gib = 2**30
    print(f"warm-up of experts {args.experts} x {len(files)} layers ({res['owned_bytes'] / gib:.2f} GiB), "
          f"cold page cache, {args.repeats} trials each, each paired with a sequential read(2) of one "
          "layer's owned bytes just before it:")
    labels = {"fault": "old: 4 KiB faults under MADV_RANDOM",
              "prefetch": "warmup(): WILLNEED + POPULATE_READ"}
    for m, label in labels.items():
        r = res["methods"][m]
        print(f"  {label:36s} best {r['GBps']:5.2f} GB/s; warm-up/disk median {r['vs_disk_median']:.2f} "
              f"(trials {', '.join(f'{v:.2f}' for v in r['vs_disk'])}; disk GB/s "
              f"{', '.join(f'{v:.2f}' for v in r['disk_GBps'])})")
        print(f"  {'':36s} RSS {r['rss_after'] / gib:.2f} GiB "
              f"(owned + {r['overhead_bytes'] / 2**20:.0f} MiB); "
              f"resident owned {r['owned_resident']:.3f}, unowned {r['unowned_resident']:.3f}")
    print(f"  prefetch / fault (best rates) = {res['prefetch_vs_fault']:.1f}x")
    return 0
