"""Remote experts: the `Experts` interface over TCP to one or more expert servers.

    experts = connect_shards("0-63=10.0.0.5:8080,64-127=tcp://10.0.0.6:8080", vindex)
    y = experts.forward(layer, h, ids, weights)      # raw weighted sum over all shards

A shard map names inclusive expert ranges; together they must cover every expert exactly once.
A range may list replicas (`0-63=a:8080|b:8080`): work a replica fails to answer is retried
once on the next one, within the request deadline. Each server's `hello` is checked against
the local vindex (expert-weights fingerprint, hidden size, expert/layer counts, owned ranges)
before any work is sent, so shards of different models can never be mixed.

Per layer, each shard receives only its own (expert, weight) pairs, for all tokens at once
(a prefill is one request per shard per layer), all shards concurrently; the partial sums are
added in shard order. The caller applies post_feedforward_layernorm_2. `forward_multi` sends
several layers in one `multi` request per shard (batch dispatch: one round trip per token).

`AsyncExpertClient` is the asyncio core; `RemoteExperts` is the synchronous `Experts` the model
uses, running the core on a private event-loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import __version__, ranges
from . import protocol as P
from .errors import LarqlError
from .shardmap import ShardSpec, ShardSpecError, parse_shards, split_work
from .transport import set_nodelay

DEFAULT_TIMEOUT = 60.0        # seconds for one request (a long prefill on a slow shard)
DEFAULT_CONNECT_TIMEOUT = 5.0


class ShardError(LarqlError, ConnectionError):
    """A shard could not be reached, timed out, or answered something unusable."""


# Stop-gap by the server helper so remote == in-process holds once the kernel rounds a double
# sum once: ask every replica that announces f64 accumulators for f64 partials (the client
# helper's rewrite supersedes this).
def _acc(sh) -> dict:
    f64 = all("f64" in (r.conn.info.get("accumulators") or ()) for r in sh.replicas if r.conn)
    return {"acc": "f64"} if f64 else {}


def _partial(rep: dict, key: str, tokens: int, hidden: int, sh) -> np.ndarray:
    yb = rep.get(key)
    if isinstance(yb, bytes) and len(yb) == tokens * hidden * 8:
        return np.frombuffer(yb, dtype="<f8").reshape(tokens, hidden)
    return P.decode_result(rep, tokens, hidden, key)


# ------------------------------------------------------------------------------------------
# One TCP connection with pipelined requests


class Connection(asyncio.Protocol):
    """A persistent connection: requests carry ids, replies may come back in any order."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.reader = P.FrameReader()
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 1
        self.closed_exc: Exception | None = None
        self.info: dict = {}

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        where = f"{host}:{port}"
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: cls(where), host, port), timeout)
        except asyncio.TimeoutError:
            raise ShardError(f"{where}: no TCP connection within {timeout:g}s") from None
        except OSError as e:
            raise ShardError(f"{where}: cannot connect ({e.strerror or e})") from None
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_exc = ShardError(f"{self.where}: connection closed" + (f" ({exc})" if exc else ""))
        self._fail_all(self.closed_exc)

    def _fail_all(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self.reader.feed(data)
            for body in bodies:
                msg = P.decode_body(body)
                rid = P.request_id(msg)
                fut = self.pending.pop(rid, None) if rid is not None else None
                if fut is None:
                    # An error reply without a usable id: the server could not parse something we
                    # sent. Nothing in flight can be trusted to be answered.
                    if msg.get("ok") is False:
                        err = msg.get("error") or {}
                        raise P.RemoteError(str(err.get("code")), str(err.get("message")), self.where)
                    continue
                if not fut.done():
                    fut.set_result(msg)
        except Exception as e:  # a broken stream: fail everything, drop the connection
            self._fail_all(e if isinstance(e, (P.RemoteError, ShardError))
                           else ShardError(f"{self.where}: unreadable reply ({e})"))
            self.close()

    @property
    def usable(self) -> bool:
        return self.closed_exc is None and self.transport is not None and not self.transport.is_closing()

    def send(self, msg: dict) -> asyncio.Future:
        """Write one request frame; the future resolves with the reply map."""
        if not self.usable:
            raise self.closed_exc or ShardError(f"{self.where}: not connected")
        rid = self.next_id
        self.next_id += 1
        msg["id"] = rid
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        self.transport.write(P.encode_frame(msg))
        return fut

    async def request(self, msg: dict, timeout: float) -> dict:
        fut = self.send(msg)
        rid = msg["id"]
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self.pending.pop(rid, None)
            raise ShardError(f"{self.where}: no reply to {msg.get('op')!r} within {timeout:g}s") from None
        return P.check_reply(reply, self.where)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# ------------------------------------------------------------------------------------------
# The asyncio client


@dataclass
class _Replica:
    host: str
    port: int
    conn: Connection | None = None
    down_until: float = 0.0          # monotonic time before which we do not retry it
    last_error: str = ""

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class _Shard:
    spec: ShardSpec
    replicas: list[_Replica] = field(default_factory=list)


@dataclass
class ModelIdentity:
    """What every server must agree with (taken from the local vindex)."""

    hidden: int
    num_experts: int
    num_layers: int
    fingerprint: str | None = None

    @classmethod
    def from_vindex(cls, vindex) -> ModelIdentity:
        cfg = vindex.config
        fingerprint = vindex.expert_fingerprint()
        if not vindex.layers_present and not vindex.index.get("expert_fingerprint"):
            # A client-only slice of a vindex that recorded no fingerprint: the hash would cover
            # no expert files and match no server. Check shapes only, and say so.
            import logging

            logging.getLogger("larql.client").warning(
                "%s holds no expert files and records no expert_fingerprint: cannot verify that the "
                "servers hold this model's experts (only shapes are checked)", vindex.path)
            fingerprint = None
        return cls(cfg.hidden_size, cfg.num_experts, cfg.num_layers, fingerprint)


class AsyncExpertClient:
    """Sends expert work to a shard map and sums the partial results (asyncio API).

    Every method must be awaited on one event loop (the one `connect` ran on)."""

    def __init__(self, shards: Sequence[ShardSpec], identity: ModelIdentity, *,
                 timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 encoding: str = "f32", quantize=None, retry_after: float = 5.0) -> None:
        if encoding not in P.ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r} (one of {list(P.ENCODINGS)})")
        if encoding == "q8k" and quantize is None:
            raise ValueError("encoding 'q8k' needs a quantize(layer, h) -> Q8_K bytes function")
        self.shards = [_Shard(s, [_Replica(h, p) for h, p in s.replicas]) for s in shards]
        self.identity = identity
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.encoding = encoding
        self.quantize = quantize
        self.retry_after = retry_after
        self.round_trips = 0            # requests sent (all shards), for prefill accounting
        self.retries = 0

    # --- connecting -----------------------------------------------------------------------
    async def connect(self) -> AsyncExpertClient:
        """Connect every replica and check its hello; a shard with no usable replica is an error."""
        results = await asyncio.gather(
            *(self._open(sh, r) for sh in self.shards for r in sh.replicas), return_exceptions=True)
        for r in results:  # a wrong-model or misconfigured server is fatal even if a replica is fine
            if isinstance(r, (ShardSpecError, P.RemoteError)):
                await self.close()
                raise r
        for sh in self.shards:
            if not any(r.conn is not None for r in sh.replicas):
                errs = "; ".join(r.last_error for r in sh.replicas)
                await self.close()
                raise ShardError(f"shard {sh.spec.label}: no replica reachable: {errs}")
        return self

    async def _open(self, sh: _Shard, rep: _Replica) -> None:
        try:
            conn = await Connection.open(rep.host, rep.port, self.connect_timeout)
        except ShardError as e:
            rep.last_error = str(e)
            rep.down_until = time.monotonic() + self.retry_after
            raise
        try:
            info = await conn.request({"op": "hello", "version": P.PROTOCOL_VERSION,
                                       "client": f"larql {__version__}"}, self.connect_timeout)
            self._check_hello(sh.spec, rep.where, info)
        except BaseException as e:
            conn.close()
            rep.last_error = str(e)
            rep.down_until = time.monotonic() + self.retry_after
            raise
        conn.info = info
        rep.conn = conn

    def _check_hello(self, spec: ShardSpec, where: str, info: dict) -> None:
        me = self.identity
        where = f"shard {spec.label} at {where}"
        checks = (("hidden", me.hidden), ("num_experts", me.num_experts), ("num_layers", me.num_layers))
        for key, mine in checks:
            if info.get(key) != mine:
                raise ShardSpecError(f"{where} serves a model with {key}={info.get(key)!r}, the local "
                                     f"vindex has {mine}: not the same model")
        if me.fingerprint is not None and info.get("fingerprint") != me.fingerprint:
            raise ShardSpecError(
                f"{where} serves different expert weights (fingerprint {str(info.get('fingerprint'))[:16]}… "
                f"vs local {me.fingerprint[:16]}…): refusing to mix shards of different models")
        experts = set(P.from_ranges(info.get("experts"), me.num_experts, "experts"))
        want = set(range(spec.first, spec.last + 1))
        if missing := sorted(want - experts):
            raise ShardSpecError(f"{where} does not hold experts {ranges.text(missing)} "
                                 f"(it serves experts {ranges.text(sorted(experts))})")
        layers = set(P.from_ranges(info.get("layers"), me.num_layers, "layers"))
        need = range(spec.layers[0], spec.layers[1] + 1) if spec.layers else range(me.num_layers)
        if missing := sorted(set(need) - layers):
            raise ShardSpecError(f"{where} does not hold layers {ranges.text(missing)} "
                                 f"(it serves layers {ranges.text(sorted(layers))})")
        encs = info.get("encodings")
        if not isinstance(encs, list) or self.encoding not in encs:
            raise ShardSpecError(f"{where} does not accept {self.encoding!r} inputs (it accepts {encs!r})")

    async def close(self) -> None:
        for sh in self.shards:
            for r in sh.replicas:
                if r.conn is not None:
                    r.conn.close()
                    r.conn = None

    # --- sending --------------------------------------------------------------------------
    async def _call(self, sh: _Shard, msg: dict, failed: tuple[_Replica, str] | None = None) -> dict:
        """One request to a shard; on a transport failure retry once on another replica.

        `failed`: a replica that already failed this request (the fast path's first try)."""
        deadline = time.monotonic() + self.timeout
        errors: list[str] = []
        tried = 0
        if failed is not None:
            self._mark_down(failed[0], failed[1])
            errors.append(failed[1])
            tried = 1
        now = time.monotonic()
        order = sorted((r for r in sh.replicas if failed is None or r is not failed[0]),
                       key=lambda r: (r.conn is None, r.down_until > now))
        for rep in order:
            if tried == 2:  # the first try plus one retry
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            tried += 1
            try:
                if rep.conn is None or not rep.conn.usable:
                    rep.conn = None
                    await self._open(sh, rep)
                self.round_trips += 1
                if tried > 1:
                    self.retries += 1
                return await rep.conn.request(dict(msg), left)
            except (ShardError, OSError) as e:
                self._mark_down(rep, str(e))
                errors.append(str(e))
        raise ShardError(f"shard {sh.spec.label}: no answer ({'; '.join(errors) or 'deadline passed'}); "
                         f"refusing to continue without experts {sh.spec.label}")

    def _mark_down(self, rep: _Replica, error: str) -> None:
        if rep.conn is not None:
            rep.conn.close()
            rep.conn = None
        rep.down_until = time.monotonic() + self.retry_after
        rep.last_error = error

    async def _call_all(self, reqs: list[tuple[_Shard, dict]]) -> list[dict]:
        """Send every request at once on the shards' live connections and wait for all replies.

        The common path creates no tasks: frames go out immediately and the reply futures are
        awaited together. Any request whose replica failed or timed out goes through `_call`
        (retry on another replica)."""
        sent: list[tuple[_Replica, asyncio.Future] | None] = []
        for sh, msg in reqs:
            rep = next((r for r in sh.replicas if r.conn is not None and r.conn.usable), None)
            if rep is None:
                sent.append(None)
                continue
            self.round_trips += 1
            sent.append((rep, rep.conn.send(dict(msg))))
        futs = [s[1] for s in sent if s is not None]
        if futs:
            await asyncio.wait(futs, timeout=self.timeout)
        out: list[dict] = []
        for (sh, msg), s in zip(reqs, sent, strict=True):
            if s is None:
                out.append(await self._call(sh, msg))
                continue
            rep, fut = s
            if not fut.done():
                fut.cancel()
                err = f"{rep.where}: no reply to {msg.get('op')!r} within {self.timeout:g}s"
                out.append(await self._call(sh, msg, failed=(rep, err)))
                continue
            exc = fut.exception()
            if exc is None:
                out.append(P.check_reply(fut.result(), rep.where))
            elif isinstance(exc, (ShardError, OSError)):
                out.append(await self._call(sh, msg, failed=(rep, str(exc))))
            else:
                raise exc
        return out

    def _frame_budget(self, sh: _Shard) -> int:
        """Bytes of vectors one request (and its reply) may carry: the smallest max_frame any
        replica of the shard announced, less room for the map's keys."""
        limits = [int(r.conn.info.get("max_frame", P.MAX_FRAME)) for r in sh.replicas if r.conn]
        max_frame = min([P.MAX_FRAME, *limits])
        return max(1024, max_frame - min(65536, max_frame // 4))

    def _token_bytes(self, K: int) -> int:
        """Frame bytes one token's work can take: its input or its reply, plus ids and weights."""
        H = self.identity.hidden
        return max(P.x_bytes(self.encoding, 1, H), 4 * H) + 8 * K

    def _max_tokens(self, sh: _Shard, K: int) -> int:
        """Tokens per request so that request and reply both fit in one frame."""
        return max(1, self._frame_budget(sh) // self._token_bytes(K))

    def _prepare(self, h: np.ndarray, ids: np.ndarray, weights: np.ndarray):
        """One layer's work as contiguous [T, H] f32, [T, K] int32, [T, K] f32, shapes checked."""
        h = np.ascontiguousarray(np.atleast_2d(h), dtype=np.float32)
        ids = np.ascontiguousarray(np.atleast_2d(ids), dtype=np.int32)
        weights = np.ascontiguousarray(np.atleast_2d(weights), dtype=np.float32)
        if h.shape[1] != self.identity.hidden or ids.shape != weights.shape or ids.shape[0] != h.shape[0]:
            raise ValueError(f"forward: h {h.shape}, ids {ids.shape}, weights {weights.shape} do not "
                             f"match hidden={self.identity.hidden}")
        return h, ids, weights

    @staticmethod
    def _share(sh: _Shard, layer: int, ids: np.ndarray, weights: np.ndarray):
        """The shard's part of one layer's routing (see split_work), or None if it has none."""
        if not sh.spec.serves(layer):
            return None
        return split_work(ids, weights, sh.spec.first, sh.spec.last)

    def _payload(self, layer: int, h: np.ndarray, rows: np.ndarray):
        x = h[rows] if rows.size != h.shape[0] else h
        if self.encoding == "q8k":
            return self.quantize(layer, x)
        return x

    async def forward(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """h f32 [T, H] raw residual, ids int32 [T, K], weights f32 [T, K] -> f32 [T, H] raw sum."""
        h, ids, weights = self._prepare(h, ids, weights)
        T, H = h.shape
        jobs, where = [], []
        for si, sh in enumerate(self.shards):
            part = self._share(sh, layer, ids, weights)
            if part is None:
                continue
            rows, ids_s, w_s = part
            step = self._max_tokens(sh, ids_s.shape[1])
            for a in range(0, rows.size, step):
                r = rows[a: a + step]
                sl = slice(a, a + step)
                item = P.encode_work(layer, self._payload(layer, h, r), ids_s[sl], w_s[sl], self.encoding)
                jobs.append((sh, {"op": "experts", **item, **_acc(sh)}))
                where.append((si, r))
        replies = await self._call_all(jobs)
        # f64 partial sums added in shard order and rounded once: in-process results bit for bit
        out = np.zeros((T, H), dtype=np.float64)
        for (si, r), rep in zip(where, replies, strict=True):  # shard order: the sum is reproducible
            y = _partial(rep, "y", r.size, H, self.shards[si])
            if r.size == T:
                out += y
            else:
                out[r] += y
        return out.astype(np.float32)

    async def forward_multi(self, work: Sequence[tuple]) -> list[np.ndarray]:
        """Several layers' work, one `multi` request per shard (batch dispatch)."""
        H = self.identity.hidden
        prepared = [(layer, *self._prepare(h, ids, w)) for layer, h, ids, w in work]
        jobs, plan = [], []
        for sh in self.shards:
            # One `multi` per shard, split into several only if it would exceed a frame.
            budget = self._frame_budget(sh)
            items, where, size = [], [], 0
            for wi, (layer, h, ids, w) in enumerate(prepared):
                part = self._share(sh, layer, ids, w)
                if part is None:
                    continue
                rows, ids_s, w_s = part
                per_token = self._token_bytes(ids_s.shape[1]) + 64  # + each item's map keys
                step = max(1, budget // per_token)
                for a in range(0, rows.size, step):
                    r = rows[a: a + step]
                    if items and size + r.size * per_token > budget:
                        jobs.append((sh, {"op": "multi", "items": items}))
                        plan.append(where)
                        items, where, size = [], [], 0
                    items.append({**P.encode_work(layer, self._payload(layer, h, r), ids_s[a: a + step],
                                                  w_s[a: a + step], self.encoding), **_acc(sh)})
                    where.append((wi, r))
                    size += r.size * per_token
            if items:
                jobs.append((sh, {"op": "multi", "items": items}))
                plan.append(where)
        replies = await self._call_all(jobs)
        outs = [np.zeros((h.shape[0], H), dtype=np.float64) for _, h, _, _ in prepared]
        for (sh, _), where, rep in zip(jobs, plan, replies, strict=True):
            ys = rep.get("ys")
            if not isinstance(ys, list) or len(ys) != len(where):
                raise ShardError(f"multi reply holds {len(ys) if isinstance(ys, list) else ys!r} results, "
                                 f"expected {len(where)}")
            for (wi, rows), yb in zip(where, ys, strict=True):
                y = _partial({"y": yb}, "y", rows.size, H, sh)
                outs[wi][rows] += y
        return [o.astype(np.float32) for o in outs]

    async def stats(self) -> list[dict]:
        """Each connected replica's `stats` reply, tagged with its address."""
        out = []
        for sh in self.shards:
            for r in sh.replicas:
                if r.conn is not None and r.conn.usable:
                    s = await r.conn.request({"op": "stats"}, self.timeout)
                    out.append({"shard": sh.spec.label, "address": r.where, **s})
        return out


# ------------------------------------------------------------------------------------------
# The synchronous Experts the model uses


class RemoteExperts:
    """`Experts` backed by expert servers: the synchronous face of an AsyncExpertClient.

    Each call runs the client's private event loop in the calling thread until the work is
    done, so a forward pass costs no thread hand-offs (they cost 50-200 us each on a busy
    machine; a token makes one call per layer). Connections stay open between calls. Calls are
    serialised; from a thread that is itself running an event loop, the call is made on a
    helper thread instead (asyncio programs should prefer AsyncExpertClient)."""

    def __init__(self, client: AsyncExpertClient) -> None:
        self.client = client
        # The stock loop, not uvloop: this loop is started and stopped once per layer, and
        # uvloop's run_until_complete costs ~45 us against asyncio's ~25 us (it re-installs
        # its signal wake-up fd each run); with two sockets uvloop's faster I/O does not pay.
        # Measured per call on loopback: health ping p50 155-211 us vs 247-296 us.
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._run(client.connect(), client.connect_timeout * 2 + 5)
        except BaseException:
            self._closed = True
            self._loop.close()
            raise

    def _run(self, coro, timeout: float | None = None, bounded: bool = True):
        """Run `coro` on the private loop. `bounded=False` for calls whose every await already
        has a deadline (forward passes): skipping the outer wait_for saves a task per layer."""
        limit = timeout if timeout is not None else self.client.timeout * 2 + 5

        async def with_deadline():
            try:
                return await asyncio.wait_for(coro, limit)
            except asyncio.TimeoutError:
                raise ShardError(f"expert request did not complete within {limit:g}s") from None

        def run():
            with self._lock:
                if self._loop.is_closed():
                    coro.close()
                    raise ShardError("the remote experts client is closed")
                return self._loop.run_until_complete(with_deadline() if bounded else coro)

        try:
            asyncio.get_running_loop()
            inside_loop = True
        except RuntimeError:
            inside_loop = False
        if not inside_loop:
            return run()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="larql-remote") as ex:
            return ex.submit(run).result()

    @property
    def round_trips(self) -> int:
        return self.client.round_trips

    def forward(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self._run(self.client.forward(layer, h, ids, weights), bounded=False)

    def forward_multi(self, work):
        return self._run(self.client.forward_multi(work), bounded=False)

    def stats(self) -> list[dict]:
        return self._run(self.client.stats())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._run(self.client.close(), 5)
        with contextlib.suppress(Exception):
            self._run(asyncio.sleep(0), 5)   # let the transports finish closing
        with self._lock:
            self._loop.close()

    def __enter__(self) -> RemoteExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: a forgotten client must not leave a thread running
        with contextlib.suppress(Exception):
            self.close()


def _q8k_quantizer(vindex):
    """quantize(layer, h) -> Q8_K bytes of pre_feedforward_layernorm_2(h), for encoding 'q8k'."""
    from . import kernels

    eps = vindex.config.rms_norm_eps
    norms: dict[int, np.ndarray] = {}

    def quantize(layer: int, h: np.ndarray) -> np.ndarray:
        w = norms.get(layer)
        if w is None:
            w = norms[layer] = vindex.norm(f"layers.{layer}.pre_feedforward_layernorm_2.weight")
        return kernels.quantize_q8k(kernels.rms_norm(h, w, eps))

    return quantize


def async_client(spec: str, vindex, *, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 encoding: str = "f32") -> AsyncExpertClient:
    """An unconnected AsyncExpertClient for a shard map (await `.connect()` on your loop)."""
    shards = parse_shards(spec, vindex.config.num_experts, vindex.config.num_layers)
    quantize = _q8k_quantizer(vindex) if encoding == "q8k" else None
    return AsyncExpertClient(shards, ModelIdentity.from_vindex(vindex), timeout=timeout,
                             connect_timeout=connect_timeout, encoding=encoding, quantize=quantize)


def connect_shards(spec: str, vindex, timeout: float = DEFAULT_TIMEOUT, *,
                   connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, encoding: str = "f32") -> RemoteExperts:
    """Parse and validate a shard map, connect to every server, check each hello against the
    local vindex; returns the synchronous Experts. All errors are raised before any work."""
    client = async_client(spec, vindex, timeout=timeout, connect_timeout=connect_timeout, encoding=encoding)
    return RemoteExperts(client)
