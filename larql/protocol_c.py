"""The decode step's wire messages in C (csrc/wire.c): the one-token `experts` request and its
reply, built, parsed and validated without Python objects on both ends.

Between two layers the interpreter runs cold (the weights streaming through the kernels evict
its code and data from the caches), so every Python step of a round trip costs several times
what a warm micro-benchmark says: ~430 us per request on the server and ~300 us on the client
against a ~100 us loopback echo, measured on the 2-vCPU dev VM (csrc/larql_wire.h).

protocol.py stays the protocol: these functions take only the well-formed common case and
decline the rest (None / False here), which then goes through protocol.py and gets its error
message there. Tests check that whatever C accepts, protocol.py accepts with the same meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._kernels import ffi, lib

MAX_TOKEN_SLOTS = 16     # csrc/wire.c's MAX_TOKEN_SLOTS, the client planner's LEAN_MAX_K
HEAD_ROOM = 64           # csrc/wire.c's HEAD_ROOM: map, keys and headers of either message


def frame_capacity(hidden: int) -> int:
    """Bytes a buffer needs for any one-token request or reply frame of this hidden size."""
    return HEAD_ROOM + 8 * hidden + 8 * MAX_TOKEN_SLOTS + 4


@dataclass(frozen=True)
class Request:
    """What lq_wire_parse_experts read: the fields and where x, ids and w start in the body."""

    id: int
    layer: int
    tokens: int
    slots: int
    acc: str
    enc: str
    x_off: int
    ids_off: int
    w_off: int


def parse_experts(body: bytes, *, hidden: int, num_layers: int, num_experts: int,
                  max_tokens: int) -> Request | None:
    """The C reading of an `experts` body (enc f32 or q8k), or None where it declines."""
    req = ffi.new("lq_wire_request *")
    rc = lib.lq_wire_parse_experts(ffi.from_buffer(body), len(body), hidden, num_layers, num_experts,
                                   max_tokens, req)
    if rc != lib.LQ_OK:
        return None
    return Request(req.id, req.layer, req.tokens, req.slots, "f64" if req.acc64 else "f32",
                   "q8k" if req.enc == lib.LQ_WIRE_Q8K else "f32", req.x_off, req.ids_off, req.w_off)


# ------------------------------------------------------------------------------------------
# Server


class TokenServer:
    """A server's C path for a lone one-token request: parse, validate, check, rms_norm, the
    expert FFN and the reply frame in one call. A layer joins once the Python path has checked
    it (`enable`, after the integrity check); until then, and for anything the C side declines,
    `serve` returns None and the request takes the Python path."""

    def __init__(self, local, vindex) -> None:
        cfg = vindex.config
        self.local = local
        self.vindex = vindex
        L = cfg.num_layers
        self._tables = ffi.new("lq_expert *[]", L)
        self._norms = ffi.new("float *[]", L)
        self._fds = ffi.new("int32_t[]", [-1] * L)
        self._sizes = ffi.new("int64_t[]", L)
        self._keep: dict[int, object] = {}
        s = self._shard = ffi.new("lq_wire_shard *")
        s.hidden, s.inter = cfg.hidden_size, cfg.moe_intermediate_size
        s.num_layers, s.num_experts, s.eps = L, cfg.num_experts, local.eps
        s.tables, s.norms, s.fds, s.sizes = self._tables, self._norms, self._fds, self._sizes
        s.norms_fd, s.norms_size = -1, 0
        self.enabled: set[int] = set()
        self._reply = bytearray(frame_capacity(cfg.hidden_size))
        self._reply_c = ffi.from_buffer(self._reply)
        self._req = ffi.new("lq_wire_request *")
        self._len = ffi.new("int64_t *")

    def enable(self, layer: int) -> None:
        """Let `layer` take the C path (call after its files and bytes passed their checks)."""
        if layer in self.enabled:
            return
        table, norm = self.local.layer(layer)
        files = self.vindex.mapped_files(layer)
        if (table.n_experts != self._shard.num_experts or table.inter != self._shard.inter
                or table.hidden != self._shard.hidden or norm.dtype != np.float32
                or not norm.flags.c_contiguous):
            return       # not the shape the C path indexes: stays on the Python path
        (fd, size), *rest = files
        self._fds[layer], self._sizes[layer] = fd, size
        if rest:
            self._shard.norms_fd, self._shard.norms_size = rest[0]
        norm_c = ffi.from_buffer("float[]", norm)
        self._keep[layer] = (table, norm, norm_c)
        self._norms[layer] = norm_c
        self._tables[layer] = table._c
        self.enabled.add(layer)

    def serve(self, body: bytes) -> bytes | None:
        """The reply frame to a request body the C path answered; None: use the Python path."""
        return self._serve(ffi.from_buffer(body), len(body))

    def serve_frame(self, frame: bytes) -> bytes | None:
        """As `serve` for a whole frame (its 4-byte length already checked by the caller)."""
        return self._serve(ffi.from_buffer(frame) + 4, len(frame) - 4)

    def _serve(self, body_c, n: int) -> bytes | None:
        rc = lib.lq_wire_serve_token(self._shard, body_c, n, self._reply_c, len(self._reply), self._len,
                                     self._req)
        return bytes(self._reply[: self._len[0]]) if rc == lib.LQ_OK else None


# ------------------------------------------------------------------------------------------
# Client


# The encodings the C path builds and parses (protocol.ENCODINGS; f16 stays in Python).
ENCODINGS = {"f32": lib.LQ_WIRE_F32, "q8k": lib.LQ_WIRE_Q8K}


def encode_token(out_c, cap: int, rid: int, layer: int, x_c, enc: str, hidden: int, ids: np.ndarray, w_c,
                 slots: int, num_experts: int, first: int, last: int, acc64: bool) -> int:
    """lq_wire_encode_token: the frame's bytes in out_c, 0 if no slot is in [first, last],
    negative for bad ids (LQ_E_EXPERT) or a short buffer (LQ_E_SHAPE). x_c is one row in `enc`
    (f32 h, or its normed Q8_K blocks)."""
    return lib.lq_wire_encode_token(out_c, cap, rid, layer, x_c, ENCODINGS[enc], hidden, ffi.from_buffer(ids),
                                    ids.dtype.itemsize == 8, w_c, slots, num_experts, first, last, acc64)


def add_reply(body_c, n: int, rid: int, hidden: int, acc64: bool, sum_c, first: bool, out_c=ffi.NULL) -> bool:
    """lq_wire_add_reply: True if the reply was {id: rid, ok: true, y: finite} and y was added
    (and, for f64 sums, the sum rounded into out_c unless NULL)."""
    return lib.lq_wire_add_reply(body_c, n, rid, hidden, acc64, sum_c, first, out_c) == lib.LQ_OK
