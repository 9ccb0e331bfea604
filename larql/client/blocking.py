"""The decode path: blocking sockets, no event loop per layer (issue 10).

One socket per replica (TCP_NODELAY; TLS through ssl.SSLContext.wrap_socket; the same auth +
hello handshake as the asyncio client, from core.handshake). A frame goes out with one
sendall (header and body in one buffer) and replies are read with recv_into into a buffer the
connection keeps, so a layer costs two system calls per shard and no task, future or loop
iteration. All shards of a layer are written first and read after, so they compute
concurrently. Failover follows the shared policy (policy.py); down replicas are probed by one
background thread while another replica carries the work.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence

import numpy as np

from .. import protocol as P
from .. import protocol_c
from .._kernels import ffi, lib
from ..experts import Pending
from ..shardmap import Endpoint, ShardSpec, ShardSpecError
from ..transport import AuthError
from . import core
from .core import BadReply, ClientOptions, ModelIdentity, Planner, ShardError, request_limits
from .policy import Replica, Shard

log = core.log

_FATAL_CODES = {P.E_NOT_OWNED, P.E_BAD_REQUEST, P.E_VERSION, P.E_UNKNOWN_OP}
# Error replies another replica may answer differently: it is draining, it hit a bug, or its own
# copy of the files failed a check.
RETRYABLE_CODES = {P.E_SHUTDOWN, P.E_INTERNAL, P.E_NEED_HELLO, P.E_INTEGRITY}


def retryable(exc: BaseException) -> bool:
    """Whether a failed request may go to another replica (the one classification both drivers use)."""
    if isinstance(exc, (ShardSpecError, AuthError)):
        return False
    if isinstance(exc, P.RemoteError):
        return exc.code in RETRYABLE_CODES
    return isinstance(exc, (ShardError, OSError, P.ProtocolError))


def tls_failure(where: str, e: BaseException) -> ShardError:
    """The one-line message for a failed TLS handshake (certificate or protocol)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        reason = e.verify_message or e.reason or str(e)
        return ShardError(f"TLS certificate of {where} not trusted: {reason} (use --tls-ca for a private CA)")
    detail = getattr(e, "reason", None) or str(e) or type(e).__name__
    return ShardError(f"TLS handshake with {where} failed: the server does not speak TLS? ({detail})")


class Closed(ShardError):
    """The peer closed the connection."""


class BlockingConnection:
    """One replica's socket; requests may be pipelined (replies matched by id)."""

    def __init__(self, endpoint: Endpoint, sock: socket.socket) -> None:
        self.endpoint = endpoint
        self.where = endpoint.where
        self.sock = sock
        self.next_id = 1
        self.info: dict = {}
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)
        self._buf_c = ffi.from_buffer(self._buf)      # the same bytes for the C reply check
        self.out: bytearray | None = None             # the C path's request buffer (token_out)
        # Plain TCP: the decode step's frames are written and read by C (protocol_c); TLS
        # records need Python's ssl module.
        self.fd = -1 if endpoint.tls else sock.fileno()
        self._io = ffi.new("int64_t[2]")              # read_frame's end and frame length
        self._err = ffi.new("int32_t *")
        self._leg = None                              # this connection's lq_wire_leg (`leg`)
        self._start = 0            # unread bytes are _buf[_start:_end]
        self._end = 0
        self._stash: dict[int, dict] = {}
        self.broken = False
        self.handshaking = True
        self._limit = 0.0            # seconds the current recv was given (for its message)

    @classmethod
    def open(cls, endpoint: Endpoint, timeout: float,
             tls_context: ssl.SSLContext | None) -> BlockingConnection:
        where = endpoint.where
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        except TimeoutError:
            raise ShardError(f"{where}: no TCP connection within {timeout:g}s") from None
        except OSError as e:
            raise ShardError(f"{where}: cannot connect ({e.strerror or e})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if endpoint.tls:
            try:
                sock = tls_context.wrap_socket(sock, server_hostname=endpoint.host)
            except TimeoutError:
                sock.close()
                raise ShardError(f"TLS handshake with {where} failed: the server does not speak TLS? "
                                 f"(no TLS reply within {timeout:g}s)") from None
            except (ssl.SSLError, ConnectionError) as e:
                sock.close()
                raise tls_failure(where, e) from None
            except OSError as e:
                sock.close()
                raise ShardError(f"TLS handshake with {where} failed: {e.strerror or e}") from None
        return cls(endpoint, sock)

    # --- frames ---------------------------------------------------------------------------
    def send(self, msg: dict, timeout: float) -> int:
        rid = self.next_id
        self.next_id += 1
        msg["id"] = rid
        self.send_frame(P.encode_frame(msg), timeout)
        return rid

    def recv(self, rid: int, deadline: float, what: str = "request") -> dict:
        """The reply to request `rid` (others that arrive first are kept for their callers)."""
        got = self._stash.pop(rid, None)
        self._limit = max(0.1, round(deadline - time.monotonic(), 1))
        while got is None:
            reply = self._read_reply(deadline, what)
            r = P.request_id(reply)
            if r == rid:
                return reply
            if r is None:
                # an error without a usable id: the server could not parse something we sent
                self.broken = True
                code, message = core._error_of(reply)
                raise P.RemoteError(code, message, self.where)
            self._stash[r] = reply
        return got

    def keep(self, rid: int, reply: dict) -> None:
        """A reply read ahead of its caller: `recv`/`recv_token` for rid return it first."""
        self._stash[rid] = reply

    def _fill(self, deadline: float, what: str) -> None:
        """Read more bytes (at least one) into the buffer, within the deadline."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):      # compact, or grow for a big frame
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start: self._end]
            self._start, self._end = 0, n
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timeout(what, deadline)
        try:
            self.sock.settimeout(left)
            n = self.sock.recv_into(self._view[self._end:])
        except TimeoutError:
            raise self._timeout(what, deadline) from None
        except ssl.SSLError as e:
            self.broken = True
            raise ShardError(f"{self.where}: TLS error ({e.reason or e})") from None
        except OSError as e:
            raise self._lost(e) from None
        if n == 0:
            raise self._closed()
        self._end += n

    def _lost(self, e: OSError) -> ShardError:
        self.broken = True
        return ShardError(f"{self.where}: connection lost ({e.strerror or e})")

    def _closed(self) -> ShardError:
        self.broken = True
        if self.handshaking and not self.endpoint.tls:
            return Closed(f"{self.where} closed the connection during the handshake: is it a TLS "
                          f"server? (use tls://{self.where})")
        return Closed(f"{self.where}: connection closed by the server")

    def _timeout(self, what: str, deadline: float) -> ShardError:
        self.broken = True    # a late reply would arrive out of step with the next request
        return ShardError(f"{self.where}: no reply to {what!r} within {self._limit:g}s")

    def _read_reply(self, deadline: float, what: str) -> dict:
        need = self._next_frame(deadline, what)
        body = self._view[self._start + 4: self._start + need]
        try:
            msg = P.decode_body(body)
        except P.ProtocolError as e:
            self.broken = True
            raise BadReply(f"{self.where}: unreadable reply ({e})") from None
        finally:
            body.release()
        self._start += need
        return msg

    def recv_token(self, rid: int, deadline: float, hidden: int, acc64: bool, sum_c, first: bool,
                   out_c) -> dict | None:
        """The reply to one-token request `rid` added into sum_c by C when it is a plain
        success (None; the f64 sum also rounded into out_c); otherwise the decoded reply,
        exactly as `recv` returns it."""
        if rid in self._stash:
            return self._stash.pop(rid)
        self._limit = max(0.1, round(deadline - time.monotonic(), 1))
        need = self._read_frame_c(deadline) if self.fd >= 0 else 0
        if not need:
            need = self._next_frame(deadline, "experts")
        body_c = self._buf_c + self._start + 4
        if protocol_c.add_reply(body_c, need - 4, rid, hidden, acc64, sum_c, first, out_c):
            self._start += need
            return None
        return self.recv(rid, deadline, "experts")   # the same frame, read by protocol.py

    def _read_frame_c(self, deadline: float) -> int:
        """C's read of the next whole frame (plain TCP): its length with the header, or 0 when
        it needs Python's reader (a frame bigger than the buffer, or an oversized length)."""
        if self._start == self._end:
            self._start = self._end = 0
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timeout("experts", deadline)
        io = self._io
        while True:   # a signal (Ctrl-C) returns to Python, whose handlers run here, then on
            io[0] = self._end
            rc = lib.lq_wire_read_frame(self.fd, self._buf_c, len(self._buf), self._start, io,
                                        max(1, int(left * 1000)), P.MAX_FRAME, io + 1, self._err)
            self._end = io[0]
            left = deadline - time.monotonic()
            if rc != lib.LQ_WIRE_INTERRUPTED:
                break
            if left <= 0:
                raise self._timeout("experts", deadline)
        if rc == lib.LQ_OK:
            return io[1]
        if rc == lib.LQ_WIRE_TIMEOUT:
            raise self._timeout("experts", deadline)
        if rc == lib.LQ_WIRE_CLOSED:
            raise self._closed()
        if rc == lib.LQ_WIRE_IO:
            raise self._lost(OSError(self._err[0], os.strerror(self._err[0])))
        return 0

    def send_token(self, buf_c, buf: bytearray, n: int, timeout: float) -> None:
        """The first n bytes of a C-built request frame, written by C on plain TCP (by Python's
        ssl on TLS, where buf_c is not used)."""
        if self.fd < 0:
            with memoryview(buf) as view:
                self.send_frame(view[:n], timeout)
            return
        rc = lib.lq_wire_write(self.fd, buf_c, n, max(1, int(timeout * 1000)), self._err)
        if rc != lib.LQ_OK:
            raise self.write_failed(-rc, self._err[0])

    def leg(self, hidden: int, spec: ShardSpec):
        """This connection's lq_wire_leg for a shard's one-token calls (plain TCP), made once."""
        if self._leg is None:
            buf, buf_c = self.token_out(hidden)
            g = self._leg = ffi.new("lq_wire_leg *")
            g.fd, g.first, g.last = self.fd, spec.first, spec.last
            g.out, g.out_cap = buf_c, len(buf)
            g.input, g.in_cap = self._buf_c, len(self._buf)
        return self._leg

    def sync_leg(self) -> None:
        """Before C writes and reads: the next request id and the unread bytes."""
        g = self._leg
        g.id, g.in_start, g.in_end = self.next_id, self._start, self._end

    def unsync_leg(self) -> None:
        """After C read: the unread bytes it left."""
        g = self._leg
        self._start, self._end = g.in_start, g.in_end

    def write_failed(self, code: int, err: int) -> ShardError:
        self.broken = True
        why = "timed out" if -code == lib.LQ_WIRE_TIMEOUT else os.strerror(err)
        return ShardError(f"{self.where}: connection lost while sending ({why})")

    def read_failed(self, status: int, err: int, deadline: float, given: float) -> ShardError | None:
        """The error a C read ended with (None: the frame is buffered, or too big for the buffer:
        the Python reader takes it)."""
        if status == lib.LQ_WIRE_TIMEOUT:
            self._limit = max(0.1, round(given, 1))
            return self._timeout("experts", deadline)
        if status == lib.LQ_WIRE_CLOSED:
            return self._closed()
        if status == lib.LQ_WIRE_IO:
            return self._lost(OSError(err, os.strerror(err)))
        return None

    def token_out(self, hidden: int):
        """(bytearray, its C pointer) for one-token requests of this hidden size."""
        if self.out is None:
            self.out = bytearray(protocol_c.frame_capacity(hidden))
            self._out_c = ffi.from_buffer(self.out)
        return self.out, self._out_c

    def send_frame(self, frame, timeout: float) -> None:
        """Write a whole frame within `timeout` seconds. The socket keeps whatever timeout the
        last read left on it (often a fraction of a second, or none at all), so it is set here:
        a server that stops reading costs one timeout, never a hang, and a write is never cut
        short by a read's leftover deadline."""
        try:
            self.sock.settimeout(max(timeout, 1e-3))
            self.sock.sendall(frame)
        except TimeoutError:
            self.broken = True   # part of the frame may be out: the stream is out of step
            raise ShardError(f"{self.where}: could not send a request within {timeout:g}s "
                             f"(the server is not reading)") from None
        except OSError as e:
            self.broken = True
            raise ShardError(f"{self.where}: connection lost while sending ({e.strerror or e})") from None
        except BaseException:    # Ctrl-C mid-frame: the next request must not follow the torn one
            self.broken = True
            raise

    def _next_frame(self, deadline: float, what: str) -> int:
        """Wait until a whole frame is buffered at _start; its length with the header."""
        while self._end - self._start < 4:
            self._fill(deadline, what)
        head = bytes(self._view[self._start: self._start + 4])
        if self.handshaking and not self.endpoint.tls and head[0] in (0x15, 0x16) and head[1] == 0x03:
            self.broken = True   # a TLS alert or record where a frame should be
            raise Closed(f"{self.where} answered with TLS: it is a TLS server (use tls://{self.where})")
        (length,) = P.HEADER.unpack(head)
        if length > P.MAX_FRAME:
            self.broken = True
            raise BadReply(f"{self.where}: reply frame of {length} bytes exceeds the "
                           f"{P.MAX_FRAME}-byte limit")
        need = 4 + length
        if need > len(self._buf):
            self._grow(need)
        while self._end - self._start < need:
            self._fill(deadline, what)
        return need

    def _grow(self, need: int) -> None:
        n = self._end - self._start
        buf = bytearray(max(need, 2 * len(self._buf)))
        buf[:n] = self._view[self._start: self._end]
        self._set_buffer(buf)
        self._start, self._end = 0, n

    def _set_buffer(self, buf: bytearray) -> None:
        """Read into `buf` from now on (the caller moved the unread bytes); C's leg follows."""
        self._view.release()
        self._buf, self._view = buf, memoryview(buf)
        self._buf_c = ffi.from_buffer(buf)
        if self._leg is not None:
            self._leg.input, self._leg.in_cap = self._buf_c, len(buf)

    def request(self, msg: dict, deadline: float) -> dict:
        """Send and wait for the raw reply (error replies are returned, not raised)."""
        return self.recv(self.send(msg, deadline - time.monotonic()), deadline, str(msg.get("op")))

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.sock.close()


def drive_handshake(conn: BlockingConnection, key: bytes | None, who: str, deadline: float) -> dict:
    gen = core.handshake(key, who)
    msg = next(gen)
    while True:
        reply = conn.request(msg, deadline)
        try:
            msg = gen.send(reply)
        except StopIteration as stop:
            conn.handshaking = False
            return stop.value


_F32 = np.dtype(np.float32)
_INT_IDS = (np.dtype(np.int64), np.dtype(np.int32))


def one_token(h, ids, weights, hidden: int) -> bool:
    """True when a layer call is what the C path takes: one contiguous f32 token of `hidden`
    values, at most 16 slots of int32/int64 ids and f32 weights (else the general path takes
    it, and words any error)."""
    return not (type(h) is not np.ndarray or type(ids) is not np.ndarray or type(weights) is not np.ndarray
                or h.dtype is not _F32 or weights.dtype is not _F32 or ids.dtype not in _INT_IDS
                or h.size != hidden or ids.size != weights.size or ids.size > protocol_c.MAX_TOKEN_SLOTS
                or h.ndim > 2 or ids.ndim > 2 or weights.ndim > 2 or (ids.ndim == 2 and ids.shape[0] != 1)
                or not (h.flags.c_contiguous and ids.flags.c_contiguous and weights.flags.c_contiguous))


def c_collect(ptrs, n: int, hidden: int, acc64: bool, deadline: float, left: float, sum_c, first: bool,
              out_c) -> tuple[int, float]:
    """lq_wire_token_collect until every leg is added (returns n) or one is not a plain success
    (its index), with the seconds it was last given. A signal (Ctrl-C) returns to Python, whose
    handlers run here, then on."""
    while True:
        stop = lib.lq_wire_token_collect(ptrs, n, hidden, acc64, max(1, int(left * 1000)), P.MAX_FRAME, sum_c,
                                         first, out_c)
        if stop == n or ptrs[stop].status != lib.LQ_WIRE_INTERRUPTED:
            return stop, left
        left = deadline - time.monotonic()
        if left <= 0:
            return stop, left


class _TokenCall:
    """One decode step's layer between `_token_send` and `_token_collect`: its inputs, the
    sum the replies are added into (f64 scratch for f64 partial sums, else the output
    itself) and the f32 output."""

    def __init__(self, layer: int, h, ids, weights, acc64: bool, hidden: int, scratch64: np.ndarray,
                 x: tuple[np.ndarray, str], out: tuple[np.ndarray, object] | None = None) -> None:
        self.layer, self.h, self.ids, self.weights = layer, h, ids, weights
        self.acc64, self.hidden = acc64, hidden
        self.x, enc = x                 # what goes on the wire: h, or its normed Q8_K blocks
        self.enc = protocol_c.ENCODINGS[enc]
        self.x_c, self.w_c = ffi.from_buffer(self.x), ffi.from_buffer("float[]", weights)
        self.norm_c, self.eps = ffi.NULL, 0.0    # set: x is h, and C makes its Q8_K blocks
        if out is None:
            out = np.empty((1, hidden), dtype=_F32), None
        self.out = out[0]
        self.out_c = out[1] if out[1] is not None else ffi.from_buffer("float[]", self.out)
        self.total = scratch64 if acc64 else self.out
        self.sum_c = ffi.from_buffer(self.total) if acc64 else self.out_c
        self.first = True
        self.python_sums = False        # a partial sum added here, not by C: round at the end
        self.sent: list[tuple[int, Replica | None, BlockingConnection | None, int]] = []
        self.deadline = 0.0
        self.legs = None                # (leg pointers, count) when C wrote every request

    def add(self, y: np.ndarray) -> None:
        t = self.total.reshape(-1)
        if self.first:
            t[:] = y + 0.0
            self.first = False
        else:
            t += y
        self.python_sums = True

    def finish(self) -> np.ndarray:
        if self.first:
            self.out[:] = 0.0
        elif self.acc64 and self.python_sums:
            self.out[:] = self.total.astype(np.float32).reshape(1, -1)
        return self.out


class _Lane:
    """A layer's one-token calls in the steady state, set up once: one replica, up and
    connected, of every shard that serves the layer per call (a replicated shard's up replicas
    in turn, `rotate`), so a call on plain TCP is two C calls (lq_wire_token_send,
    lq_wire_token_collect) and a few lines.
    Over TLS the same C call builds every request (the norm and Q8_K step included) and
    Python's ssl writes and reads the records; C still checks and adds each reply.

    Why: between two layers the model's own kernels evict the interpreter's code and data, so
    each Python step of the general path runs cold. Measured on the 2-vCPU dev VM, one shard,
    the model's compute between calls: the general path (`_token_send` + `_token_collect`)
    cost 535 us over in-process, the two C calls alone 317 us; the bare echo was 148 us. Over
    TLS (same VM, one shard, interleaved with the model's compute) the lane took 80-130 us less
    wall time and ~85 us less client CPU per call than the general path, whose norm and Q8_K
    step alone cost 49 us in Python; what is left is the ssl records (~70 us to write, ~85 us
    to read, client CPU).

    Valid while the client's epoch (bumped by every connection or health change) is its own
    and none of its connections broke. A call that meets anything else (a failed write, a reply
    that is not a plain success, a timeout) is handed to the general path as it stands
    (`BlockingExpertClient._adopt`), which owns failover and every error message."""

    __slots__ = ("epoch", "entries", "conns", "legs", "ptrs", "n", "enc", "enc_name", "norm_c", "eps",
                 "acc64", "tls", "rotating", "turn", "all_conns")

    def __init__(self, epoch: int, entries: list, legs: list, enc_name: str, norm_c, eps: float,
                 acc64: bool) -> None:
        self.epoch = epoch
        self.entries = entries           # (shard index, Shard, Replica, BlockingConnection), shard order
        self.conns = [e[3] for e in entries]
        self.legs = legs                 # their lq_wire_leg structs
        self.ptrs = ffi.new("lq_wire_leg *[]", legs)
        self.n = len(legs)
        self.enc_name, self.enc = enc_name, protocol_c.ENCODINGS[enc_name]
        self.norm_c, self.eps = norm_c, eps    # q8k: the layer's norm, made into Q8_K blocks by C
        self.acc64 = acc64
        self.tls = any(c.fd < 0 for c in self.conns)   # some replies are read by Python's ssl
        self.rotating: list = []         # (position, shard index, Shard, [(Replica, conn, leg)])
        self.turn = 0
        self.all_conns = list(self.conns)   # every connection a call may use (all must be whole)

    def rotate(self, rotating: list, start: int) -> None:
        """Replicated shards take their up replicas in turn, call by call (the policy's
        round-robin among equals: a decode step has nothing in flight), from `start`."""
        self.rotating, self.turn = rotating, start - 1
        self.all_conns = [e[3] for e in self.entries] + [c for *_, opts in rotating for _, c, _ in opts]
        self.tls = any(c.fd < 0 for c in self.all_conns)
        self.advance()

    def advance(self) -> None:
        """The next replica of each replicated shard into this call's entries and legs."""
        self.turn += 1
        for i, si, sh, opts in self.rotating:
            rep, conn, leg = opts[self.turn % len(opts)]
            self.entries[i] = (si, sh, rep, conn)
            self.conns[i], self.legs[i], self.ptrs[i] = conn, leg, leg


class _LaneCall:
    """One `start` on a lane, until its `result`."""

    __slots__ = ("lane", "layer", "h", "ids", "weights", "out", "out_c", "sent", "deadline", "failures")

    def __init__(self, lane: _Lane, layer: int, h, ids, weights, out: np.ndarray, out_c, sent: int,
                 deadline: float, failures: dict | None) -> None:
        self.lane, self.layer, self.h, self.ids, self.weights = lane, layer, h, ids, weights
        self.out, self.out_c, self.sent, self.deadline = out, out_c, sent, deadline
        self.failures = failures         # {leg index: the ShardError of a write by Python (TLS)}


class BlockingExpertClient:
    """Shard-map client on blocking sockets: `forward`, `forward_multi`, `stats`, `ping`."""

    def __init__(self, shards: Sequence[ShardSpec], identity: ModelIdentity, options: ClientOptions,
                 quantize=None) -> None:
        self.options = options
        self.identity = identity
        self.shards = [Shard(s) for s in shards]
        self.planner = Planner(shards, identity, options.encoding, quantize)
        self.round_trips = 0
        self.retries = 0
        self.c_path_calls = 0                # layer calls built and summed in C (`_token_send`, lanes)
        self.lane_calls = 0                  # of which on a lane, start to finish (`_Lane`)
        self._scratch64 = np.empty(identity.hidden, dtype=np.float64)
        self._scratch64_c = ffi.from_buffer(self._scratch64)
        # The lane (one-token calls in two C calls) serves clients that fail rather than
        # renormalise, with an encoding C builds; a call uses one replica per shard (`_Lane`).
        self._lane_ok = options.encoding in protocol_c.ENCODINGS and options.on_shard_failure == "fail"
        self._lanes: list[_Lane | None] = [None] * identity.num_layers
        self._epoch = 0                      # bumped by every connection or health change
        self._legs: dict[tuple[int, ...], tuple] = {}   # connections -> (them, their C leg pointers)
        self._lock = threading.Lock()        # guards policy state and connections vs the prober
        self._prober: threading.Thread | None = None
        self._probe_wake = threading.Event()
        self._closed = False

    @property
    def degraded_layers(self) -> int:
        return self.planner.degraded_layers

    @property
    def accumulator(self) -> str:
        return self.planner.acc

    # --- connecting -----------------------------------------------------------------------
    def connect(self) -> BlockingExpertClient:
        """Connect every replica and check its hello; fatal if a shard has none or any replica
        is the wrong server (even when another replica of the range is fine)."""
        try:
            for sh in self.shards:
                for rep in sh.replicas:
                    try:
                        self._open(sh, rep)
                    except (ShardSpecError, AuthError, P.RemoteError):
                        raise
                    except ShardError as e:
                        sh.policy.failed(rep.state, str(e), time.monotonic())
                if not sh.policy.any_up():
                    raise ShardError(f"shard {sh.spec.label}: no replica reachable: {sh.policy.summary()}")
            infos = [r.conn.info for sh in self.shards for r in sh.replicas if r.conn is not None]
            split = core.splits_a_layer([sh.spec for sh in self.shards], self.identity.num_layers)
            self.planner.acc = core.choose_accumulator(self.options.accumulate, infos, split)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self, sh: Shard, rep: Replica, timeout: float | None = None) -> BlockingConnection:
        opts = self.options
        timeout = opts.connect_timeout if timeout is None else min(timeout, opts.connect_timeout)
        deadline = time.monotonic() + timeout
        ctx = opts.tls_context() if rep.state.endpoint.tls else None
        conn = BlockingConnection.open(rep.state.endpoint, timeout, ctx)
        try:
            info = drive_handshake(conn, opts.api_key, core.endpoint_label(sh.spec, rep.state.endpoint),
                                   deadline)
            acc = self.planner.acc if self.planner.acc == "f64" else None
            core.check_hello(self.identity, sh.spec, rep.state.where, info, opts.encoding, acc)
        except BaseException:
            conn.close()
            raise
        conn.info = info
        if rep.conn is not None:
            rep.conn.close()
        rep.conn = conn
        self._epoch += 1
        return conn

    def close(self) -> None:
        self._closed = True
        self._probe_wake.set()
        with self._lock:
            for sh in self.shards:
                for rep in sh.replicas:
                    if rep.conn is not None:
                        rep.conn.close()
                        rep.conn = None
        if self._prober is not None and self._prober is not threading.current_thread():
            self._prober.join(self.options.connect_timeout + 2)

    # --- sending --------------------------------------------------------------------------
    def _budget(self, si: int) -> tuple[int, int, int]:
        return request_limits(r.conn.info for r in self.shards[si].replicas if r.conn is not None)

    def forward(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.start(layer, h, ids, weights).result()

    def start(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> Pending:
        """Send the layer's requests now; `result()` reads and sums the replies. The caller
        computes meanwhile (the model: its dense MLP while the servers run the experts)."""
        if self._closed:
            raise ShardError("the remote experts client is closed")
        if self._lane_ok:
            lane = self._lane(layer)
            if lane is not None and one_token(h, ids, weights, self.identity.hidden):
                pending = self._lane_send(lane, layer, h, ids, weights)
                if pending is not None:
                    return pending
        if self.options.encoding in protocol_c.ENCODINGS and self.options.on_shard_failure == "fail":
            call = self._token_send(layer, h, ids, weights)
            if call is not None:
                return Pending(lambda: self._token_collect(call))
        run = self._run_send([(layer, h, ids, weights)], multi=False)
        return Pending(lambda: self._run_collect(run)[0])

    def forward_multi(self, work) -> list[np.ndarray]:
        if self._closed:
            raise ShardError("the remote experts client is closed")
        return self._run_collect(self._run_send(list(work), multi=True))

    def _run_send(self, work, multi: bool):
        plan = self.planner.plan(work, multi, self._budget)
        deadline = time.monotonic() + self.options.timeout
        # Write every shard's request first, read after: the shards compute concurrently.
        sent = [self._send_first(job) for job in plan.jobs]
        return plan, sent, deadline

    def _run_collect(self, run) -> list[np.ndarray]:
        plan, sent, deadline = run
        results = [self._finish(job, s, deadline) for job, s in zip(plan.jobs, sent, strict=True)]
        self._schedule_probes()
        return self.planner.combine(plan, results)

    # --- the lane: a layer's one-token call in the steady state --------------------------------
    def _lane(self, layer) -> _Lane | None:
        lanes = self._lanes
        if type(layer) is not int or not 0 <= layer < len(lanes):
            return None
        lane = lanes[layer]
        if lane is not None and lane.epoch == self._epoch:
            for c in lane.all_conns:
                if c.broken:
                    break
            else:
                return lane
        lane = lanes[layer] = self._new_lane(layer)
        return lane

    def _new_lane(self, layer: int) -> _Lane | None:
        entries, rotating = [], []
        for si, sh in enumerate(self.shards):
            if sh.spec.serves(layer):
                reps = [r for r in sh.replicas if r.conn is not None and not r.conn.broken and r.state.up()]
                if not reps:        # none up and connected: the general path reconnects or waits
                    return None
                entries.append((si, sh, reps[0], reps[0].conn))
                if len(reps) > 1:
                    rotating.append((len(entries) - 1, si, sh, reps))
        planner = self.planner
        norm_c, eps = ffi.NULL, 0.0
        if planner.encoding == "q8k":
            quantize = planner.quantize
            if not hasattr(quantize, "norm_c"):
                return None
            norm_c, eps = quantize.norm_c(layer), quantize.eps
        if not entries:
            return None
        H = self.identity.hidden
        legs = [conn.leg(H, sh.spec) for _, sh, _, conn in entries]
        lane = _Lane(self._epoch, entries, legs, planner.encoding, norm_c, eps, planner.acc == "f64")
        if rotating:
            lane.rotate([(i, si, sh, [(r, r.conn, r.conn.leg(H, sh.spec)) for r in reps])
                         for i, si, sh, reps in rotating], layer)
        return lane

    def _lane_send(self, lane: _Lane, layer: int, h, ids, weights) -> Pending | None:
        """Every shard's request encoded and written by one C call; None if an id is out of
        range (nothing went out: the general path words the error)."""
        H = self.identity.hidden
        out = np.empty((1, H), dtype=_F32)
        out_c = ffi.from_buffer("float[]", out)
        if lane.rotating:
            lane.advance()
        for c in lane.conns:
            c.sync_leg()
        timeout = self.options.timeout
        rc = lib.lq_wire_token_send(lane.ptrs, lane.n, layer, ffi.from_buffer(h), lane.enc, lane.norm_c,
                                    lane.eps, H, ffi.from_buffer(ids), ids.dtype.itemsize == 8,
                                    ffi.from_buffer("float[]", weights), ids.size, self.identity.num_experts,
                                    lane.acc64, max(1, int(timeout * 1000)))
        if rc < 0:
            return None
        sent = failed = 0
        failures = None
        for i, (leg, c) in enumerate(zip(lane.legs, lane.conns, strict=True)):
            status = leg.sent
            if status == 3:                  # built, for Python's ssl to write (TLS)
                try:
                    c.send_token(None, c.out, leg.out_len, timeout)
                    leg.sent = status = 1
                except ShardError as e:
                    leg.sent = status = -lib.LQ_WIRE_IO
                    failures = failures or {}
                    failures[i] = e
            if status == 1:
                c.next_id += 1
                sent += 1
            elif status < 0:
                failed = 1
        self.round_trips += sent
        lc = _LaneCall(lane, layer, h, ids, weights, out, out_c, sent, time.monotonic() + timeout, failures)
        if failed:
            call = self._adopt(lc)
            return Pending(lambda: self._token_collect(call))
        return Pending(lambda: self._lane_collect(lc))

    def _lane_collect(self, lc: _LaneCall) -> np.ndarray:
        lane = lc.lane
        if lc.sent:
            sum_c = self._scratch64_c if lane.acc64 else lc.out_c
            error = None
            # as the general path waits: while a replicated shard has another replica up, half
            # of what is left, so a hung replica still leaves time to fail over
            wait = min((self._attempt_deadline(sh, rep, lc.deadline) for _, sh, rep, _ in lane.entries),
                       default=lc.deadline)
            if lane.tls:
                stop, left, error = self._lane_read_each(lc, sum_c, wait)
            else:
                try:
                    stop, left = c_collect(lane.ptrs, lane.n, self.identity.hidden, lane.acc64, wait,
                                           wait - time.monotonic(), sum_c, True, lc.out_c)
                finally:   # also when a signal handler raises (Ctrl-C): the bytes C read stay read
                    for c in lane.conns:
                        c.unsync_leg()
            if stop != lane.n:
                call = self._adopt(lc)
                return self._token_collect(call, self._collect_legs(call, stop, left, error))
        else:
            lc.out[:] = 0.0                 # every slot empty (-1): nothing to add
        self.c_path_calls += 1
        self.lane_calls += 1
        return lc.out

    def _lane_read_each(self, lc: _LaneCall, sum_c, wait: float) -> tuple[int, float, Exception | None]:
        """A lane with a TLS leg: the replies in shard order, each read by its connection (ssl
        records in Python, plain TCP in C) and checked and added by C, as lq_wire_token_collect
        does. Where one is not a plain success: (its leg, the time left, the transport error, or
        None when the reply was read: it is kept for the general path, which reads it again)."""
        lane = lc.lane
        H, first = self.identity.hidden, True
        for i, (leg, c) in enumerate(zip(lane.legs, lane.conns, strict=True)):
            if leg.sent != 1:
                continue
            rid = int(leg.id)
            try:
                reply = c.recv_token(rid, wait, H, lane.acc64, sum_c, first, lc.out_c)
            except Exception as e:
                return i, wait - time.monotonic(), e
            if reply is not None:
                c.keep(rid, reply)
                leg.status = lib.LQ_WIRE_DECLINED
                return i, wait - time.monotonic(), None
            leg.sent = 2
            first = False
        return lane.n, 0.0, None

    def _adopt(self, lc: _LaneCall) -> _TokenCall:
        """A lane call as the general path holds it after `_send_legs` (a write failed, or a
        reply was not a plain success): the same output and sums, and its requests recorded
        and counted against their replicas."""
        lane = lc.lane
        call = _TokenCall(lc.layer, lc.h, lc.ids, lc.weights, lane.acc64, self.identity.hidden,
                          self._scratch64, (lc.h, lane.enc_name), (lc.out, lc.out_c))
        call.deadline = lc.deadline
        call.legs = lane.ptrs, lane.n
        for i, ((si, sh, rep, conn), leg) in enumerate(zip(lane.entries, lane.legs, strict=True)):
            status = leg.sent
            if status == 0:
                continue
            with self._lock:
                rep.state.inflight += 1     # as `_pick` counts it; the general path uncounts it
            if status < 0:
                failed = lc.failures.get(i) if lc.failures else None
                self._send_failed(sh, rep, failed or conn.write_failed(status, leg.err))
                call.sent.append((si, None, None, 0))
            else:
                call.sent.append((si, rep, conn, int(leg.id)))
                if status == 2:             # its reply is already in the sum
                    call.first = False
        return call

    def _token_send(self, layer: int, h, ids, weights) -> _TokenCall | None:
        """A decode step's layer with its requests built in C (protocol_c), sent to every shard
        that has a slot of it; None when the inputs are not one f32 token of at most 16 slots
        with valid ids (the general path then takes them, and words any error)."""
        H = self.identity.hidden
        if not one_token(h, ids, weights, H):
            return None
        picks = []
        plain = True
        for si, sh in enumerate(self.shards):
            if sh.spec.serves(layer):
                picked = self._pick(sh)
                picks.append((si, sh, picked))
                plain = plain and picked is not None and picked[1].fd >= 0
        quantize = self.planner.quantize
        in_c = plain and bool(picks) and self.planner.encoding == "q8k" and hasattr(quantize, "norm_c")
        # on the all-C path the norm and Q8_K step runs in C too (lq_wire_token_send)
        x = (h, "q8k") if in_c else self.planner.token_input(layer, h)
        call = _TokenCall(layer, h, ids, weights, self.planner.acc == "f64", H, self._scratch64, x)
        if in_c:
            call.norm_c, call.eps = quantize.norm_c(layer), quantize.eps
        sent = self._send_legs(call, picks) if plain and picks else self._send_each(call, picks)
        if not sent:
            for _, _, picked in picks:       # an id out of range: nothing went out
                if picked is not None:
                    self._unpick(picked[0])
            return None
        call.deadline = time.monotonic() + self.options.timeout
        return call

    def _send_legs(self, call: _TokenCall, picks) -> bool:
        """Every shard's request encoded and written by one C call (plain TCP)."""
        conns = [picked[1] for _, _, picked in picks]
        key = tuple(map(id, conns))
        hit = self._legs.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], conns, strict=True)):
            ptrs = hit[1]
        else:   # the entry keeps its connections alive, so their ids (and legs) cannot be reused
            if len(self._legs) > 64:
                self._legs.clear()
            legs = [c.leg(call.hidden, sh.spec) for c, (_, sh, _) in zip(conns, picks, strict=True)]
            ptrs = ffi.new("lq_wire_leg *[]", legs)
            self._legs[key] = (conns, ptrs)
        for c in conns:
            c.sync_leg()
        ids = call.ids
        rc = lib.lq_wire_token_send(ptrs, len(conns), call.layer, call.x_c, call.enc, call.norm_c, call.eps,
                                    call.hidden, ffi.from_buffer(ids),
                                    ids.dtype.itemsize == 8, call.w_c, ids.size, self.identity.num_experts,
                                    call.acc64, max(1, int(self.options.timeout * 1000)))
        if rc < 0:
            return False
        for (si, sh, (rep, conn)) in picks:
            leg = conn._leg
            if leg.sent == 1:
                self.round_trips += 1
                call.sent.append((si, rep, conn, conn.next_id))
                conn.next_id += 1
            elif leg.sent == 0:
                self._unpick(rep)           # no slot of this token is in the shard's range
            else:
                self._send_failed(sh, rep, conn.write_failed(leg.sent, leg.err))
                call.sent.append((si, None, None, 0))
        call.legs = ptrs, len(conns)
        return True

    def _send_each(self, call: _TokenCall, picks) -> bool:
        """Each shard's request encoded by C and written by Python (TLS, or a replica down)."""
        H, E, K = call.hidden, self.identity.num_experts, call.ids.size
        for si, sh, picked in picks:
            if picked is None:
                call.sent.append((si, None, None, 0))
                continue
            rep, conn = picked
            buf, buf_c = conn.token_out(H)
            rid = conn.next_id
            n = protocol_c.encode_token(buf_c, len(buf), rid, call.layer, call.x_c, self.planner.encoding, H,
                                        call.ids, call.w_c, K, E, sh.spec.first, sh.spec.last, call.acc64)
            if n < 0:
                if call.sent:                # ids are checked by the first encode, before any send
                    raise ShardError(f"internal: a one-token request was not encoded ({n})")
                return False
            if n == 0:
                self._unpick(rep)            # no slot of this token is in the shard's range
                continue
            conn.next_id += 1
            try:
                conn.send_token(buf_c, buf, n, self.options.timeout)
            except ShardError as e:
                self._send_failed(sh, rep, e)
                call.sent.append((si, None, None, 0))
                continue
            self.round_trips += 1
            call.sent.append((si, rep, conn, rid))
        return True

    def _token_collect(self, call: _TokenCall,
                       collected: tuple[int, Exception | None] | None = None) -> np.ndarray:
        """The replies of `_token_send`, checked and summed by C in shard order. Anything off
        the plain path (a replica down, an error reply, a bad reply) goes through the same
        failover as the general path, shard by shard, its partial sum added at its turn.
        `collected`: `_collect_legs`' answer, already had (a lane call)."""
        H, deadline = call.hidden, call.deadline
        start, error = 0, None
        if collected is not None:
            start, error = collected
        elif call.legs is not None:
            start, error = self._collect_legs(call)
        jobs: dict[int, core.Job] | None = None
        for si, rep, conn, rid in call.sent[start:]:
            sh = self.shards[si]
            reply = None
            if rep is not None and error is None:
                try:
                    reply = conn.recv_token(rid, self._attempt_deadline(sh, rep, deadline), H, call.acc64,
                                            call.sum_c, call.first, call.out_c)
                except Exception as e:
                    error = e
                else:
                    if reply is None:       # added by C
                        self._succeeded(sh, rep)
                        call.first = False
                        continue
            if jobs is None:
                plan = self.planner.plan([(call.layer, call.h, call.ids, call.weights)], False, self._budget)
                jobs = {j.shard: j for j in plan.jobs}
            job = jobs.get(si)
            if job is not None:             # None: a down shard with no slot of this token
                if rep is None:
                    ys = self._finish(job, None, deadline)
                elif error is not None:
                    ys = self._failover(job, deadline, (rep, error))
                else:
                    try:
                        ys = self._take(job, sh, rep, conn, reply)
                    except Exception as e:
                        ys = self._failover(job, deadline, (rep, e))
                call.add(ys[0].reshape(-1))
            error = None
        self._schedule_probes()
        self.c_path_calls += 1
        return call.finish()

    def _collect_legs(self, call: _TokenCall, stop: int | None = None, left: float = 0.0,
                      error: Exception | None = None) -> tuple[int, Exception | None]:
        """C reads and adds the replies in shard order until one is not a plain success; that
        one's position in call.sent and its transport error (None: its frame is buffered, or
        it is a shard that was down, for the Python path to take). With `stop` (and the `left`
        it was given), a lane call already did so and stopped at that leg, with `error` when it
        was a transport error read by Python (TLS). Either way each
        connection's buffer offsets are back from its leg (unsync_leg) before the walk below."""
        ptrs, n = call.legs
        deadline = min((self._attempt_deadline(self.shards[si], rep, call.deadline)
                        for si, rep, _, _ in call.sent if rep is not None), default=call.deadline)
        if stop is None:
            left = deadline - time.monotonic()
            if left <= 0 or not call.sent:      # the first shard goes to the Python path as it is
                first = call.sent[0] if call.sent else None
                if first is None or first[1] is None:
                    return 0, None
                return 0, first[2].read_failed(lib.LQ_WIRE_TIMEOUT, 0, deadline, 0.0)
            try:
                stop, left = c_collect(ptrs, n, call.hidden, call.acc64, deadline, left, call.sum_c,
                                       call.first, call.out_c)
            finally:   # also when a signal handler raises (Ctrl-C): the bytes C read stay read
                for _, rep, conn, _ in call.sent:
                    if rep is not None:
                        conn.unsync_leg()
        k = 0                               # position in call.sent
        for i in range(n):
            leg = ptrs[i]
            if leg.sent == 0:
                continue
            si, rep, conn, _ = call.sent[k]
            if rep is None or i == stop:
                break
            self._succeeded(self.shards[si], rep)
            call.first = False
            k += 1
        else:
            return k, None
        if rep is None:
            return k, None
        return k, error if error is not None else conn.read_failed(leg.status, leg.err, deadline, left)

    def _pick(self, sh: Shard) -> tuple[Replica, BlockingConnection] | None:
        """The replica the policy chooses, connected and up, with its request counted."""
        with self._lock:
            state = sh.policy.choose(time.monotonic())
            if state is None or not state.up():
                return None
            rep = sh.replica(state)
            conn = rep.conn
            if conn is None or conn.broken:
                return None
            state.inflight += 1
        return rep, conn

    def _unpick(self, rep: Replica) -> None:
        with self._lock:
            rep.state.inflight -= 1

    def _succeeded(self, sh: Shard, rep: Replica) -> None:
        state = rep.state
        with self._lock:
            state.inflight -= 1
            if state.failures:
                sh.policy.succeeded(state)
                self._epoch += 1

    def _send_failed(self, sh: Shard, rep: Replica, e: Exception) -> None:
        """A request that never went out: uncounted, and the replica marked failed."""
        with self._lock:
            rep.state.inflight -= 1
            sh.policy.failed(rep.state, str(e), time.monotonic())
            self._epoch += 1

    def _send_first(self, job: core.Job):
        """Send on a connected, up replica chosen by the policy (None: go through `_finish`'s
        failover loop at once)."""
        sh = self.shards[job.shard]
        picked = self._pick(sh)
        if picked is None:
            return None
        rep, conn = picked
        try:
            rid = conn.send(dict(job.msg), self.options.timeout)
        except ShardError as e:
            self._send_failed(sh, rep, e)
            return None
        self.round_trips += 1
        return rep, conn, rid

    def _finish(self, job: core.Job, sent, deadline: float):
        sh = self.shards[job.shard]
        if sent is not None:
            rep, conn, rid = sent
            try:
                reply = conn.recv(rid, self._attempt_deadline(sh, rep, deadline), job.msg["op"])
                return self._take(job, sh, rep, conn, reply)
            except Exception as e:
                return self._failover(job, deadline, (rep, e))
        return self._failover(job, deadline)

    def _failover(self, job: core.Job, deadline: float, failed: tuple[Replica, Exception] | None = None):
        """The job on the replicas the policy offers, in turn, after `failed` = (replica, its
        error) if the first attempt already failed."""
        sh = self.shards[job.shard]
        pol = sh.policy
        degrade = self.options.on_shard_failure == "renormalize"
        attempt = pol.attempt(deadline, wait=not degrade)
        if failed is not None:
            rep, e = failed
            attempt.tried.append(rep.state)
            attempt.tries += 1
            self._failed(sh, rep, e, attempt)
        while True:
            with self._lock:
                step = attempt.next(time.monotonic())
            if step.replica is not None:
                rep = sh.replica(step.replica)
                try:
                    with self._lock:
                        conn = rep.conn
                    if conn is None or conn.broken:
                        conn = self._open(sh, rep, step.budget)
                    with self._lock:
                        rep.state.inflight += 1
                    self.round_trips += 1
                    if attempt.tries > 1:
                        self.retries += 1
                    reply = conn.request(dict(job.msg), time.monotonic() + step.budget)
                    return self._take(job, sh, rep, conn, reply)
                except Exception as e:
                    self._failed(sh, rep, e, attempt)
            elif step.wait:
                time.sleep(step.wait)
            else:
                if degrade:
                    log.warning("%s; renormalising the other shards' router weights (--on-shard-failure "
                                "renormalize)", step.reason)
                    return None
                raise ShardError(step.reason)

    @staticmethod
    def _attempt_deadline(sh: Shard, rep: Replica, deadline: float) -> float:
        """Half of what is left when another replica is up to fail over to (see policy.py)."""
        if len(sh.replicas) == 1:
            return deadline
        others = any(r.state.up() for r in sh.replicas if r is not rep)
        now = time.monotonic()
        return now + (deadline - now) / 2 if others else deadline

    def _take(self, job: core.Job, sh: Shard, rep: Replica, conn: BlockingConnection, reply: dict):
        state = rep.state
        self._unpick(rep)
        if reply.get("ok") is not True:
            code, message = core._error_of(reply)
            raise P.RemoteError(code, message, core.endpoint_label(sh.spec, state.endpoint))
        ys = self.planner.decode(job, reply, rep)
        if state.failures:
            with self._lock:
                sh.policy.succeeded(state)
                self._epoch += 1
        return ys

    def _failed(self, sh: Shard, rep: Replica, e: Exception, attempt) -> None:
        with self._lock:
            rep.state.inflight = max(0, rep.state.inflight - 1)
            self._epoch += 1
        if not retryable(e):
            raise e
        with self._lock:
            if rep.conn is not None:
                rep.conn.close()
                rep.conn = None
            attempt.failed(rep.state, str(e), time.monotonic(), corrupt=isinstance(e, BadReply))
        log.info("shard %s replica %s failed: %s", sh.spec.label, rep.state.where, e)

    # --- background probes of down replicas -------------------------------------------------
    def _schedule_probes(self) -> None:
        down = any(r.state.failures for sh in self.shards for r in sh.replicas)
        if not down or self._closed:
            return
        if self._prober is None or not self._prober.is_alive():
            self._prober = threading.Thread(target=self._probe_loop, name="larql-probe", daemon=True)
            self._prober.start()
        self._probe_wake.set()

    def _probe_loop(self) -> None:
        while not self._closed:
            now = time.monotonic()
            with self._lock:
                due = [(sh, sh.replica(s)) for sh in self.shards for s in sh.policy.due_probes(now)]
                down = any(not r.state.up() for sh in self.shards for r in sh.replicas)
            for sh, rep in due:
                error = None
                try:
                    conn = self._probe(sh, rep)
                except (ShardError, OSError, P.RemoteError, AuthError, ShardSpecError) as e:
                    error, conn = str(e), None
                with self._lock:
                    if conn is not None and not self._closed:
                        if rep.conn is not None:
                            rep.conn.close()
                        rep.conn = conn
                    elif conn is not None:
                        conn.close()
                    sh.policy.probe_done(rep.state, error, time.monotonic())
                    self._epoch += 1
                if error is None:
                    log.info("shard %s replica %s is back", sh.spec.label, rep.state.where)
            if not down:
                return
            self._probe_wake.wait(0.2)
            self._probe_wake.clear()

    def _probe(self, sh: Shard, rep: Replica) -> BlockingConnection:
        opts = self.options
        deadline = time.monotonic() + opts.connect_timeout
        ctx = opts.tls_context() if rep.state.endpoint.tls else None
        conn = BlockingConnection.open(rep.state.endpoint, opts.connect_timeout, ctx)
        try:
            info = drive_handshake(conn, opts.api_key, core.endpoint_label(sh.spec, rep.state.endpoint),
                                   deadline)
            acc = self.planner.acc if self.planner.acc == "f64" else None
            core.check_hello(self.identity, sh.spec, rep.state.where, info, opts.encoding, acc)
            status = conn.request({"op": "health"}, deadline)
            if status.get("status") != "ok":
                raise ShardError(f"{rep.state.where}: health {core.short(status.get('status'), 32)!r}")
        except BaseException:
            conn.close()
            raise
        conn.info = info
        return conn

    # --- other requests -------------------------------------------------------------------
    def stats(self) -> list[dict]:
        """Each connected replica's `stats` reply, tagged with its address."""
        out = []
        for sh in self.shards:
            for r in sh.replicas:
                if r.conn is not None and not r.conn.broken:
                    deadline = time.monotonic() + self.options.timeout
                    rep = P.check_reply(r.conn.request({"op": "stats"}, deadline), r.state.where)
                    out.append({"shard": sh.spec.label, "address": r.state.where, **rep})
        return out

    def ping(self, shard: int = 0) -> dict:
        """One `health` round trip to the first connected replica of a shard."""
        for r in self.shards[shard].replicas:
            if r.conn is not None and not r.conn.broken:
                deadline = time.monotonic() + self.options.timeout
                return P.check_reply(r.conn.request({"op": "health"}, deadline), r.state.where)
        raise ShardError(f"shard {self.shards[shard].spec.label}: no connected replica")
