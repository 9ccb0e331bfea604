"""The expert server: a shard of one model's expert bank behind a TCP socket.

One asyncio (uvloop) event loop parses frames and answers cheap requests; expert compute runs
in a small thread pool (the C kernels release the GIL). Requests for the same layer that are
waiting together are fused into one `moe_ffn` call, so each expert's bytes are read once per
group instead of once per request. The compute itself is `LocalExperts`, restricted to the
shard's experts and layers: the same code the client runs when experts are in process.

    srv = ExpertServer(open_vindex(path), experts=range(0, 64))
    handle = srv.start_in_thread(port=0)      # tests, demo, embedding
    ...; handle.stop()

or `larql serve VINDEX --experts 0-63` (see commands/serve.py), which runs `serve_forever`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import __version__, kernels, ranges
from . import protocol as P
from .experts import ExpertOwnershipError, LocalExperts
from .transport import new_event_loop, set_nodelay

log = logging.getLogger("larql.server")

# Per-connection cap on requests in flight: past it the server stops reading that socket until
# replies drain, so one greedy client cannot queue unbounded work or memory.
MAX_INFLIGHT_PER_CONN = 256


# ------------------------------------------------------------------------------------------
# Statistics


class Stats:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.errors = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.compute_s = 0.0
        self.kernel_calls = 0          # moe_ffn calls (< expert requests when grouping kicks in)
        self.expert_requests = 0       # layer work items computed
        self.tokens = 0
        self.connections = 0
        self.open_connections = 0
        self.backpressure = 0          # times a connection's reading paused for a slow reader
        self._lat_us: deque[float] = deque(maxlen=20000)
        self._compute_us: deque[float] = deque(maxlen=20000)

    def latency(self, seconds: float) -> None:
        self._lat_us.append(seconds * 1e6)

    def compute(self, seconds: float) -> None:
        self.compute_s += seconds
        self.kernel_calls += 1
        self._compute_us.append(seconds * 1e6)

    def snapshot(self) -> dict:
        lat = np.fromiter(self._lat_us, dtype=np.float64) if self._lat_us else None
        comp = np.fromiter(self._compute_us, dtype=np.float64) if self._compute_us else None

        def pct(q: float, a=lat) -> float:
            return float(np.percentile(a, q)) if a is not None else 0.0

        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": self.requests, "errors": self.errors,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "compute_s": round(self.compute_s, 6), "kernel_calls": self.kernel_calls,
            "expert_requests": self.expert_requests, "tokens": self.tokens,
            "connections": self.connections, "open_connections": self.open_connections,
            "backpressure": self.backpressure,
            "p50_us": round(pct(50), 1), "p99_us": round(pct(99), 1),
            "compute_p50_us": round(pct(50, comp), 1), "compute_p99_us": round(pct(99, comp), 1),
            "latency_samples": len(self._lat_us),
        }


# ------------------------------------------------------------------------------------------
# Compute: per-layer grouping over a bounded thread pool


@dataclass
class _Job:
    work: P.Work
    fut: asyncio.Future


class LayerBatcher:
    """Queues expert work per (layer, input kind) and runs at most one kernel call per key at a
    time, on at most `workers` threads. Work arriving while its layer computes waits and is then
    fused with everything else that waited: concurrency is bounded and grouping is automatic."""

    def __init__(self, loop: asyncio.AbstractEventLoop, local: LocalExperts, workers: int,
                 stats: Stats) -> None:
        self.loop = loop
        self.local = local
        self.hidden = local.vindex.config.hidden_size
        self.stats = stats
        # workers == 0: compute on the event-loop thread itself. The kernel's own threads do
        # the work either way; this saves two thread hand-offs per request, and frames that
        # arrive meanwhile wait in the socket and are fused into the next call.
        self.inline = workers == 0
        self.executor = (None if self.inline
                         else ThreadPoolExecutor(workers, thread_name_prefix="larql-experts"))
        self.free = workers
        self.pending: dict[tuple[int, bool], list[_Job]] = {}
        self.running: set[tuple[int, bool]] = set()
        self.inflight = 0
        self._kick_scheduled = False

    def submit(self, work: P.Work) -> asyncio.Future:
        fut = self.loop.create_future()
        key = (work.layer, work.enc == "q8k")
        self.pending.setdefault(key, []).append(_Job(work, fut))
        self.inflight += 1
        if not self._kick_scheduled:
            # Deferred to the end of this loop iteration so frames that arrived together
            # (on one connection or several) land in the same group.
            self._kick_scheduled = True
            self.loop.call_soon(self._kick)
        return fut

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self.inline or self._lone_token():
            while self.pending:
                key = next(iter(self.pending))
                jobs = self.pending.pop(key)
                try:
                    result, exc = self._compute(key, [j.work for j in jobs]), None
                except Exception as e:  # handed to each request's reply
                    result, exc = None, e
                self._finish(key, jobs, result, exc)
            return
        for key in list(self.pending):
            if self.free == 0:
                break
            if key in self.running:
                continue
            jobs = self.pending.pop(key)
            self.running.add(key)
            self.free -= 1
            cf = self.loop.run_in_executor(self.executor, self._compute, key, [j.work for j in jobs])
            cf.add_done_callback(lambda f, key=key, jobs=jobs: self._done(key, jobs, f))

    def _lone_token(self) -> bool:
        """True when all there is to do is one request for one token and no kernel call is
        running: a single stream decoding. It is then computed on the loop thread, which saves
        the two thread hand-offs (loop -> pool thread -> loop: ~140 + ~165 us p50 on a 2-vCPU VM,
        per layer) that pay off only when there is other work to overlap. Frames arriving
        meanwhile wait in the socket and are grouped by the next kick, as with workers=0."""
        if self.running or len(self.pending) != 1:
            return False
        (jobs,) = self.pending.values()
        return len(jobs) == 1 and jobs[0].work.tokens == 1

    def _compute(self, key: tuple[int, bool], works: list[P.Work]) -> tuple[np.ndarray, float]:
        layer, normed = key
        t0 = time.perf_counter()
        if len(works) == 1:
            x, ids, w = works[0].x, works[0].ids, works[0].weights
        else:
            K = max(wk.ids.shape[1] for wk in works)
            x = np.concatenate([wk.x for wk in works])
            ids = np.concatenate([_pad(wk.ids, K, -1) for wk in works])
            w = np.concatenate([_pad(wk.weights, K, 0.0) for wk in works])
        if normed:
            # q8k input is already pre_feedforward_layernorm_2(h): dequantise and go straight
            # to the kernel (which re-quantises it to the same Q8_K blocks).
            T = x.shape[0]
            cols = x.shape[1] // P.Q8K_BLOCK_BYTES * P.Q8K_BLOCK
            xe = kernels.dequantize(np.ascontiguousarray(x).reshape(-1), kernels.Q8_K, T, cols)
            y = self.local.forward_normed(layer, xe[:, : self.hidden], ids, w)
        else:
            y = self.local.forward(layer, x, ids, w)
        return y, time.perf_counter() - t0

    def _done(self, key: tuple[int, bool], jobs: list[_Job], f: asyncio.Future) -> None:
        self.running.discard(key)
        self.free += 1
        exc = f.exception()
        self._finish(key, jobs, None if exc is not None else f.result(), exc)
        if self.pending:
            self._kick()

    def _finish(self, key: tuple[int, bool], jobs: list[_Job], result, exc: BaseException | None) -> None:
        if exc is not None and len(jobs) > 1:
            # A fused call failed: redo its requests one by one so that one bad request can
            # never fail the others it happened to be grouped with (rare: all are validated).
            for j in jobs:
                try:
                    one, err = self._compute(key, [j.work]), None
                except Exception as e:
                    one, err = None, e
                self._finish(key, [j], one, err)
            return
        self.inflight -= len(jobs)
        if exc is not None:
            for j in jobs:
                if not j.fut.done():
                    j.fut.set_exception(exc)
        else:
            y, dt = result
            self.stats.compute(dt)
            self.stats.expert_requests += len(jobs)
            row = 0
            for j in jobs:
                T = j.work.tokens
                self.stats.tokens += T
                if not j.fut.done():
                    j.fut.set_result(y[row: row + T])
                row += T

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=False)


def _pad(a: np.ndarray, K: int, fill) -> np.ndarray:
    if a.shape[1] == K:
        return a
    out = np.full((a.shape[0], K), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


# ------------------------------------------------------------------------------------------
# The server


class ExpertServer:
    """Serves `experts` x `layers` of one vindex. Loads only norms, manifests and layers/."""

    def __init__(self, vindex, experts: Iterable[int] | None = None, layers: Iterable[int] | None = None,
                 *, workers: int = 2, max_frame: int = P.MAX_FRAME) -> None:
        self.vindex = vindex
        cfg = vindex.config
        self.cfg = cfg
        present_e = set(vindex.experts_present)
        present_l = set(vindex.layers_present)
        experts = sorted(set(experts)) if experts is not None else sorted(present_e)
        layers = sorted(set(layers)) if layers is not None else sorted(present_l)
        if not experts or not layers:
            raise ValueError("a shard must own at least one expert and one layer")
        if missing := sorted(set(experts) - present_e):
            raise ValueError(f"experts {ranges.text(missing)} are not in this vindex "
                             f"(it holds {ranges.text(sorted(present_e))})")
        if missing := sorted(set(layers) - present_l):
            raise ValueError(f"layers {ranges.text(missing)} are not in this vindex "
                             f"(it holds {ranges.text(sorted(present_l))})")
        self.experts, self.layers = experts, layers
        for layer in layers:  # fail at startup, naming the file, if a layer file is unusable
            vindex.expert_file(layer)
        self.local = LocalExperts(vindex, experts=experts, layers=layers)
        self.workers = max(0, workers)
        self.max_frame = max_frame
        self.stats = Stats()
        self.fingerprint = vindex.expert_fingerprint()
        self._info = {
            "version": P.PROTOCOL_VERSION,
            "server": f"larql {__version__}",
            "model": str(vindex.index.get("model", "")),
            "fingerprint": self.fingerprint,
            "hidden": cfg.hidden_size,
            "num_experts": cfg.num_experts,
            "num_layers": cfg.num_layers,
            "top_k": cfg.top_k,
            "quant": str(getattr(vindex, "quant", "")),
            "experts": ranges.to_pairs(experts),
            "layers": ranges.to_pairs(layers),
            "encodings": list(P.ENCODINGS),
            "max_frame": max_frame,
        }
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batcher: LayerBatcher | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._closing = False
        self.address: tuple[str, int] | None = None

    # --- info -----------------------------------------------------------------------------
    def info(self) -> dict:
        return dict(self._info)

    def owned_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            ef = self.vindex.expert_file(layer)
            for e in self.experts:
                ent = ef.entry(e)
                if ent is not None:
                    total += ent.down_off + ent.down_len - ent.gate_up_off
        return total

    def warmup(self, progress: bool = True) -> tuple[int, float]:
        """Pre-fault every page of the owned experts (and only those); returns (bytes, seconds)."""
        t0 = time.perf_counter()
        total = 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.layers), unit="layer", desc="warm-up", leave=False)
        for layer in self.layers:
            ef = self.vindex.expert_file(layer)
            ef.advise_random()
            total += int(ef.prefault(self.experts))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{total / 2**20:,.0f} MiB")
        if bar is not None:
            bar.close()
        return total, time.perf_counter() - t0

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self, host: str = "0.0.0.0", port: int = 8080) -> tuple[str, int]:
        self.loop = asyncio.get_running_loop()
        self.batcher = LayerBatcher(self.loop, self.local, self.workers, self.stats)
        self._server = await self.loop.create_server(lambda: _Conn(self), host, port, backlog=256)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish and their replies go out, then close."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.inflight for c in self._conns):
            await asyncio.sleep(0.005)
        for c in list(self._conns):
            c.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)

    async def serve_forever(self, host: str, port: int) -> None:
        """Serve until SIGTERM/SIGINT, then shut down gracefully."""
        await self.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("serving experts %s layers %s of %s on %s:%d (pid %d)",
                 ranges.text(self.experts), ranges.text(self.layers),
                 self._info["model"] or self.vindex.path, self.address[0], self.address[1], os.getpid())
        await stop.wait()
        log.info("shutting down: finishing %d in-flight requests",
                 sum(c.inflight for c in self._conns))
        await self.shutdown()
        log.info("stopped")  # `larql serve` logs the counters in words on exit

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> ServerHandle:
        """Run the server on a real socket in a background thread with its own event loop."""
        loop = new_event_loop()
        ready = threading.Event()
        err: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start(host, port))
            except BaseException as e:  # reported to the caller below
                err.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        t = threading.Thread(target=run, name=f"larql-server-{port}", daemon=True)
        t.start()
        ready.wait()
        if err:
            raise err[0]
        return ServerHandle(self, loop, t)


class ServerHandle:
    def __init__(self, server: ExpertServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self.server, self.loop, self.thread = server, loop, thread
        self.host, self.port = server.address

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 10.0) -> None:
        if not self.thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self.loop)
        try:
            fut.result(grace + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------
# One client connection


class _Conn(asyncio.Protocol):
    def __init__(self, server: ExpertServer) -> None:
        self.srv = server
        self.reader = P.FrameReader(server.max_frame)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.greeted = False
        self.inflight = 0
        self.requests = 0
        self.paused = False          # reading paused: too many requests in flight
        self.write_paused = False    # reading paused: the client is not reading its replies
        self.closed = False

    # asyncio callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.srv._conns.add(self)
        self.srv.stats.connections += 1
        self.srv.stats.open_connections += 1
        log.info("connect %s", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.srv._conns.discard(self)
        self.srv.stats.open_connections -= 1
        why = f" ({exc})" if exc else ""
        trunc = f", {self.reader.pending} bytes of a truncated frame dropped" if self.reader.pending else ""
        log.info("close %s after %d requests%s%s", self.peer, self.requests, trunc, why)

    def data_received(self, data: bytes) -> None:
        self.srv.stats.bytes_in += len(data)
        try:
            bodies = self.reader.feed(data)
        except P.ProtocolError as e:
            # The length prefix is garbage or hostile: we cannot find the next frame. Say why, close.
            log.info("close %s: %s", self.peer, e)
            self.srv.stats.errors += 1
            self._send(P.error_reply(None, e.code, str(e)))
            self.close()
            return
        for body in bodies:
            if self.closed:
                return
            self._handle(body)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    # A client that sends requests but does not read the replies fills our write buffer; stop
    # reading its requests until it catches up, so its backlog cannot grow without bound.
    def pause_writing(self) -> None:
        self.write_paused = True
        self.srv.stats.backpressure += 1
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.closed and not self.paused:
            self.transport.resume_reading()

    # requests ------------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            frame = P.encode_frame(msg)
        except P.ProtocolError as e:  # a reply too big for a frame: tell the client instead
            frame = P.encode_frame(P.error_reply(msg.get("id"), P.E_BAD_REQUEST, str(e)))
        self.srv.stats.bytes_out += len(frame)
        self.transport.write(frame)

    def _error(self, rid: int | None, code: str, message: str) -> None:
        self.srv.stats.errors += 1
        self._send(P.error_reply(rid, code, message))

    def _handle(self, body: bytes) -> None:
        t0 = time.perf_counter()
        self.requests += 1
        self.srv.stats.requests += 1
        try:
            msg = P.decode_body(body)
        except P.ProtocolError as e:
            self._error(None, e.code, str(e))
            return
        rid = P.request_id(msg)
        op = msg.get("op")
        if rid is None:
            self._error(None, P.E_BAD_REQUEST,
                        f"field 'id' must be an integer in [0, 2^63), got {msg.get('id')!r}")
            return
        try:
            if op == "experts" or op == "multi":
                self._compute(rid, op, msg, t0)
            elif op == "hello":
                version = msg.get("version")
                if version != P.PROTOCOL_VERSION:
                    self._error(rid, P.E_VERSION, f"protocol version {version!r} is not supported "
                                                   f"(this server speaks {P.PROTOCOL_VERSION})")
                    return
                if not self.greeted:
                    log.info("hello %s (%s)", self.peer, str(msg.get("client", "?"))[:64])
                self.greeted = True
                self._send({"id": rid, "ok": True, **self.srv._info})
            elif op == "info":
                self._send({"id": rid, "ok": True, **self.srv._info})
            elif op == "health":
                b = self.srv.batcher
                self._send({"id": rid, "ok": True, "status": "draining" if self.srv._closing else "ok",
                            "inflight": b.inflight if b else 0})
            elif op == "stats":
                self._send({"id": rid, "ok": True, **self.srv.stats.snapshot()})
            elif op == "warmup":
                if not self.greeted:
                    raise P.ProtocolError("send 'hello' before 'warmup'", P.E_NEED_HELLO)
                self._warmup(rid)
            else:
                self._error(rid, P.E_UNKNOWN_OP, f"unknown op {op!r} (ops: {', '.join(P.OPS)})")
        except P.ProtocolError as e:
            self._error(rid, e.code, str(e))
        except ExpertOwnershipError as e:
            self._error(rid, P.E_NOT_OWNED, str(e))
        except Exception as e:  # a bug must cost one request, never the server
            log.exception("request %s from %s failed", rid, self.peer)
            self._error(rid, P.E_INTERNAL, f"{type(e).__name__}: {e}")

    def _compute(self, rid: int, op: str, msg: dict, t0: float) -> None:
        srv = self.srv
        if srv._closing:
            raise P.ProtocolError("server is shutting down", P.E_SHUTDOWN)
        if not self.greeted:
            raise P.ProtocolError("send 'hello' (protocol version check) before compute requests",
                                  P.E_NEED_HELLO)
        cfg = srv.cfg
        kw = dict(hidden=cfg.hidden_size, num_layers=cfg.num_layers, num_experts=cfg.num_experts)
        if op == "experts":
            works = [P.decode_work(msg, **kw)]
        else:
            items = msg.get("items")
            if not isinstance(items, list) or not items:
                raise P.ProtocolError("field 'items' must be a non-empty list of work items")
            works = [P.decode_work(it, **kw) for it in items]
        for wk in works:  # all-or-nothing: check every item before computing any (-> not_owned)
            srv.local.check(wk.layer, wk.ids)
        futs = [srv.batcher.submit(wk) for wk in works]
        self._track(+1)
        if op == "experts":
            futs[0].add_done_callback(lambda f: self._reply_one(rid, f, t0))
        else:
            g = asyncio.gather(*futs, return_exceptions=True)
            g.add_done_callback(lambda f: self._reply_multi(rid, f, t0))

    def _reply_one(self, rid: int, f: asyncio.Future, t0: float) -> None:
        self._track(-1)
        exc = f.exception()
        if exc is not None:
            self._compute_failed(rid, exc)
            return
        y = f.result()
        self._send({"id": rid, "ok": True, "y": np.ascontiguousarray(y, dtype="<f4").tobytes()})
        self.srv.stats.latency(time.perf_counter() - t0)

    def _reply_multi(self, rid: int, g: asyncio.Future, t0: float) -> None:
        self._track(-1)
        results = g.result()
        for r in results:
            if isinstance(r, BaseException):
                self._compute_failed(rid, r)
                return
        ys = [np.ascontiguousarray(y, dtype="<f4").tobytes() for y in results]
        self._send({"id": rid, "ok": True, "ys": ys})
        self.srv.stats.latency(time.perf_counter() - t0)

    def _compute_failed(self, rid: int, exc: BaseException) -> None:
        if isinstance(exc, ExpertOwnershipError):
            self._error(rid, P.E_NOT_OWNED, str(exc))
        elif isinstance(exc, ValueError):  # KernelError and friends: the input was bad
            self._error(rid, P.E_BAD_REQUEST, str(exc))
        else:
            log.error("compute for request %s from %s failed: %r", rid, self.peer, exc)
            self._error(rid, P.E_INTERNAL, f"{type(exc).__name__}: {exc}")

    def _track(self, delta: int) -> None:
        self.inflight += delta
        if self.transport is None or self.closed:
            return
        if not self.paused and self.inflight >= MAX_INFLIGHT_PER_CONN:
            self.paused = True
            self.transport.pause_reading()
        elif self.paused and self.inflight < MAX_INFLIGHT_PER_CONN // 2:
            self.paused = False
            if not self.write_paused:
                self.transport.resume_reading()

    def _warmup(self, rid: int) -> None:
        srv = self.srv
        fut = asyncio.get_running_loop().run_in_executor(None, srv.warmup, False)
        self._track(+1)

        def done(f: asyncio.Future) -> None:
            self._track(-1)
            if f.exception() is not None:
                self._error(rid, P.E_INTERNAL, f"warm-up failed: {f.exception()}")
            else:
                nbytes, secs = f.result()
                self._send({"id": rid, "ok": True, "bytes": nbytes, "seconds": round(secs, 6)})

        fut.add_done_callback(done)
