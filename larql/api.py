"""Embedding larql in another Python program.

High level: load a model whose experts run in process or on expert servers, and stream text.

    import larql.api as lq

    with lq.load("gemma4-26b-a4b-q4k.vindex", shards="0-63=10.0.0.5:8080,64-127=10.0.0.6:8080") as m:
        for piece in m.stream("The capital of France is", max_tokens=20):
            print(piece, end="", flush=True)
        print(m.last.stats.summary())

    # asyncio: the forward passes run on a worker thread, the event loop stays free
    async for piece in m.astream("Hello", max_tokens=20): ...

Low level: send one layer's expert work to a shard map and get the summed result back.

    experts = lq.expert_client("0-63=a:8080,64-127=tls://b:8443", "gemma4.vindex", api_key_file="key")
    y = experts.forward(layer, h, ids, weights)      # raw weighted sum; apply the post-norm yourself

    client = await lq.async_expert_client(spec, vindex)   # the same, awaitable
    y = await client.forward(layer, h, ids, weights)

Connection keywords (load, expert_client, async_expert_client): `api_key` / `api_key_file`
(default: $LARQL_API_KEY; `api_key=""` forces none), `tls_ca` (default: $LARQL_TLS_CA, else the
system trust store), `connect_timeout`, `on_shard_failure` ("fail", or "renormalize": drop a
lost shard's experts and rescale the router weights, counted in stats as degraded_layers),
`accumulate` ("auto": f64 partial sums when the servers offer them), `encoding` ("auto": the
experts' own Q8_K input blocks for a Q4_K vindex, same result in 3.5x fewer bytes; f32 otherwise).

See examples/ for runnable programs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from .client import (
    DEFAULT_TIMEOUT,
    AsyncExpertClient,
    RemoteExperts,
    ShardError,
    async_client,
    connect_shards,
)
from .errors import LarqlError
from .generate import GenerationStats, generate
from .protocol import RemoteError
from .sampling import Sampler
from .shardmap import ShardSpecError
from .transport import AuthError

__all__ = ["Generation", "Model", "load", "expert_client", "async_expert_client",
           "ShardError", "ShardSpecError", "RemoteError", "AuthError", "LarqlError"]


def _open(vindex):
    from .vindex import open_vindex

    return open_vindex(vindex) if isinstance(vindex, (str, os.PathLike)) else vindex


@dataclass
class Generation:
    """The outcome of the last generation: ids, text and timings."""

    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def prefill_ms(self) -> float:
        return self.stats.prefill_ms

    @property
    def decode_tok_s(self) -> float:
        return self.stats.decode_tok_s


class Model:
    """A Gemma 4 model with its tokenizer, experts local or remote. Not thread-safe: one
    generation at a time (asyncio callers are serialised by a lock)."""

    def __init__(self, vindex, experts=None, dispatch: str = "exact") -> None:
        from . import models
        from .tokenizer import TextTokenizer

        self.vindex = _open(vindex)
        self.model = models.load(self.vindex, experts=experts, dispatch=dispatch)
        self.experts = self.model.experts
        self.tokenizer = TextTokenizer.from_vindex(self.vindex)
        self.last = Generation()
        self._lock: asyncio.Lock | None = None

    # --- synchronous ----------------------------------------------------------------------
    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def stream_ids(self, prompt: str | list[int], max_tokens: int = 64, *, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                   chat: bool = False, speculate: int | str = "off",
                   draft: str = "lookup") -> Iterator[int]:
        """Token ids as they are generated (greedy unless temperature > 0).

        speculate: "off", N or "auto": draft up to N tokens ("lookup": n-gram match on the text
        so far; "batch": batch dispatch) and verify them in one pass; greedy output is the same
        as "off", sampled output has the same distribution (see larql.speculative)."""
        ids = self.encode(prompt, chat)
        self.last = g = Generation(prompt_ids=ids)
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        for step in generate(self.model, ids, max_tokens, sampler, stop_ids=self.tokenizer.stop_ids,
                             stats=g.stats, speculate=speculate, drafter=draft):
            g.tokens.append(step.token)
            yield step.token
        if isinstance(self.experts, RemoteExperts):
            g.stats.extra["degraded_layers"] = self.experts.degraded_layers

    def stream(self, prompt: str | list[int], max_tokens: int = 64, **kw) -> Iterator[str]:
        """Text pieces as they become final (multi-token characters are held until complete)."""
        dec = self.tokenizer.streamer()
        for tid in self.stream_ids(prompt, max_tokens, **kw):
            piece = dec.add(tid)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail
        self.last.text = dec.text

    def generate(self, prompt: str | list[int], max_tokens: int = 64, **kw) -> str:
        return "".join(self.stream(prompt, max_tokens, **kw))

    def generate_ids(self, prompt: str | list[int], max_tokens: int = 64, **kw) -> list[int]:
        return list(self.stream_ids(prompt, max_tokens, **kw))

    # --- asyncio --------------------------------------------------------------------------
    async def astream(self, prompt: str | list[int], max_tokens: int = 64, **kw) -> AsyncIterator[str]:
        """`stream` for asyncio programs: generation runs on a worker thread; pieces arrive
        through a queue, so the event loop is never blocked by a forward pass."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            done = object()
            stop = threading.Event()

            def worker() -> None:
                try:
                    for piece in self.stream(prompt, max_tokens, **kw):
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                        if stop.is_set():
                            break
                    loop.call_soon_threadsafe(queue.put_nowait, done)
                except BaseException as e:  # handed to the awaiting side
                    loop.call_soon_threadsafe(queue.put_nowait, e)

            fut = loop.run_in_executor(None, worker)
            try:
                while True:
                    item = await queue.get()
                    if item is done:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                stop.set()       # a consumer that stops early ends the generation
                await fut

    async def agenerate(self, prompt: str | list[int], max_tokens: int = 64, **kw) -> str:
        return "".join([p async for p in self.astream(prompt, max_tokens, **kw)])

    # --- remote details -------------------------------------------------------------------
    @property
    def expert_round_trips(self) -> int:
        """Requests sent to expert servers so far (0 for in-process experts)."""
        return int(getattr(self.experts, "round_trips", 0))

    def server_stats(self) -> list[dict]:
        """Each expert server's `stats` (empty for in-process experts)."""
        return self.experts.stats() if isinstance(self.experts, RemoteExperts) else []

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(vindex, shards: str | None = None, *, dispatch: str = "exact", timeout: float = DEFAULT_TIMEOUT,
         encoding: str = "auto", **connection) -> Model:
    """A Model over a vindex (path or opened). shards: a `--moe-shards` map ("0-63=host:port,...");
    None runs the experts in process. dispatch: "exact" (per layer) or "batch" (one round trip
    per token, approximate). `connection`: the keywords listed at the top of this module."""
    vindex = _open(vindex)
    experts = (connect_shards(shards, vindex, timeout=timeout, encoding=encoding, **connection)
               if shards else None)
    try:
        return Model(vindex, experts=experts, dispatch=dispatch)
    except BaseException:
        if experts is not None:
            experts.close()
        raise


def expert_client(shards: str, vindex, *, timeout: float = DEFAULT_TIMEOUT,
                  encoding: str = "auto", **connection) -> RemoteExperts:
    """Synchronous low-level client: `.forward(layer, h, ids, weights)` -> summed raw expert output,
    `.forward_multi([...])`, `.stats()`, `.close()`."""
    return connect_shards(shards, _open(vindex), timeout=timeout, encoding=encoding, **connection)


async def async_expert_client(shards: str, vindex, *, timeout: float = DEFAULT_TIMEOUT,
                              encoding: str = "auto", **connection) -> AsyncExpertClient:
    """Connected asyncio low-level client on the running loop (await `.forward(...)`, `.close()`)."""
    client = async_client(shards, _open(vindex), timeout=timeout, encoding=encoding, **connection)
    return await client.connect()
