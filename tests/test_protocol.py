"""The wire format on its own: frames, field validation, ranges, shard maps."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from larql import protocol as P
from larql import ranges


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
