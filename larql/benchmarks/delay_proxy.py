"""A TCP forwarder that delays every byte by a fixed one-way latency, in both directions.

A stand-in for `tc qdisc ... netem delay` on kernels built without sch_netem: listen on
LISTEN, forward to TARGET, and hold each chunk for DELAY ms before passing it on (so a round
trip through it costs 2 x DELAY plus the real path). Order is preserved per direction.

    python3 -m larql.benchmarks.delay_proxy --listen 10.77.0.1:9001 --target 10.77.0.2:9001 --delay-ms 22.5

(bench/delay_proxy.py runs the same; `larql bench wan` starts one per shard on loopback.)
"""

from __future__ import annotations

import argparse
import asyncio
import socket


class Pipe(asyncio.Protocol):
    """One direction's sink: data written to `peer` after the delay."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self.pending: list[bytes] = []   # arrived before the other side connected

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + self.delay, self._forward, data)

    def _forward(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            if not self.peer.transport.is_closing():
                self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self):
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + self.delay, self._close_peer)
        return False

    def _close_peer(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def connection_lost(self, exc) -> None:
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + self.delay, self._close_peer)


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    loop = asyncio.get_running_loop()

    def accepted() -> Pipe:
        down = Pipe(delay)   # client -> proxy

        async def connect_upstream() -> None:
            try:
                _, up = await loop.create_connection(lambda: Pipe(delay), *target)
            except OSError:
                if down.transport is not None:
                    down.transport.close()
                return
            up.peer, down.peer = down, up
            for chunk in down.pending:
                up.transport.write(chunk)
            down.pending.clear()

        loop.create_task(connect_upstream())
        return down

    server = await loop.create_server(accepted, *listen)
    async with server:
        await server.serve_forever()


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, type=addr)
    p.add_argument("--target", required=True, type=addr)
    p.add_argument("--delay-ms", type=float, default=22.5, help="one-way delay (default 22.5 = 45 ms RTT)")
    a = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(a.listen, a.target, a.delay_ms / 1e3))


if __name__ == "__main__":
    main()
