"""Authentication, TLS and the secure default of a real expert server on loopback.

Certificates are made here with `cryptography`: a private CA, a server certificate it signs for
127.0.0.1, an expired one, and a self-signed one no client trusts."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rawwire import authenticate, closed_by_peer, connect, read_frame, rt, work

from larql import protocol as P
from larql import transport as T
from larql.commands.serve import is_loopback
from larql.demo import build_demo_vindex, demo_config
from larql.processes import free_port
from larql.server import UNAUTHORIZED, ExpertServer
from larql.vindex import open_vindex

H = 64
KEY = b"correct-horse-battery-staple-0123"


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory):
    cfg = demo_config(num_layers=1, hidden=H, num_experts=4, top_k=2)
    return build_demo_vindex(tmp_path_factory.mktemp("sec") / "v", quant="f32", config=cfg)


def start(vindex_path, **kw):
    return ExpertServer(open_vindex(vindex_path), **kw).start_in_thread("127.0.0.1", 0)


# ------------------------------------------------------------------------------------------
# API key


@pytest.fixture(scope="module")
def keyed(vindex_path):
    h = start(vindex_path, api_key=KEY)
    yield h
    h.stop()


def test_right_key_authenticates_both_ways_then_serves(keyed):
    with connect(keyed.host, keyed.port, hello=False) as s:
        assert authenticate(s, KEY) == {"id": 101, "ok": True}
        assert rt(s, {"op": "hello", "id": 2, "version": 1})["ok"]
        r = rt(s, work(H))
        assert r["ok"] and len(r["y"]) == 2 * H * 4


def test_wrong_key_is_refused_and_closed(keyed):
    with connect(keyed.host, keyed.port, hello=False) as s:
        cn = T.new_nonce()
        r1 = rt(s, {"op": "auth", "id": 1, "step": 1, "nonce": cn})
        wrong = b"not-the-key-0123456789"
        assert not T.proof_ok(wrong, "server", cn, r1["nonce"], r1["proof"])  # the client would stop here
        proof = T.auth_proof(wrong, "client", cn, r1["nonce"])
        r2 = rt(s, {"op": "auth", "id": 2, "step": 2, "proof": proof})
        assert r2["ok"] is False and r2["error"]["code"] == P.E_UNAUTHORIZED and r2["id"] == 2
        assert "wrong API key" in r2["error"]["message"]
        assert closed_by_peer(s)


def test_reflected_server_proof_is_not_a_client_proof(keyed):
    with connect(keyed.host, keyed.port, hello=False) as s:
        r1 = rt(s, {"op": "auth", "id": 1, "step": 1, "nonce": T.new_nonce()})
        r2 = rt(s, {"op": "auth", "id": 2, "step": 2, "proof": r1["proof"]})
        assert r2["error"]["code"] == P.E_UNAUTHORIZED
        assert closed_by_peer(s)


@pytest.mark.parametrize("op", ["hello", "info", "stats", "experts", "warmup", "launch"])
def test_no_key_only_health_then_unauthorized_and_close(keyed, op):
    with connect(keyed.host, keyed.port, hello=False) as s:
        assert rt(s, {"op": "health", "id": 1})["status"] == "ok"          # allowed before auth
        msg = work(H, rid=2) if op == "experts" else {"op": op, "id": 2, "version": 1}
        r = rt(s, msg)
        assert r == {"id": 2, "ok": False, "error": {"code": P.E_UNAUTHORIZED, "message": UNAUTHORIZED}}
        assert closed_by_peer(s)


def test_auth_out_of_order_or_malformed_is_refused(keyed):
    for msg in ({"op": "auth", "id": 1, "step": 2, "proof": b"\0" * 32},      # step 2 first
                {"op": "auth", "id": 1, "step": 1, "nonce": b"short"},
                {"op": "auth", "id": 1, "step": True, "nonce": T.new_nonce()},
                {"op": "auth", "id": 1, "step": [[[[1]]]]}):
        with connect(keyed.host, keyed.port, hello=False) as s:
            r = rt(s, msg)
            assert r["error"]["code"] == P.E_UNAUTHORIZED, r
            assert closed_by_peer(s)


def test_unauthenticated_connection_closed_after_auth_timeout(vindex_path):
    h = start(vindex_path, api_key=KEY, limits=P.ServerLimits(auth_timeout=0.3))
    try:
        with connect(h.host, h.port, hello=False) as s:
            t0 = time.monotonic()
            r = read_frame(s)
            assert r["id"] is None and r["error"]["code"] == P.E_UNAUTHORIZED
            assert "not authenticated within 0.3 s" in r["error"]["message"]
            assert closed_by_peer(s)
            assert time.monotonic() - t0 < 5
        with connect(h.host, h.port, hello=False) as s:   # authenticated in time: stays open
            authenticate(s, KEY)
            time.sleep(0.6)
            assert rt(s, {"op": "hello", "id": 3, "version": 1})["ok"]
        assert h.server.stats.timeouts >= 1
    finally:
        h.stop()


def test_keyless_server_answers_auth_with_scheme_none(vindex_path):
    h = start(vindex_path)
    try:
        with connect(h.host, h.port, hello=False) as s:
            assert rt(s, {"op": "auth", "id": 1, "step": 1, "nonce": T.new_nonce()}) == \
                {"id": 1, "ok": True, "scheme": "none"}
            assert rt(s, {"op": "hello", "id": 2, "version": 1})["ok"]
    finally:
        h.stop()


# ------------------------------------------------------------------------------------------
# TLS


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, key, signer, *, ca: bool, days=(-1, 30)):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now + datetime.timedelta(days=days[0]))
         .not_valid_after(now + datetime.timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                         x509.DNSName("localhost")]), critical=False)
    return b.sign(signer, hashes.SHA256())


def _write(path, cert, key):
    (path.parent / f"{path.name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path.parent / f"{path.name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path.parent / f"{path.name}.crt", path.parent / f"{path.name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("larql test CA"), _name("larql test CA"), ca_key, ca_key, ca=True, days=(-1, 30))
    ca_crt, _ = _write(d / "ca", ca, ca_key)
    out = {"ca": ca_crt}
    for name, days, self_signed in (("good", (-1, 30), False), ("expired", (-30, -1), False),
                                    ("untrusted", (-1, 30), True)):
        k = ec.generate_private_key(ec.SECP256R1())
        issuer, signer = (_name("127.0.0.1"), k) if self_signed else (ca.subject, ca_key)
        out[name] = _write(d / name, _cert(_name("127.0.0.1"), issuer, k, signer, ca=False, days=days), k)
    return out


@pytest.fixture(scope="module")
def tls_server(vindex_path, pki):
    h = start(vindex_path, tls=T.server_tls_context(*pki["good"]))
    yield h
    h.stop()


def test_tls_client_with_the_ca_is_served(tls_server, pki):
    ctx = T.client_tls_context(pki["ca"])
    with connect(tls_server.host, tls_server.port, tls=ctx) as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        r = rt(s, work(H))
        assert r["ok"] and len(r["y"]) == 2 * H * 4


def test_plain_client_to_tls_server_is_closed_within_a_second(tls_server):
    with socket.create_connection((tls_server.host, tls_server.port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(P.encode_frame({"op": "hello", "id": 1, "version": 1}))
        assert closed_by_peer(s, timeout=5)
        assert time.monotonic() - t0 < 2


def test_tls_client_to_plain_server_is_logged_and_closed_at_once(vindex_path, pki, caplog):
    h = start(vindex_path)
    try:
        caplog.set_level(logging.WARNING, logger="larql.server")
        ctx = T.client_tls_context(pki["ca"])
        t0 = time.monotonic()
        with socket.create_connection((h.host, h.port), timeout=5) as raw, \
                pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        assert time.monotonic() - t0 < 2      # not waiting for a 33 MB "frame"
        deadline = time.monotonic() + 5
        while "TLS ClientHello on a plain port" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "TLS ClientHello on a plain port from 127.0.0.1:" in caplog.text
        assert "--tls-cert/--tls-key or connect without tls://" in caplog.text
    finally:
        h.stop()


@pytest.mark.parametrize("which, reason", [("expired", "certificate has expired"),
                                           ("untrusted", "self-signed certificate")])
def test_expired_or_untrusted_certificate_is_refused_by_the_client(vindex_path, pki, which, reason):
    h = start(vindex_path, tls=T.server_tls_context(*pki[which]))
    try:
        with socket.create_connection((h.host, h.port), timeout=5) as raw, \
                pytest.raises(ssl.SSLCertVerificationError, match=reason):
            T.client_tls_context(pki["ca"]).wrap_socket(raw, server_hostname="127.0.0.1")
        # and the server keeps serving clients that do trust it
        ok = ssl.create_default_context(cafile=str(pki[which][0]))
        ok.check_hostname, ok.verify_mode = False, ssl.CERT_NONE
        with connect(h.host, h.port, tls=ok) as s:
            assert rt(s, {"op": "health", "id": 3})["ok"]
    finally:
        h.stop()


def test_tls_and_key_together(vindex_path, pki):
    h = start(vindex_path, tls=T.server_tls_context(*pki["good"]), api_key=KEY)
    try:
        with connect(h.host, h.port, hello=False, tls=T.client_tls_context(pki["ca"])) as s:
            assert rt(s, {"op": "hello", "id": 1, "version": 1})["error"]["code"] == P.E_UNAUTHORIZED
        with connect(h.host, h.port, key=KEY, tls=T.client_tls_context(pki["ca"])) as s:
            assert rt(s, work(H))["ok"]
    finally:
        h.stop()


# ------------------------------------------------------------------------------------------
# The secure default of `larql serve`


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "192.0.2.1", "example.com"]))


def _serve(vindex_path, *extra, env=None, timeout=60):
    import os

    e = {k: v for k, v in os.environ.items() if k != T.API_KEY_ENV}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "larql", "serve", str(vindex_path), *extra],
                          capture_output=True, text=True, timeout=timeout, env=e)


def test_serve_refuses_a_public_address_without_a_key(vindex_path):
    out = _serve(vindex_path, "--host", "0.0.0.0", "--port", str(free_port()))
    assert out.returncode == 1
    assert ("refusing to serve on 0.0.0.0 without an API key: set LARQL_API_KEY or --api-key-file, "
            "or pass --allow-anonymous on a private network") in out.stderr, out.stderr


def test_allow_anonymous_gets_past_the_check_with_a_warning(vindex_path):
    # 192.0.2.1 (TEST-NET-1) is assigned to no interface here: the bind fails after the check,
    # so nothing listens beyond loopback during the test.
    out = _serve(vindex_path, "--host", "192.0.2.1", "--port", str(free_port()), "--allow-anonymous")
    assert "without an API key (--allow-anonymous)" in out.stderr, out.stderr
    assert "refusing" not in out.stderr
    assert out.returncode == 1      # the bind itself failed, reported in one line


def test_serve_flags_are_checked(vindex_path, tmp_path):
    out = _serve(vindex_path, "--tls-cert", str(tmp_path / "c.pem"))
    assert out.returncode == 1 and "--tls-cert and --tls-key go together" in out.stderr
    short = tmp_path / "short.key"
    short.write_text("abc")
    out = _serve(vindex_path, "--api-key-file", str(short))
    assert out.returncode == 1 and "at least 16" in out.stderr
    out = _serve(vindex_path, "--max-tokens", "0")
    assert out.returncode == 1 and "--max-tokens 0 must be positive" in out.stderr
