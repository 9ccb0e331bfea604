"""Fuzzing a live expert server on loopback (hypothesis): >= 100,000 malformed frames over many
connections, structured (every request field given values of every msgpack type, nested) and
byte-level (valid frames with bytes flipped, cut or appended, the length prefix kept in sync).

For every frame the server must answer exactly once, with the frame's id when the frame parses
to a map with a valid id (else id nil), never with `internal`; it must stay up; and a good
client's answers, asked between the batches, must stay bit-identical."""

from __future__ import annotations

import random
import socket
import time
from collections import Counter

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawwire import connect, raw_frame, read_frame, rt

from larql import protocol as P
from larql.demo import build_demo_vindex, demo_config
from larql.server import ExpertServer
from larql.vindex import open_vindex

H, E = 64, 8
EXAMPLES = 400          # connections; x (up to 12 structured + 250 byte-level frames) >= 100,000
# frames in ~45 s here (hypothesis draws ~55 ms per example; the server answers ~4,000 frames/s)
BYTE_FRAMES = 250
TOTAL = {"frames": 0, "examples": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = demo_config(num_layers=2, hidden=H, num_experts=E, top_k=2)
    path = build_demo_vindex(tmp_path_factory.mktemp("fuzz") / "v", quant="f32", config=cfg)
    # a shard (experts 0-5, layer 0) so that not_owned is reachable too
    h = ExpertServer(open_vindex(path), experts=range(6), layers=[0]).start_in_thread("127.0.0.1", 0)
    yield h
    h.stop()


def good_request(rid: int, T: int = 2, seed: int = 0, enc: str = "f32") -> dict:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(6, 2, replace=False) for _ in range(T)]).astype(np.int32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = rng.random((T, 2)).astype(np.float32)
    return {"op": "experts", "id": rid, **P.encode_work(0, x, ids, w, enc)}


@pytest.fixture(scope="module")
def witness(server):
    """A well-behaved client and the answers it must keep getting."""
    s = connect(server.host, server.port)
    reqs = [good_request(9000 + i, T=1 + i % 3, seed=i, enc=("f32", "f16", "q8k")[i % 3]) for i in range(3)]
    reqs[2]["x"] = bytes(P.x_bytes("q8k", reqs[2]["T"], H))   # zero Q8_K blocks: scale 0, valid
    want = [rt(s, r) for r in reqs]
    assert all(w["ok"] for w in want)
    yield s, reqs, want
    s.close()


# ------------------------------------------------------------------------------------------
# Strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=40), st.binary(max_size=64),
)
junk = st.recursive(scalars,
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=12)
deep = st.integers(1, 1000).map(lambda d: _nest(d))
FIELDS = ["op", "id", "layer", "T", "K", "enc", "acc", "x", "ids", "w", "items", "version", "client",
          "step", "nonce", "proof"]


def _nest(depth: int):
    v: object = 0
    for _ in range(depth):
        v = [v]
    return v


@st.composite
def requests(draw):
    """A request: a valid one with a few fields replaced, removed or added, or pure junk."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "multi", "junk", "op"]))
    if kind == "junk":
        msg = draw(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), junk, max_size=8))
    elif kind == "op":
        msg = {"op": draw(st.sampled_from(P.OPS) | st.text(max_size=70) | junk),
               "version": draw(st.sampled_from([1, True, 1.0, 2, None]) | junk)}
    else:
        seed = draw(st.integers(0, 2**16))
        enc = draw(st.sampled_from(["f32", "f16"]))
        base = good_request(0, T=draw(st.integers(1, 3)), seed=seed, enc=enc)
        base.pop("id")
        if kind == "multi":
            items = [{k: v for k, v in base.items() if k != "op"} for _ in range(draw(st.integers(0, 3)))]
            msg = {"op": "multi", "items": items}
            target = items[0] if items and draw(st.booleans()) else msg
        else:
            msg, target = base, base
        for _ in range(draw(st.integers(1, 3))):
            field = draw(st.sampled_from(FIELDS))
            action = draw(st.sampled_from(["junk", "junk", "deep", "drop", "bytes"]))
            if action == "drop":
                target.pop(field, None)
            elif action == "deep":
                target[field] = draw(deep)
            elif action == "bytes":
                target[field] = draw(st.binary(max_size=600))
            else:
                target[field] = draw(junk)
    msg.setdefault("id", "UNIQUE") if draw(st.integers(0, 9)) else msg.update(id=draw(junk))
    return msg


# ------------------------------------------------------------------------------------------
# Framing and the expected answers


def frame_of(msg: dict, next_id) -> bytes | None:
    if msg.get("id") == "UNIQUE":
        msg = {**msg, "id": next_id()}
    try:
        body = msgpack.packb(msg, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None     # not representable in msgpack (e.g. too deep for the packer)
    return raw_frame(body)


def expected_id(frame: bytes):
    try:
        msg = P.decode_body(frame[4:])
    except P.ProtocolError:
        return None
    return P.request_id(msg)


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """Byte-level damage to a valid frame's body; the length prefix is recomputed."""
    body = bytearray(frame[4:])
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and body:
            body[rng.randrange(len(body))] = rng.randrange(256)
        elif op == 1 and body:
            del body[rng.randrange(len(body)):]
        elif op == 2:
            body += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3 and body:
            i = rng.randrange(len(body))
            body[i:i] = bytes([rng.choice([0xDC, 0xDD, 0xC6, 0xDB, 0xDF, 0x91, 0xC1])])
        elif body:
            i, j = sorted(rng.randrange(len(body)) for _ in range(2))
            body[i:j] = body[i:j][::-1]
    return raw_frame(bytes(body))


def exchange(server, frames: list[bytes]) -> list[dict]:
    """Send all frames pipelined on a fresh connection; read exactly one reply per frame."""
    s = connect(server.host, server.port, timeout=30)
    try:
        s.sendall(b"".join(frames))
        return [read_frame(s) for _ in range(len(frames))]
    finally:
        s.close()


# ------------------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(requests(), min_size=1, max_size=12), seed=st.integers(0, 2**32 - 1))
def fuzz_one_connection(server, witness, msgs, seed):
    counter = iter(range(10**6, 10**7))
    rng = random.Random(seed)
    frames = [f for m in msgs if (f := frame_of(m, lambda: next(counter))) is not None]
    pool = [P.encode_frame(good_request(next(counter), T=1 + i % 2, seed=seed + i)) for i in range(4)]
    pool += [P.encode_frame({"op": op, "id": next(counter), "version": 1}) for op in ("hello", "health")]
    frames += [mutate(rng.choice(pool), rng) for _ in range(BYTE_FRAMES)]
    replies = exchange(server, frames)

    assert Counter(r["id"] for r in replies) == Counter(expected_id(f) for f in frames)
    for r in replies:
        assert isinstance(r.get("ok"), bool), r
        if not r["ok"]:
            assert r["error"]["code"] != P.E_INTERNAL, r
            assert len(r["error"]["message"]) < 400, r
    TOTAL["frames"] += len(frames)
    TOTAL["examples"] += 1
    if TOTAL["examples"] % 50 == 0:     # the good client between batches: unchanged answers
        s, reqs, want = witness
        assert [rt(s, q) for q in reqs] == want


def test_fuzzed_frames_are_each_answered_and_never_internal(server, witness):
    t0 = time.monotonic()
    fuzz_one_connection(server, witness)
    s, reqs, want = witness
    assert TOTAL["frames"] >= 100_000, TOTAL
    assert [rt(s, q) for q in reqs] == want
    with socket.create_connection((server.host, server.port), timeout=5) as c:
        assert rt(c, {"op": "health", "id": 1})["status"] == "ok"
    st_ = server.server.stats
    assert st_.connections >= EXAMPLES
    print(f"\nfuzz: {TOTAL['frames']:,} frames over {TOTAL['examples']:,} connections; "
          f"server {st_.requests:,} requests, {st_.errors:,} error replies, {time.monotonic() - t0:.0f} s")
