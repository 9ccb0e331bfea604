"""A server that accepts a connection and then stops reading: the blocking client's write gives
up within the timeout it was given, with a message that says so, over plain TCP and over TLS,
and the connection is marked broken (part of a frame may be out). Before, the write used
whatever timeout the last read had left on the socket: none at all (a hang) or a fraction of a
second (a healthy but slow write cut short)."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest
from standin import make_certs

from larql import transport
from larql.client.blocking import BlockingConnection
from larql.client.core import ShardError
from larql.shardmap import Endpoint


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("send-certs"))


class DeafServer:
    """Accepts one connection (completing the TLS handshake when given a context), then never
    reads from it until stopped."""

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.port = self.listener.getsockname()[1]
        self.tls = tls
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        if self.tls:
            conn = self.tls.wrap_socket(conn, server_side=True)
        self.stop.wait(30)
        conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
def test_a_write_the_server_never_reads_gives_up_within_its_timeout(certs, use_tls):
    server_ctx = transport.server_tls_context(certs["server"], certs["server.key"]) if use_tls else None
    server = DeafServer(server_ctx)
    try:
        client_ctx = transport.client_tls_context(certs["ca"]) if use_tls else None
        conn = BlockingConnection.open(Endpoint("127.0.0.1", server.port, use_tls), 5.0, client_ctx)
        conn.sock.settimeout(None)          # what a read may leave behind: no timeout at all
        frame = bytes(64 << 20)             # far more than both ends' socket buffers hold
        t0 = time.monotonic()
        with pytest.raises(ShardError, match=r"127\.0\.0\.1:\d+: could not send a request within 0\.5s"):
            conn.send_frame(frame, 0.5)
        assert time.monotonic() - t0 < 5    # the timeout held: no hang
        assert conn.broken
        conn.close()
    finally:
        server.close()


def test_a_slow_write_is_not_cut_short_by_a_reads_leftover_timeout(certs):
    """A read leaves 1 ms on the socket; a write the server reads, slowly, still completes."""
    listener = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def reader() -> None:
        c, _ = listener.accept()
        with c:
            while len(got) < (8 << 20):
                time.sleep(0.002)            # a slow reader: the client's write must wait
                chunk = c.recv(1 << 16)
                if not chunk:
                    break
                got.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        conn = BlockingConnection.open(Endpoint("127.0.0.1", listener.getsockname()[1]), 5.0, None)
        conn.sock.settimeout(0.001)
        conn.send_frame(bytes(8 << 20), 20.0)
        t.join(20)
        assert len(got) == 8 << 20 and not conn.broken
        conn.close()
    finally:
        listener.close()


def test_ctrl_c_in_the_middle_of_a_write_marks_the_connection_broken(certs):
    """SIGINT while a TLS write waits on a server that does not read: KeyboardInterrupt reaches
    the caller, and the connection, with part of a frame written, is not used again."""
    import os
    import signal

    server = DeafServer(transport.server_tls_context(certs["server"], certs["server.key"]))
    try:
        conn = BlockingConnection.open(Endpoint("127.0.0.1", server.port, True), 5.0,
                                       transport.client_tls_context(certs["ca"]))
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            conn.send_frame(bytes(64 << 20), 10.0)
        timer.join()
        assert conn.broken
        conn.close()
    finally:
        server.close()
