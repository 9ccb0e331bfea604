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
import dataclasses
import logging
import os
import signal
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import __version__, protocol_c, ranges
from . import protocol as P
from .experts import ExpertOwnershipError, LocalExperts
from .transport import (
    AUTH_SCHEME,
    NONCE_BYTES,
    auth_proof,
    looks_like_tls,
    new_event_loop,
    new_nonce,
    proof_ok,
    set_nodelay,
)
from .vindex import integrity
from .vindex.format import VindexError

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
        self.memory_pauses = 0         # times a connection's reading paused for --max-buffered
        self.refused_connections = 0   # closed at once: --max-connections reached
        self.timeouts = 0              # connections closed by --auth/--frame/--idle-timeout
        self.auth_failures = 0
        self.dropped = 0               # work items dropped because their connection closed
        self.c_path = 0                # one-token requests answered by the C path (protocol_c)
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
            "backpressure": self.backpressure, "memory_pauses": self.memory_pauses,
            "refused_connections": self.refused_connections, "timeouts": self.timeouts,
            "auth_failures": self.auth_failures, "dropped": self.dropped, "c_path": self.c_path,
            "p50_us": round(pct(50), 1), "p99_us": round(pct(99), 1),
            "compute_p50_us": round(pct(50, comp), 1), "compute_p99_us": round(pct(99, comp), 1),
            "latency_samples": len(self._lat_us),
        }


# ------------------------------------------------------------------------------------------
# Compute: per-layer grouping over a bounded thread pool, fair between connections

# A work item of more tokens is computed in chunks of this many, and connections take turns
# chunk by chunk, so a one-token request waits for at most one chunk of another client's
# prefill instead of all of it (the six 16 MiB requests held a one-token request 2.4 s).
# Each chunk still streams each chosen expert's rows once per 64 tokens (the row kernels' batch),
# so chunks of 128 lose little of the prefill's weight reuse.
CHUNK_TOKENS = 128
# A fused kernel call gathers waiting chunks of one layer up to this many tokens.
FUSE_TOKENS = 256
# Requests of at most this many tokens may use the express thread when every worker is busy
# (the C pool runs one parallel phase at a time, so they interleave with a big chunk's phases).
EXPRESS_TOKENS = 4


class _Job:
    """One work item of one request: computed in chunks, answered when the last one is done."""

    __slots__ = ("work", "conn", "on_done", "y", "left", "exc")

    def __init__(self, work: P.Work, conn, on_done) -> None:
        self.work = work
        self.conn = conn            # has .closed; work of a closed connection is dropped
        self.on_done = on_done      # on_done(job) on the loop thread, once
        self.y: np.ndarray | None = None
        self.left = 0
        self.exc: BaseException | None = None


class _Chunk:
    __slots__ = ("job", "r0", "r1", "key")

    def __init__(self, job: _Job, r0: int, r1: int) -> None:
        self.job, self.r0, self.r1 = job, r0, r1
        self.key = (job.work.layer, job.work.enc == "q8k")


class LayerBatcher:
    """Queues expert work per connection and runs at most one kernel call per (layer, input
    kind) at a time on at most `workers` threads, plus one express thread for small requests.
    Connections take turns (round robin, chunk by chunk); a call fuses every waiting chunk of
    its layer from any connection, up to FUSE_TOKENS, so grouping stays automatic under load.
    Chunks of a connection that closed are dropped, never computed."""

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
        self.express = (None if self.inline
                        else ThreadPoolExecutor(1, thread_name_prefix="larql-express"))
        self.free = workers
        self.express_free = not self.inline
        self.queues: dict[object, deque[_Chunk]] = {}   # per connection, in arrival order
        self.turns: deque[object] = deque()              # connections with queued chunks
        self.running: set[tuple[int, bool]] = set()
        self.calls = 0                                   # kernel calls running
        self.inflight = 0                                # jobs submitted and not finished
        self._kick_scheduled = False
        # Called with the layer before each kernel call (the server's file and integrity checks).
        self.before_compute = None

    # --- submission -----------------------------------------------------------------------
    def idle(self) -> bool:
        return self.calls == 0 and not self.turns

    def submit(self, work: P.Work, conn, on_done) -> _Job:
        job = _Job(work, conn, on_done)
        T = work.tokens
        chunks = [_Chunk(job, r0, min(T, r0 + CHUNK_TOKENS)) for r0 in range(0, T, CHUNK_TOKENS)]
        job.left = len(chunks)
        q = self.queues.get(conn)
        if q is None:
            q = self.queues[conn] = deque()
            self.turns.append(conn)
        q.extend(chunks)
        self.inflight += 1
        if not self._kick_scheduled:
            # Deferred to the end of this loop iteration so frames that arrived together
            # (on one connection or several) land in the same group.
            self._kick_scheduled = True
            self.loop.call_soon(self._kick)
        return job

    def compute_now(self, work: P.Work) -> np.ndarray:
        """A lone small request computed on the calling (loop) thread, no queue, no future."""
        y, dt = self._compute((work.layer, work.enc == "q8k"), [work])
        self.stats.compute(dt)
        self.stats.expert_requests += 1
        self.stats.tokens += work.tokens
        return y

    # --- scheduling -----------------------------------------------------------------------
    def _kick(self) -> None:
        self._kick_scheduled = False
        if self.inline or self._lone_token():
            while (group := self._take()) is not None:
                key, chunks = group
                try:
                    result, exc = self._compute_chunks(key, chunks), None
                except Exception as e:  # handed to each request's reply
                    result, exc = None, e
                self._finish(key, chunks, result, exc)
            return
        while self.free > 0 and (group := self._take()) is not None:
            self.free -= 1
            self._run(self.executor, group, express=False)
        if self.express_free and self.turns and (group := self._take(express=True)) is not None:
            self.express_free = False
            self._run(self.express, group, express=True)

    def _run(self, pool: ThreadPoolExecutor, group, express: bool) -> None:
        key, chunks = group
        self.running.add(key)
        self.calls += 1
        cf = self.loop.run_in_executor(pool, self._compute_chunks, key, chunks)
        cf.add_done_callback(lambda f: self._done(key, chunks, f, express))

    def _lone_token(self) -> bool:
        """True when all there is to do is one request for one token and no kernel call is
        running: a single stream decoding. It is then computed on the loop thread, which saves
        the two thread hand-offs (loop -> pool thread -> loop: ~140 + ~165 us p50 on a 2-vCPU VM,
        per layer) that pay off only when there is other work to overlap."""
        if self.calls or len(self.turns) != 1:
            return False
        (q,) = self.queues.values()
        return len(q) == 1 and q[0].job.work.tokens == 1

    def _take(self, express: bool = False) -> tuple[tuple[int, bool], list[_Chunk]] | None:
        """The next connection in turn whose first chunk's layer is not computing (any layer
        for the express thread, whose chunks are small), with every waiting chunk of that layer
        fused in, up to FUSE_TOKENS; None if nothing can start now."""
        for _ in range(len(self.turns)):
            conn = self.turns[0]
            self.turns.rotate(-1)
            q = self.queues[conn]
            if getattr(conn, "closed", False):
                self._drop(conn)
                continue
            head = q[0]
            if express:
                if head.job.work.tokens > EXPRESS_TOKENS:
                    continue
            elif head.key in self.running:
                continue
            return head.key, self._gather(head.key, conn, FUSE_TOKENS if not express else EXPRESS_TOKENS * 4)
        return None

    def _gather(self, key, first, budget: int) -> list[_Chunk]:
        taken: list[_Chunk] = []
        tokens = 0
        order = [first, *[c for c in self.turns if c is not first]]
        for conn in order:
            q = self.queues.get(conn)
            if q is None or getattr(conn, "closed", False):
                continue
            keep: deque[_Chunk] = deque()
            for ch in q:
                n = ch.r1 - ch.r0
                if ch.key == key and (not taken or tokens + n <= budget):
                    taken.append(ch)
                    tokens += n
                else:
                    keep.append(ch)
            if len(keep) != len(q):
                if keep:
                    self.queues[conn] = keep
                else:
                    del self.queues[conn]
                    self.turns.remove(conn)
            if tokens >= budget:
                break
        return taken

    def _drop(self, conn) -> None:
        """A closed connection's queued work: forgotten, never computed."""
        q = self.queues.pop(conn, None)
        self.turns.remove(conn)
        jobs = {id(ch.job): ch.job for ch in q or ()}
        self.stats.dropped += len(jobs)
        for job in jobs.values():
            if job.left > 0:
                job.left = 0
                self.inflight -= 1
                job.exc = ConnectionAbortedError("connection closed")
                job.on_done(job)

    def drop_closed(self, conn) -> None:
        if conn in self.queues:
            self._drop(conn)

    # --- compute --------------------------------------------------------------------------
    def _compute_chunks(self, key: tuple[int, bool], chunks: list[_Chunk]) -> tuple[np.ndarray, float]:
        works = []
        for ch in chunks:
            wk = ch.job.work
            if ch.r0 == 0 and ch.r1 == wk.tokens:
                works.append(wk)
            else:
                works.append(P.Work(wk.layer, wk.x[ch.r0:ch.r1], wk.ids[ch.r0:ch.r1],
                                    wk.weights[ch.r0:ch.r1], wk.enc, wk.acc))
        return self._compute(key, works)

    def _compute(self, key: tuple[int, bool], works: list[P.Work]) -> tuple[np.ndarray, float]:
        """One kernel call for `works` (one layer); f64 sums if any of them asked for them (the
        f32 results are those sums rounded once, exactly what an f32 call returns)."""
        layer, normed = key
        f64 = any(wk.acc == "f64" for wk in works)
        t0 = time.perf_counter()
        if self.before_compute is not None:
            self.before_compute(layer)
        if len(works) == 1:
            x, ids, w = works[0].x, works[0].ids, works[0].weights
        else:
            K = max(wk.ids.shape[1] for wk in works)
            x = np.concatenate([wk.x for wk in works])
            ids = np.concatenate([_pad(wk.ids, K, -1) for wk in works])
            w = np.concatenate([_pad(wk.weights, K, 0.0) for wk in works])
        acc = "f64" if f64 else "f32"
        if normed:
            # q8k input is already pre_feedforward_layernorm_2(h) in the kernel's own blocks
            y = self.local.forward_q8k(layer, x, ids, w, acc)
        else:
            y = self.local.forward(layer, x, ids, w, acc)
        return y, time.perf_counter() - t0

    def _done(self, key, chunks: list[_Chunk], f: asyncio.Future, express: bool) -> None:
        self.running.discard(key)
        self.calls -= 1
        if express:
            self.express_free = True
        else:
            self.free += 1
        exc = f.exception()
        self._finish(key, chunks, None if exc is not None else f.result(), exc)
        if self.turns:
            self._kick()

    def _finish(self, key, chunks: list[_Chunk], result, exc: BaseException | None) -> None:
        if exc is not None and len(chunks) > 1:
            # A fused call failed: redo its chunks one by one so that one bad request can
            # never fail the others it happened to be grouped with (rare: all are validated).
            for ch in chunks:
                try:
                    one, err = self._compute_chunks(key, [ch]), None
                except Exception as e:
                    one, err = None, e
                self._finish(key, [ch], one, err)
            return
        if exc is None:
            y, dt = result
            self.stats.compute(dt)
        row = 0
        for ch in chunks:
            job = ch.job
            n = ch.r1 - ch.r0
            if job.left <= 0:          # dropped meanwhile (its connection closed)
                row += n
                continue
            if exc is not None:
                job.exc = exc
                job.left = 1           # finish it now: one failed chunk fails the request
            elif ch.r0 == 0 and ch.r1 == job.work.tokens and row == 0 and y.shape[0] == n:
                job.y = y              # the whole job in one call: no copy
            else:
                want = np.float64 if job.work.acc == "f64" else np.float32
                if job.y is None:
                    job.y = np.empty((job.work.tokens, self.hidden), dtype=want)
                job.y[ch.r0:ch.r1] = y[row:row + n]
            row += n
            job.left -= 1
            if job.left == 0:
                self.inflight -= 1
                if job.exc is None:
                    self.stats.expert_requests += 1
                    self.stats.tokens += job.work.tokens
                job.on_done(job)

    def close(self) -> None:
        for pool in (self.executor, self.express):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=False)


def _pad(a: np.ndarray, K: int, fill) -> np.ndarray:
    if a.shape[1] == K:
        return a
    out = np.full((a.shape[0], K), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


# ------------------------------------------------------------------------------------------
# The server


class ExpertServer:
    """Serves `experts` x `layers` of one vindex. Loads only norms, manifests and layers/.

    `api_key` (bytes) makes every connection authenticate first (op `auth`); `tls` (an
    ssl.SSLContext from transport.server_tls_context) serves TLS; `limits` bounds connections,
    time, memory and request sizes (protocol.ServerLimits, docs/PROTOCOL.md)."""

    def __init__(self, vindex, experts: Iterable[int] | None = None, layers: Iterable[int] | None = None,
                 *, workers: int = 2, max_frame: int | None = None, limits: P.ServerLimits | None = None,
                 api_key: bytes | None = None, tls: ssl.SSLContext | None = None) -> None:
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
        limits = limits or P.ServerLimits()
        if max_frame is not None:
            limits = dataclasses.replace(limits, max_frame=max_frame)
        if limits.max_buffered < limits.max_frame:
            raise ValueError(f"max_buffered ({limits.max_buffered} bytes) must be at least max_frame "
                             f"({limits.max_frame}): a frame that cannot be buffered never completes")
        self.limits = limits
        self.max_frame = limits.max_frame
        self.api_key = api_key or None
        self.tls = tls
        self.stats = Stats()
        # Derived from the digests index.json records, never read from it; the bytes served
        # are checked against those digests before they are computed with (self.integrity:
        # during warm-up, else on a background thread from start(), a layer's first request
        # waiting for its own check).
        self.fingerprint = vindex.expert_fingerprint()
        self.integrity = integrity.Verifier(vindex, experts, layers)
        # Lone one-token requests of a layer that passed its checks, answered in C (protocol_c).
        self.token_path = protocol_c.TokenServer(self.local, vindex)
        self._loop_thread: int | None = None
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
            "accumulators": list(P.ACCUMULATORS),
            "max_frame": limits.max_frame,
            "max_tokens": limits.max_tokens,
            "max_items": limits.max_items,
        }
        self._work_kw = dict(hidden=cfg.hidden_size, num_layers=cfg.num_layers,
                             num_experts=cfg.num_experts, max_tokens=limits.max_tokens)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batcher: LayerBatcher | None = None
        self.validator: ThreadPoolExecutor | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._closing = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.buffered = 0                 # bytes of unfinished frames + queued work, all connections
        self._mem_paused: set[_Conn] = set()
        self._last_compute_conn: _Conn | None = None
        self._refusals = _RateLimited(log, 1.0)
        self.address: tuple[str, int] | None = None

    # --- info -----------------------------------------------------------------------------
    def info(self) -> dict:
        return dict(self._info)

    def health(self) -> dict:
        """The `health` reply's fields: "failed" once a served layer failed its integrity check
        (every token needs every layer, so the shard cannot serve the model: a container's
        health check should say so), "draining" while shutting down, else "ok"."""
        failed = self.integrity.failed_layers()
        status = "draining" if self._closing else "failed" if failed else "ok"
        out = {"status": status, "inflight": self.batcher.inflight if self.batcher else 0,
               "integrity": self.integrity.status()}
        if failed:
            out["failed_layers"] = failed
        return out

    def _check_layer(self, layer: int) -> None:
        """Before a kernel reads `layer`: its files have not shrunk under us (fstat; a read past
        the end of a mapping is SIGBUS) and its bytes passed the integrity check."""
        self.vindex.check_intact(layer)
        self.integrity.check(layer)
        if layer not in self.token_path.enabled and self.loop is not None:
            # the C path's tables are changed on the loop thread only, which also reads them
            if threading.get_ident() == self._loop_thread:
                self.token_path.enable(layer)
            else:
                self.loop.call_soon_threadsafe(self.token_path.enable, layer)

    def owned_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            ef = self.vindex.expert_file(layer)
            for e in self.experts:
                ent = ef.entry(e)
                if ent is not None:
                    total += ent.down_off + ent.down_len - ent.gate_up_off
        return total

    # Warm-up: pieces read at once, and the piece size (big enough for long sequential reads,
    # small enough to keep every thread busy to the end).
    WARMUP_THREADS = 4
    WARMUP_CHUNK = 32 << 20

    def warmup(self, progress: bool = True, threads: int | None = None) -> tuple[int, float]:
        """Read every page of the owned experts (and only those) into memory; returns
        (bytes, seconds). The owned ranges are cut into WARMUP_CHUNK pieces and `threads` of
        them are in flight at once (readahead, then MADV_POPULATE_READ: ExpertFile.populate), so the
        disk sees large queued reads instead of one 4 KiB fault at a time. The mappings stay
        MADV_RANDOM for serving, on 2 MiB pages where Linux can (ExpertFile.advise_huge).

        Then each layer's owned bytes are checked against index.json's digests, read from the
        page cache the pre-fault filled (ExpertFile.pread): VindexError names the file and the
        experts whose bytes do not match. Neither step can SIGBUS on a file truncated meanwhile:
        MADV_POPULATE_READ and process_vm_readv fail with EFAULT instead, and the touch fallback
        of kernels before 5.14 runs after a size check."""
        t0 = time.perf_counter()
        step = self.WARMUP_CHUNK
        pieces: list[tuple[object, int, int]] = []
        for layer in self.layers:
            ef = self.vindex.expert_file(layer)
            ef.advise_random()
            ef.advise_huge(self.experts)
            ef.check_intact()
            for a, b in ef.page_ranges(self.experts):
                pieces += [(ef, p, min(b, p + step)) for p in range(a, b, step)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(b - a for _, a, b in pieces), unit="B", unit_scale=True,
                       unit_divisor=1024, desc="warm-up", leave=False, dynamic_ncols=True)
        workers = max(1, threads or self.WARMUP_THREADS)
        with ThreadPoolExecutor(workers, thread_name_prefix="larql-warmup") as pool:
            for a, b in pool.map(lambda pc: (pc[0].populate(pc[1], pc[2]), pc[1], pc[2])[1:], pieces):
                if bar is not None:
                    bar.update(b - a)
        if bar is not None:
            bar.close()
        for layer in self.layers:
            self.integrity.check(layer)
        return self.owned_bytes(), time.perf_counter() - t0

    def disk_read_rate(self, max_bytes: int = 256 << 20) -> float | None:
        """The disk's sequential read rate (bytes/s) over up to `max_bytes` of the first owned
        range, read and evicted again before warm-up (see sequential_read_rate); None when a
        fifth of it is already cached (a warm restart: the disk would not be what is timed)."""
        from .vindex.reader import sequential_read_rate

        ef = self.vindex.expert_file(self.layers[0])
        start, end = ef.page_ranges(self.experts)[0]
        end = min(end, start + max_bytes)
        if ef.resident_fraction([(start, end)]) > 0.2:
            return None
        return sequential_read_rate(ef.path, start, end)

    # --- memory cap (--max-buffered) ------------------------------------------------------
    def account(self, delta: int, conn: _Conn | None = None) -> None:
        """Add `delta` bytes to what the server holds for clients; past the cap the connection
        that added stops being read, and every paused one resumes once usage is back under it."""
        self.buffered += delta
        if delta > 0 and conn is not None and self.buffered > self.limits.max_buffered:
            if conn not in self._mem_paused:
                self._mem_paused.add(conn)
                self.stats.memory_pauses += 1
                conn.update_reading()
        elif delta < 0 and self._mem_paused and self.buffered <= self.limits.max_buffered * 3 // 4:
            paused, self._mem_paused = self._mem_paused, set()
            for c in paused:
                c.update_reading()

    # --- timeouts -------------------------------------------------------------------------
    def _sweep_interval(self) -> float:
        lim = self.limits
        shortest = min(lim.idle_timeout, lim.frame_timeout, lim.auth_timeout if self.api_key else 1e9)
        return min(1.0, max(0.02, shortest / 4))

    def _sweep(self) -> None:
        """Close connections past a deadline: unauthenticated, a frame left unfinished, idle."""
        now = time.monotonic()
        lim = self.limits
        for c in list(self._conns):
            if c.closed:
                continue
            if not c.authed and now - c.connected_at > lim.auth_timeout:
                self.stats.timeouts += 1
                c.refuse(P.E_UNAUTHORIZED, f"not authenticated within {lim.auth_timeout:g} s", "auth timeout")
            elif c.frame_started is not None and now - c.frame_started > lim.frame_timeout:
                self.stats.timeouts += 1
                c.refuse(P.E_BAD_FRAME, f"frame not completed within {lim.frame_timeout:g} s "
                         f"({c.reader.pending} bytes received)", "frame timeout")
            elif c.inflight == 0 and c.frame_started is None and now - c.last_active > lim.idle_timeout:
                self.stats.timeouts += 1
                log.info("close %s: idle for %.0f s", c.peer, now - c.last_active)
                c.close()
        if not self._closing and self.loop is not None:
            self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self, host: str = "0.0.0.0", port: int = 8080) -> tuple[str, int]:
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.batcher = LayerBatcher(self.loop, self.local, self.workers, self.stats)
        self.batcher.before_compute = self._check_layer
        self.integrity.start_background()  # returns at once; layers warm-up checked are skipped
        self.validator = ThreadPoolExecutor(1, thread_name_prefix="larql-validate")
        kw = {}
        if self.tls is not None:
            kw = {"ssl": self.tls, "ssl_handshake_timeout": max(1.0, min(self.limits.auth_timeout, 30.0))}
        self._server = await self.loop.create_server(lambda: _Conn(self), host, port, backlog=256, **kw)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)
        return self.address

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish and their replies go out, then close."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.inflight for c in self._conns):
            await asyncio.sleep(0.005)
        for c in list(self._conns):
            c.close()
        if self._server is not None:
            await self._server.wait_closed()
        loop = asyncio.get_running_loop()
        if self.batcher is not None:
            await loop.run_in_executor(None, self.batcher.close)
        if self.validator is not None:
            await loop.run_in_executor(None, self.validator.shutdown)
        await loop.run_in_executor(None, self.integrity.close)

    async def serve_forever(self, host: str, port: int) -> None:
        """Serve until SIGTERM/SIGINT, then shut down gracefully."""
        await self.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("serving experts %s layers %s of %s on %s:%d (%s, %s; pid %d)",
                 ranges.text(self.experts), ranges.text(self.layers),
                 self._info["model"] or self.vindex.path, self.address[0], self.address[1],
                 "TLS" if self.tls else "plain TCP", "API key required" if self.api_key else "no API key",
                 os.getpid())
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


class _RateLimited:
    """Log a repeated event at most once per `interval` seconds, with the count it stood for."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger, self.interval = logger, interval
        self.last = 0.0
        self.suppressed = 0

    def warning(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        self.logger.warning(msg + more, *args)
        self.last, self.suppressed = now, 0


# ------------------------------------------------------------------------------------------
# One client connection

# Bodies at least this big are unpacked and validated on the validation thread, so a client's
# 16 MiB prefill (or a 64-item `multi`) never stalls the event loop for everyone else
# (unpack + isfinite of 16 MiB: ~5-10 ms; a one-token f32 body at hidden 2816 is 11 KiB).
OFFLOAD_BYTES = 256 << 10

UNAUTHORIZED = "this server requires authentication: set LARQL_API_KEY or --shard-api-key-file on the client"
PRE_AUTH_OPS = ("auth", "health")


class _Conn(asyncio.Protocol):
    def __init__(self, server: ExpertServer) -> None:
        self.srv = server
        self.reader = P.FrameReader(server.max_frame)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.greeted = False                 # hello succeeded
        self.authed = server.api_key is None
        self.auth_nonces: tuple[bytes, bytes] | None = None
        self.inflight = 0
        self.requests = 0
        self.held = 0                        # bytes counted against --max-buffered for this connection
        self.paused = False                  # too many requests in flight
        self.write_paused = False            # the client is not reading its replies
        self.reading = True
        self.closed = False
        self.refused = False                 # over --max-connections: never served
        self.first_bytes = True
        self.refusal: tuple[str, str, str] | None = None   # to send once in-flight work is answered
        now = time.monotonic()
        self.connected_at = now
        self.last_active = now
        self.frame_started: float | None = None
        self.c_ready = False                 # greeted and authenticated: compute may take the C path

    # asyncio callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        srv = self.srv
        if len(srv._conns) >= srv.limits.max_connections or srv._closing:
            self.refused = self.closed = True
            srv.stats.refused_connections += 1
            srv._refusals.warning("refusing connection from %s: %d connections open (--max-connections %d)",
                                  self.peer, len(srv._conns), srv.limits.max_connections)
            transport.close()
            return
        set_nodelay(transport)
        srv._conns.add(self)
        srv.stats.connections += 1
        srv.stats.open_connections += 1
        log.info("connect %s", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.closed = True
        srv = self.srv
        srv._conns.discard(self)
        srv._mem_paused.discard(self)
        srv.stats.open_connections -= 1
        if srv.batcher is not None:
            srv.batcher.drop_closed(self)   # its queued work is never computed
        if self.held:
            srv.account(-self.held)
            self.held = 0
        if srv._last_compute_conn is self:
            srv._last_compute_conn = None
        why = f" ({exc})" if exc else ""
        trunc = f", {self.reader.pending} bytes of a truncated frame dropped" if self.reader.pending else ""
        log.info("close %s after %d requests%s%s", self.peer, self.requests, trunc, why)

    def data_received(self, data: bytes) -> None:
        srv = self.srv
        if self.closed or self.refusal is not None:
            return
        if (4 < len(data) <= srv.max_frame + 4 and self.reader.pending == 0
                and P.HEADER.unpack_from(data)[0] == len(data) - 4 and self._c_path_open()):
            # One whole frame in this read and nothing else pending: offer it to the C path
            # before copying it through the frame reader (one stream decoding).
            t0 = time.perf_counter()
            frame = srv.token_path.serve_frame(data)
            if frame is not None:
                srv.stats.bytes_in += len(data)
                self.last_active = time.monotonic()
                self._answered_in_c(frame, t0)
                return
        srv.stats.bytes_in += len(data)
        if self.first_bytes:
            self.first_bytes = False
            if srv.tls is None and looks_like_tls(data[:3]):
                log.warning("TLS ClientHello on a plain port from %s: closing (start the server with "
                            "--tls-cert/--tls-key or connect without tls://)", self.peer)
                srv.stats.errors += 1
                self.close()
                return
        before = self.reader.pending
        try:
            bodies = self.reader.feed(data)
        except P.ProtocolError as e:
            self._stream_broken(e)
            return
        self._hold(self.reader.pending - before + sum(len(b) for b in bodies))
        if bodies or self.reader.pending == 0:
            self.frame_started = None
        if self.reader.pending and self.frame_started is None:
            self.frame_started = time.monotonic()
        self.last_active = time.monotonic()
        last = len(bodies) - 1
        for i, body in enumerate(bodies):
            if self.closed:
                return
            self._hold(-len(body))
            self._handle(body, lone=i == last and self.reader.pending == 0)
        if self.closed:
            return
        if self.reader.error is not None:
            self._stream_broken(self.reader.error)
            return
        nxt = self.reader.next_length
        if nxt is not None and not self.greeted and nxt > srv.limits.greeting_frame:
            self._stream_broken(P.ProtocolError(
                f"frame length {nxt} exceeds the {srv.limits.greeting_frame}-byte limit before 'hello'",
                P.E_BAD_FRAME))

    def _stream_broken(self, e: P.ProtocolError) -> None:
        # The length prefix is garbage or hostile: we cannot find the next frame. Say why, close.
        self.refuse(e.code, str(e), str(e), after_inflight=True)

    def refuse(self, code: str, message: str, why: str, *, after_inflight: bool = False) -> None:
        """One error reply (id nil), then close: for what ends a connection. `after_inflight`:
        first answer the requests already accepted (frames that came before a broken one)."""
        if after_inflight and self.inflight:
            self.refusal = (code, message, why)
            self.update_reading()
            return
        log.info("close %s: %s", self.peer, why)
        self._error(None, code, message)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def _hold(self, delta: int) -> None:
        if self.closed:
            # connection_lost released everything this connection held at once; the releases
            # of its dropped work that follow must not count twice
            delta = max(delta, -self.held) if delta < 0 else 0
        if delta:
            self.held += delta
            self.srv.account(delta, self)

    # Reading stops while any of: too many requests in flight, the client not reading its
    # replies (our write buffer is full), or the server over --max-buffered.
    def update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        want = not (self.paused or self.write_paused or self.refusal or self in self.srv._mem_paused)
        if want != self.reading:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.srv.stats.backpressure += 1
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.update_reading()

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

    def _handle(self, body: bytes, lone: bool = False) -> None:
        t0 = time.perf_counter()
        srv = self.srv
        if lone and self._c_path_open() and (frame := srv.token_path.serve(body)) is not None:
            # One stream decoding, a layer already checked: parsed, validated, computed and
            # answered in C (protocol_c), byte for byte what the Python path below replies.
            self._answered_in_c(frame, t0)
            return
        self.requests += 1
        srv.stats.requests += 1
        if not self.greeted and len(body) > srv.limits.greeting_frame:
            self.refuse(P.E_BAD_FRAME, f"frame of {len(body)} bytes exceeds the "
                        f"{srv.limits.greeting_frame}-byte limit before 'hello'",
                        "oversized frame before hello")
            return
        if len(body) >= OFFLOAD_BYTES:
            self._handle_offloaded(body, t0)
            return
        try:
            msg = P.decode_body(body, max_array_len=max(srv.limits.max_items, P.MAX_ARRAY_LEN))
        except P.ProtocolError as e:
            if not self.authed:
                self.refuse(e.code, str(e), "bad frame before auth")
            else:
                self._error(None, e.code, str(e))
            return
        rid = P.request_id(msg)
        op = msg.get("op")
        if rid is None:
            self._error(None, P.E_BAD_REQUEST,
                        f"field 'id' must be an integer in [0, 2^63), got {P.preview(msg.get('id'))}")
            if not self.authed:
                self.close()
            return
        if not self.authed and op not in PRE_AUTH_OPS:
            srv.stats.auth_failures += 1
            self._error(rid, P.E_UNAUTHORIZED, UNAUTHORIZED)
            log.info("close %s: %s before auth", self.peer, P.preview(op))
            self.close()
            return
        try:
            if op == "experts":
                work = P.decode_work(msg, **srv._work_kw)
                self._check_compute()
                srv.local.check(work.layer, work.ids)
                b = srv.batcher
                if lone and work.tokens == 1 and b.idle() and srv._last_compute_conn is self:
                    # One stream decoding: answer from here, no queue, no future, no hop.
                    y = b.compute_now(work)
                    self._send_y(rid, y, work.acc)
                    srv.stats.latency(time.perf_counter() - t0)
                    return
                srv._last_compute_conn = self
                self._submit(rid, op, [work], t0, 0)
            elif op == "multi":
                works = self._decode_multi(msg)
                self._check_compute()
                for wk in works:  # all-or-nothing: check every item before computing any
                    srv.local.check(wk.layer, wk.ids)
                srv._last_compute_conn = self
                self._submit(rid, op, works, t0, 0)
            elif op == "hello":
                self._hello(rid, msg)
            elif op == "auth":
                self._auth(rid, msg)
            elif op == "info":
                self._send({"id": rid, "ok": True, **srv._info})
            elif op == "health":
                self._send({"id": rid, "ok": True, **srv.health()})
            elif op == "stats":
                self._send({"id": rid, "ok": True, **srv.stats.snapshot()})
            elif op == "warmup":
                if not self.greeted:
                    raise P.ProtocolError("send 'hello' before 'warmup'", P.E_NEED_HELLO)
                self._warmup(rid)
            else:
                self._error(rid, P.E_UNKNOWN_OP, f"unknown op {P.preview(op)} (ops: {', '.join(P.OPS)})")
        except P.ProtocolError as e:
            self._error(rid, e.code, str(e))
        except ExpertOwnershipError as e:
            self._error(rid, P.E_NOT_OWNED, str(e))
        except VindexError as e:  # our files changed on disk or failed their check
            log.error("request %s from %s: %s", rid, self.peer, e)
            self._error(rid, P.E_INTEGRITY, str(e))
        except Exception as e:  # a bug must cost one request, never the server
            log.exception("request %s from %s failed", rid, self.peer)
            self._error(rid, P.E_INTERNAL, f"{type(e).__name__}: {e}")

    def _c_path_open(self) -> bool:
        """Whether a one-token request may take the C path: greeted and authenticated, one
        stream decoding (this connection computed last, nothing queued or running), not draining."""
        srv = self.srv
        return self.c_ready and srv._last_compute_conn is self and not srv._closing and srv.batcher.idle()

    def _answered_in_c(self, frame: bytes, t0: float) -> None:
        st = self.srv.stats
        self.requests += 1
        st.requests += 1
        st.c_path += 1
        st.compute(time.perf_counter() - t0)
        st.expert_requests += 1
        st.tokens += 1
        if self.transport is not None and not self.transport.is_closing():
            st.bytes_out += len(frame)
            self.transport.write(frame)
        st.latency(time.perf_counter() - t0)

    def _hello(self, rid: int, msg: dict) -> None:
        version = msg.get("version")
        if type(version) is not int or version != P.PROTOCOL_VERSION:   # not True, not 1.0
            self._error(rid, P.E_VERSION, f"protocol version {P.preview(version)} is not supported "
                                          f"(this server speaks {P.PROTOCOL_VERSION})")
            return
        if not self.greeted:
            client = msg.get("client", "?")
            log.info("hello %s (%s)", self.peer,
                     client[:64] if isinstance(client, str) else P.preview(client))
        self.greeted = True
        self.c_ready = self.authed
        self._send({"id": rid, "ok": True, **self.srv._info})

    def _auth(self, rid: int, msg: dict) -> None:
        """The challenge-response of docs/PROTOCOL.md ("auth"); a failure closes the connection."""
        key = self.srv.api_key
        step = msg.get("step")
        if key is None:
            if type(step) is not int or step not in (1, 2):
                raise P.ProtocolError(f"field 'step' must be 1 or 2, got {P.preview(step)}")
            self._send({"id": rid, "ok": True, "scheme": "none"})
            return
        if self.authed:
            self._send({"id": rid, "ok": True})
            return
        if step == 1 and type(step) is int and self.auth_nonces is None:
            client_nonce = msg.get("nonce")
            if not isinstance(client_nonce, bytes) or len(client_nonce) != NONCE_BYTES:
                self._auth_failed(rid, f"auth step 1 needs a {NONCE_BYTES}-byte 'nonce'")
                return
            server_nonce = new_nonce()
            self.auth_nonces = (client_nonce, server_nonce)
            self._send({"id": rid, "ok": True, "scheme": AUTH_SCHEME, "nonce": server_nonce,
                        "proof": auth_proof(key, "server", client_nonce, server_nonce)})
        elif step == 2 and type(step) is int and self.auth_nonces is not None:
            cn, sn = self.auth_nonces
            if not proof_ok(key, "client", cn, sn, msg.get("proof")):
                self._auth_failed(rid, "wrong API key (the client's proof did not verify)")
                return
            self.authed = True
            self.c_ready = self.greeted
            log.info("auth %s: ok", self.peer)
            self._send({"id": rid, "ok": True})
        else:
            self._auth_failed(rid, "auth out of order: send step 1 (a nonce), then step 2 (a proof), "
                                   "once each")

    def _auth_failed(self, rid: int, message: str) -> None:
        self.srv.stats.auth_failures += 1
        log.warning("auth %s: refused: %s", self.peer, message)
        self._error(rid, P.E_UNAUTHORIZED, message)
        self.close()

    def _check_compute(self) -> None:
        if self.srv._closing:
            raise P.ProtocolError("server is shutting down", P.E_SHUTDOWN)
        if not self.greeted:
            raise P.ProtocolError("send 'hello' (protocol version check) before compute requests",
                                  P.E_NEED_HELLO)

    def _decode_multi(self, msg: dict) -> list[P.Work]:
        items = msg.get("items")
        if not isinstance(items, list) or not items:
            raise P.ProtocolError(f"field 'items' must be a non-empty list of work items, "
                                  f"got {P.preview(items)}")
        if len(items) > self.srv.limits.max_items:
            raise P.ProtocolError(f"field 'items' holds {len(items)} items; this server takes at most "
                                  f"{self.srv.limits.max_items} (--max-items)")
        return [P.decode_work(it, **self.srv._work_kw) for it in items]

    # --- large requests: unpacked and validated off the event loop --------------------------
    def _handle_offloaded(self, body: bytes, t0: float) -> None:
        srv = self.srv
        if not self.authed:
            self.refuse(P.E_UNAUTHORIZED, UNAUTHORIZED, "large frame before auth")
            return
        self._hold(len(body))
        self._track(+1)
        fut = srv.loop.run_in_executor(srv.validator, self._validate_large, body)
        fut.add_done_callback(lambda f: self._validated(f, len(body), t0))

    def _validate_large(self, body: bytes) -> tuple[int | None, str, list[P.Work] | None, Exception | None]:
        """On the validation thread: decode and check everything, or say what was wrong."""
        if self.closed:
            return None, "", None, None
        rid = None
        op = ""
        try:
            msg = P.decode_body(body, max_array_len=max(self.srv.limits.max_items, P.MAX_ARRAY_LEN))
            rid = P.request_id(msg)
            op = msg.get("op")
            if rid is None:
                raise P.ProtocolError(f"field 'id' must be an integer in [0, 2^63), got "
                                      f"{P.preview(msg.get('id'))}")
            if op == "experts":
                works = [P.decode_work(msg, **self.srv._work_kw)]
            elif op == "multi":
                works = self._decode_multi(msg)
            else:
                raise P.ProtocolError(f"a frame of {len(body)} bytes must be an 'experts' or 'multi' "
                                      f"request, not {P.preview(op)}")
            for wk in works:
                self.srv.local.check(wk.layer, wk.ids)
            return rid, op, works, None
        except Exception as e:  # turned into the reply on the loop thread
            return rid, op if isinstance(op, str) else "", None, e

    def _validated(self, f: asyncio.Future, nbytes: int, t0: float) -> None:
        try:
            self._after_validation(f, nbytes, t0)
        finally:
            self._track(-1)    # last: a refusal waiting for in-flight work goes after this reply

    def _after_validation(self, f: asyncio.Future, nbytes: int, t0: float) -> None:
        rid, op, works, exc = f.result()
        if self.closed:
            self._hold(-nbytes)
            return
        try:
            if exc is not None:
                raise exc
            if works is None:
                self._hold(-nbytes)
                return
            self._check_compute()
        except P.ProtocolError as e:
            self._hold(-nbytes)
            self._error(rid, e.code, str(e))
            return
        except ExpertOwnershipError as e:
            self._hold(-nbytes)
            self._error(rid, P.E_NOT_OWNED, str(e))
            return
        except VindexError as e:  # our files changed on disk or failed their check
            self._hold(-nbytes)
            log.error("request %s from %s: %s", rid, self.peer, e)
            self._error(rid, P.E_INTEGRITY, str(e))
            return
        except Exception as e:
            self._hold(-nbytes)
            log.error("validating request %s from %s failed: %r", rid, self.peer, e)
            self._error(rid, P.E_INTERNAL, f"{type(e).__name__}: {e}")
            return
        self.srv._last_compute_conn = self
        self._submit(rid, op, works, t0, nbytes)   # the bytes stay held until the reply

    # --- compute ----------------------------------------------------------------------------
    def _submit(self, rid: int, op: str, works: list[P.Work], t0: float, held: int) -> None:
        b = self.srv.batcher
        left = [len(works)]
        jobs: list[_Job] = []
        self._track(+1)

        def done(_job: _Job) -> None:
            left[0] -= 1
            if left[0]:
                return
            if held:
                self._hold(-held)
            if not self.closed:
                self._reply(rid, op, jobs, t0)
            self._track(-1)    # after the reply: a refusal waiting for in-flight work goes last

        for wk in works:
            jobs.append(b.submit(wk, self, done))

    def _reply(self, rid: int, op: str, jobs: list[_Job], t0: float) -> None:
        for j in jobs:
            if j.exc is not None:
                self._compute_failed(rid, j.exc)
                return
        if op == "experts":
            self._send_y(rid, jobs[0].y, jobs[0].work.acc)
        else:
            self._send({"id": rid, "ok": True, "ys": [_y_bytes(j.y, j.work.acc) for j in jobs]})
        self.srv.stats.latency(time.perf_counter() - t0)

    def _send_y(self, rid: int, y: np.ndarray, acc: str) -> None:
        self._send({"id": rid, "ok": True, "y": _y_bytes(y, acc)})

    def _compute_failed(self, rid: int, exc: BaseException) -> None:
        if isinstance(exc, ExpertOwnershipError):
            self._error(rid, P.E_NOT_OWNED, str(exc))
        elif isinstance(exc, VindexError):  # our files (changed on disk, failed their check)
            log.error("request %s from %s: %s", rid, self.peer, exc)
            self._error(rid, P.E_INTEGRITY, str(exc))
        elif isinstance(exc, ValueError):  # KernelError and friends: the input was bad
            self._error(rid, P.E_BAD_REQUEST, str(exc))
        else:
            log.error("compute for request %s from %s failed: %r", rid, self.peer, exc)
            self._error(rid, P.E_INTERNAL, f"{type(exc).__name__}: {exc}")

    def _track(self, delta: int) -> None:
        self.inflight += delta
        if delta < 0:
            self.last_active = time.monotonic()
            if self.inflight == 0 and self.refusal is not None and not self.closed:
                self.refuse(*self.refusal)
                return
        if not self.paused and self.inflight >= MAX_INFLIGHT_PER_CONN:
            self.paused = True
            self.update_reading()
        elif self.paused and self.inflight < MAX_INFLIGHT_PER_CONN // 2:
            self.paused = False
            self.update_reading()

    def _warmup(self, rid: int) -> None:
        srv = self.srv
        fut = asyncio.get_running_loop().run_in_executor(None, srv.warmup, False)
        self._track(+1)

        def done(f: asyncio.Future) -> None:
            if f.exception() is not None:
                self._error(rid, P.E_INTERNAL, f"warm-up failed: {f.exception()}")
            else:
                nbytes, secs = f.result()
                self._send({"id": rid, "ok": True, "bytes": nbytes, "seconds": round(secs, 6)})
            self._track(-1)

        fut.add_done_callback(done)


def _y_bytes(y: np.ndarray, acc: str) -> bytes:
    return np.ascontiguousarray(y, dtype="<f8" if acc == "f64" else "<f4").tobytes()
