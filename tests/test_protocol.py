"""The wire format on its own: frames, field validation, ranges, shard maps."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from larql import protocol as P
from larql import ranges
from larql.client import ShardSpecError, parse_address, parse_shards, split_work


def test_frame_roundtrip_and_split_delivery():
    msgs = [{"op": "health", "id": i, "blob": bytes(range(i % 256)) * 3} for i in range(50)]
    stream = b"".join(P.encode_frame(m) for m in msgs)
    r = P.FrameReader()
    got = []
    # deliver in awkward chunk sizes: 1 byte, 3 bytes, 7 bytes...
    pos, step = 0, 1
    while pos < len(stream):
        got += [P.decode_body(b) for b in r.feed(stream[pos:pos + step])]
        pos += step
        step = step * 3 % 97 + 1
    assert got == msgs
    assert r.pending == 0


def test_frame_is_one_bytes_object_with_le_length():
    f = P.encode_frame({"op": "hello", "id": 1})
    assert isinstance(f, bytes)
    assert int.from_bytes(f[:4], "little") == len(f) - 4


def test_oversized_length_is_rejected_before_reading_body():
    r = P.FrameReader(max_frame=1000)
    with pytest.raises(P.ProtocolError) as e:
        r.feed((1001).to_bytes(4, "little") + b"x")
    assert e.value.code == P.E_BAD_FRAME and "1001" in str(e.value)


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"\xa3abc", b"\xdc\xff\xff", b""])
def test_decode_body_rejects_non_maps_and_garbage(body):
    with pytest.raises(P.ProtocolError) as e:
        P.decode_body(body)
    assert e.value.code == P.E_BAD_FRAME


def test_decode_body_rejects_non_string_keys():
    with pytest.raises(P.ProtocolError):
        P.decode_body(msgpack.packb({1: 2}))


def _item(T=3, K=2, H=8, enc="f32", seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(0, 4, (T, K)).astype(np.int32)
    w = rng.random((T, K)).astype(np.float32)
    return x, ids, w, P.encode_work(5, x, ids, w, enc)


KW = dict(hidden=8, num_layers=6, num_experts=4)


def test_work_roundtrip_f32_and_f16():
    x, ids, w, item = _item()
    wk = P.decode_work(msgpack.unpackb(msgpack.packb(item)), **KW)
    assert wk.layer == 5 and wk.enc == "f32"
    np.testing.assert_array_equal(wk.x, x)
    np.testing.assert_array_equal(wk.ids, ids)
    np.testing.assert_array_equal(wk.weights, w)
    x, ids, w, item = _item(enc="f16")
    wk = P.decode_work(item, **KW)
    assert wk.x.dtype == np.float32
    np.testing.assert_array_equal(wk.x, x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("mutate, needle", [
    (lambda m: m.update(layer=6), "layer"),
    (lambda m: m.update(layer=-1), "layer"),
    (lambda m: m.update(layer="3"), "layer"),
    (lambda m: m.update(layer=True), "layer"),
    (lambda m: m.update(T=0), "'T'"),
    (lambda m: m.update(T=4), "'x' has"),          # byte length no longer matches T*H
    (lambda m: m.update(K=5), "'K'"),
    (lambda m: m.update(enc="bf16"), "enc"),
    (lambda m: m.update(x=m["x"][:-1]), "'x' has"),
    (lambda m: m.update(x=[1.0] * 24), "bin"),     # a list of floats is not accepted
    (lambda m: m.update(ids=m["ids"] + b"\0\0\0\0"), "'ids'"),
    (lambda m: m.update(w=None), "'w'"),
    (lambda m: m.pop("x"), "'x'"),
    (lambda m: m.update(ids=np.array([[0, 4]] * 3, "<i4").tobytes()), "out of range"),
    (lambda m: m.update(ids=np.array([[0, -2]] * 3, "<i4").tobytes()), "out of range"),
    (lambda m: m.update(w=np.array([[0, np.nan]] * 3, "<f4").tobytes()), "non-finite"),
])
def test_work_validation_names_the_field(mutate, needle):
    *_, item = _item()
    mutate(item)
    with pytest.raises(P.ProtocolError) as e:
        P.decode_work(item, **KW)
    assert needle in str(e.value)
    assert e.value.code == P.E_BAD_REQUEST


def test_q8k_sizes():
    assert P.q8k_row_bytes(2816) == 11 * 292
    assert P.x_bytes("q8k", 2, 64) == 2 * 292


def test_error_reply_and_check_reply():
    rep = P.error_reply(7, P.E_NOT_OWNED, "experts 64-127 are not served here")
    with pytest.raises(P.RemoteError) as e:
        P.check_reply(rep, "a:1")
    assert e.value.code == P.E_NOT_OWNED and "a:1" in str(e.value)
    assert P.check_reply({"id": 1, "ok": True}) == {"id": 1, "ok": True}


def test_ranges():
    assert ranges.parse("0-3,8,10-11", 16) == [0, 1, 2, 3, 8, 10, 11]
    assert ranges.to_pairs([0, 1, 2, 5, 7, 8]) == [[0, 2], [5, 5], [7, 8]]
    assert P.from_ranges([[0, 2], [5, 5]], 8, "x") == [0, 1, 2, 5]
    assert ranges.text([0, 1, 2, 5]) == "0-2,5"
    for bad in ("", "3-1", "0-16", "a-b", "-1"):
        with pytest.raises(ValueError):
            ranges.parse(bad, 16)
    for bad in ([[0, 9]], [[2, 1]], "0-3", [[0, "1"]], [[0]]):
        with pytest.raises(P.ProtocolError):
            P.from_ranges(bad, 8, "experts")


def test_parse_shards_ok():
    s = parse_shards("64-127=tcp://b.example:9000, 0-63=10.0.0.5:8080|[::1]:8081", 128)
    assert [(x.first, x.last) for x in s] == [(0, 63), (64, 127)]
    assert s[0].replicas == [("10.0.0.5", 8080), ("::1", 8081)]
    assert s[1].replicas == [("b.example", 9000)]
    assert [(x.first, x.last) for x in parse_shards("0=a:1,1-7=b:2", 8)] == [(0, 0), (1, 7)]


def test_parse_shards_with_layer_ranges():
    s = parse_shards("0-63@0-14=a:1,64-127@0-14=b:1,0-127@15-29=c:1|d:2", 128, 30)
    assert [x.label for x in s] == ["0-63@0-14", "0-127@15-29", "64-127@0-14"]
    assert s[1].serves(15) and not s[1].serves(14) and s[0].serves(0)
    for spec, needle in (("0-127@0-14=a:1", "0-127 unserved at layer 15"),
                         ("0-127@0-14=a:1,0-127@14-29=b:1", "overlaps an earlier range at layer 14"),
                         ("0-127@0-30=a:1", "outside 0-29"), ("0-127@x=a:1", "bad layer range")):
        with pytest.raises(ShardSpecError, match=needle):
            parse_shards(spec, 128, 30)


@pytest.mark.parametrize("spec, needle", [
    ("", "empty"),
    ("0-63=a:1", "64-127 unserved"),                 # gap at the end
    ("0-10=a:1,20-127=b:2", "11-19 unserved"),       # gap in the middle
    ("0-6=a:1,8-127=b:2", "experts 7 unserved"),      # a one-expert gap reads as one id
    ("0-70=a:1,64-127=b:2", "overlaps"),
    ("0-128=a:1", "outside"),
    ("10-0=a:1,0-127=b:2", "after its end"),
    ("x-63=a:1", "bad expert range"),
    ("0-127", "expected RANGE=HOST:PORT"),
    ("0-127=a", "no port"),
    ("0-127=a:http", "not a number"),
    ("0-127=a:0", "out of range"),
    ("0-127=https://a.fly.dev", "raw TCP"),
    ("0-63=a:1,,64-127=b:2", "empty entry"),
])
def test_parse_shards_errors(spec, needle):
    with pytest.raises(ShardSpecError) as e:
        parse_shards(spec, 128)
    assert needle in str(e.value)


def test_parse_address_forms():
    assert parse_address("tcp://h:1/") == ("h", 1)
    assert parse_address("[fe80::1]:80") == ("fe80::1", 80)


def test_split_work_keeps_order_and_compacts():
    ids = np.array([[3, 9, 1, 12], [8, 9, 10, 11], [0, 1, 2, 3]], dtype=np.int32)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows, i_s, w_s = split_work(ids, w, 0, 7)
    assert rows.tolist() == [0, 2]
    assert i_s.tolist() == [[3, 1, -1, -1], [0, 1, 2, 3]]
    assert w_s.tolist() == [[0, 2, 0, 0], [8, 9, 10, 11]]
    rows, i_s, w_s = split_work(ids, w, 8, 15)
    assert rows.tolist() == [0, 1]
    assert i_s.tolist() == [[9, 12, -1, -1], [8, 9, 10, 11]]
    assert split_work(ids[2:], w[2:], 8, 15) is None
