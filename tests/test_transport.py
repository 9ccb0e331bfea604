"""The shared socket-level primitives: API keys, the challenge-response proofs, TLS detection."""

from __future__ import annotations

import pytest

from larql import LarqlError
from larql import transport as T


def test_key_from_file_is_stripped_and_env_is_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv(T.API_KEY_ENV, "  env-key-0123456789  ")
    path = tmp_path / "key"
    path.write_text("file-key-0123456789\n")
    assert T.load_api_key(path) == b"file-key-0123456789"
    assert T.load_api_key() == b"env-key-0123456789"
    monkeypatch.delenv(T.API_KEY_ENV)
    assert T.load_api_key() is None


def test_short_or_missing_key_files_are_refused_by_name(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(T.AuthError, match="3 bytes.*at least 16"):
        T.load_api_key(short)
    with pytest.raises(LarqlError, match="cannot read the API key file .*nope"):
        T.load_api_key(tmp_path / "nope")


def test_proofs_bind_key_role_and_both_nonces():
    key, other = b"k" * 32, b"j" * 32
    cn, sn = T.new_nonce(), T.new_nonce()
    assert len(cn) == T.NONCE_BYTES and cn != sn
    server = T.auth_proof(key, "server", cn, sn)
    assert T.proof_ok(key, "server", cn, sn, server)
    assert not T.proof_ok(other, "server", cn, sn, server)          # wrong key
    assert not T.proof_ok(key, "client", cn, sn, server)            # a reflected proof
    assert not T.proof_ok(key, "server", sn, cn, server)            # nonces swapped
    assert not T.proof_ok(key, "server", cn, T.new_nonce(), server)  # a replay on a new nonce
    for junk in (None, b"", "x" * 32, server[:-1], 7):
        assert not T.proof_ok(key, "server", cn, sn, junk)
    with pytest.raises(ValueError):
        T.auth_proof(key, "admin", cn, sn)


def test_tls_client_hello_is_recognised_where_a_length_prefix_should_be():
    assert T.looks_like_tls(bytes([0x16, 0x03, 0x01, 0x02, 0x00]))
    assert not T.looks_like_tls((1234).to_bytes(4, "little"))
    assert not T.looks_like_tls(b"\x16")


def test_tls_context_errors_name_the_file(tmp_path):
    with pytest.raises(LarqlError, match="no such file"):
        T.server_tls_context(tmp_path / "cert.pem", tmp_path / "key.pem")
    with pytest.raises(LarqlError, match="CA file"):
        T.client_tls_context(tmp_path / "ca.pem")
    assert T.client_tls_context().check_hostname
