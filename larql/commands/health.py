"""`larql health [ADDRESS]`: one `health` request to an expert server (the image's HEALTHCHECK)."""

from __future__ import annotations

from ..health import DEFAULT_TIMEOUT
from ..health import health_main as main

__all__ = ["add_parser", "main"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "health",
        help="ask an expert server whether it is up (the protocol's health op); exit 0 if ok",
        description="Send one `health` request. Without ADDRESS: this machine's server, "
                    "127.0.0.1:$PORT (default 8080), over TLS when $TLS_CERT is set (the "
                    "container health check).",
    )
    p.add_argument("address", nargs="?", default=None,
                   help="host:port, tcp://host:port, tls://host:port or https://host[:port]")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds for connect and reply (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="CA bundle for a server with a private certificate (default $LARQL_TLS_CA)")
    p.set_defaults(func=main)
