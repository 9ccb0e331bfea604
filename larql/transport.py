"""Socket-level helpers the expert client and server share.

The wire format itself (frames, messages, validation) is `protocol.py`, which is pure; this
module holds what touches sockets, keys and certificates, so both ends configure them the same
way: the event loop, TCP_NODELAY, the API-key challenge-response and the TLS contexts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import socket
import ssl
from pathlib import Path

from .errors import LarqlError


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


# ------------------------------------------------------------------------------------------
# Authentication: a shared API key, never sent on the wire (docs/PROTOCOL.md, "auth").
#
# The client speaks first: `auth` step 1 carries a fresh client nonce; the server answers with
# its own nonce and a proof that it knows the key; the client checks that proof before it sends
# its own (step 2), so both ends are authenticated and neither proof can be replayed (each
# covers both fresh nonces, in an order and under a label that differ per direction).

API_KEY_ENV = "LARQL_API_KEY"
AUTH_SCHEME = "hmac-sha256-v1"
NONCE_BYTES = 32
MIN_KEY_BYTES = 16   # shorter keys are refused: a key is a secret, not a password


class AuthError(LarqlError):
    """A key is missing, wrong, too short, or a peer failed the challenge-response."""


def load_api_key(path: str | os.PathLike | None = None, env: str = API_KEY_ENV) -> bytes | None:
    """The API key from `path` (whitespace stripped) or else the environment; None if neither."""
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise AuthError(f"cannot read the API key file {path}: {e.strerror or e}") from None
        where = f"API key file {path}"
    else:
        text = os.environ.get(env, "").strip()
        if not text:
            return None
        where = f"${env}"
    key = text.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        hint = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        raise AuthError(f"the {where} holds {len(key)} bytes; an API key needs at least "
                        f"{MIN_KEY_BYTES} (make one with: {hint})")
    return key


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def auth_proof(key: bytes, role: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256 proof of the key for `role` ("server" or "client") over both nonces."""
    if role not in ("server", "client"):
        raise ValueError(f"role must be 'server' or 'client', not {role!r}")
    first, second = (client_nonce, server_nonce) if role == "server" else (server_nonce, client_nonce)
    label = f"larql {AUTH_SCHEME} {role}\n".encode()
    return hmac.new(key, label + first + second, hashlib.sha256).digest()


def proof_ok(key: bytes, role: str, client_nonce: bytes, server_nonce: bytes, proof: object) -> bool:
    """Constant-time check of a peer's proof (anything that is not 32 bytes is simply wrong)."""
    if not isinstance(proof, bytes) or len(proof) != hashlib.sha256().digest_size:
        return False
    return hmac.compare_digest(auth_proof(key, role, client_nonce, server_nonce), proof)


# ------------------------------------------------------------------------------------------
# TLS


TLS_CA_ENV = "LARQL_TLS_CA"


def server_tls_context(cert: str | os.PathLike, key: str | os.PathLike) -> ssl.SSLContext:
    """TLS 1.2+ server context from PEM files; errors name the file that failed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as e:
        raise LarqlError(f"TLS: {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise LarqlError(f"TLS: cannot load certificate {cert} with key {key}: {e}") from None
    return ctx


def client_tls_context(cafile: str | os.PathLike | None = None) -> ssl.SSLContext:
    """Verifying client context: the system trust store, or `cafile` / $LARQL_TLS_CA for a private CA."""
    cafile = cafile or os.environ.get(TLS_CA_ENV) or None
    try:
        ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except FileNotFoundError:
        raise LarqlError(f"TLS: CA file {cafile}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise LarqlError(f"TLS: cannot load CA file {cafile}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def looks_like_tls(first_bytes: bytes) -> bool:
    """A TLS record header (handshake, version 3.x) where a frame's length prefix should be:
    a TLS client talking to a plain port. Our frames never start like this in practice: read as
    a little-endian length, a ClientHello's first bytes announce a body of tens of MiB, which no
    client sends before `hello`."""
    b = first_bytes
    return len(b) >= 3 and b[0] == 0x16 and b[1] == 0x03 and b[2] <= 0x04
