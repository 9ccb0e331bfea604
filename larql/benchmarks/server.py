"""`larql bench server`: what the network costs, as ratios against in-process experts.

On a synthetic vindex with the real Gemma 4 26B A4B shapes (hidden 2816, 128 experts of
704, top-8, Q4_K), measured in this one invocation:

  rtt         one layer of top-8 experts for one token: in process vs through a loopback
              `larql serve` process (p50/p99, overhead in us) and the bare protocol ping.
  throughput  requests/s with many concurrent connections vs one connection at a time, and
              how many requests the server fused into each kernel call.
  e2e         decode tok/s of the whole model with two loopback shards vs in-process experts
              (exact and batch dispatch) and expert round trips per prompt (prefill).

Servers are separate processes (their own GIL), started and stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from . import add_lm_head_argument, add_synthetic_vindex_arguments, synthetic_vindex


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_lm_head_argument(p)
    p.add_argument("--what", default="all", choices=["all", "rtt", "throughput", "e2e"],
                   help="rtt: one layer's round trip vs in process; throughput: requests/s with many "
                        "connections; e2e: decode tok/s with two shards (default all)")
    add_synthetic_vindex_arguments(p, 2, "vocabulary of the synthetic vindex (the LM head is part of e2e "
                                         "decode time)")
    p.add_argument("--iters", type=int, default=300, help="round trips per rtt measurement")
    p.add_argument("--threads", type=int, default=0,
                   help="kernel threads, in process and in each server (default: all cores)")
    p.add_argument("--server-workers", type=int, default=2, help="`larql serve --workers` (default 2)")
    p.add_argument("--conns", type=int, default=16, help="concurrent connections for throughput")
    p.add_argument("--seconds", type=float, default=4.0, help="duration of each throughput run")
    p.add_argument("--tokens", type=int, default=16, help="decode tokens per e2e run")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for e2e prefill")


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q))


SERVER_ARGS: tuple[str, ...] = ()


def start_servers(path: Path, ranges: list[tuple[int, int]], threads: int, logdir: Path):
    from ..processes import ServerProcess, free_port

    servers = [ServerProcess(path, f"{a}-{b}", free_port(), logdir / f"bench-server-{a}-{b}.log",
                             threads=threads, warmup=True, extra=SERVER_ARGS) for a, b in ranges]
    for s in servers:
        s.wait_ready(300)
    spec = ",".join(f"{a}-{b}=127.0.0.1:{s.port}" for (a, b), s in zip(ranges, servers, strict=True))
    return servers, spec


def random_work(cfg, n: int, T: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h = rng.standard_normal((T, cfg.hidden_size)).astype(np.float32)
        ids = np.stack([rng.choice(cfg.num_experts, cfg.top_k, replace=False)
                        for _ in range(T)]).astype(np.int32)
        w = rng.random((T, cfg.top_k)).astype(np.float32)
        w /= w.sum(axis=1, keepdims=True)
        out.append((i % cfg.num_layers, h, ids, w))
    return out


def interleaved(fns: list, works, iters: int) -> list[list[float]]:
    """Time several implementations on the same inputs, alternating call by call, so a noisy
    shared machine slows them all alike; returns microseconds per call for each."""
    for wk in works[:8]:
        for fn in fns:
            fn(*wk)
    out: list[list[float]] = [[] for _ in fns]
    for i in range(iters):
        wk = works[i % len(works)]
        order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
        for j in order:
            t0 = time.perf_counter()
            fns[j](*wk)
            out[j].append((time.perf_counter() - t0) * 1e6)
    return out


# A bare echo process: the machine's own floor for one loopback round trip between two Python
# processes, measured beside ours so the overhead can be read against it.
_ECHO = """
import socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (d := c.recv(1 << 16)):
    c.sendall(d)
"""


def raw_echo():
    """(ping function, stop function) for a 64-byte round trip to a bare Python echo process."""
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * 64

    def ping(*_):
        sock.sendall(payload)
        got = 0
        while got < len(payload):
            got += len(sock.recv(1 << 16))

    def stop():
        sock.close()
        proc.wait(5)

    return ping, stop


def bench_rtt(args, path: Path, vindex) -> None:
    from ..client import connect_shards
    from ..experts import LocalExperts

    cfg = vindex.config
    works = random_work(cfg, 64)
    local = LocalExperts(vindex)
    for layer in range(cfg.num_layers):   # page the experts in, as the server's --warmup does
        vindex.expert_file(layer).prefault()
    servers, spec = start_servers(path, [(0, cfg.num_experts - 1)], args.threads, path.parent)
    try:
        rx = connect_shards(spec, vindex)
        try:
            def ping(*_):
                rx.ping()

            echo, stop_echo = raw_echo()
            try:
                t_local, t_remote, t_ping, t_echo = interleaved(
                    [local.forward, rx.forward, ping, echo], works, args.iters
                )
            finally:
                stop_echo()
            stats = rx.stats()[0]
        finally:
            rx.close()
    finally:
        for s in servers:
            s.stop()
    lp50, rp50 = pct(t_local, 50), pct(t_remote, 50)
    print("\n== one layer, top-8 experts, 1 token (hidden 2816, 704-wide Q4_K experts), interleaved ==")
    print(f"{'':26}{'p50 us':>10}{'p99 us':>10}")
    print(f"{'in process (baseline)':26}{lp50:10.0f}{pct(t_local, 99):10.0f}")
    print(f"{'loopback larql serve':26}{rp50:10.0f}{pct(t_remote, 99):10.0f}")
    print(f"{'protocol ping (health)':26}{pct(t_ping, 50):10.0f}{pct(t_ping, 99):10.0f}")
    print(f"{'bare Python echo (floor)':26}{pct(t_echo, 50):10.0f}{pct(t_echo, 99):10.0f}")
    print(f"overhead at p50: {rp50 - lp50:.0f} us (target < 100 us) = {(rp50 - lp50) / pct(t_echo, 50):.1f}x "
          f"this machine's bare loopback round trip; remote/in-process = {rp50 / lp50:.2f}x")
    print(f"server side: p50 {stats['p50_us']:.0f} us per request, of which compute (norm + kernel) "
          f"p50 {stats['compute_p50_us']:.0f} us")


def bench_throughput(args, path: Path, vindex) -> None:
    from ..client import AsyncExpertClient, ModelIdentity
    from ..shardmap import parse_shards
    from ..transport import new_event_loop

    cfg = vindex.config
    works = random_work(cfg, 256, seed=1)
    servers, spec = start_servers(path, [(0, cfg.num_experts - 1)], args.threads, path.parent)

    async def run(conns: int, seconds: float) -> tuple[int, dict]:
        identity = ModelIdentity.from_vindex(vindex)
        clients = [await AsyncExpertClient(parse_shards(spec, cfg.num_experts), identity).connect()
                   for _ in range(conns)]
        before = (await clients[0].stats())[0]
        done = 0
        stop = time.perf_counter() + seconds

        async def loop(c, k):
            nonlocal done
            i = k
            while time.perf_counter() < stop:
                await c.forward(*works[i % len(works)])
                done += 1
                i += conns

        await asyncio.gather(*(loop(c, k) for k, c in enumerate(clients)))
        after = (await clients[0].stats())[0]
        for c in clients:
            await c.close()
        fused = {k: after[k] - before[k] for k in ("kernel_calls", "expert_requests")}
        return done, fused

    loop = new_event_loop()
    try:
        n1, f1 = loop.run_until_complete(run(1, args.seconds))
        nk, fk = loop.run_until_complete(run(args.conns, args.seconds))
    finally:
        loop.close()
        for s in servers:
            s.stop()
    r1, rk = n1 / args.seconds, nk / args.seconds
    print(f"\n== throughput: one-token top-8 layer requests, {args.seconds:g} s each ==")
    print(f"1 connection, serial (baseline): {r1:8.0f} req/s  "
          f"({f1['expert_requests'] / max(1, f1['kernel_calls']):.2f} requests per kernel call)")
    print(f"{args.conns} concurrent connections:    {rk:8.0f} req/s  "
          f"({fk['expert_requests'] / max(1, fk['kernel_calls']):.2f} requests per kernel call)")
    print(f"ratio: {rk / r1:.2f}x")


def bench_e2e(args, path: Path, vindex) -> None:
    from .. import models
    from ..client import connect_shards

    cfg = vindex.config
    rng = np.random.default_rng(3)
    prompt = [cfg.bos_token_id, *rng.integers(3, cfg.vocab_size, args.prompt_tokens - 1).tolist()]
    for layer in range(cfg.num_layers):
        vindex.expert_file(layer).prefault()
    half = cfg.num_experts // 2
    servers, spec = start_servers(path, [(0, half - 1), (half, cfg.num_experts - 1)], args.threads,
                                  path.parent)
    try:
        rx = connect_shards(spec, vindex)
        try:
            runs = {"local": models.load(vindex), "exact": models.load(vindex, experts=rx),
                    "batch": models.load(vindex, experts=rx, dispatch="batch")}
            caches = {k: m.new_cache() for k, m in runs.items()}
            prefill, trips, tok = {}, {}, {}
            for k, m in runs.items():
                m.forward(prompt, m.new_cache())   # untimed: first touch of pages, tables
                before = rx.round_trips
                t0 = time.perf_counter()
                logits = m.forward(prompt, caches[k])
                prefill[k] = time.perf_counter() - t0
                trips[k] = rx.round_trips - before
                tok[k] = int(np.argmax(logits))
                tok[k] = int(np.argmax(m.forward([tok[k]], caches[k])))   # untimed first step
            spent = dict.fromkeys(runs, 0.0)
            batch_trips = 0
            for i in range(args.tokens):   # interleaved token by token: shared noise
                keys = list(runs) if i % 2 == 0 else list(reversed(runs))
                for k in keys:
                    before = rx.round_trips
                    t0 = time.perf_counter()
                    tok[k] = int(np.argmax(runs[k].forward([tok[k]], caches[k])))
                    spent[k] += time.perf_counter() - t0
                    if k == "batch":
                        batch_trips += rx.round_trips - before
        finally:
            rx.close()
    finally:
        for s in servers:
            s.stop()
    tps = {k: args.tokens / v for k, v in spent.items()}
    print(f"\n== end to end: {cfg.num_layers} layers of 26B-A4B shape, vocab {cfg.vocab_size}, "
          f"{args.tokens} decode tokens, interleaved ==")
    print(f"in-process experts (baseline):      {tps['local']:7.2f} tok/s   prefill of {args.prompt_tokens} "
          f"tokens {prefill['local'] * 1e3:7.0f} ms")
    print(f"2 loopback shards, exact dispatch:  {tps['exact']:7.2f} tok/s   prefill "
          f"{prefill['exact'] * 1e3:7.0f} ms  -> {tps['exact'] / tps['local']:.0%} of in-process "
          f"(target >= 85%)")
    print(f"2 loopback shards, batch dispatch:  {tps['batch']:7.2f} tok/s   "
          f"-> {tps['batch'] / tps['local']:.0%} of in-process")
    print(f"prefill round trips for a {args.prompt_tokens}-token prompt: {trips['exact']} "
          f"= {trips['exact'] / (2 * cfg.num_layers):.2f} per shard per layer (target 1); "
          f"batch dispatch: {batch_trips / args.tokens:.1f} round trips per decode token")


def main(args: argparse.Namespace) -> int:
    from .. import kernels
    from ..vindex import open_vindex

    global SERVER_ARGS
    SERVER_ARGS = ("--workers", str(args.server_workers))
    if args.threads:
        kernels.set_num_threads(args.threads)
    path = synthetic_vindex(args.dir, args.layers, args.vocab, "synth", args.lm_head)
    vindex = open_vindex(path)
    print(f"synthetic vindex {path}: kernels {kernels.isa()} x{kernels.num_threads()} threads")
    if args.what in ("all", "rtt"):
        bench_rtt(args, path, vindex)
    if args.what in ("all", "throughput"):
        bench_throughput(args, path, vindex)
    if args.what in ("all", "e2e"):
        bench_e2e(args, path, vindex)
    return 0
