"""A real expert server on loopback fed malformed, hostile and out-of-contract frames.

Every case must get an error reply naming what was wrong (or, when the stream cannot be
resynchronised, a clean close) and the server must keep serving everyone else.
"""

from __future__ import annotations

import socket
import struct

import msgpack
import numpy as np
import pytest
from rawwire import raw_frame, read_frame, recv_exact, rt  # noqa: F401  (the shared raw-socket helpers)

from larql import protocol as P
from larql.demo import build_demo_vindex, demo_config
from larql.server import ExpertServer
from larql.vindex import open_vindex

H = 64


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory):
    cfg = demo_config(num_layers=2, hidden=H, num_experts=8, top_k=2)
    return build_demo_vindex(tmp_path_factory.mktemp("srvproto") / "v", quant="f32", config=cfg)


@pytest.fixture(scope="module")
def server(vindex_path):
    srv = ExpertServer(open_vindex(vindex_path), experts=range(0, 4), layers=[0])
    h = srv.start_in_thread("127.0.0.1", 0)
    yield h
    h.stop()


def connect(h, hello=True) -> socket.socket:
    s = socket.create_connection((h.host, h.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hello:
        r = rt(s, {"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION})
        assert r["ok"] is True
    return s


def assert_alive(h):
    with connect(h, hello=False) as s:
        r = rt(s, {"op": "health", "id": 99})
        assert r.pop("integrity") in ("verified", "verifying", "unverified")  # the background check
        assert r == {"id": 99, "ok": True, "status": "ok", "inflight": 0}


def work(layer=0, T=2, K=2, ids=None, enc="f32"):
    rng = np.random.default_rng(0)
    ids = np.array(ids if ids is not None else [[0, 1]] * T, dtype=np.int32)
    return {"op": "experts", "id": 5, **P.encode_work(layer, rng.standard_normal((T, H)).astype(np.float32),
                                                      ids, np.full(ids.shape, 0.5, np.float32), enc)}


def test_hello_describes_the_shard(server, vindex_path):
    with connect(server, hello=False) as s:
        r = rt(s, {"op": "hello", "id": 3, "version": P.PROTOCOL_VERSION, "client": "test"})
    assert r["ok"] and r["id"] == 3 and r["version"] == P.PROTOCOL_VERSION
    assert r["fingerprint"] == open_vindex(vindex_path).expert_fingerprint()
    assert (r["hidden"], r["num_experts"], r["num_layers"], r["top_k"]) == (H, 8, 2, 2)
    assert r["experts"] == [[0, 3]] and r["layers"] == [[0, 0]]
    assert set(r["encodings"]) == {"f32", "f16", "q8k"}
    assert r["max_frame"] == P.MAX_FRAME


def test_wrong_version_and_missing_hello(server):
    with connect(server, hello=False) as s:
        r = rt(s, {"op": "hello", "id": 1, "version": 99})
        assert r["ok"] is False and r["error"]["code"] == P.E_VERSION and "99" in r["error"]["message"]
        r = rt(s, work())
        assert r["error"]["code"] == P.E_NEED_HELLO and r["id"] == 5
        assert rt(s, {"op": "hello", "id": 2, "version": P.PROTOCOL_VERSION})["ok"]   # still usable


@pytest.mark.parametrize("payload, code, needle", [
    (raw_frame(b"\xc1\xc1\xc1"), P.E_BAD_FRAME, "msgpack"),
    (raw_frame(msgpack.packb([1, 2, 3])), P.E_BAD_FRAME, "map"),
    (raw_frame(b""), P.E_BAD_FRAME, "msgpack"),
    (raw_frame(msgpack.packb({1: "x"})), P.E_BAD_FRAME, "msgpack"),
    (raw_frame(b"\x91" * 100000 + b"\x00"), P.E_BAD_FRAME, "msgpack"),        # nested 100k deep
    (raw_frame(b"\xdd\xff\xff\xff\xff"), P.E_BAD_FRAME, "msgpack"),          # claims 4G elements
    (raw_frame(b"\xc6\xff\xff\xff\xff"), P.E_BAD_FRAME, "msgpack"),          # claims a 4 GiB bin
    ({"op": "health"}, P.E_BAD_REQUEST, "'id'"),
    ({"op": "health", "id": -4}, P.E_BAD_REQUEST, "'id'"),
    ({"op": "health", "id": "7"}, P.E_BAD_REQUEST, "'id'"),
    ({"op": "launch", "id": 7}, P.E_UNKNOWN_OP, "launch"),
    ({"id": 7}, P.E_UNKNOWN_OP, "None"),
    ({**work(), "layer": "0"}, P.E_BAD_REQUEST, "'layer'"),
    ({**work(), "T": 3}, P.E_BAD_REQUEST, "'x' has"),
    ({**work(), "T": 2**40}, P.E_BAD_REQUEST, "'T'"),
    ({**work(), "K": 0}, P.E_BAD_REQUEST, "'K'"),
    ({**work(), "x": work()["x"][:-4]}, P.E_BAD_REQUEST, "'x' has"),
    ({**work(), "x": [0.0] * (2 * H)}, P.E_BAD_REQUEST, "bin"),
    ({**work(), "ids": b"\0" * 12}, P.E_BAD_REQUEST, "'ids'"),
    ({**work(), "enc": "int4"}, P.E_BAD_REQUEST, "enc"),
    ({**work(enc="q8k"), "x": b"\0" * 10}, P.E_BAD_REQUEST, "'x' has"),
    (work(ids=[[0, 8], [1, 2]]), P.E_BAD_REQUEST, "out of range"),
    (work(ids=[[0, 5], [1, 2]]), P.E_NOT_OWNED, "experts 0-3"),
    (work(layer=1), P.E_NOT_OWNED, "layers 0"),
    (work(layer=2), P.E_BAD_REQUEST, "'layer'"),
    ({"op": "multi", "id": 5, "items": []}, P.E_BAD_REQUEST, "items"),
    ({"op": "multi", "id": 5, "items": "x"}, P.E_BAD_REQUEST, "items"),
    ({"op": "multi", "id": 5, "items": [{k: v for k, v in work().items() if k not in ("op", "id")}, 3]},
     P.E_BAD_REQUEST, "map"),
    ({"op": "multi", "id": 5, "items": [{k: v for k, v in work(layer=1).items() if k not in ("op", "id")}]},
     P.E_NOT_OWNED, "layer 1"),
])
def test_bad_request_gets_error_reply_and_connection_survives(server, payload, code, needle):
    with connect(server) as s:
        r = rt(s, payload)
        assert r["ok"] is False, r
        assert r["error"]["code"] == code, r
        assert needle in r["error"]["message"], r
        # the same connection still answers
        assert rt(s, {"op": "health", "id": 11})["ok"] is True
    assert_alive(server)


def test_oversized_length_gets_error_then_close(server):
    with connect(server) as s:
        s.sendall(struct.pack("<I", P.MAX_FRAME + 1) + b"\0" * 64)
        r = read_frame(s)
        assert r["ok"] is False and r["error"]["code"] == P.E_BAD_FRAME and r["id"] is None
        assert "exceeds" in r["error"]["message"]
        s.settimeout(5)
        assert s.recv(1) == b""   # closed: the stream cannot be resynchronised
    assert_alive(server)


def test_truncated_frames_and_abrupt_disconnects(server):
    for cut in (1, 3, 4, 20):
        s = connect(server)
        s.sendall(P.encode_frame(work())[:cut])
        s.close()
    s = connect(server)
    s.sendall(struct.pack("<I", 1000) + b"\x81")   # promises 1000 bytes, sends 1, then RST
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    assert_alive(server)


def test_random_garbage_never_kills_the_server(server):
    rng = np.random.default_rng(1234)
    for i in range(150):
        s = connect(server, hello=bool(i % 2))
        if i % 3 == 0:   # plausible length, random body
            body = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
            data = raw_frame(body)
        elif i % 3 == 1:  # a valid map with random fields
            keys = ["op", "id", "layer", "T", "K", "x", "ids", "w", "enc", "items", "version"]
            vals = [None, -1, 0, 1, 2**64 - 1, "experts", "multi", b"\0" * 8, [1, 2], {"a": 1}, 1.5, True]
            m = {k: vals[int(rng.integers(len(vals)))] for k in keys if rng.random() < 0.6}
            data = raw_frame(msgpack.packb(m))
        else:             # anything at all
            data = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        s.close()
        # whatever came back is well-formed frames of error replies
        for body in P.FrameReader().feed(got):
            rep = P.decode_body(body)
            assert rep["ok"] is False or rep.get("status") == "ok" or "version" in rep, rep
    assert_alive(server)


def test_stats_count_requests_and_errors(server):
    with connect(server) as s:
        before = rt(s, {"op": "stats", "id": 1})
        rt(s, {"op": "nope", "id": 2})
        after = rt(s, {"op": "stats", "id": 3})
    assert after["requests"] >= before["requests"] + 2
    assert after["errors"] >= before["errors"] + 1
    for key in ("bytes_in", "bytes_out", "compute_s", "p50_us", "p99_us", "connections"):
        assert key in after


def test_warmup_op_reports_owned_bytes(server, vindex_path):
    vindex = open_vindex(vindex_path)
    ef = vindex.expert_file(0)
    owned = sum(ef.entry(e).down_off + ef.entry(e).down_len - ef.entry(e).gate_up_off for e in range(4))
    with connect(server, hello=False) as s:
        assert rt(s, {"op": "warmup", "id": 1})["error"]["code"] == P.E_NEED_HELLO
        assert rt(s, {"op": "hello", "id": 2, "version": P.PROTOCOL_VERSION})["ok"]
        r = rt(s, {"op": "warmup", "id": 3})
    assert r["ok"] and r["bytes"] == owned and r["seconds"] >= 0


@pytest.mark.parametrize("extra, needle", [
    (["--experts", "5-2"], "start 5 is after end 2"),
    (["--experts", "0-8"], "outside 0-7"),
    (["--layers", "x"], "bad --layers"),
    (["--port", "70000"], "out of range"),
])
def test_serve_cli_rejects_bad_arguments(vindex_path, extra, needle):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "larql", "serve", str(vindex_path), *extra],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert needle in out.stderr, out.stderr


def test_serve_cli_names_a_missing_layer_file(vindex_path, tmp_path):
    import shutil
    import subprocess
    import sys

    broken = tmp_path / "broken"
    shutil.copytree(vindex_path, broken)
    (broken / "layers" / "layer_01.weights").unlink()
    out = subprocess.run([sys.executable, "-m", "larql", "serve", str(broken), "--layers", "0-1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "layer" in out.stderr and "1" in out.stderr, out.stderr
