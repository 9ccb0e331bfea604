"""The client's side of authentication and TLS, against real TLS on loopback and a stand-in
server speaking the auth handshake (tests/standin.py) in front of a real ExpertServer: the
right key works; a wrong, missing or unexpected key, an untrusted or expired certificate, and
TLS/plain mix-ups are each refused in one line naming the shard and why."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time

import numpy as np
import pytest
from standin import StandIn, make_certs

from larql import transport
from larql.client import ShardError, async_client, connect_shards
from larql.demo import build_demo_vindex, demo_config
from larql.experts import LocalExperts
from larql.server import ExpertServer
from larql.transport import AuthError
from larql.vindex import open_vindex

E, L, H, TOPK = 8, 2, 64, 3
KEY = b"k" * 24 + b"-larql-test-key"
OTHER_KEY = b"z" * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    path = build_demo_vindex(tmp / "v", config=demo_config(num_layers=L, hidden=H, num_experts=E, top_k=TOPK))
    srv = ExpertServer(open_vindex(path)).start_in_thread("127.0.0.1", 0)
    certs = make_certs(tmp / "certs")
    try:
        yield open_vindex(path), srv, certs, tmp
    finally:
        srv.stop()


def work(seed=0, T=2):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.choice(E, TOPK, replace=False) for _ in range(T)]).astype(np.int32)
    return h, ids, rng.random((T, TOPK)).astype(np.float32)


def upstream(srv):
    return (srv.host, srv.port)


def test_right_key_by_argument_file_and_environment(setup, monkeypatch, tmp_path):
    vindex, srv, _, _ = setup
    guard = StandIn(upstream(srv), key=KEY)
    try:
        h, ids, w = work(1)
        ref = LocalExperts(vindex).forward(1, h, ids, w)
        with connect_shards(f"0-7={guard.address}", vindex, timeout=5, api_key=KEY.decode()) as rx:
            np.testing.assert_array_equal(rx.forward(1, h, ids, w), ref)
        keyfile = tmp_path / "key"
        keyfile.write_text(KEY.decode() + "\n")
        with connect_shards(f"0-7={guard.address}", vindex, timeout=5, api_key_file=keyfile) as rx:
            np.testing.assert_array_equal(rx.forward(1, h, ids, w), ref)
        monkeypatch.setenv(transport.API_KEY_ENV, KEY.decode())
        with connect_shards(f"0-7={guard.address}", vindex, timeout=5) as rx:      # $LARQL_API_KEY
            np.testing.assert_array_equal(rx.forward(1, h, ids, w), ref)

        async def via_asyncio():
            client = await async_client(f"0-7={guard.address}", vindex, timeout=5).connect()
            try:
                return await client.forward(1, h, ids, w)
            finally:
                await client.close()

        np.testing.assert_array_equal(asyncio.run(via_asyncio()), ref)
        assert guard.refused == 0 and guard.forwarded == 4
    finally:
        guard.stop()


def test_wrong_missing_and_unexpected_keys_are_refused(setup, monkeypatch):
    vindex, srv, _, _ = setup
    monkeypatch.delenv(transport.API_KEY_ENV, raising=False)
    guard = StandIn(upstream(srv), key=KEY)
    impostor = StandIn(upstream(srv), key=KEY, wrong_proof=True)
    keyless = StandIn(upstream(srv))
    try:
        spec = f"0-7={guard.address}"
        # a wrong key: the server's proof does not verify under ours, so we never send a proof
        with pytest.raises(AuthError, match=f"shard 0-7 at {guard.address} failed to prove it holds the API"):
            connect_shards(spec, vindex, timeout=5, api_key=OTHER_KEY)
        # no key: the server refuses hello, naming what to set
        with pytest.raises(AuthError, match=rf"shard 0-7 at {guard.address} requires an API key "
                                            r"\(set LARQL_API_KEY or --shard-api-key-file\)"):
            connect_shards(spec, vindex, timeout=5)
        assert guard.refused == 1 and guard.forwarded == 0
        # a server that claims the key but cannot prove it
        with pytest.raises(AuthError, match="failed to prove it holds the API key"):
            connect_shards(f"0-7={impostor.address}", vindex, timeout=5, api_key=KEY)
        # a key configured but the server does not authenticate: refuse to send it work
        with pytest.raises(AuthError, match="does not authenticate; refusing to send work"):
            connect_shards(f"0-7={keyless.address}", vindex, timeout=5, api_key=KEY)
        # ... and the same against a real server from before `auth` (unknown op) or without a key
        with pytest.raises(AuthError, match="does not authenticate"):
            connect_shards(f"0-7={srv.address}", vindex, timeout=5, api_key=KEY)
        # api_key="" forces no key even with $LARQL_API_KEY set (keyless loopback servers)
        monkeypatch.setenv(transport.API_KEY_ENV, KEY.decode())
        with connect_shards(f"0-7={keyless.address}", vindex, timeout=5, api_key="") as rx:
            rx.forward(0, *work(2))
        with pytest.raises(AuthError, match="at least 16"):
            connect_shards(spec, vindex, timeout=5, api_key="short")
    finally:
        for s in (guard, impostor, keyless):
            s.stop()


def test_tls_verified_against_a_private_ca(setup, monkeypatch):
    vindex, srv, certs, _ = setup
    ctx = transport.server_tls_context(certs["server"], certs["server.key"])
    tls = StandIn(upstream(srv), tls=ctx, key=KEY)
    try:
        h, ids, w = work(3)
        ref = LocalExperts(vindex).forward(0, h, ids, w)
        spec = f"0-7={tls.address}"
        assert spec.startswith("0-7=tls://")
        with connect_shards(spec, vindex, timeout=5, api_key=KEY, tls_ca=certs["ca"]) as rx:
            np.testing.assert_array_equal(rx.forward(0, h, ids, w), ref)
        monkeypatch.setenv(transport.TLS_CA_ENV, str(certs["ca"]))
        with connect_shards(spec.replace("tls://", "https://"), vindex, timeout=5, api_key=KEY) as rx:
            np.testing.assert_array_equal(rx.forward(0, h, ids, w), ref)     # https://host:port too
        monkeypatch.delenv(transport.TLS_CA_ENV)
        # the system trust store does not know our CA
        with pytest.raises(ShardError, match=rf"TLS certificate of 127.0.0.1:{tls.port} not trusted: "
                                             r".*\(use --tls-ca for a private CA\)"):
            connect_shards(spec, vindex, timeout=5, api_key=KEY)
        with pytest.raises(ShardError, match="not trusted"):
            connect_shards(spec, vindex, timeout=5, api_key=KEY, tls_ca=certs["other_ca"])
        # the host name is checked too: the certificate names 127.0.0.1 and localhost only
        with pytest.raises(ShardError, match="not trusted.*(mismatch|match)"):
            connect_shards(f"0-7=tls://[::ffff:127.0.0.1]:{tls.port}", vindex, timeout=5, api_key=KEY,
                           tls_ca=certs["ca"])
    finally:
        tls.stop()


def test_expired_certificate_is_refused(setup):
    vindex, srv, certs, _ = setup
    tls = StandIn(upstream(srv), tls=transport.server_tls_context(certs["expired"], certs["expired.key"]))
    try:
        with pytest.raises(ShardError, match="not trusted: certificate has expired"):
            connect_shards(f"0-7={tls.address}", vindex, timeout=5, api_key="", tls_ca=certs["ca"])
    finally:
        tls.stop()


def test_plain_to_tls_and_tls_to_plain_fail_fast_and_say_which(setup):
    vindex, srv, certs, _ = setup
    tls = StandIn(upstream(srv), tls=transport.server_tls_context(certs["server"], certs["server.key"]))
    try:
        t0 = time.monotonic()
        with pytest.raises(ShardError, match=rf"127.0.0.1:{tls.port} .*TLS server.*use tls://127.0.0.1:{tls.port}"):
            connect_shards(f"0-7=127.0.0.1:{tls.port}", vindex, timeout=5, connect_timeout=2, api_key="")
        assert time.monotonic() - t0 < 3
        t0 = time.monotonic()
        with pytest.raises(ShardError, match=f"TLS handshake with {srv.address} failed: the server does not "
                                             "speak TLS"):
            connect_shards(f"0-7=tls://{srv.address}", vindex, timeout=5, connect_timeout=2, api_key="",
                           tls_ca=certs["ca"])
        assert time.monotonic() - t0 < 4
    finally:
        tls.stop()


def test_asyncio_client_tls_errors_match(setup):
    vindex, srv, certs, _ = setup
    tls = StandIn(upstream(srv), tls=transport.server_tls_context(certs["server"], certs["server.key"]))
    try:
        async def connect(spec, **kw):
            client = async_client(spec, vindex, timeout=5, connect_timeout=2, api_key="", **kw)
            await client.connect()
            y = await client.forward(0, *work(4))
            await client.close()
            return y

        y = asyncio.run(connect(f"0-7={tls.address}", tls_ca=certs["ca"]))
        np.testing.assert_array_equal(y, LocalExperts(vindex).forward(0, *work(4)))
        with pytest.raises(ShardError, match="not trusted"):
            asyncio.run(connect(f"0-7={tls.address}"))
        with pytest.raises(ShardError, match="TLS server"):
            asyncio.run(connect(f"0-7=127.0.0.1:{tls.port}"))
    finally:
        tls.stop()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "larql", "run", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


def test_larql_run_with_key_and_tls_and_its_refusals(setup, tmp_path):
    vindex, srv, certs, _ = setup
    ctx = transport.server_tls_context(certs["server"], certs["server.key"])
    tls = StandIn(upstream(srv), tls=ctx, key=KEY)
    try:
        keyfile = tmp_path / "key"
        keyfile.write_text(KEY.decode())
        spec = f"0-7={tls.address}"
        local = run_cli(vindex.path, "Hello", "-n", "5", "--json")
        remote = run_cli(vindex.path, "Hello", "-n", "5", "--json", "--moe-shards", spec,
                         "--shard-api-key-file", keyfile, "--tls-ca", certs["ca"])
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
        assert json.loads(remote.stdout)["stats"]["degraded_layers"] == 0
        forced = run_cli(vindex.path, "Hello", "-n", "5", "--json", "--moe-shards", spec,
                         "--api-key-file", keyfile, "--tls-ca", certs["ca"], "--encoding", "f32")
        assert forced.returncode == 0, forced.stderr       # the raw residual instead of auto's choice
        # (and --api-key-file, run's first spelling of --shard-api-key-file, still works)
        assert json.loads(forced.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
        wrong = tmp_path / "wrong"
        wrong.write_text(OTHER_KEY.decode())
        for extra, needle in (((), "requires an API key"),
                              (("--api-key-file", wrong), "failed to prove it holds the API key"),
                              (("--api-key-file", keyfile), "not trusted")):
            env = {k: v for k, v in os.environ.items()
                   if k not in (transport.API_KEY_ENV, transport.TLS_CA_ENV)}
            if needle != "not trusted":
                env[transport.TLS_CA_ENV] = str(certs["ca"])
            out = run_cli(vindex.path, "Hi", "-n", "2", "--moe-shards", spec, *extra, env=env)
            assert out.returncode == 1, out.stderr
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and needle in lines[0], out.stderr      # one line, saying why ...
            assert f"127.0.0.1:{tls.port}" in lines[0]                     # ... and which server
            assert "Traceback" not in out.stderr
        # a file that cannot be used: one line naming the flag as typed and the file
        unreadable = "cannot read the API key file"
        for flag, path, needle in (("--shard-api-key-file", tmp_path / "nope", unreadable),
                                   ("--api-key-file", tmp_path / "nope", unreadable),
                                   ("--tls-ca", tmp_path / "no-ca.pem", "TLS: CA file")):
            out = run_cli(vindex.path, "Hi", "-n", "2", "--moe-shards", spec, flag, path)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 1 and len(lines) == 1, out.stderr
            assert lines[0].startswith(f"larql run: error: {flag}: {needle} {path}: "), lines[0]
    finally:
        tls.stop()


def test_client_tls_context_is_verifying():
    ctx = transport.client_tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
