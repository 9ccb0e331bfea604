"""`larql bench server`: what the network costs, as ratios against in-process experts.

On a synthetic vindex with the real Gemma 4 26B A4B shapes (hidden 2816, 128 experts of
704, top-8, Q4_K), measured in this one invocation:

  rtt         one layer of top-8 experts for one token: in process vs one and two loopback
              `larql serve` shards (p50/p99), beside the protocol ping and a bare Python echo:
              the per-layer overhead over in-process compute and its ratio to the echo; TLS's
              cost on its own (the echo over TLS; larql serve over TLS when it has --tls-cert).
  throughput  requests/s with many concurrent connections vs one connection at a time, and
              how many requests the server fused into each kernel call.
  e2e         decode tok/s of the whole model with two loopback shards vs in-process experts
              (exact and batch dispatch), expert round trips per prompt (prefill), and the
              same projected to 30 layers (the LM head once + 30 x the measured per-layer time).

Servers are separate processes (their own GIL), started and stopped here. `--json` prints one
object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from .. import protocol as P
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
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


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
# processes, measured beside ours so the overhead can be read against it. With a certificate
# and key as arguments it speaks TLS: the same echo's TLS cost, alone.
_ECHO = """
import socket, ssl, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if len(sys.argv) > 2:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    c = ctx.wrap_socket(c, server_side=True)
while (d := c.recv(1 << 16)):
    c.sendall(d)
"""


def raw_echo(tls: tuple[Path, Path] | None = None):
    """(ping function, stop function) for a 64-byte round trip to a bare Python echo process,
    over TLS when `tls` = (certificate, key) of 127.0.0.1 is given."""
    import socket
    import ssl
    import subprocess
    import sys

    extra = [str(tls[0]), str(tls[1])] if tls else []
    proc = subprocess.Popen([sys.executable, "-c", _ECHO, *extra], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = ssl.create_default_context(cafile=str(tls[0]))
        sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
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


def self_signed(folder: Path) -> tuple[Path, Path] | None:
    """A throw-away certificate for 127.0.0.1 (None without the `cryptography` package)."""
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "larql bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "bench-cert.pem", folder / "bench-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def serve_speaks_tls() -> bool:
    """Whether `larql serve` has --tls-cert (the server side of issue 8)."""
    from ..commands import serve

    return _has_option(serve, "--tls-cert")


def _has_option(module, option: str) -> bool:
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    module.add_parser(sub)
    return any(option in a.option_strings for p in sub.choices.values() for a in p._actions)


def bench_rtt(args, path: Path, vindex) -> dict:
    """One layer, one token: in process vs one shard vs two shards, beside the protocol ping,
    the bare echo and (when available) the same over TLS."""
    from ..client import connect_shards
    from ..experts import LocalExperts

    cfg = vindex.config
    works = random_work(cfg, 64)
    local = LocalExperts(vindex)
    for layer in range(cfg.num_layers):   # page the experts in, as the server's --warmup does
        vindex.expert_file(layer).prefault()
    half = cfg.num_experts // 2
    tls = self_signed(path.parent / "bench-tls")
    tls_serve = tls is not None and serve_speaks_tls()
    one, spec1 = start_servers(path, [(0, cfg.num_experts - 1)], args.threads, path.parent)
    two, spec2 = start_servers(path, [(0, half - 1), (half, cfg.num_experts - 1)], args.threads, path.parent)
    tls_servers: list = []
    clients: list = []
    stops: list = []
    try:
        rx1 = connect_shards(spec1, vindex, api_key="")
        clients.append(rx1)
        rx2 = connect_shards(spec2, vindex, api_key="")
        clients.append(rx2)
        enc = rx2.client.options.encoding       # the default ("auto"): q8k for a Q4_K vindex
        other = "f32" if enc != "f32" else "q8k"
        rx2o = connect_shards(spec2, vindex, api_key="", encoding=other)
        clients.append(rx2o)
        names = ["in process", "1 shard", "2 shards", f"2 shards {other}", "ping", "echo"]
        fns = [local.forward, rx1.forward, rx2.forward, rx2o.forward, lambda *_: rx1.ping(), None]
        fns[5], stop = raw_echo()
        stops.append(stop)
        if tls is not None:
            echo_tls, stop = raw_echo(tls)
            stops.append(stop)
            names.append("echo TLS")
            fns.append(echo_tls)
        if tls_serve:
            global SERVER_ARGS
            plain_args = SERVER_ARGS
            SERVER_ARGS = (*plain_args, "--tls-cert", str(tls[0]), "--tls-key", str(tls[1]))
            try:
                tls_servers, spec_tls = start_servers(path, [(0, cfg.num_experts - 1)], args.threads,
                                                      path.parent)
            finally:
                SERVER_ARGS = plain_args
            rxt = connect_shards(spec_tls.replace("=", "=tls://"), vindex, api_key="", tls_ca=tls[0])
            clients.append(rxt)
            names.append("1 shard TLS")
            fns.append(rxt.forward)
        times = dict(zip(names, interleaved(fns, works, args.iters), strict=True))
        server = rx1.stats()[0]
        # each half's compute on the shared cores: why 2 co-located shards cost more than 1
        halves = [st["compute_p50_us"] for st in rx2.stats()]
        cpu = client_cpu(rx1, spec1, vindex, works, args.iters)
    finally:
        for c in clients:
            c.close()
        for stop in stops:
            stop()
        for s in one + two + tls_servers:
            s.stop()
    p50 = {k: pct(v, 50) for k, v in times.items()}
    p99 = {k: pct(v, 99) for k, v in times.items()}
    echo = p50["echo"]
    over1 = p50["1 shard"] - p50["in process"]
    over2 = p50["2 shards"] - p50["in process"]
    out = {"p50_us": p50, "p99_us": p99, "overhead_1shard_us": over1, "overhead_2shards_us": over2,
           "overhead_over_echo": over1 / echo, "overhead_2shards_over_echo": over2 / echo,
           "ping_over_echo": p50["ping"] / echo, "server_p50_us": server["p50_us"],
           "server_compute_p50_us": server["compute_p50_us"], "server_compute_p50_us_2shards": halves}
    out["client_cpu_us"] = cpu
    out["encoding"] = enc
    out[f"overhead_2shards_{other}_us"] = p50[f"2 shards {other}"] - p50["in process"]
    # what one token's input costs on the wire per shard and layer, and per 30-layer token
    # through 2 shards: the bytes that bound a thin uplink, whatever the loopback says
    H = cfg.hidden_size
    out["request_x_bytes"] = {e: P.x_bytes(e, 1, H) for e in ("f32", "q8k")}
    out["upload_kb_per_30_layer_token_2_shards"] = {e: 2 * 30 * (P.x_bytes(e, 1, H) + 8 * cfg.top_k) / 1e3
                                                    for e in ("f32", "q8k")}
    if "echo TLS" in p50:
        out["tls_echo_cost_us"] = p50["echo TLS"] - echo
    if "1 shard TLS" in p50:
        out["tls_layer_cost_us"] = p50["1 shard TLS"] - p50["1 shard"]
    if args.json:
        return out
    print(f"\n== one layer, top-{cfg.top_k} experts, 1 token (hidden {cfg.hidden_size}), interleaved "
          f"{args.iters} times ==")
    print(f"{'':30}{'p50 us':>10}{'p99 us':>10}")
    labels = {"in process": "in process (baseline)", "1 shard": "1 loopback shard",
              "2 shards": "2 loopback shards", "ping": "protocol ping (health)",
              "echo": "bare Python echo (floor)", "echo TLS": "bare echo over TLS",
              "1 shard TLS": "1 loopback shard over TLS", f"2 shards {other}": f"2 loopback shards, {other}"}
    for k in names:
        print(f"{labels[k]:30}{p50[k]:10.0f}{p99[k]:10.0f}")
    print(f"per-layer overhead over in-process compute, p50: 1 shard {over1:.0f} us = {over1 / echo:.1f}x "
          f"the bare echo (target <= 3x); 2 shards {over2:.0f} us = {over2 / echo:.1f}x; ping = "
          f"{p50['ping'] / echo:.1f}x the echo")
    up = out["upload_kb_per_30_layer_token_2_shards"]
    print(f"input encoding {enc} (default; {other} beside it): x is {out['request_x_bytes'][enc]} bytes per "
          f"shard and layer; a 30-layer token through 2 shards uploads {up[enc]:.0f} KB ({other}: "
          f"{up[other]:.0f} KB)")
    print(f"server side: p50 {server['p50_us']:.0f} us per request, of which compute p50 "
          f"{server['compute_p50_us']:.0f} us; with 2 shards on these cores each computes its half "
          f"of the experts in p50 {' and '.join(f'{h:.0f}' for h in halves)} us")
    print(f"client CPU per layer call (thread time, p50; independent of the machine's load): blocking "
          f"decode path {cpu['blocking']:.0f} us, asyncio client on a private loop {cpu['asyncio']:.0f} us "
          f"(the old decode path's shape) -> {cpu['asyncio'] / cpu['blocking']:.1f}x")
    if "tls_echo_cost_us" in out:
        served = (f", {out['tls_layer_cost_us']:.0f} us per layer through larql serve"
                  if "tls_layer_cost_us" in out
                  else " (larql serve here has no --tls-cert: the server's TLS row is skipped)")
        print(f"TLS costs {out['tls_echo_cost_us']:.0f} us per round trip on the bare echo{served}")
    else:
        print("TLS: skipped (needs the `cryptography` package for a throw-away certificate)")
    return out


def client_cpu(rx, spec: str, vindex, works, iters: int) -> dict:
    """CPU time the client's own thread spends per one-shard layer call (waiting excluded):
    the blocking decode path vs the asyncio client run on a private loop per call, as the
    decode path did before (p50 us, interleaved)."""
    from ..client import async_client

    loop = asyncio.new_event_loop()
    ac = async_client(spec, vindex, api_key="")
    loop.run_until_complete(ac.connect())

    def aio(*w):
        return loop.run_until_complete(ac.forward(*w))

    out: dict[str, list[float]] = {"blocking": [], "asyncio": []}
    try:
        for i in range(iters):
            wk = works[i % len(works)]
            for name, fn in ((("blocking", rx.forward), ("asyncio", aio)) if i % 2 == 0
                             else (("asyncio", aio), ("blocking", rx.forward))):
                t0 = time.thread_time()
                fn(*wk)
                out[name].append((time.thread_time() - t0) * 1e6)
    finally:
        loop.run_until_complete(ac.close())
        loop.close()
    return {k: pct(v, 50) for k, v in out.items()}


def bench_throughput(args, path: Path, vindex) -> dict:
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
    out = {"serial_req_s": r1, "concurrent_req_s": rk, "connections": args.conns, "ratio": rk / r1,
           "fused_serial": f1["expert_requests"] / max(1, f1["kernel_calls"]),
           "fused_concurrent": fk["expert_requests"] / max(1, fk["kernel_calls"])}
    if args.json:
        return out
    print(f"\n== throughput: one-token top-8 layer requests, {args.seconds:g} s each ==")
    print(f"1 connection, serial (baseline): {r1:8.0f} req/s  "
          f"({f1['expert_requests'] / max(1, f1['kernel_calls']):.2f} requests per kernel call)")
    print(f"{args.conns} concurrent connections:    {rk:8.0f} req/s  "
          f"({fk['expert_requests'] / max(1, fk['kernel_calls']):.2f} requests per kernel call)")
    print(f"ratio: {rk / r1:.2f}x")
    return out


def time_layers(model) -> list[float]:
    """Wrap model.layer (this instance only) to record each call's seconds, in call order."""
    times: list[float] = []
    layer = model.layer

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return layer(*a, **kw)
        finally:
            times.append(time.perf_counter() - t0)

    model.layer = timed
    return times


def bench_e2e(args, path: Path, vindex) -> dict:
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
        rx = connect_shards(spec, vindex, api_key="")
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
            layer_s = {k: time_layers(m) for k, m in runs.items()}
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
            # The LM head, timed alone: the part of a token that does not grow with the layers
            model = runs["local"]
            h = np.random.default_rng(4).standard_normal((1, cfg.hidden_size)).astype(np.float32)
            head = [0.0] * 5
            for i in range(5):
                t0 = time.perf_counter()
                model.logits(h)
                head[i] = time.perf_counter() - t0
        finally:
            rx.close()
    finally:
        for s in servers:
            s.stop()
    tps = {k: args.tokens / v for k, v in spent.items()}
    # A 30-layer (26B A4B) token: the head once plus 30 of this model's per-layer time. The
    # layers are timed call by call (median), not as the token time less the head: with a
    # 40 ms head and two layers that difference was mostly noise (3-12 ms per layer, run to run).
    t_head = float(np.median(head))
    per_layer = {k: float(np.median(layer_s[k][cfg.num_layers:])) for k in runs}   # not the prefill's
    if "batch" in per_layer:   # batch dispatch sends at the end of the token, outside the layers
        per_layer["batch"] = max(0.0, spent["batch"] / args.tokens - t_head) / cfg.num_layers
    proj = {k: 1.0 / (t_head + 30 * per_layer[k]) for k in spent}
    out = {"tok_s": tps, "prefill_ms": {k: v * 1e3 for k, v in prefill.items()},
           "prefill_round_trips": trips["exact"], "batch_round_trips_per_token": batch_trips / args.tokens,
           "lm_head_ms": t_head * 1e3, "per_layer_ms": {k: v * 1e3 for k, v in per_layer.items()},
           "projected_30_layer_tok_s": proj,
           "projected_30_layer_exact_over_in_process": proj["exact"] / proj["local"]}
    if args.json:
        return out
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
    print(f"30-layer projection (LM head {t_head * 1e3:.1f} ms + 30 x the measured per-layer time): "
          f"in process {proj['local']:.2f} tok/s, 2 shards exact {proj['exact']:.2f} tok/s -> "
          f"{proj['exact'] / proj['local']:.1%} of in-process (target >= 95%)")
    return out


def main(args: argparse.Namespace) -> int:
    from .. import kernels
    from ..vindex import open_vindex

    global SERVER_ARGS
    SERVER_ARGS = ("--workers", str(args.server_workers))
    if args.threads:
        kernels.set_num_threads(args.threads)
    path = synthetic_vindex(args.dir, args.layers, args.vocab, "synth", args.lm_head)
    vindex = open_vindex(path)
    if not args.json:
        print(f"synthetic vindex {path}: kernels {kernels.isa()} x{kernels.num_threads()} threads")
    results: dict = {"kernels": kernels.isa(), "threads": kernels.num_threads(), "layers": args.layers,
                     "vocab": args.vocab}
    if args.what in ("all", "rtt"):
        results["rtt"] = bench_rtt(args, path, vindex)
    if args.what in ("all", "throughput"):
        results["throughput"] = bench_throughput(args, path, vindex)
    if args.what in ("all", "e2e"):
        results["e2e"] = bench_e2e(args, path, vindex)
    if args.json:
        import json

        print(json.dumps(results, indent=1))
    return 0
