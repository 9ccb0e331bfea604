"""Issue 8's attacks on a live server, each a regression test (all of them worked on the old
server): idle and slowloris connections, partial frames held in memory, huge strings echoed,
huge `multi`s, deep nesting, frames lost before an oversized length, NaN input, duplicate ids,
`hello` with version true/1.0, a one-token request stuck behind another client's prefill, and
work computed for a client that left."""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgpack
import numpy as np
import pytest
from rawwire import closed_by_peer, connect, raw_frame, read_frame, rt, work

from larql import protocol as P
from larql.demo import build_demo_vindex, demo_config
from larql.server import ExpertServer
from larql.vindex import open_vindex

H = 64


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory):
    cfg = demo_config(num_layers=2, hidden=H, num_experts=8, top_k=2)
    return build_demo_vindex(tmp_path_factory.mktemp("limits") / "v", quant="f32", config=cfg)


@pytest.fixture(scope="module")
def server(vindex_path):
    h = ExpertServer(open_vindex(vindex_path)).start_in_thread("127.0.0.1", 0)
    yield h
    h.stop()


def start(vindex_path, **limits):
    srv = ExpertServer(open_vindex(vindex_path), limits=P.ServerLimits(**limits))
    return srv.start_in_thread("127.0.0.1", 0)


def sock(h, **kw):
    return connect(h.host, h.port, **kw)


# ------------------------------------------------------------------------------------------
# Connections and time


def test_connections_past_the_cap_are_closed_at_once(vindex_path):
    h = start(vindex_path, max_connections=5)
    try:
        held = [sock(h, hello=False) for _ in range(5)]
        for s in held:
            assert rt(s, {"op": "health", "id": 1})["ok"]
        extra = [socket.create_connection((h.host, h.port), timeout=5) for _ in range(20)]
        assert all(closed_by_peer(s, timeout=3) for s in extra)
        assert h.server.stats.refused_connections == 20
        held.pop().close()
        deadline = time.monotonic() + 5
        while h.server.stats.open_connections > 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        with sock(h, hello=False) as s:          # a place came free
            assert rt(s, {"op": "health", "id": 2})["ok"]
        for s in held + extra:
            s.close()
    finally:
        h.stop()


def test_idle_connections_are_closed(vindex_path):
    h = start(vindex_path, idle_timeout=0.3)
    try:
        idle = [sock(h, hello=False) for _ in range(20)]
        t0 = time.monotonic()
        assert all(closed_by_peer(s, timeout=5) for s in idle)
        assert time.monotonic() - t0 < 5
        assert h.server.stats.timeouts >= 20
    finally:
        h.stop()


def test_slowloris_frames_are_cut_off_by_the_frame_timeout(vindex_path):
    h = start(vindex_path, frame_timeout=0.5, idle_timeout=600)
    try:
        conns = [sock(h) for _ in range(10)]
        frame = P.encode_frame(work(H))
        for s in conns:
            s.sendall(frame[:2])             # not even a whole length prefix
        for i in range(3):                   # a byte every 0.25 s: "activity", but no frame
            time.sleep(0.25)
            for s in conns:
                s.sendall(frame[2 + i: 3 + i])
        for s in conns:
            r = read_frame(s)
            assert r["id"] is None and r["error"]["code"] == P.E_BAD_FRAME
            assert "not completed within 0.5 s" in r["error"]["message"]
            assert closed_by_peer(s)
    finally:
        h.stop()


def test_partial_frames_cannot_hold_more_than_max_buffered(vindex_path):
    cap = 4 << 20
    h = start(vindex_path, max_buffered=cap, max_frame=2 << 20, frame_timeout=2.0)
    try:
        conns = [sock(h) for _ in range(6)]
        blob = b"\0" * ((2 << 20) - 100)
        for s in conns:                      # each promises 2 MiB and sends all but 100 bytes
            s.setblocking(False)
            try:
                s.send(struct.pack("<I", 2 << 20) + blob)
            except BlockingIOError:
                pass
        time.sleep(0.5)
        peak = h.server.buffered
        # reading pauses past the cap; each connection may overshoot by one socket read
        assert peak <= cap + 6 * (256 << 10), peak
        assert h.server.stats.memory_pauses >= 1
        # a well-behaved client is still answered meanwhile (small frames, same server)
        with sock(h, hello=False) as s:
            assert rt(s, {"op": "health", "id": 1})["ok"]
        # the frame timeout frees the memory
        deadline = time.monotonic() + 10
        while h.server.buffered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h.server.buffered == 0
        for s in conns:
            s.close()
    finally:
        h.stop()


# ------------------------------------------------------------------------------------------
# Sizes, strings, nesting


def test_huge_string_is_refused_without_echo(server):
    with sock(server) as s:
        r = rt(s, raw_frame(msgpack.packb({"op": "A" * (8 << 20), "id": 3})))
        assert r["error"]["code"] == P.E_BAD_FRAME and "max_str_len" in r["error"]["message"]
        assert len(r["error"]["message"]) < 200
        r = rt(s, {"op": "B" * 5000 + "C", "id": 4})
        assert "BBBB" not in r["error"]["message"] and len(r["error"]["message"]) < 200
        r = rt(s, {"op": "D" * 100, "id": 5})             # under the unpack cap, over a name's
        assert r["error"]["code"] == P.E_UNKNOWN_OP and "D" * 32 in r["error"]["message"]
        assert "D" * 33 not in r["error"]["message"]
        assert rt(s, {"op": "health", "id": 6})["ok"]


def test_huge_multi_is_refused_before_validation(server):
    item = {k: v for k, v in work(H, T=1, ids=[[0, 1]]).items() if k not in ("op", "id")}
    with sock(server) as s:
        t0 = time.monotonic()
        r = rt(s, raw_frame(msgpack.packb({"op": "multi", "id": 7, "items": [item] * 50_000})))
        assert r["error"]["code"] == P.E_BAD_FRAME and "max_array_len" in r["error"]["message"]
        r = rt(s, {"op": "multi", "id": 8, "items": [item] * 65})
        assert r["id"] == 8 and r["error"]["code"] == P.E_BAD_REQUEST
        assert "at most 64" in r["error"]["message"]
        assert time.monotonic() - t0 < 10
        r = rt(s, {"op": "multi", "id": 9, "items": [item] * 64})
        assert r["ok"] and len(r["ys"]) == 64


def test_too_many_tokens_is_refused(vindex_path):
    h = start(vindex_path, max_tokens=8)
    try:
        with sock(h) as s:
            r = rt(s, work(H, T=9, ids=[[0, 1]] * 9))
            assert r["error"]["code"] == P.E_BAD_REQUEST
            assert "'T'=9 is out of range [1, 8]" in r["error"]["message"]
            assert rt(s, work(H, T=8, ids=[[0, 1]] * 8))["ok"]
            info = rt(s, {"op": "info", "id": 1})
            assert (info["max_tokens"], info["max_items"]) == (8, 64)
    finally:
        h.stop()


def _nested(depth: int):
    v: object = 1
    for _ in range(depth):
        v = [v]
    return v


@pytest.mark.parametrize("field", ["op", "client", "version", "id", "layer", "enc", "items", "x"])
def test_deep_nesting_never_gives_internal_or_a_dropped_connection(server, field):
    deep = _nested(1000)
    msg = ({"op": "hello", "id": 2, "version": 1, "client": deep} if field == "client" else
           {"op": "hello", "id": 2, "version": deep} if field == "version" else
           {"op": "multi", "id": 2, "items": deep} if field == "items" else
           {**work(H, rid=2), field: deep})
    with sock(server) as s:
        r = rt(s, raw_frame(msgpack.packb(msg)))
        if field == "client":
            assert r["ok"] is True           # a label, logged as a short preview
        else:
            assert r["ok"] is False and r["error"]["code"] != P.E_INTERNAL, r
            assert len(r["error"]["message"]) < 300
            assert r["id"] == (None if field == "id" else 2)
        assert rt(s, {"op": "health", "id": 11})["ok"]   # the connection survives


def test_frames_before_an_oversized_length_in_one_read_are_answered(server):
    with sock(server) as s:
        s.sendall(P.encode_frame({"op": "health", "id": 21}) + P.encode_frame(work(H, rid=22))
                  + struct.pack("<I", P.MAX_FRAME + 1) + b"\0" * 16)
        got = [read_frame(s) for _ in range(3)]
        assert [g["id"] for g in got] == [21, 22, None]
        assert got[0]["ok"] and got[1]["ok"] and got[2]["error"]["code"] == P.E_BAD_FRAME
        assert closed_by_peer(s)


def test_big_frames_before_hello_are_refused_at_the_length(server):
    with sock(server, hello=False) as s:
        s.sendall(struct.pack("<I", 1 << 20) + b"\0" * 10)    # 1 MiB before hello: refused now
        r = read_frame(s)
        assert r["error"]["code"] == P.E_BAD_FRAME and "before 'hello'" in r["error"]["message"]
        assert closed_by_peer(s)


# ------------------------------------------------------------------------------------------
# Integrity


@pytest.mark.parametrize("version", [True, 1.0, "1", [1], None])
def test_hello_version_must_be_the_int_1(server, version):
    with sock(server, hello=False) as s:
        r = rt(s, {"op": "hello", "id": 1, "version": version})
        assert r["error"]["code"] == P.E_VERSION, r


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("enc", ["f32", "f16"])
def test_non_finite_x_is_bad_request(server, bad, enc):
    x = np.ones((2, H), np.float32)
    x[1, 7] = bad
    msg = {"op": "experts", "id": 4, **P.encode_work(0, x, np.array([[0, 1], [2, 3]], np.int32),
                                                      np.full((2, 2), 0.5, np.float32), enc)}
    with sock(server) as s:
        r = rt(s, msg)
        assert r["error"]["code"] == P.E_BAD_REQUEST and "non-finite" in r["error"]["message"]


def test_non_finite_q8k_scale_is_bad_request(server):
    with sock(server) as s:
        good = work(H, enc="q8k", T=1, ids=[[0, 1]])
        good["x"] = np.zeros(P.q8k_row_bytes(H), np.uint8).tobytes()
        assert rt(s, good)["ok"]
        bad = dict(good)
        xb = bytearray(good["x"])
        xb[0:4] = struct.pack("<f", float("nan"))
        bad["x"] = bytes(xb)
        r = rt(s, bad)
        assert r["error"]["code"] == P.E_BAD_REQUEST and "non-finite scales" in r["error"]["message"]


@pytest.mark.parametrize("ids", [[[3, 3]], [[0, 1], [2, 2]], [[5, -1, 5, 1]], [[1, 2, 3, 4, 5, 6, 7, 1]] * 3])
def test_duplicate_expert_ids_in_a_token_are_bad_request(server, ids):
    with sock(server) as s:
        r = rt(s, work(H, ids=ids))
        assert r["error"]["code"] == P.E_BAD_REQUEST and "more than once" in r["error"]["message"], r
        assert rt(s, work(H, ids=[[1, -1, -1, 2]]))["ok"]    # repeated -1 (empty slots) is fine


# ------------------------------------------------------------------------------------------
# Scheduling: off-loop validation, fairness, dropped work


@pytest.fixture(scope="module")
def wide_path(tmp_path_factory):
    """Heavier experts, so a prefill takes long enough to queue behind."""
    cfg = demo_config(num_layers=1, hidden=256, num_experts=8, top_k=4)
    return build_demo_vindex(tmp_path_factory.mktemp("wide") / "v", quant="f32", config=cfg)


def _big(T, rid, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(8, 4, replace=False) for _ in range(T)]).astype(np.int32)
    x = rng.standard_normal((T, 256)).astype(np.float32)
    return {"op": "experts", "id": rid, **P.encode_work(0, x, ids, np.full((T, 4), 0.25, np.float32))}


def test_large_requests_are_validated_off_the_event_loop(wide_path, monkeypatch):
    names: list[str] = []
    real = P.decode_work

    def recording(item, **kw):
        names.append(threading.current_thread().name)
        return real(item, **kw)

    monkeypatch.setattr(P, "decode_work", recording)
    h = ExpertServer(open_vindex(wide_path)).start_in_thread("127.0.0.1", 0)
    try:
        with sock(h) as s:
            assert rt(s, _big(1, 1))["ok"]
            assert rt(s, _big(512, 2))["ok"]          # 512 KiB of x
        assert names[0] == h.thread.name               # small: on the loop, no hop
        assert names[1].startswith("larql-validate")   # large: off the loop
    finally:
        h.stop()


def test_one_token_request_is_not_stuck_behind_another_clients_prefill(wide_path):
    """Client A queues six prefills of 2048 tokens; client B's one-token request must be
    answered before A's first prefill (chunks of 128 tokens take turns). The old server fused
    all six into one call and answered B after every one of them."""
    h = ExpertServer(open_vindex(wide_path), workers=2).start_in_thread("127.0.0.1", 0)
    order: list[str] = []
    try:
        a, b = sock(h), sock(h)
        assert rt(b, _big(1, 50))["ok"]               # warm
        frames = b"".join(P.encode_frame(_big(2048, 100 + i, seed=i)) for i in range(6))
        sender = threading.Thread(target=a.sendall, args=(frames,))
        sender.start()
        deadline = time.monotonic() + 30
        while h.server.batcher.inflight < 3 and time.monotonic() < deadline:
            time.sleep(0.002)
        b.sendall(P.encode_frame(_big(1, 7)))

        def read_a():
            for _ in range(6):
                r = read_frame(a)
                assert r["ok"], r
                order.append(f"A{r['id']}")

        reader = threading.Thread(target=read_a)
        reader.start()
        r = read_frame(b)
        order.append("B")
        assert r["ok"] and r["id"] == 7
        reader.join(60)
        sender.join(60)
        assert len(order) == 7
        assert order.index("B") <= 1, order     # at most one prefill (already computing) before it
        a.close()
        b.close()
    finally:
        h.stop()


def test_work_of_a_disconnected_client_is_dropped(wide_path):
    h = ExpertServer(open_vindex(wide_path), workers=1).start_in_thread("127.0.0.1", 0)
    try:
        a = sock(h)
        a.sendall(b"".join(P.encode_frame(_big(1024, 100 + i, seed=i)) for i in range(6)))
        deadline = time.monotonic() + 30
        while h.server.batcher.inflight < 6 and time.monotonic() < deadline:
            time.sleep(0.002)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.close()                                         # reset: gone
        while h.server.batcher.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        st = h.server.stats
        assert st.dropped >= 4, st.snapshot()             # at most the running ones computed
        assert st.tokens <= 2 * 1024, st.snapshot()
        deadline = time.monotonic() + 10
        while h.server.buffered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.server.buffered == 0          # released once, not twice (nor never)
        with sock(h) as s:
            assert rt(s, _big(1, 1))["ok"]
    finally:
        h.stop()


def test_lone_decode_stream_is_answered_from_the_read_callback(vindex_path):
    """Back-to-back one-token requests of one connection with nothing else queued skip the queue
    (no submit, no future); a second connection taking turns goes through it."""
    h = ExpertServer(open_vindex(vindex_path)).start_in_thread("127.0.0.1", 0)
    b = h.server.batcher
    submitted: list[int] = []
    real = b.submit

    def recording(work, conn, on_done):
        submitted.append(work.tokens)
        return real(work, conn, on_done)

    b.submit = recording
    try:
        with sock(h) as s, sock(h) as t:
            first = rt(s, work(H, T=1, ids=[[0, 1]], rid=1))
            for i in range(10):
                assert rt(s, work(H, T=1, ids=[[0, 1]], rid=2 + i)) == {**first, "id": 2 + i}
            assert submitted == [1]                         # only the first one was queued
            for i in range(4):
                assert rt(t if i % 2 else s, work(H, T=1, ids=[[0, 1]], rid=20 + i))["y"] == first["y"]
            # s again (direct), then t, s, t alternating: each queued
            assert len(submitted) == 4
    finally:
        h.stop()
