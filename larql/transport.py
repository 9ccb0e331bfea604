"""Socket-level helpers the expert client and server share.

The wire format itself (frames, messages, validation) is `protocol.py`, which is pure; this
module holds what touches sockets and event loops, so both ends configure them the same way.
"""

from __future__ import annotations

import asyncio
import socket


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (half the per-frame latency of stock asyncio), else asyncio's."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Disable Nagle on a TCP transport: a frame is one write and must leave at once."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
