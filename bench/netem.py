#!/usr/bin/env python3
"""Expert servers behind a 45 ms round trip: exact vs batch dispatch tok/s (needs root).

Puts two expert servers in a network namespace joined to this one by a veth pair
(10.77.0.1 <-> 10.77.0.2, private addresses on this machine only) and adds 22.5 ms of delay
each way with `tc qdisc netem`. Kernels built without sch_netem (e.g. Firecracker guests with
no modules) get the same delay from bench/delay_proxy.py, a user-space forwarder in this
namespace; the report says which was used.

The model has the real layer count (30) and top-8 of 128 experts but small matrices, so the
network, not the CPU, sets the pace, as it does for the seed's public-internet figure
(~0.7 tok/s = 30 serial round trips of ~45 ms per token).

    sudo python3 bench/netem.py [--rtt-ms 45] [--tokens 8] [--real-dims]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

NS = "larql-netem"
HOST_IF, NS_IF = "lqnet0", "lqnet1"
HOST_IP, NS_IP = "10.77.0.1", "10.77.0.2"
SEED_TOK_S = 0.7


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def setup(one_way_ms: float) -> str:
    teardown()
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
    sh("ip", "link", "set", NS_IF, "netns", NS)
    sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
    sh("ip", "link", "set", HOST_IF, "up")
    sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
    sh("ip", "netns", "exec", NS, "ip", "link", "set", NS_IF, "up")
    sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
    delay = f"{one_way_ms * 1000:.0f}us"
    r1 = sh("tc", "qdisc", "add", "dev", HOST_IF, "root", "netem", "delay", delay, check=False)
    r2 = sh("ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", NS_IF, "root", "netem", "delay", delay,
            check=False)
    if r1.returncode == 0 and r2.returncode == 0:
        return "tc netem"
    sh("tc", "qdisc", "del", "dev", HOST_IF, "root", check=False)
    return f"user-space delay proxy (tc netem unavailable: {(r1.stderr or r2.stderr).strip()})"


def teardown() -> None:
    sh("ip", "link", "del", HOST_IF, check=False)
    sh("ip", "netns", "del", NS, check=False)


def build_vindex(out: Path, real_dims: bool) -> Path:
    if real_dims:
        from larql.vindex.synthetic import write_synthetic_vindex

        return write_synthetic_vindex(out, num_layers=30, quant="q4k", progress=True, vocab_size=4096)
    from larql.demo import build_demo_vindex, demo_config

    cfg = demo_config(num_layers=30, hidden=256, num_experts=128, top_k=8, moe_intermediate=64)
    return build_demo_vindex(out, quant="q4k", config=cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt-ms", type=float, default=45.0)
    ap.add_argument("--tokens", type=int, default=8, help="decode tokens per mode")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--real-dims", action="store_true",
                    help="synthetic 26B-A4B matrices (12 GiB of experts) instead of small ones")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("netem.py needs root (network namespaces, veth, tc)", file=sys.stderr)
        return 2

    from larql import models
    from larql.client import connect_shards
    from larql.processes import child_env, larql_command
    from larql.vindex import open_vindex

    tmp = Path(tempfile.mkdtemp(prefix="larql-netem-"))
    procs: list[subprocess.Popen] = []
    try:
        print("building the model ...", flush=True)
        path = build_vindex(tmp / "m.vindex", args.real_dims)
        vindex = open_vindex(path)
        cfg = vindex.config
        how = setup(args.rtt_ms / 2)
        print(f"network: {HOST_IP} <-> {NS_IP} over veth, {args.rtt_ms:g} ms RTT via {how}")
        env = child_env()
        half = cfg.num_experts // 2
        shards = []
        for i, (a, b) in enumerate([(0, half - 1), (half, cfg.num_experts - 1)]):
            port = 9100 + i
            log = open(tmp / f"server-{i}.log", "wb")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", NS, *larql_command("serve", str(path)),
                 "--experts", f"{a}-{b}", "--host", NS_IP, "--port", str(port), "--warmup", "--threads", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env))
            if how == "tc netem":
                shards.append(f"{a}-{b}={NS_IP}:{port}")
            else:
                pport = 9200 + i
                procs.append(subprocess.Popen(
                    [sys.executable, str(ROOT / "bench" / "delay_proxy.py"), "--listen", f"{HOST_IP}:{pport}",
                     "--target", f"{NS_IP}:{port}", "--delay-ms", str(args.rtt_ms / 2)], env=env))
                shards.append(f"{a}-{b}={HOST_IP}:{pport}")
        spec = ",".join(shards)
        deadline = time.monotonic() + 120
        while True:   # servers listen only after warm-up
            try:
                rx = connect_shards(spec, vindex, timeout=60, connect_timeout=2)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        try:
            t0 = time.perf_counter()
            rtts = []
            for _ in range(5):
                t0 = time.perf_counter()
                rx.ping()
                rtts.append((time.perf_counter() - t0) * 1e3)
            print(f"measured protocol round trip: {np.median(rtts):.1f} ms")
            rng = np.random.default_rng(0)
            prompt = [cfg.bos_token_id, *rng.integers(3, cfg.vocab_size, args.prompt_tokens - 1).tolist()]
            results = {}
            for mode in ("exact", "batch"):
                model = models.load(vindex, experts=rx, dispatch=mode)
                cache = model.new_cache()
                before = rx.round_trips
                t0 = time.perf_counter()
                tok = int(np.argmax(model.forward(prompt, cache)))
                prefill = time.perf_counter() - t0
                prefill_trips = rx.round_trips - before
                toks = []
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    tok = int(np.argmax(model.forward([tok], cache)))
                    toks.append(tok)
                results[mode] = (args.tokens / (time.perf_counter() - t0), prefill, prefill_trips, toks)
            local = models.load(vindex)   # the client's own compute, no network: the ceiling
            cache = local.new_cache()
            tok = int(np.argmax(local.forward(prompt, cache)))
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                tok = int(np.argmax(local.forward([tok], cache)))
            local_tps = args.tokens / (time.perf_counter() - t0)
        finally:
            rx.close()
        print(f"\nmodel: {cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, hidden "
              f"{cfg.hidden_size}; two shards; {args.tokens} decode tokens per mode")
        for mode, (tps, prefill, trips, _) in results.items():
            print(f"{mode:>5} dispatch: {tps:6.2f} tok/s = {tps / SEED_TOK_S:5.1f}x the seed's "
                  f"~{SEED_TOK_S} tok/s; prefill of {args.prompt_tokens} tokens {prefill * 1e3:6.0f} ms "
                  f"in {trips} round trips")
        print(f"(in-process experts, no network: {local_tps:.2f} tok/s; "
              "batch dispatch runs the layers twice)")
        agree = np.mean(np.array(results["batch"][3]) == np.array(results["exact"][3]))
        print(f"batch dispatch greedy tokens equal to exact dispatch: {agree:.0%} (batch is approximate)")
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        teardown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
