"""`larql serve` (also `larql-server`): one shard of a vindex's experts over TCP."""

from __future__ import annotations

import argparse
import os
import sys


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
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=main)


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
    from ..server import ExpertServer
    from ..transport import new_event_loop
    from ..vindex import open_vindex

    _setup_logging(args.log_level)
    log = logging.getLogger("larql.server")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port} out of range")
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: must be 0 (compute on the event loop) or more")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: must be 0 (the kernels' choice) or more")
    if args.threads:
        kernels.set_num_threads(args.threads)
    vindex = open_vindex(args.vindex)
    cfg = vindex.config
    experts = ranges.parse(args.experts, cfg.num_experts, "--experts") if args.experts else None
    layers = ranges.parse(args.layers, cfg.num_layers, "--layers") if args.layers else None
    _check_servable(vindex, layers)
    srv = ExpertServer(vindex, experts, layers, workers=args.workers)
    log.info("vindex %s: %s, hidden %d, %d experts x %d layers; this shard: experts %s, layers %s "
             "(%s of expert weights), kernels %s x%d threads",
             vindex.path, srv.info()["model"] or "?", cfg.hidden_size, cfg.num_experts, cfg.num_layers,
             ranges.text(srv.experts), ranges.text(srv.layers), human_bytes(srv.owned_bytes()),
             kernels.isa(), kernels.num_threads())
    _check_port(args.host, args.port)
    if args.warmup:
        # A bar only on a terminal: in a log file its last frame and the next line would share one.
        bar = sys.stderr.isatty()
        if not bar:
            log.info("warm-up: faulting in %s of owned expert pages", human_bytes(srv.owned_bytes()))
        nbytes, secs = srv.warmup(progress=bar)
        log.info("warm-up: %s of owned expert pages faulted in %.2f s (%.2f GB/s); process RSS %s",
                 human_bytes(nbytes), secs, nbytes / max(secs, 1e-9) / 1e9, human_bytes(_rss()))
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
