"""Remote experts: the `Experts` interface over TCP (or TLS) to one or more expert servers.

    experts = connect_shards("0-63=10.0.0.5:8080,64-127=tls://10.0.0.6:8443", vindex)
    y = experts.forward(layer, h, ids, weights)      # raw weighted sum over all shards

A shard map names inclusive expert ranges; together they must cover every expert exactly once.
A range may list replicas (`0-63=a:8080|b:8080`) that share the load and take over each other's
work when one fails (policy.py). Each server's `hello` is checked against the local vindex
(expert-weights fingerprint, hidden size, expert/layer counts, owned ranges) before any work is
sent, after the API-key handshake when a key is set (core.handshake).

Per layer, each shard receives only its own (expert, weight) pairs, for all tokens at once (a
prefill is one request per shard per layer), all shards concurrently; the partial sums are added
in shard order, in f64 and rounded once when the servers offer f64 partial sums. The caller
applies post_feedforward_layernorm_2. `forward_multi` sends several layers in one `multi`
request per shard (batch dispatch: one round trip per token).

Modules: core.py (options, handshake, hello checks, planning and summing: no I/O), policy.py
(replica choice, backoff, deadline: no I/O), blocking.py (the decode path: blocking sockets, no
event loop), aio.py (the asyncio client for pipelined, concurrent use).
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

from ..experts import Pending
from ..shardmap import parse_shards
from .aio import AsyncExpertClient, Connection
from .blocking import BlockingConnection, BlockingExpertClient, retryable
from .core import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    ON_SHARD_FAILURE,
    BadReply,
    ClientOptions,
    ModelIdentity,
    ShardError,
    resolve_api_key,
)

__all__ = ["AsyncExpertClient", "BadReply", "BlockingConnection", "BlockingExpertClient", "ClientOptions",
           "Connection", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_TIMEOUT", "ModelIdentity", "ON_SHARD_FAILURE",
           "RemoteExperts", "ShardError", "async_client", "connect_shards", "make_options", "retryable"]


class RemoteExperts:
    """`Experts` backed by expert servers, on the blocking decode path (no event loop per
    layer). Connections stay open between calls; calls are serialised by a lock, so one
    RemoteExperts may be shared by threads (asyncio programs should prefer AsyncExpertClient)."""

    def __init__(self, client: BlockingExpertClient) -> None:
        self.client = client
        # Re-entrant: a Ctrl-C between `start` and `result` can leave a layer call uncollected
        # (its lock count held); the same thread must still be able to go on and to close.
        self._lock = threading.RLock()
        self._closed = False
        client.connect()

    @property
    def round_trips(self) -> int:
        return self.client.round_trips

    @property
    def degraded_layers(self) -> int:
        """Layer results computed without an unreachable shard (--on-shard-failure renormalize)."""
        return self.client.degraded_layers

    @property
    def accumulator(self) -> str:
        """'f64' when shards send f64 partial sums (rounded once here), else 'f32'."""
        return self.client.accumulator

    def forward(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        with self._lock:
            return self.client.forward(layer, h, ids, weights)

    def start(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> Pending:
        """Send now, sum at `result()` (which must be called: the client is reserved until then)."""
        self._lock.acquire()
        try:
            pending = self.client.start(layer, h, ids, weights)
        except BaseException:
            self._lock.release()
            raise

        def collect() -> np.ndarray:
            try:
                return pending.result()
            finally:
                self._lock.release()

        return Pending(collect)

    def forward_multi(self, work):
        with self._lock:
            return self.client.forward_multi(work)

    def stats(self) -> list[dict]:
        with self._lock:
            return self.client.stats()

    def ping(self, shard: int = 0) -> dict:
        """One `health` round trip (benchmarks: the protocol's floor)."""
        with self._lock:
            return self.client.ping(shard)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # another thread stuck with an uncollected call must not keep the sockets open forever
        held = self._lock.acquire(timeout=self.client.options.timeout)
        try:
            self.client.close()
        finally:
            if held:
                self._lock.release()

    def __enter__(self) -> RemoteExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: a forgotten client must not leave sockets open
        with contextlib.suppress(Exception):
            self.close()


class _Q8KInput:
    """quantize(layer, h) -> Q8_K bytes of pre_feedforward_layernorm_2(h), for encoding 'q8k';
    `norm_c(layer)` and `eps` let the C decode path do the same step itself."""

    def __init__(self, vindex) -> None:
        self.vindex = vindex
        self.eps = vindex.config.rms_norm_eps
        self._norms: dict[int, tuple[np.ndarray, object]] = {}

    def _norm(self, layer: int) -> tuple[np.ndarray, object]:
        got = self._norms.get(layer)
        if got is None:
            from .._kernels import ffi

            w = np.ascontiguousarray(self.vindex.norm(f"layers.{layer}.pre_feedforward_layernorm_2.weight"),
                                     dtype=np.float32)
            got = self._norms[layer] = (w, ffi.from_buffer("float[]", w))
        return got

    def __call__(self, layer: int, h: np.ndarray) -> np.ndarray:
        from .. import kernels

        return kernels.rms_norm_q8k(h, self._norm(layer)[0], self.eps)

    def norm_c(self, layer: int):
        """The layer's norm weight as a C float pointer (kept alive here)."""
        return self._norm(layer)[1]


def resolve_encoding(encoding: str, vindex) -> str:
    """"auto": "q8k" for a vindex of K-quant experts, whose kernels quantise their input to
    Q8_K anyway: the client sends those very blocks (3.2 KB a token at hidden 2816 instead of
    11 KB of f32) and the result is unchanged bit for bit; "f32" for float experts, where Q8_K
    would lose precision. Anything else is returned as it is (ClientOptions checks it)."""
    if encoding == "auto":
        return "q8k" if vindex.quant == "q4k" else "f32"
    return encoding


def make_options(*, timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 encoding: str = "f32", api_key: str | bytes | None = None,
                 api_key_file: str | os.PathLike | None = None, tls_ca: str | os.PathLike | None = None,
                 on_shard_failure: str = "fail", accumulate: str = "auto") -> ClientOptions:
    """ClientOptions with the key resolved: `api_key_file`, else `api_key`; `api_key=None` reads
    $LARQL_API_KEY, `api_key=""` forces no key. `tls_ca=None` reads $LARQL_TLS_CA."""
    return ClientOptions(timeout=timeout, connect_timeout=connect_timeout, encoding=encoding,
                         api_key=resolve_api_key(api_key, api_key_file), tls_ca=tls_ca,
                         on_shard_failure=on_shard_failure, accumulate=accumulate)


def async_client(spec: str, vindex, **options) -> AsyncExpertClient:
    """An unconnected AsyncExpertClient for a shard map (await `.connect()` on your loop).
    Keywords: those of `make_options`."""
    options["encoding"] = resolve_encoding(options.get("encoding", "auto"), vindex)
    opts = make_options(**options)
    shards = parse_shards(spec, vindex.config.num_experts, vindex.config.num_layers)
    quantize = _Q8KInput(vindex) if opts.encoding == "q8k" else None
    return AsyncExpertClient(shards, ModelIdentity.from_vindex(vindex), quantize=quantize, options=opts)


def connect_shards(spec: str, vindex, timeout: float = DEFAULT_TIMEOUT, **options) -> RemoteExperts:
    """Parse and validate a shard map, connect to every server (auth, TLS), check each hello
    against the local vindex; returns the synchronous Experts. All errors are raised before
    any work. Keywords: those of `make_options`."""
    options["encoding"] = resolve_encoding(options.get("encoding", "auto"), vindex)
    opts = make_options(timeout=timeout, **options)
    shards = parse_shards(spec, vindex.config.num_experts, vindex.config.num_layers)
    quantize = _Q8KInput(vindex) if opts.encoding == "q8k" else None
    return RemoteExperts(BlockingExpertClient(shards, ModelIdentity.from_vindex(vindex), opts, quantize))
