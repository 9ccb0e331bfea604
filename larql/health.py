"""`larql health [ADDRESS]`: ask an expert server for its `health` op (one frame each way).

A plain blocking socket and nothing else from the client, so container health checks
(Dockerfile HEALTHCHECK, compose `healthcheck`) stay cheap: no vindex, no event loop. `health`
is one of the ops a server answers before `hello` (docs/PROTOCOL.md).

    larql health                      # 127.0.0.1:$PORT (8080), TLS when $TLS_CERT is set
    larql health 10.0.0.5:8080
    larql health tls://APP.fly.dev:443   (or https://APP.fly.dev: TLS, port 443)

Exit status 0 when the server answers `status: ok`, 1 otherwise (unreachable, draining,
an error reply), with one line saying which.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
from dataclasses import dataclass

from . import protocol as P

DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: bool
    where: str


def parse_target(text: str) -> Target:
    """host:port, [v6]:port, tcp://host:port, tls://host:port, https://host[:port] (TLS, 443):
    the shard map's address forms (shardmap.parse_address)."""
    from .shardmap import parse_address

    ep = parse_address(text)
    return Target(ep.host, ep.port, ep.tls, text.strip())


def local_target(env: dict[str, str] | None = None) -> Target:
    """The server of this container: 127.0.0.1:$PORT, over TLS when $TLS_CERT is set."""
    env = os.environ if env is None else env
    port = env.get("PORT") or "8080"
    return Target("127.0.0.1", int(port), bool(env.get("TLS_CERT")), f"127.0.0.1:{port}")


def _tls_context(target: Target, ca_file: str | None, loopback_cert: str | None) -> ssl.SSLContext:
    if loopback_cert:
        # Our own certificate on 127.0.0.1: check the chain against it, not the name in it.
        ctx = ssl.create_default_context(cafile=loopback_cert)
        ctx.check_hostname = False
        return ctx
    from .transport import client_tls_context

    return client_tls_context(ca_file)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def check(target: Target, timeout: float = DEFAULT_TIMEOUT, ca_file: str | None = None,
          loopback_cert: str | None = None) -> dict:
    """Send one `health` request and return the reply (raises OSError / ProtocolError /
    RemoteError when the server cannot be reached or answers something unusable)."""
    with socket.create_connection((target.host, target.port), timeout=timeout) as raw:
        sock: socket.socket = raw
        if target.tls:
            ctx = _tls_context(target, ca_file, loopback_cert)
            sock = ctx.wrap_socket(raw, server_hostname=target.host)
        sock.sendall(P.encode_frame({"id": 1, "op": "health"}))
        (length,) = P.HEADER.unpack(_read_exact(sock, P.HEADER.size))
        if length > 1 << 20:
            raise P.ProtocolError(f"health reply of {length} bytes: not a larql server?", P.E_BAD_FRAME)
        reply = P.decode_body(_read_exact(sock, length))
    return P.check_reply(reply, target.where)


def health_main(args: argparse.Namespace) -> int:
    target = parse_target(args.address) if args.address else local_target()
    loopback_cert = os.environ.get("TLS_CERT") if not args.address and target.tls else None
    ca_file = args.tls_ca or os.environ.get("LARQL_TLS_CA") or None
    try:
        reply = check(target, args.timeout, ca_file, loopback_cert)
    except (OSError, ValueError, P.RemoteError) as e:
        print(f"{target.where}: unhealthy: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    status = reply.get("status")
    details = {k: v for k, v in reply.items() if k not in ("id", "ok")}
    print(f"{target.where}: {status} {json.dumps(details)}")
    return 0 if status == "ok" else 1
