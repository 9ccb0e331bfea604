"""The expert wire protocol: length-prefixed msgpack frames over TCP (see docs/PROTOCOL.md).

A frame is a little-endian u32 body length followed by a msgpack map. Vectors travel as msgpack
`bin` (raw little-endian bytes), never as lists of floats. Every field of a request is checked
here, against the server's model shape, before any byte reaches the C kernels.

This module is pure: it knows nothing about sockets or event loops, so the server, the client
and the tests share exactly one definition of every message.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from . import ranges
from .errors import LarqlError

PROTOCOL_VERSION = 1

HEADER = struct.Struct("<I")
# The largest body a peer accepts. Big enough for a 2048-token f32 prefill of one 2816-wide
# layer (23 MiB) with room to spare; a client splits larger prefills (see max_tokens_per_frame).
MAX_FRAME = 64 << 20

# Input encodings of the residual. "f32"/"f16" carry the raw residual (the server applies
# pre_feedforward_layernorm_2); "q8k" carries the already-normed input quantised to Q8_K.
ENCODINGS = ("f32", "f16", "q8k")
Q8K_BLOCK = 256
Q8K_BLOCK_BYTES = 292  # f32 d + 256 int8 + 16 int16 group sums

# Partial-sum precisions a server can reply in (request field `acc`): "f64" partials added by
# the client and rounded once give the in-process result bit for bit for any shard split.
ACCUMULATORS = ("f32", "f64")

# Bounds on what one frame may hold, applied while unpacking (before any value exists), so a
# hostile body cannot make the server build huge strings, lists or maps. Requests hold a few
# short strings and at most `max_items` work items; replies a few dozen keys.
MAX_STR_BYTES = 4096      # any string in a frame
MAX_NAME_BYTES = 64       # a string field of a request: op, client, enc, acc, scheme
MAX_ARRAY_LEN = 4096
MAX_MAP_LEN = 256
PREVIEW_CHARS = 32        # the most of a client's value an error message ever repeats



@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts (the `larql serve` flags of the same names; docs/PROTOCOL.md).

    Modelled on what long-lived public services do: a connection cap, an idle timeout, a
    deadline for a frame once it has started, a short deadline for authentication, a global cap
    on buffered bytes, and caps on the work one request may ask for."""

    max_connections: int = 256
    idle_timeout: float = 600.0        # s without a request while nothing is in flight
    frame_timeout: float = 30.0        # s from a frame's first byte to its last
    auth_timeout: float = 10.0         # s from connect to a successful `auth` (servers with a key)
    max_buffered: int = 512 << 20      # bytes of unfinished frames + queued work, all connections
    max_tokens: int = 4096             # T per work item
    max_items: int = 64                # items per `multi`
    max_frame: int = MAX_FRAME
    greeting_frame: int = 64 << 10     # largest frame before `hello`/`auth` succeeded


OPS = ("auth", "hello", "info", "health", "experts", "multi", "warmup", "stats")

# Error codes in replies: stable strings a client can branch on.
E_BAD_FRAME = "bad_frame"        # not msgpack, not a map, or oversized
E_BAD_REQUEST = "bad_request"    # a field is missing or has the wrong type/shape/length
E_UNKNOWN_OP = "unknown_op"
E_VERSION = "version"            # hello with an unsupported protocol version
E_NEED_HELLO = "hello_required"  # compute before the handshake
E_NOT_OWNED = "not_owned"        # an expert or layer this shard does not hold
E_INTERNAL = "internal"          # the server failed (a bug); the request did nothing
E_INTEGRITY = "integrity"        # the shard's own files failed a check (changed on disk, digest
                                 # mismatch, truncated): nothing computed; another replica may serve it
E_SHUTDOWN = "shutting_down"
E_UNAUTHORIZED = "unauthorized"  # no or wrong API key: the connection is closed after this reply


class ProtocolError(LarqlError, ValueError):
    """A frame or field was malformed. `code` is one of the E_* strings."""

    def __init__(self, message: str, code: str = E_BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


class RemoteError(LarqlError, RuntimeError):
    """The peer answered a request with an error reply."""

    def __init__(self, code: str, message: str, where: str = "") -> None:
        super().__init__(f"{where}: {message} [{code}]" if where else f"{message} [{code}]")
        self.code = code
        self.remote_message = message


# ------------------------------------------------------------------------------------------
# Frames


def encode_frame(msg: dict[str, Any]) -> bytes:
    """One bytes object holding header and body, so a frame is always written with one write."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit", E_BAD_FRAME)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes | memoryview, *, max_array_len: int = MAX_ARRAY_LEN) -> dict[str, Any]:
    """msgpack body -> dict with str keys; anything else is a ProtocolError (never another type).

    Strings, arrays and maps are bounded while unpacking (MAX_*), and msgpack itself refuses
    nesting deeper than 1024; values nested below that are harmless as long as nobody formats
    them, which is why every message about a client value goes through `preview`."""
    try:
        msg = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True,
                              max_str_len=MAX_STR_BYTES, max_bin_len=len(body),
                              max_array_len=max_array_len, max_map_len=MAX_MAP_LEN, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"body is not valid msgpack ({type(e).__name__}: {e})", E_BAD_FRAME) from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"body must be a msgpack map, got {type(msg).__name__}", E_BAD_FRAME)
    return msg


class FrameReader:
    """Accumulates stream bytes and yields complete frame bodies.

    An oversized length makes the stream unrecoverable (we cannot tell where the next frame
    starts without reading gigabytes), so `feed` raises and the caller closes the connection.
    Frames completed before the bad length, in the same read, are returned first: the error is
    kept in `error` and raised by the next `feed` (a caller may call `feed(b"")` right away).
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self.error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            raise self.error
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self.max_frame:
                self.error = ProtocolError(
                    f"frame length {length} exceeds the {self.max_frame}-byte limit", E_BAD_FRAME
                )
                del buf[:]
                if not out:
                    raise self.error
                return out
            if n - pos - 4 < length:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + length]))
            pos += 4 + length
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered (non-zero at EOF means truncation)."""
        return len(self._buf)

    @property
    def next_length(self) -> int | None:
        """The body length the incomplete frame announced, once its 4-byte prefix arrived."""
        return HEADER.unpack_from(self._buf, 0)[0] if len(self._buf) >= 4 else None


# ------------------------------------------------------------------------------------------
# Field checks


def preview(v: Any) -> str:
    """A client's value for an error message: its type and at most PREVIEW_CHARS characters,
    never a full repr (which could be megabytes, or recurse a thousand levels deep)."""
    if v is None or isinstance(v, (bool, int, float)):
        text = repr(v)
    elif isinstance(v, str):
        text = repr(v[:PREVIEW_CHARS]) + ("..." if len(v) > PREVIEW_CHARS else "")
    elif isinstance(v, (bytes, bytearray, memoryview)):
        text = f"bin of {len(v)} bytes"
    elif isinstance(v, (list, tuple)):
        text = f"array of {len(v)}"
    elif isinstance(v, dict):
        text = f"map of {len(v)}"
    else:
        text = type(v).__name__
    return text if len(text) <= PREVIEW_CHARS + 5 else text[:PREVIEW_CHARS] + "..."


def get_int(msg: dict, key: str, lo: int, hi: int) -> int:
    """An int field in [lo, hi]; bools are not ints here."""
    v = msg.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"field {key!r} must be an integer, got {preview(v)}")
    if not lo <= v <= hi:
        raise ProtocolError(f"field {key!r}={v} is out of range [{lo}, {hi}]")
    return v


def get_bytes(msg: dict, key: str, length: int) -> bytes:
    v = msg.get(key)
    if not isinstance(v, bytes):
        raise ProtocolError(f"field {key!r} must be msgpack bin, got {preview(v)}")
    if len(v) != length:
        raise ProtocolError(f"field {key!r} has {len(v)} bytes, expected {length}")
    return v


def get_str(msg: dict, key: str, choices: tuple[str, ...] | None = None, default: str | None = None) -> str:
    v = msg.get(key, default)
    if not isinstance(v, str):
        raise ProtocolError(f"field {key!r} must be a string, got {preview(v)}")
    if len(v) > MAX_NAME_BYTES:
        raise ProtocolError(f"field {key!r} is longer than {MAX_NAME_BYTES} characters ({preview(v)})")
    if choices is not None and v not in choices:
        raise ProtocolError(f"field {key!r}={preview(v)} is not one of {list(choices)}")
    return v


def request_id(msg: dict) -> int | None:
    """The request id if it is a valid one, else None (the error reply then carries id nil)."""
    v = msg.get("id")
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63:
        return v
    return None


def _typename(v: Any) -> str:
    return "nothing" if v is None else type(v).__name__


# ------------------------------------------------------------------------------------------
# Expert work: one layer, T tokens, K (expert, weight) pairs each


def q8k_row_bytes(hidden: int) -> int:
    return (hidden + Q8K_BLOCK - 1) // Q8K_BLOCK * Q8K_BLOCK_BYTES


def x_bytes(enc: str, tokens: int, hidden: int) -> int:
    if enc == "f32":
        return tokens * hidden * 4
    if enc == "f16":
        return tokens * hidden * 2
    return tokens * q8k_row_bytes(hidden)


@dataclass
class Work:
    """One layer's expert work as decoded from the wire (views over the frame's bytes).

    x is f32 [T, H] raw residual for f32/f16, or uint8 [T, row_bytes] of normed Q8_K for q8k.
    """

    layer: int
    x: np.ndarray
    ids: np.ndarray      # int32 [T, K], -1 = empty slot
    weights: np.ndarray  # f32 [T, K]
    enc: str
    acc: str = "f32"     # precision of the reply's partial sums (ACCUMULATORS)

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]


def encode_work(layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, enc: str = "f32") -> dict:
    """Client side: one `experts`/`multi` item. x is the raw residual f32 [T, H] for f32/f16, or
    the Q8_K bytes (uint8 [T, row_bytes]) of the normed input for q8k."""
    ids = np.ascontiguousarray(ids, dtype="<i4")
    weights = np.ascontiguousarray(weights, dtype="<f4")
    if enc == "f32":
        xb = np.ascontiguousarray(x, dtype="<f4").tobytes()
    elif enc == "f16":
        xb = np.ascontiguousarray(x, dtype="<f2").tobytes()
    elif enc == "q8k":
        xb = np.ascontiguousarray(x, dtype=np.uint8).tobytes()
    else:
        raise ProtocolError(f"unknown encoding {enc!r} (one of {list(ENCODINGS)})")
    T, K = ids.shape
    return {"layer": int(layer), "T": int(T), "K": int(K), "enc": enc,
            "x": xb, "ids": ids.tobytes(), "w": weights.tobytes()}


# T * K at or below this is checked with plain ints (struct + min/max/set/sum: ~1.3 us for a
# top-8 token) instead of numpy reductions on tiny arrays (~13 us), measured on the dev VM.
FAST_SLOTS = 16
_I32 = [struct.Struct(f"<{n}i") for n in range(FAST_SLOTS + 1)]
_F32 = [struct.Struct(f"<{n}f") for n in range(FAST_SLOTS + 1)]


def _check_slots_small(idb: bytes, wb: bytes, T: int, K: int, num_experts: int) -> None:
    n = T * K
    ids = _I32[n].unpack(idb)
    if min(ids) < -1 or max(ids) >= num_experts:
        _bad_ids(ids, num_experts)
    for t in range(T):
        row = ids[t * K: (t + 1) * K]
        used = [e for e in row if e >= 0] if -1 in row else row
        if len(set(used)) != len(used):
            _duplicate_ids(t, used)
    # A sum of at most 16 f32 values in double cannot overflow: it is finite iff every value is.
    if not math.isfinite(sum(_F32[n].unpack(wb))):
        raise ProtocolError("field 'w' holds non-finite weights")


def _check_slots(ids: np.ndarray, w: np.ndarray, num_experts: int) -> None:
    if ids.min() < -1 or ids.max() >= num_experts:
        _bad_ids(ids.ravel().tolist(), num_experts)
    if ids.shape[1] > 1:
        s = np.sort(ids, axis=1)
        dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        if dup.any():
            t = int(np.argmax(dup.any(axis=1)))
            _duplicate_ids(t, [int(e) for e in ids[t] if e >= 0])
    if not np.isfinite(w).all():
        raise ProtocolError("field 'w' holds non-finite weights")


def _bad_ids(ids, num_experts: int) -> None:
    bad = sorted({int(e) for e in ids if e < -1 or e >= num_experts})[:8]
    raise ProtocolError(f"expert ids {bad} out of range [0, {num_experts - 1}] (or -1 for none)")


def _duplicate_ids(t: int, used: list[int]) -> None:
    seen: set[int] = set()
    dups = sorted({e for e in used if e in seen or seen.add(e)})[:8]
    raise ProtocolError(f"token {t} names expert(s) {dups} more than once (each token's ids must be "
                        "distinct; use -1 for an empty slot)")


def decode_work(item: Any, *, hidden: int, num_layers: int, num_experts: int,
                max_tokens: int = 1 << 20) -> Work:
    """Server side: validate one work item completely (types, ranges, byte lengths, expert ids,
    duplicate ids within a token, finiteness of x and w).

    Ownership is the server's business (it knows what it holds); everything else that could
    make a kernel read out of bounds, or put a NaN into a sum, is rejected here."""
    if not isinstance(item, dict):
        raise ProtocolError(f"work item must be a map, got {preview(item)}")
    layer = get_int(item, "layer", 0, num_layers - 1)
    T = get_int(item, "T", 1, max_tokens)
    K = get_int(item, "K", 1, num_experts)
    enc = get_str(item, "enc", ENCODINGS, default="f32")
    acc = get_str(item, "acc", ACCUMULATORS, default="f32")
    xb = get_bytes(item, "x", x_bytes(enc, T, hidden))
    idb = get_bytes(item, "ids", T * K * 4)
    wb = get_bytes(item, "w", T * K * 4)
    ids = np.frombuffer(idb, dtype="<i4").reshape(T, K)
    w = np.frombuffer(wb, dtype="<f4").reshape(T, K)
    if T * K <= FAST_SLOTS:
        _check_slots_small(idb, wb, T, K, num_experts)
    else:
        _check_slots(ids, w, num_experts)
    if enc == "f32":
        x = np.frombuffer(xb, dtype="<f4").reshape(T, hidden)
    elif enc == "f16":
        x = np.frombuffer(xb, dtype="<f2").reshape(T, hidden).astype(np.float32)
    else:
        x = np.frombuffer(xb, dtype=np.uint8).reshape(T, q8k_row_bytes(hidden))
        # each 292-byte Q8_K block starts with its f32 scale: the only float in it
        scales = np.ndarray((len(xb) // Q8K_BLOCK_BYTES,), dtype="<f4", buffer=xb, strides=(Q8K_BLOCK_BYTES,))
        if not np.isfinite(scales).all():
            raise ProtocolError("field 'x' holds Q8_K blocks with non-finite scales")
        # the kernel uses the blocks as they are, sums of 16 included (its min term): they must
        # be the sums of the quants, or the result would be silently wrong
        blocks = x.reshape(-1, Q8K_BLOCK_BYTES)
        sums = blocks[:, 4:4 + Q8K_BLOCK].view(np.int8).reshape(-1, Q8K_BLOCK // 16, 16).sum(axis=2)
        wrong = (sums != blocks[:, 4 + Q8K_BLOCK:].view("<i2")).any(axis=1)
        if wrong.any():
            bad = int(np.argmax(wrong))
            raise ProtocolError(f"field 'x' holds a Q8_K block (block {bad}) whose group sums are not "
                                "the sums of its quants")
    if enc != "q8k" and not np.isfinite(x).all():
        raise ProtocolError("field 'x' holds non-finite values (NaN or Inf)")
    return Work(layer, x, ids, w, enc, acc)


def decode_result(reply: dict, tokens: int, hidden: int, key: str = "y") -> np.ndarray:
    """Client side: the f32 [T, H] weighted sums of a reply, length-checked."""
    yb = reply.get(key)
    if not isinstance(yb, bytes) or len(yb) != tokens * hidden * 4:
        got = len(yb) if isinstance(yb, bytes) else _typename(yb)
        raise ProtocolError(f"reply field {key!r} has {got} bytes, expected {tokens * hidden * 4}")
    return np.frombuffer(yb, dtype="<f4").reshape(tokens, hidden)


def error_reply(rid: int | None, code: str, message: str) -> dict:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


def check_reply(reply: dict, where: str = "") -> dict:
    """Raise RemoteError for an error reply; return the reply otherwise."""
    if reply.get("ok") is True:
        return reply
    err = reply.get("error")
    if isinstance(err, dict):
        raise RemoteError(str(err.get("code", "?")), str(err.get("message", "")), where)
    raise RemoteError(E_BAD_FRAME, f"malformed reply {sorted(reply)!r}", where)


# ------------------------------------------------------------------------------------------
# Expert/layer sets in hello replies: [first, last] pairs (see ranges.py)


def from_ranges(pairs: Any, limit: int, what: str) -> list[int]:
    """The ids a hello reply's [[first, last], ...] names, validated (a hello reply is wire input)."""
    if not isinstance(pairs, list):
        raise ProtocolError(f"{what} must be a list of [first, last] pairs")
    for p in pairs:
        if (not isinstance(p, list) or len(p) != 2 or not all(isinstance(v, int) for v in p)
                or not 0 <= p[0] <= p[1] < limit):
            raise ProtocolError(f"{what} holds a bad range {preview(p)} (limit {limit})")
    return ranges.from_pairs(pairs)
