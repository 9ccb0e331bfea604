"""`larql serve` (also `larql-server`): one shard of a vindex's experts over TCP."""

from __future__ import annotations

import argparse
import os
import sys

from ..protocol import ServerLimits


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a shard of a vindex's experts over TCP",
        description="Serve the routed experts of a vindex (or a range of them) to `larql run "
                    "--moe-shards` clients. Needs only index.json, the manifests, norms.bin and "
                    "layers/ of the vindex.",
    )
    p.add_argument("vindex", help="path to the vindex directory")
    p.add_argument("--experts", default="", metavar="A-B",
                   help="experts this shard owns, inclusive (e.g. 0-63; default: all)")
    p.add_argument("--layers", default="", metavar="A-B",
                   help="layers this shard owns, inclusive (default: all)")
    p.add_argument("--warmup", "--warmup-walk-ffn", dest="warmup", action="store_true",
                   help="pre-fault every page of the owned experts before accepting traffic")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--threads", type=int, default=0,
                   help="kernel threads (default: the kernels' own choice, usually all cores)")
    p.add_argument("--workers", type=int, default=2,
                   help="expert computations in flight at once, each a fused group of requests "
                        "(default 2; 0 computes on the event-loop thread: lowest latency, one at a time)")
    p.add_argument("--scheduling", default="batch", choices=["batch", "normal"],
                   help="batch (default): a request waking the server never preempts another program "
                        "on its core (Linux SCHED_BATCH), so a client on the same machine keeps sending "
                        "and computing; normal: ordinary time-sharing")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sec = p.add_argument_group("security (docs/PROTOCOL.md, docs/DEPLOY.md)")
    sec.add_argument("--api-key-file", metavar="FILE",
                     help="require clients to prove they hold this key (HMAC challenge-response; the "
                          "key never crosses the wire); default: $LARQL_API_KEY, if set")
    sec.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate chain")
    sec.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    sec.add_argument("--allow-anonymous", action="store_true",
                     help="serve a non-loopback address without an API key (a private network only)")
    lim = p.add_argument_group("limits (defaults as in docs/PROTOCOL.md)")
    d = ServerLimits()
    lim.add_argument("--max-connections", type=int, default=d.max_connections, metavar="N",
                     help=f"open connections; past it new ones are closed at once "
                          f"(default {d.max_connections})")
    lim.add_argument("--idle-timeout", type=float, default=d.idle_timeout, metavar="S",
                     help=f"close a connection with no request and nothing in flight "
                          f"(default {d.idle_timeout:g} s)")
    lim.add_argument("--frame-timeout", type=float, default=d.frame_timeout, metavar="S",
                     help=f"a frame must be complete this long after its first byte "
                          f"(default {d.frame_timeout:g} s)")
    lim.add_argument("--auth-timeout", type=float, default=d.auth_timeout, metavar="S",
                     help=f"close a connection not authenticated by then (default {d.auth_timeout:g} s)")
    lim.add_argument("--max-buffered", type=_mib, default=d.max_buffered, metavar="MIB",
                     help=f"MiB of unfinished frames and queued work, all connections; past it reading "
                          f"pauses (default {d.max_buffered >> 20})")
    lim.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="T",
                     help=f"tokens per work item (default {d.max_tokens})")
    lim.add_argument("--max-items", type=int, default=d.max_items, metavar="N",
                     help=f"work items per 'multi' request (default {d.max_items})")
    p.set_defaults(func=main)


def batch_scheduling(log) -> None:
    """Every thread of this process (and those it starts later, which inherit it) on SCHED_BATCH:
    woken by a request, they wait for a free core or the scheduler tick instead of preempting
    the thread that is running. Measured with two co-located shards, 2 threads each, on the
    2-vCPU dev VM, A/B in one run: the client's wall time per layer 35-110 us less (the client
    was preempted inside its write to the first shard, so the second shard started late)."""
    import os

    if not hasattr(os, "sched_setscheduler"):
        return
    try:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
    except OSError as e:   # a container that forbids it: run as usual
        log.info("SCHED_BATCH not available (%s); ordinary scheduling", e)


def _mib(text: str) -> int:
    return int(float(text) * (1 << 20))


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    checks = [("--max-connections", args.max_connections, 1), ("--max-tokens", args.max_tokens, 1),
              ("--max-items", args.max_items, 1), ("--idle-timeout", args.idle_timeout, 0.001),
              ("--frame-timeout", args.frame_timeout, 0.001), ("--auth-timeout", args.auth_timeout, 0.001),
              ("--max-buffered", args.max_buffered, 1)]
    for flag, value, least in checks:
        if not value >= least:
            raise ValueError(f"{flag} {value} must be positive")
    return ServerLimits(max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                        frame_timeout=args.frame_timeout, auth_timeout=args.auth_timeout,
                        max_buffered=args.max_buffered, max_tokens=args.max_tokens, max_items=args.max_items)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def stats_summary(snap: dict) -> str:
    """The server's counters (server.Stats.snapshot) as one line of words."""
    return (f"{snap['requests']} requests ({snap['errors']} errors), {snap['tokens']} token-layers, "
            f"{snap['connections']} connections; latency p50 {snap['p50_us']:.0f} us, "
            f"p99 {snap['p99_us']:.0f} us; compute {snap['compute_s']:.2f} s; "
            f"{human_bytes(snap['bytes_in'])} in, {human_bytes(snap['bytes_out'])} out")


def _rss() -> int:
    """Resident set size of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s larql-server %(message)s",
                        datefmt="%H:%M:%S")


def _check_servable(vindex, layers: list[int] | None) -> None:
    """What a server needs besides the layer files, read now: missing, it would log "serving"
    and then fail every request."""
    from ..vindex import VindexError

    if not vindex.layers_present:
        preset = (vindex.index.get("slice") or {}).get("preset")
        kind = f"a slice with preset {preset!r}" if preset else "this vindex"
        raise VindexError(f"{vindex.path}: {kind} has no expert layer files (layers/), so there is "
                          "nothing to serve: serve the full vindex or a slice made with `larql slice "
                          "SRC -o shard.vindex --preset experts [--experts A-B]`")
    try:
        for layer in layers if layers is not None else vindex.layers_present:
            vindex.norm(f"layers.{layer}.pre_feedforward_layernorm_2.weight")
    except (VindexError, OSError, KeyError) as e:
        raise VindexError(f"{vindex.path}: cannot be served: {e} (a server needs index.json, "
                          "weight_manifest.json, norms.bin and layers/; `larql slice --preset "
                          "experts` copies exactly those)") from None


def _check_port(host: str, port: int) -> None:
    """Fail now, not after a warm-up of minutes, if (host, port) cannot be listened on. Binds
    the way asyncio's create_server does (SO_REUSEADDR) and lets go at once."""
    import socket

    from ..errors import LarqlError

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LarqlError(f"--host {host}: {e.strerror}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise LarqlError(f"cannot listen on {host}:{port}: {e.strerror} (another server on "
                                 "that port? choose one with --port)") from None


def main(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import time

    from .. import kernels, ranges
    from ..errors import LarqlError
    from ..server import ExpertServer
    from ..transport import load_api_key, new_event_loop, server_tls_context
    from ..vindex import open_vindex

    _setup_logging(args.log_level)
    log = logging.getLogger("larql.server")
    if args.scheduling == "batch":
        batch_scheduling(log)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port} out of range")
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: must be 0 (compute on the event loop) or more")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: must be 0 (the kernels' choice) or more")
    limits = limits_from_args(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise LarqlError("--tls-cert and --tls-key go together: give both or neither")
    tls = server_tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    api_key = load_api_key(args.api_key_file)
    if args.threads:
        kernels.set_num_threads(args.threads)
    vindex = open_vindex(args.vindex)
    cfg = vindex.config
    experts = ranges.parse(args.experts, cfg.num_experts, "--experts") if args.experts else None
    layers = ranges.parse(args.layers, cfg.num_layers, "--layers") if args.layers else None
    _check_servable(vindex, layers)
    srv = ExpertServer(vindex, experts, layers, workers=args.workers, limits=limits, api_key=api_key, tls=tls)
    # after the arguments and the vindex checked out (their errors say more), before warm-up
    if api_key is None and not is_loopback(args.host):
        if not args.allow_anonymous:
            raise LarqlError(f"refusing to serve on {args.host} without an API key: set LARQL_API_KEY or "
                             "--api-key-file, or pass --allow-anonymous on a private network")
        log.warning("serving %s without an API key (--allow-anonymous): anyone who can reach the port "
                    "can use this shard", args.host)
    log.info("vindex %s: %s, hidden %d, %d experts x %d layers; this shard: experts %s, layers %s "
             "(%s of expert weights), kernels %s x%d threads",
             vindex.path, srv.info()["model"] or "?", cfg.hidden_size, cfg.num_experts, cfg.num_layers,
             ranges.text(srv.experts), ranges.text(srv.layers), human_bytes(srv.owned_bytes()),
             kernels.isa(), kernels.num_threads())
    _check_port(args.host, args.port)
    if args.warmup:
        disk = srv.disk_read_rate()  # read and evicted again: the warm-up below starts cold
        # A bar only on a terminal: in a log file its last frame and the next line would share one.
        bar = sys.stderr.isatty()
        if not bar:
            log.info("warm-up: faulting in %s of owned expert pages", human_bytes(srv.owned_bytes()))
        nbytes, secs = srv.warmup(progress=bar)
        rate = nbytes / max(secs, 1e-9)
        vs_disk = (f"; the disk reads sequentially at {disk / 1e9:.2f} GB/s: warm-up/disk = {rate / disk:.2f}"
                   if disk else "; disk rate not measured (the pages were already cached)")
        log.info("warm-up: %s of owned expert pages faulted in %.2f s (%.2f GB/s)%s; process RSS %s",
                 human_bytes(nbytes), secs, rate / 1e9, vs_disk, human_bytes(_rss()))
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    t0 = time.time()
    try:
        loop.run_until_complete(srv.serve_forever(args.host, args.port))
    finally:
        loop.close()
    log.info("exit after %.0f s (pid %d): %s", time.time() - t0, os.getpid(),
             stats_summary(srv.stats.snapshot()))
    return 0
