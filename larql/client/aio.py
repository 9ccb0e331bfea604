"""The asyncio client: pipelined and concurrent use (many forwards in flight on one loop).

Same handshake, hello checks, planning, integrity checks and failover policy as the blocking
decode path (core.py, policy.py); only the I/O differs. Down replicas are probed by a task
while another replica carries the work.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence

import numpy as np

from .. import protocol as P
from ..shardmap import Endpoint, ShardSpec, ShardSpecError
from ..transport import AuthError, set_nodelay
from . import core
from .blocking import retryable, tls_failure
from .core import ClientOptions, ModelIdentity, Planner, ShardError, request_limits
from .policy import Replica, Shard


class Connection(asyncio.Protocol):
    """A persistent connection: requests carry ids, replies may come back in any order."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.where = endpoint.where
        self.reader = P.FrameReader()
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 1
        self.closed_exc: Exception | None = None
        self.info: dict = {}
        self.handshaking = True

    @classmethod
    async def open(cls, endpoint: Endpoint, timeout: float, tls_context: ssl.SSLContext | None) -> Connection:
        loop = asyncio.get_running_loop()
        where = endpoint.where
        kw = {}
        if endpoint.tls:
            kw = dict(ssl=tls_context, server_hostname=endpoint.host, ssl_handshake_timeout=timeout)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: cls(endpoint), endpoint.host, endpoint.port, **kw), timeout)
        except asyncio.TimeoutError:
            if endpoint.tls:
                raise ShardError(f"TLS handshake with {where} failed: the server does not speak TLS? "
                                 f"(no TLS reply within {timeout:g}s)") from None
            raise ShardError(f"{where}: no TCP connection within {timeout:g}s") from None
        except ssl.SSLError as e:
            raise tls_failure(where, e) from None
        except ConnectionError as e:
            if endpoint.tls:
                raise tls_failure(where, e) from None
            raise ShardError(f"{where}: cannot connect ({e.strerror or e})") from None
        except OSError as e:
            raise ShardError(f"{where}: cannot connect ({e.strerror or e})") from None
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed_exc is None:
            if self.handshaking and not self.endpoint.tls:
                self.closed_exc = ShardError(f"{self.where} closed the connection during the handshake: is "
                                             f"it a TLS server? (use tls://{self.where})")
            else:
                why = f" ({exc})" if exc else ""
                self.closed_exc = ShardError(f"{self.where}: connection closed{why}")
        self._fail_all(self.closed_exc)

    def _fail_all(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        try:
            if self.handshaking and not self.endpoint.tls and self.reader.pending == 0 and len(data) >= 2 \
                    and data[0] in (0x15, 0x16) and data[1] == 0x03:
                raise ShardError(f"{self.where} answered with TLS: it is a TLS server (use tls://{self.where})")
            for body in self.reader.feed(data):
                msg = P.decode_body(body)
                rid = P.request_id(msg)
                fut = self.pending.pop(rid, None) if rid is not None else None
                if fut is None:
                    if msg.get("ok") is False and rid is None:
                        # an error without a usable id: nothing in flight can be trusted
                        code, message = core._error_of(msg)
                        raise P.RemoteError(code, message, self.where)
                    continue
                if not fut.done():
                    fut.set_result(msg)
        except Exception as e:  # a broken stream: fail everything, drop the connection
            err = e if isinstance(e, (P.RemoteError, ShardError)) else core.BadReply(
                f"{self.where}: unreadable reply ({e})")
            self.closed_exc = err
            self._fail_all(err)
            self.close()

    @property
    def usable(self) -> bool:
        return self.closed_exc is None and self.transport is not None and not self.transport.is_closing()

    def send(self, msg: dict) -> asyncio.Future:
        """Write one request frame; the future resolves with the raw reply map."""
        if not self.usable:
            raise self.closed_exc or ShardError(f"{self.where}: not connected")
        rid = self.next_id
        self.next_id += 1
        msg["id"] = rid
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        self.transport.write(P.encode_frame(msg))
        return fut

    async def request_raw(self, msg: dict, timeout: float) -> dict:
        fut = self.send(msg)
        rid = msg["id"]
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self.pending.pop(rid, None)
            raise ShardError(f"{self.where}: no reply to {msg.get('op')!r} within {timeout:g}s") from None

    async def request(self, msg: dict, timeout: float) -> dict:
        return P.check_reply(await self.request_raw(msg, timeout), self.where)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def drive_handshake(conn: Connection, key: bytes | None, who: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    gen = core.handshake(key, who)
    msg = next(gen)
    while True:
        reply = await conn.request_raw(msg, max(0.001, deadline - time.monotonic()))
        try:
            msg = gen.send(reply)
        except StopIteration as stop:
            conn.handshaking = False
            return stop.value


class AsyncExpertClient:
    """The shard-map client on an asyncio loop: `await connect()`, `forward`, `forward_multi`."""

    def __init__(self, shards: Sequence[ShardSpec], identity: ModelIdentity, *,
                 timeout: float = core.DEFAULT_TIMEOUT, connect_timeout: float = core.DEFAULT_CONNECT_TIMEOUT,
                 encoding: str = "f32", quantize=None, options: ClientOptions | None = None) -> None:
        self.options = options or ClientOptions(timeout=timeout, connect_timeout=connect_timeout,
                                                encoding=encoding, api_key=None)
        self.timeout = self.options.timeout
        self.connect_timeout = self.options.connect_timeout
        self.encoding = self.options.encoding
        self.identity = identity
        self.shards = [Shard(s) for s in shards]
        self.planner = Planner(shards, identity, self.encoding, quantize)
        self.round_trips = 0            # requests sent (all shards), for prefill accounting
        self.retries = 0
        self._probes: set[asyncio.Task] = set()

    @property
    def accumulator(self) -> str:
        return self.planner.acc

    @property
    def degraded_layers(self) -> int:
        return self.planner.degraded_layers

    # --- connecting -----------------------------------------------------------------------
    async def connect(self) -> AsyncExpertClient:
        """Connect every replica and check its hello; a shard with no usable replica is an error."""
        pairs = [(sh, r) for sh in self.shards for r in sh.replicas]
        results = await asyncio.gather(*(self._open(sh, r) for sh, r in pairs), return_exceptions=True)
        now = time.monotonic()
        for (sh, r), res in zip(pairs, results, strict=True):
            if isinstance(res, (ShardSpecError, AuthError, P.RemoteError)):
                await self.close()   # a wrong-model or refusing server is fatal even if a replica is fine
                raise res
            if isinstance(res, BaseException):
                sh.policy.failed(r.state, str(res), now)
        for sh in self.shards:
            if not sh.policy.any_up():
                await self.close()
                raise ShardError(f"shard {sh.spec.label}: no replica reachable: {sh.policy.summary()}")
        try:
            self.planner.acc = core.choose_accumulator(
                self.options.accumulate, [r.conn.info for sh in self.shards for r in sh.replicas if r.conn],
                core.splits_a_layer([sh.spec for sh in self.shards], self.identity.num_layers))
        except BaseException:
            await self.close()
            raise
        return self

    async def _open(self, sh: Shard, rep: Replica, timeout: float | None = None) -> Connection:
        opts = self.options
        timeout = opts.connect_timeout if timeout is None else min(timeout, opts.connect_timeout)
        t0 = time.monotonic()
        ctx = opts.tls_context() if rep.state.endpoint.tls else None
        conn = await Connection.open(rep.state.endpoint, timeout, ctx)
        try:
            left = max(0.001, timeout - (time.monotonic() - t0))
            info = await drive_handshake(conn, opts.api_key, core.endpoint_label(sh.spec, rep.state.endpoint),
                                         left)
            acc = self.planner.acc if self.planner.acc == "f64" else None
            core.check_hello(self.identity, sh.spec, rep.where, info, opts.encoding, acc)
        except BaseException:
            conn.close()
            raise
        conn.info = info
        if rep.conn is not None:
            rep.conn.close()
        rep.conn = conn
        return conn

    async def close(self) -> None:
        for t in list(self._probes):
            t.cancel()
        for sh in self.shards:
            for r in sh.replicas:
                if r.conn is not None:
                    r.conn.close()
                    r.conn = None

    # --- sending --------------------------------------------------------------------------
    def _budget(self, si: int) -> tuple[int, int, int]:
        return request_limits(r.conn.info for r in self.shards[si].replicas if r.conn is not None)

    async def forward(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """h f32 [T, H] raw residual, ids int32 [T, K], weights f32 [T, K] -> f32 [T, H] raw sum."""
        return (await self._run([(layer, h, ids, weights)], multi=False))[0]

    async def forward_multi(self, work: Sequence[tuple]) -> list[np.ndarray]:
        """Several layers' work, one `multi` request per shard (batch dispatch)."""
        return await self._run(list(work), multi=True)

    async def _run(self, work, multi: bool) -> list[np.ndarray]:
        plan = self.planner.plan(work, multi, self._budget)
        deadline = time.monotonic() + self.timeout
        # The common path creates no tasks: frames go out at once, replies are awaited together.
        sent = [self._send_first(job) for job in plan.jobs]
        futs = [s[1] for s in sent if s is not None]
        if futs:
            await asyncio.wait(futs, timeout=self.timeout)
        results = []
        for job, s in zip(plan.jobs, sent, strict=True):
            results.append(await self._finish(job, s, deadline))
        self._schedule_probes()
        return self.planner.combine(plan, results)

    def _send_first(self, job: core.Job):
        sh = self.shards[job.shard]
        state = sh.policy.choose(time.monotonic())
        if state is None or not state.up():
            return None
        rep = sh.replica(state)
        if rep.conn is None or not rep.conn.usable:
            return None
        try:
            fut = rep.conn.send(dict(job.msg))
        except ShardError as e:
            sh.policy.failed(state, str(e), time.monotonic())
            return None
        state.inflight += 1
        self.round_trips += 1
        return rep, fut

    async def _finish(self, job: core.Job, sent, deadline: float):
        sh = self.shards[job.shard]
        degrade = self.options.on_shard_failure == "renormalize"
        attempt = sh.policy.attempt(deadline, wait=not degrade)
        if sent is not None:
            rep, fut = sent
            attempt.tried.append(rep.state)
            attempt.tries += 1
            rep.state.inflight -= 1
            try:
                if not fut.done():
                    fut.cancel()
                    raise ShardError(f"{rep.where}: no reply to {job.msg['op']!r} within {self.timeout:g}s")
                return self._take(job, sh, rep, fut.result())
            except Exception as e:
                self._failed(sh, rep, e, attempt)
        while True:
            step = attempt.next(time.monotonic())
            if step.replica is not None:
                rep = sh.replica(step.replica)
                try:
                    if rep.conn is None or not rep.conn.usable:
                        await self._open(sh, rep, step.budget)
                    self.round_trips += 1
                    if attempt.tries > 1:
                        self.retries += 1
                    reply = await rep.conn.request_raw(dict(job.msg), step.budget)
                    return self._take(job, sh, rep, reply)
                except Exception as e:
                    self._failed(sh, rep, e, attempt)
            elif step.wait:
                await asyncio.sleep(step.wait)
            else:
                if degrade:
                    core.log.warning("%s; renormalising the other shards' router weights "
                                     "(--on-shard-failure renormalize)", step.reason)
                    return None
                raise ShardError(step.reason)

    def _take(self, job: core.Job, sh: Shard, rep: Replica, reply: dict):
        if reply.get("ok") is not True:
            code, message = core._error_of(reply)
            raise P.RemoteError(code, message, core.endpoint_label(sh.spec, rep.state.endpoint))
        ys = self.planner.decode(job, reply, rep)
        sh.policy.succeeded(rep.state)
        return ys

    def _failed(self, sh: Shard, rep: Replica, e: Exception, attempt) -> None:
        if not retryable(e):
            raise e
        if rep.conn is not None:
            rep.conn.close()
            rep.conn = None
        attempt.failed(rep.state, str(e), time.monotonic(), corrupt=isinstance(e, core.BadReply))

    # --- background probes ------------------------------------------------------------------
    def _schedule_probes(self) -> None:
        now = time.monotonic()
        for sh in self.shards:
            for state in sh.policy.due_probes(now):
                task = asyncio.ensure_future(self._probe(sh, sh.replica(state)))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _probe(self, sh: Shard, rep: Replica) -> None:
        error = None
        try:
            conn = await self._open(sh, rep)
            status = await conn.request({"op": "health"}, self.connect_timeout)
            if status.get("status") != "ok":
                raise ShardError(f"{rep.where}: health {core.short(status.get('status'), 32)!r}")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = str(e)
            if rep.conn is not None:
                rep.conn.close()
                rep.conn = None
        sh.policy.probe_done(rep.state, error, time.monotonic())

    async def stats(self) -> list[dict]:
        """Each connected replica's `stats` reply, tagged with its address."""
        out = []
        for sh in self.shards:
            for r in sh.replicas:
                if r.conn is not None and r.conn.usable:
                    s = await r.conn.request({"op": "stats"}, self.timeout)
                    out.append({"shard": sh.spec.label, "address": r.where, **s})
        return out

    async def ping(self, shard: int = 0) -> dict:
        for r in self.shards[shard].replicas:
            if r.conn is not None and r.conn.usable:
                return await r.conn.request({"op": "health"}, self.timeout)
        raise ShardError(f"shard {self.shards[shard].spec.label}: no connected replica")

