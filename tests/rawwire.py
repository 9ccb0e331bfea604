"""A raw-socket client of the expert protocol for the server's tests: frames written and read
by hand, so a test can send exactly the bytes an attacker would (and the real client's bugs or
fixes never hide a server's)."""

from __future__ import annotations

import socket
import ssl
import struct

import msgpack
import numpy as np

from larql import protocol as P
from larql import transport as T


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_frame(s: socket.socket) -> dict:
    (n,) = struct.unpack("<I", recv_exact(s, 4))
    return msgpack.unpackb(recv_exact(s, n), raw=False)


def rt(s: socket.socket, msg) -> dict:
    s.sendall(P.encode_frame(msg) if isinstance(msg, dict) else msg)
    return read_frame(s)


def raw_frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def connect(host: str, port: int, *, hello: bool = True, key: bytes | None = None,
            tls: ssl.SSLContext | None = None, timeout: float = 10) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname=host)
    if key is not None:
        authenticate(s, key)
    if hello:
        r = rt(s, {"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION})
        assert r["ok"] is True, r
    return s


def authenticate(s: socket.socket, key: bytes) -> dict:
    """Both steps of `auth`; checks the server's proof; returns the step-2 reply."""
    cn = T.new_nonce()
    r1 = rt(s, {"op": "auth", "id": 100, "step": 1, "nonce": cn})
    assert r1["ok"] is True and r1["scheme"] == T.AUTH_SCHEME, r1
    sn = r1["nonce"]
    assert T.proof_ok(key, "server", cn, sn, r1["proof"]), "server failed to prove the key"
    return rt(s, {"op": "auth", "id": 101, "step": 2, "proof": T.auth_proof(key, "client", cn, sn)})


def closed_by_peer(s: socket.socket, timeout: float = 5) -> bool:
    """True if the peer closes (EOF or reset) within `timeout`, reading and discarding replies."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def work(hidden: int, layer: int = 0, T: int = 2, ids=None, enc: str = "f32", seed: int = 0,
         rid: int = 5, **extra) -> dict:
    rng = np.random.default_rng(seed)
    ids = np.array(ids if ids is not None else [[0, 1]] * T, dtype=np.int32)
    x = rng.standard_normal((ids.shape[0], hidden)).astype(np.float32)
    return {"op": "experts", "id": rid,
            **P.encode_work(layer, x, ids, np.full(ids.shape, 0.5, np.float32), enc), **extra}
