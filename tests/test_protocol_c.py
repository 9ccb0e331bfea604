"""The decode step's wire messages in C (larql/protocol_c.py, csrc/wire.c) against protocol.py.

The C side may decline anything; what it accepts, protocol.py must accept with the same
meaning, and what it writes must be byte for byte what the Python side writes. Then the real
server and the real client on loopback: the C path is taken, its replies are the Python path's
bytes, and everything off the plain path still gets protocol.py's errors.
"""

from __future__ import annotations

import os
import socket
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawwire import connect, read_frame, recv_exact, rt
from standin import StandIn, make_certs

from larql import kernels, transport
from larql import protocol as P
from larql import protocol_c as C
from larql.client import connect_shards
from larql.client.core import ModelIdentity, Planner
from larql.demo import build_demo_vindex, demo_config
from larql.experts import LocalExperts
from larql.server import ExpertServer
from larql.shardmap import parse_shards
from larql.vindex import open_vindex

H, E, L = 64, 8, 2
ffi = C.ffi
LIMITS = dict(hidden=H, num_layers=L, num_experts=E, max_tokens=4096)


def request(T=1, K=2, ids=None, layer=1, acc=None, rid=5, seed=0, over=None, q8k=False, **fields) -> dict:
    """A valid request (T tokens, K slots; x in Q8_K if q8k), then `fields` and `over` written
    over it as they are."""
    rng = np.random.default_rng(seed)
    ids = np.array(ids if ids is not None else [list(range(K))] * T, dtype=np.int32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    msg = {"op": "experts", **P.encode_work(layer, kernels.quantize_q8k(x) if q8k else x, ids,
                                            rng.random(ids.shape).astype(np.float32),
                                            "q8k" if q8k else "f32"), "id": rid}
    if acc is not None:
        msg["acc"] = acc
    msg.update(fields)
    msg.update(over or {})
    return msg


def body(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def python_reading(b: bytes):
    """protocol.py's reading of a body as the server does it, or the ProtocolError."""
    try:
        msg = P.decode_body(b)
        if msg.get("op") != "experts" or P.request_id(msg) is None:
            raise P.ProtocolError("not an experts request with an id")
        return msg, P.decode_work(msg, **LIMITS)
    except P.ProtocolError as e:
        return e


def assert_same_meaning(b: bytes) -> bool:
    """C accepts only what Python accepts, with the same fields; True if C accepted."""
    got = C.parse_experts(b, **LIMITS)
    py = python_reading(b)
    if got is None:
        return False
    assert not isinstance(py, Exception), f"C accepted what protocol.py refuses: {py}"
    msg, wk = py
    assert (got.id, got.layer, got.tokens, got.slots, got.acc) == (msg["id"], wk.layer, wk.tokens,
                                                                   wk.ids.shape[1], wk.acc)
    assert got.enc == wk.enc in ("f32", "q8k")
    T, K = got.tokens, got.slots
    assert b[got.x_off: got.x_off + wk.x.nbytes] == wk.x.tobytes()
    assert b[got.ids_off: got.ids_off + 4 * T * K] == wk.ids.tobytes()
    assert b[got.w_off: got.w_off + 4 * T * K] == wk.weights.tobytes()
    return True


# ------------------------------------------------------------------------------------------
# Parsing requests


def q8k_block(d: float = 0.5, sums_off: int = 0) -> bytes:
    """One Q8_K block (the row of H = 64 values padded to 256) with scale d; sums_off added to
    its first group sum."""
    q = np.random.default_rng(3).integers(-127, 128, 256).astype(np.int8)
    sums = q.reshape(16, 16).astype(np.int16).sum(axis=1).astype("<i2")
    sums[0] += sums_off
    return struct.pack("<f", d) + q.tobytes() + sums.tobytes()



@pytest.mark.parametrize("msg", [
    request(), request(T=3, K=4), request(acc="f64"), request(acc="f32"), request(enc="f32"),
    request(K=3, ids=[[2, -1, 5]]), request(rid=0), request(rid=2**63 - 1), request(rid=300),
    request(rid=70000), request(rid=2**40), request(layer=0), request(K=E, ids=[list(range(E))]),
    request(q8k=True), request(q8k=True, T=2, acc="f64"), request(q8k=True, x=b"\0" * 292),
])
def test_valid_requests_are_read_as_protocol_py_reads_them(msg):
    assert assert_same_meaning(body(msg))


@pytest.mark.parametrize("msg, why", [
    (request(enc="f16"), "another encoding (the Python path converts it)"),
    (request(acc="f16"), "an unknown accumulator"),
    (request(op="multi"), "another op"),
    (request(extra=1), "a key the C path does not know"),
    (request(over={"T": 0}), "T below 1"),
    (request(over={"K": 0}), "K below 1"),
    (request(over={"K": E + 1}), "K above the experts"),
    (request(over={"layer": L}), "a layer out of range"),
    (request(ids=[[0, E]]), "an id out of range"),
    (request(ids=[[0, -2]]), "an id below -1"),
    (request(ids=[[3, 3]]), "a duplicate id"),
    (request(rid=-1), "a negative id"),
    (request(over={"T": True}), "a bool for an int"),
    (request(over={"layer": 1.0}), "a float for an int"),
    (request(x=b"\0" * 8), "x of the wrong length"),
    (request(w=b"\0" * 4), "w of the wrong length"),
    (request(x="text"), "a str where bin belongs"),
    (request(w=struct.pack("<2f", 0.5, float("nan"))), "a NaN weight"),
    (request(x=struct.pack(f"<{H}f", *([0.0] * (H - 1) + [float("inf")]))), "an infinite x"),
    (request(q8k=True, x=b"\0" * 291), "Q8_K x of the wrong length"),
    (request(q8k=True, x=b"\0" * 4 * H), "f32 bytes sent as Q8_K"),
    (request(q8k=True, x=q8k_block(d=float("nan"))), "a NaN Q8_K scale"),
    (request(q8k=True, x=q8k_block(sums_off=1)), "Q8_K group sums that are not the quants' sums"),
    (request(x=bytes(kernels.quantize_q8k(np.ones((1, H), np.float32)))), "Q8_K bytes sent as f32"),
])
def test_what_the_c_path_declines(msg, why):
    assert C.parse_experts(body(msg), **LIMITS) is None, why


def test_protocol_py_refuses_the_bad_q8k_blocks_too():
    """What C declines for its Q8_K blocks, protocol.py refuses with a message that says why."""
    for x, words in ((q8k_block(d=float("inf")), "non-finite scales"),
                     (q8k_block(sums_off=-3), "group sums")):
        err = python_reading(body(request(q8k=True, x=x)))
        assert isinstance(err, P.ProtocolError) and words in str(err)
    assert not isinstance(python_reading(body(request(q8k=True, x=q8k_block()))), Exception)


def test_declines_framing_the_python_side_refuses():
    b = body(request())
    assert C.parse_experts(b + b"\0", **LIMITS) is None                  # extra data after the map
    assert C.parse_experts(b[:-1], **LIMITS) is None                     # truncated
    assert C.parse_experts(b"\x80", **LIMITS) is None                    # an empty map
    # a repeated key: msgpack-python keeps the last one, C does not guess
    rep = b"\x8a" + b[1:] + msgpack.packb("layer") + msgpack.packb(0)
    assert C.parse_experts(rep, **LIMITS) is None
    assert C.parse_experts(b"", **LIMITS) is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_frames_never_mean_something_else(data):
    """Random byte edits of valid frames: whenever C accepts, protocol.py agrees field by field."""
    msg = request(T=data.draw(st.integers(1, 2)), K=2, acc=data.draw(st.sampled_from([None, "f32", "f64"])),
                  rid=data.draw(st.integers(0, 2**63 - 1)), q8k=data.draw(st.booleans()))
    b = bytearray(body(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = data.draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b.insert(i, data.draw(st.integers(0, 255)))
        elif len(b) > 1:
            del b[i]
        if not b:
            b = bytearray(b"\x80")
    assert_same_meaning(bytes(b))


# ------------------------------------------------------------------------------------------
# Building requests, reading replies


def shards(ranges):
    return parse_shards(",".join(f"{a}-{b}=127.0.0.1:{9000 + i}" for i, (a, b) in enumerate(ranges)), E)


@pytest.mark.parametrize("enc", ["f32", "q8k"])
@pytest.mark.parametrize("acc64", [False, True])
@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("ranges", [[(0, 7)], [(0, 3), (4, 7)], [(0, 0), (1, 6), (7, 7)]])
def test_requests_are_the_python_planners_bytes(enc, acc64, ids_dtype, ranges):
    rng = np.random.default_rng(1)
    specs = shards(ranges)
    planner = Planner(specs, ModelIdentity(H, E, L), enc,
                      lambda layer, h: kernels.quantize_q8k(h * (layer + 1)))
    planner.acc = "f64" if acc64 else "f32"
    out = bytearray(C.frame_capacity(H))
    out_c = ffi.from_buffer(out)
    for trial in range(20):
        K = int(rng.integers(1, 9))
        ids = rng.choice(np.arange(-1, E), K, replace=False).astype(ids_dtype)[None]
        w = rng.random((1, K)).astype(np.float32)
        h = rng.standard_normal((1, H)).astype(np.float32)
        rid = int(rng.choice([1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**62]))
        plan = planner.plan([(trial % L, h, ids, w)], False, lambda si: (1 << 30, 1 << 20, 1 << 20))
        jobs = {j.shard: j for j in plan.jobs}
        x, x_enc = planner.token_input(trial % L, h)
        assert x_enc == enc
        for si, spec in enumerate(specs):
            n = C.encode_token(out_c, len(out), rid, trial % L, ffi.from_buffer(x), enc, H, ids,
                               ffi.from_buffer("float[]", w), K, E, spec.first, spec.last, acc64)
            if si not in jobs:
                assert n == 0
                continue
            assert bytes(out[:n]) == P.encode_frame({**jobs[si].msg, "id": rid})


def test_encode_refuses_bad_ids_and_short_buffers():
    out = bytearray(C.frame_capacity(H))
    h = ffi.from_buffer("float[]", np.zeros(H, np.float32))
    w = ffi.from_buffer("float[]", np.ones(2, np.float32))
    out_c = ffi.from_buffer(out)
    for bad in ([0, E], [-2, 0]):
        ids = np.array(bad, np.int32)
        assert C.encode_token(out_c, len(out), 1, 0, h, "f32", H, ids, w, 2, E, 0, E - 1, False) < 0
    ids = np.array([0, 1], np.int32)
    assert C.encode_token(out_c, 100, 1, 0, h, "f32", H, ids, w, 2, E, 0, E - 1, False) < 0


def add(reply: dict | bytes, rid=7, acc64=False, first=False, start=None):
    dtype = np.float64 if acc64 else np.float32
    total = np.full(H, 0.25, dtype) if start is None else start.copy()
    b = reply if isinstance(reply, bytes) else body(reply)
    ok = C.add_reply(ffi.from_buffer(b), len(b), rid, H, acc64, ffi.from_buffer(total), first)
    return ok, total


@pytest.mark.parametrize("acc64", [False, True])
def test_replies_are_added_exactly(acc64):
    dtype = np.float64 if acc64 else np.float32
    y = np.random.default_rng(2).standard_normal(H).astype(dtype)
    y[0] = -0.0
    ok, total = add({"id": 7, "ok": True, "y": y.tobytes()}, acc64=acc64)
    assert ok and np.array_equal(total, np.full(H, 0.25, dtype) + y)
    ok, total = add({"y": y.tobytes(), "ok": True, "id": 7}, acc64=acc64, first=True)   # any key order
    assert ok and total.tobytes() == (y + 0.0).tobytes()          # 0 + y, as the Python combine


@pytest.mark.parametrize("reply, why", [
    ({"id": 8, "ok": True, "y": np.zeros(H, np.float32).tobytes()}, "another request's reply"),
    ({"id": 7, "ok": False, "error": {"code": "internal", "message": "x"}}, "an error reply"),
    ({"id": 7, "ok": True, "y": np.zeros(H - 1, np.float32).tobytes()}, "a short y"),
    ({"id": 7, "ok": True, "y": np.full(H, np.nan, np.float32).tobytes()}, "NaN"),
    ({"id": 7, "ok": True, "y": np.full(H, np.inf, np.float32).tobytes()}, "infinity"),
    ({"id": 7, "ok": 1, "y": np.zeros(H, np.float32).tobytes()}, "ok not true"),
    ({"id": 7, "ok": True, "y": np.zeros(H, np.float32).tobytes(), "more": 1}, "an extra key"),
    ({"id": 7, "ok": True, "y": "text"}, "a str y"),
])
def test_replies_off_the_plain_path_are_declined_untouched(reply, why):
    ok, total = add(reply)
    assert not ok, why
    assert np.array_equal(total, np.full(H, 0.25, np.float32))
    b = body({"id": 7, "ok": True, "y": np.zeros(H, np.float32).tobytes()})
    for cut in (b[:-1], b + b"\0"):
        assert not add(cut)[0]


# ------------------------------------------------------------------------------------------
# The real server and client on loopback


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory):
    cfg = demo_config(num_layers=L, hidden=H, num_experts=E, top_k=2)
    return build_demo_vindex(tmp_path_factory.mktemp("protoc") / "v", quant="q4k", config=cfg)


@pytest.fixture()
def server(vindex_path):
    srv = ExpertServer(open_vindex(vindex_path), experts=range(0, 4))
    h = srv.start_in_thread("127.0.0.1", 0)
    yield h
    h.stop()


def stats(s) -> dict:
    return rt(s, {"op": "stats", "id": 1000})


@pytest.mark.parametrize("acc", ["f32", "f64"])
def test_server_answers_in_c_with_the_python_paths_bytes(server, acc):
    s = connect(server.host, server.port)
    frame = P.encode_frame(request(ids=[[1, 3]], acc=acc, rid=41))
    replies = []
    for _ in range(3):       # the first takes the Python path (and checks the layer), then C
        s.sendall(frame)
        (n,) = struct.unpack("<I", recv_exact(s, 4))
        replies.append(recv_exact(s, n))
    assert replies[0] == replies[1] == replies[2]
    assert stats(s)["c_path"] == 2
    y = np.frombuffer(msgpack.unpackb(replies[0])["y"], dtype="<f8" if acc == "f64" else "<f4")
    msg = request(ids=[[1, 3]])
    wk = P.decode_work(msg, **LIMITS)
    local = LocalExperts(server.server.vindex, experts=range(0, 4))
    assert np.array_equal(y, local.forward(1, wk.x, wk.ids, wk.weights, acc)[0])


@pytest.mark.parametrize("acc", ["f32", "f64"])
def test_server_answers_q8k_in_c_exactly(server, acc):
    """A q8k request (the normed input in the kernel's own Q8_K blocks) is answered in C with
    the Python path's bytes, and equals the in-process experts on the raw residual bit for bit."""
    v = server.server.vindex
    local = LocalExperts(v, experts=range(0, 4))
    rng = np.random.default_rng(12)
    h = rng.standard_normal((1, H)).astype(np.float32) * 2
    norm = v.norm("layers.1.pre_feedforward_layernorm_2.weight")
    xq = kernels.quantize_q8k(kernels.rms_norm(h, norm, v.config.rms_norm_eps))
    ids, w = np.array([[0, 3]], np.int32), np.array([[0.4, 0.6]], np.float32)
    msg = {"op": "experts", **P.encode_work(1, xq, ids, w, "q8k"), "acc": acc, "id": 77}
    s = connect(server.host, server.port)
    replies = []
    for _ in range(3):       # the first takes the Python path (and checks the layer), then C
        s.sendall(P.encode_frame(msg))
        (n,) = struct.unpack("<I", recv_exact(s, 4))
        replies.append(recv_exact(s, n))
    assert replies[0] == replies[1] == replies[2]
    assert stats(s)["c_path"] == 2
    y = np.frombuffer(msgpack.unpackb(replies[0])["y"], dtype="<f8" if acc == "f64" else "<f4")
    assert np.array_equal(y, local.forward(1, h, ids, w, acc)[0])
    bad = {**msg, "x": q8k_block(sums_off=2)}
    r = rt(s, bad)
    assert r["ok"] is False and r["error"]["code"] == P.E_BAD_REQUEST
    assert "group sums" in r["error"]["message"]


def test_server_c_path_takes_frames_split_across_reads(server):
    """A frame that arrives in pieces is assembled by the frame reader, then offered to C."""
    import time

    s = connect(server.host, server.port)
    frame = P.encode_frame(request(ids=[[0, 2]], rid=60))
    whole = rt(s, frame)
    for cut in (3, 100, len(frame) - 1):
        s.sendall(frame[:cut])
        time.sleep(0.05)
        s.sendall(frame[cut:])
        assert read_frame(s) == whole
    assert stats(s)["c_path"] == 3


def test_server_c_path_leaves_errors_to_protocol_py(server):
    s = connect(server.host, server.port)
    for _ in range(2):
        assert rt(s, request(ids=[[1, 3]]))["ok"] is True
    r = rt(s, request(ids=[[1, 5]]))          # expert 5 is not held: C declines, Python names it
    assert r["ok"] is False and r["error"]["code"] == P.E_NOT_OWNED
    r = rt(s, request(ids=[[2, 2]]))
    assert r["ok"] is False and "more than once" in r["error"]["message"]
    r = rt(s, request(x=struct.pack(f"<{H}f", *([float("nan")] * H))))
    assert r["ok"] is False and "non-finite" in r["error"]["message"]
    assert rt(s, request(ids=[[1, 3]]))["ok"] is True
    assert stats(s)["c_path"] == 2


def test_server_c_path_checks_the_file_before_reading_it(vindex_path, tmp_path):
    """A layer file truncated in place after the C path took the layer: an error reply naming
    the file, not a SIGBUS (the C path's fstat declines and the Python path reports)."""
    import shutil

    copy = tmp_path / "v"
    shutil.copytree(vindex_path, copy)
    srv = ExpertServer(open_vindex(copy), experts=range(0, 4))
    h = srv.start_in_thread("127.0.0.1", 0)
    try:
        s = connect(h.host, h.port)
        for _ in range(3):
            assert rt(s, request(ids=[[1, 3]]))["ok"] is True
        assert stats(s)["c_path"] == 2
        layer_file = next(p for p in (copy / "layers").iterdir() if p.name.startswith("layer_01"))
        os.truncate(layer_file, 4096)
        r = rt(s, request(ids=[[1, 3]]))
        assert r["ok"] is False and r["error"]["code"] == P.E_INTEGRITY and "shrank" in r["error"]["message"]
        assert stats(s)["c_path"] == 2
    finally:
        h.stop()


def test_pipelined_frames_take_the_python_path(server):
    """Two frames in one read are not a lone request: the batcher fuses them, as before."""
    s = connect(server.host, server.port)
    for _ in range(2):
        assert rt(s, request(ids=[[1, 3]]))["ok"] is True
    before = stats(s)["c_path"]
    s.sendall(P.encode_frame(request(ids=[[1, 3]], rid=50)) + P.encode_frame(request(ids=[[0, 2]], rid=51)))
    got = {read_frame(s)["id"], read_frame(s)["id"]}
    assert got == {50, 51}
    assert stats(s)["c_path"] == before


@pytest.mark.parametrize("enc", ["f32", "q8k"])
@pytest.mark.parametrize("acc", ["f32", "f64"])
def test_client_c_path_equals_the_python_path(vindex_path, acc, enc):
    """Two shards: the C-built requests and C-summed replies give exactly the general path's
    result (which `forward_multi` still takes), for int32 and int64 ids, in either encoding;
    with f64 partial sums both equal the in-process experts bit for bit."""
    v = open_vindex(vindex_path)
    a = ExpertServer(v, experts=range(0, 4)).start_in_thread("127.0.0.1", 0)
    b = ExpertServer(v, experts=range(4, 8)).start_in_thread("127.0.0.1", 0)
    local = LocalExperts(v)
    try:
        rx = connect_shards(f"0-3={a.address},4-7={b.address}", v, api_key="", accumulate=acc, encoding=enc)
        rng = np.random.default_rng(5)
        for _ in range(12):
            h = rng.standard_normal((1, H)).astype(np.float32)
            ids = rng.choice(E, 2, replace=False)[None]
            w = rng.random((1, 2)).astype(np.float32)
            for dt in (np.int32, np.int64):
                fast = rx.forward(1, h, ids.astype(dt), w)
                (general,) = rx.forward_multi([(1, h, ids.astype(dt), w)])
                assert fast.dtype == np.float32 and fast.shape == (1, H)
                assert fast.tobytes() == general.tobytes()
                if acc == "f64":
                    assert fast.tobytes() == local.forward(1, h, ids, w).tobytes()
        assert rx.client.c_path_calls == 24
        assert a.server.stats.c_path > 0 and b.server.stats.c_path > 0
        rx.close()
    finally:
        a.stop()
        b.stop()


def test_client_lane_is_the_steady_state_and_hands_trouble_to_failover(vindex_path):
    """Two single-replica shards: every decode call runs on the lane (two C calls), exactly the
    in-process sum. A write that fails on the lane (the client's side of shard 0 shut) is handed
    to the general path as it stands: shard 0 reconnects and is asked again, shard 1's reply,
    already written, is still added in shard order; the next call runs on a new lane over the
    new connection."""
    v = open_vindex(vindex_path)
    a = ExpertServer(v, experts=range(0, 4)).start_in_thread("127.0.0.1", 0)
    b = ExpertServer(v, experts=range(4, 8)).start_in_thread("127.0.0.1", 0)
    local = LocalExperts(v)
    try:
        rx = connect_shards(f"0-3={a.address},4-7={b.address}", v, api_key="", accumulate="f64", timeout=20)
        rng = np.random.default_rng(8)
        work = [(1, rng.standard_normal((1, H)).astype(np.float32), np.array([[2, 6]]),
                 rng.random((1, 2)).astype(np.float32)) for _ in range(4)]
        for wk in work:
            assert rx.forward(*wk).tobytes() == local.forward(*wk).tobytes()
        assert rx.client.lane_calls == 4
        c = rx.client
        old = c.shards[0].replicas[0].conn
        old.sock.shutdown(socket.SHUT_WR)        # the next write to shard 0 fails (EPIPE)
        assert rx.forward(*work[0]).tobytes() == local.forward(*work[0]).tobytes()
        assert c.lane_calls == 4                 # that call finished on the general path
        new = c.shards[0].replicas[0].conn
        assert new is not None and new is not old and c.shards[0].policy.replicas[0].up()
        assert rx.forward(*work[1]).tobytes() == local.forward(*work[1]).tobytes()
        assert c.lane_calls == 5 and c._lanes[1].conns[0] is new
        rx.close()
    finally:
        a.stop()
        b.stop()


def test_client_lane_takes_a_replicated_shards_replicas_in_turn_and_fails_over(vindex_path):
    """Shard 0 has two replicas, shard 1 one: decode calls run on the lane, shard 0's replicas
    answer in turn (the policy's round-robin), each sum exactly the in-process one. One replica
    stopped: the call that meets it fails over to the other within the deadline, and the calls
    after it run on a new lane with the replica that is left."""
    v = open_vindex(vindex_path)
    a1 = ExpertServer(v, experts=range(0, 4)).start_in_thread("127.0.0.1", 0)
    a2 = ExpertServer(v, experts=range(0, 4)).start_in_thread("127.0.0.1", 0)
    b = ExpertServer(v, experts=range(4, 8)).start_in_thread("127.0.0.1", 0)
    local = LocalExperts(v)
    try:
        rx = connect_shards(f"0-3={a1.address}|{a2.address},4-7={b.address}", v, api_key="",
                            accumulate="f64", timeout=10)
        c = rx.client
        rng = np.random.default_rng(9)
        work = [(i % L, rng.standard_normal((1, H)).astype(np.float32), np.array([[i % 4, 4 + i % 4]]),
                 rng.random((1, 2)).astype(np.float32)) for i in range(8)]
        for wk in work:
            assert rx.forward(*wk).tobytes() == local.forward(*wk).tobytes()
        assert c.lane_calls == 8
        served = [a1.server.stats.requests, a2.server.stats.requests]
        assert min(served) >= 3, served              # both replicas, in turn
        a1.stop()                                    # one replica of shard 0 gone
        for wk in work:
            assert rx.forward(*wk).tobytes() == local.forward(*wk).tobytes()
        assert not c.shards[0].replicas[0].state.up() and c.shards[0].replicas[1].state.up()
        assert c.lane_calls >= 8 + 6                 # at most the failed call and a rebuild off it
        lane = c._lanes[work[-1][0]]
        assert lane is not None and lane.conns[0] is c.shards[0].replicas[1].conn
        rx.close()
    finally:
        for h in (a2, b):
            h.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("lane-certs"))


def test_client_lane_over_tls_and_plain_hands_trouble_to_failover(vindex_path, certs):
    """A TLS shard and a plain one: every decode call runs on the lane (C builds both requests;
    Python's ssl writes and reads the TLS records, C checks and adds every reply), exactly the
    in-process sum. A write that fails (TLS, then plain) is handed to the general path as it
    stands: that shard reconnects and is asked again, and the next call runs on a new lane."""
    v = open_vindex(vindex_path)
    ctx = transport.server_tls_context(certs["server"], certs["server.key"])
    a = ExpertServer(v, experts=range(0, 4), tls=ctx).start_in_thread("127.0.0.1", 0)
    b = ExpertServer(v, experts=range(4, 8)).start_in_thread("127.0.0.1", 0)
    plain = ExpertServer(v, experts=range(0, 4)).start_in_thread("127.0.0.1", 0)
    local = LocalExperts(v)
    try:
        for acc in ("f32", "f64"):
            rx = connect_shards(f"0-3=tls://{a.address},4-7={b.address}", v, api_key="", accumulate=acc,
                                tls_ca=certs["ca"], timeout=20)
            rng = np.random.default_rng(12)
            work = [(i % L, rng.standard_normal((1, H)).astype(np.float32), np.array([[i % 4, 4 + i % 4]]),
                     rng.random((1, 2)).astype(np.float32)) for i in range(4)]
            ref = connect_shards(f"0-3={plain.address},4-7={b.address}", v, api_key="", accumulate=acc)
            for wk in work:
                assert rx.forward(*wk).tobytes() == ref.forward(*wk).tobytes()
                np.testing.assert_allclose(rx.forward(*wk), local.forward(*wk), rtol=1e-5, atol=1e-5)
            c = rx.client
            assert c.lane_calls == 8 and c._lanes[0].tls and c.shards[0].replicas[0].conn.fd < 0
            old = c.shards[0].replicas[0].conn
            old.sock.shutdown(socket.SHUT_WR)        # the next TLS write to shard 0 fails
            assert rx.forward(*work[0]).tobytes() == ref.forward(*work[0]).tobytes()
            assert c.lane_calls == 8                 # that call finished on the general path
            new = c.shards[0].replicas[0].conn
            assert new is not None and new is not old and c.shards[0].policy.replicas[0].up()
            assert rx.forward(*work[1]).tobytes() == ref.forward(*work[1]).tobytes()
            assert c.lane_calls == 9 and c._lanes[work[1][0]].conns[0] is new
            # the plain write fails with the TLS request out: C's collect leaves the TLS leg
            # to Python (LQ_WIRE_DECLINED), which reads it, then shard 1 is asked again
            c.shards[1].replicas[0].conn.sock.shutdown(socket.SHUT_WR)
            assert rx.forward(*work[2]).tobytes() == ref.forward(*work[2]).tobytes()
            assert c.lane_calls == 9 and c.shards[1].policy.replicas[0].up()
            assert rx.forward(*work[3]).tobytes() == ref.forward(*work[3]).tobytes() and c.lane_calls == 10
            rx.close()
            ref.close()
    finally:
        a.stop()
        b.stop()
        plain.stop()


def test_client_lane_over_tls_words_a_bad_reply_as_the_general_path(vindex_path, certs):
    """A TLS shard whose replies carry a NaN: the lane reads the reply, C declines it, and the
    general path reads it again and raises; the same error, word for word, as a client that
    never takes the lane. Once the replica is back, calls are exact and on the lane again."""
    v = open_vindex(vindex_path)
    honest = ExpertServer(v).start_in_thread("127.0.0.1", 0)
    poison = {"on": True}

    def nan_y(req, rep):
        if "y" in rep and poison["on"]:
            y = np.frombuffer(rep["y"], dtype="<f8" if req.get("acc") == "f64" else "<f4").copy()
            y[3] = np.nan
            rep["y"] = y.tobytes()
        return rep

    bad = StandIn((honest.host, honest.port), mangle=nan_y,
                  tls=transport.server_tls_context(certs["server"], certs["server.key"]))
    try:
        spec = f"0-7={bad.address}"
        rx = connect_shards(spec, v, api_key="", tls_ca=certs["ca"], timeout=20)
        general = connect_shards(spec, v, api_key="", tls_ca=certs["ca"], timeout=20)
        general.client._new_lane = lambda layer: None
        wk = (1, np.random.default_rng(13).standard_normal((1, H)).astype(np.float32), np.array([[2, 6]]),
              np.array([[0.25, 0.75]], np.float32))
        errors = []
        for client in (rx, general):
            with pytest.raises(Exception) as info:
                client.forward(*wk)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1] and "finite" in errors[0][1].lower(), errors
        assert general.client.lane_calls == 0
        poison["on"] = False
        want = LocalExperts(v).forward(*wk).tobytes()
        assert not rx.client.shards[0].replicas[0].state.up()   # the bad reply took it down
        assert rx.forward(*wk).tobytes() == want      # the general path reconnects it
        assert rx.forward(*wk).tobytes() == want and rx.client.lane_calls == 1
        rx.close()
        general.close()
    finally:
        bad.stop()
        honest.stop()


def test_client_c_reads_hand_big_frames_to_python(vindex_path, server):
    """A reply that does not fit the connection's buffer: C says so (LQ_WIRE_GROW) and the
    Python reader grows the buffer and finishes the frame; the result is unchanged."""
    v = open_vindex(vindex_path)
    b = ExpertServer(v, experts=range(4, 8)).start_in_thread("127.0.0.1", 0)
    try:
        rx = connect_shards(f"0-3={server.address},4-7={b.address}", v, api_key="")
        h = np.random.default_rng(9).standard_normal((1, H)).astype(np.float32)
        ids, w = np.array([[1, 6]]), np.array([[0.3, 0.7]], np.float32)
        want = rx.forward(1, h, ids, w)
        for sh in rx.client.shards:
            conn = sh.replicas[0].conn
            assert conn.fd >= 0
            assert conn._start == conn._end
            conn._set_buffer(bytearray(40))        # smaller than one reply frame
        assert rx.forward(1, h, ids, w).tobytes() == want.tobytes()
        assert all(len(sh.replicas[0].conn._buf) > 40 for sh in rx.client.shards)
        rx.close()
    finally:
        b.stop()


@pytest.mark.parametrize("acc", ["f32", "f64"])
def test_client_c_path_keeps_shard_order_through_a_failover(vindex_path, acc):
    """Three shards, the middle one's first replica hostile (a NaN in y): C adds shard 0, stops
    at shard 1, Python fails it over to the honest replica, then shard 2 is added: the sum is
    in shard order, bit for bit the general path's over honest servers."""
    def nan_y(req, rep):
        if "y" in rep:
            y = np.frombuffer(rep["y"], dtype="<f8" if req.get("acc") == "f64" else "<f4").copy()
            y[3] = np.nan
            rep["y"] = y.tobytes()
        return rep

    v = open_vindex(vindex_path)
    honest = ExpertServer(v).start_in_thread("127.0.0.1", 0)
    bad = StandIn((honest.host, honest.port), mangle=nan_y)
    try:
        a = honest.address
        rx = connect_shards(f"0-2={a},3-5={bad.address}|{a},6-7={a}", v, api_key="", accumulate=acc)
        ref = connect_shards(f"0-2={a},3-5={a},6-7={a}", v, api_key="", accumulate=acc)
        rng = np.random.default_rng(11)
        for _ in range(8):
            h = rng.standard_normal((1, H)).astype(np.float32) * 3
            ids = np.array([[1, 4, 7]])
            w = rng.random((1, 3)).astype(np.float32)
            (want,) = ref.forward_multi([(0, h, ids, w)])
            assert rx.forward(0, h, ids, w).tobytes() == want.tobytes()
        assert rx.client.retries >= 1 and bad.forwarded >= 1
        assert rx.client.c_path_calls == 8
        rx.close()
        ref.close()
    finally:
        bad.stop()
        honest.stop()
