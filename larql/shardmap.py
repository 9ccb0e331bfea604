"""Shard maps: which expert server computes which experts (and layers), and each shard's share
of one layer's routing. Pure: no sockets, no event loop, so every rule is unit-tested alone.

    shards = parse_shards("0-63=10.0.0.5:8080,64-127=a:8080|b:8080", num_experts=128)
    part = split_work(ids, weights, shards[0].first, shards[0].last)

A shard map names inclusive expert ranges, optionally limited to a layer range
('0-127@0-14=a:1'), each with one or more replicas ('|'); together the entries must serve every
expert of every layer exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import ranges
from .errors import LarqlError


class ShardSpecError(LarqlError, ValueError):
    """A --moe-shards map is malformed, has gaps or overlaps, or names experts out of range."""


class Endpoint(NamedTuple):
    """One replica's address; `tls` says whether the connection is wrapped in TLS."""

    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tls://' if self.tls else ''}{host}:{self.port}"

    @property
    def where(self) -> str:
        """host:port, as messages name it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class ShardSpec:
    first: int
    last: int
    replicas: list[Endpoint]
    layers: tuple[int, int] | None = None   # inclusive layer range; None = every layer

    @property
    def label(self) -> str:
        lr = f"@{self.layers[0]}-{self.layers[1]}" if self.layers else ""
        return f"{self.first}-{self.last}{lr}"

    def serves(self, layer: int) -> bool:
        return self.layers is None or self.layers[0] <= layer <= self.layers[1]

    def __str__(self) -> str:
        return f"{self.label}=" + "|".join(str(e) for e in self.replicas)


TLS_DEFAULT_PORT = 443   # https://host without a port: a TLS-terminating proxy such as fly's


def parse_address(text: str) -> Endpoint:
    """'host:port', 'tcp://host:port', '[::1]:port' -> plain TCP; 'tls://host:port' and
    'https://host[:port]' (port 443 by default) -> TLS."""
    t = text.strip()
    scheme = "tcp"
    if "://" in t:
        scheme, t = t.split("://", 1)
        scheme = scheme.lower()
        if scheme == "http":
            raise ShardSpecError(f"address {text!r}: larql expert servers do not speak plain HTTP; "
                                 f"use tls:// or https:// for TLS, or host:port for plain TCP")
        if scheme not in ("tcp", "tls", "https"):
            raise ShardSpecError(f"address {text!r}: unknown scheme {scheme}://; write host:port or "
                                 f"tcp://host:port (plain TCP), tls://host:port or https://host (TLS)")
        host_part, slash, path = t.partition("/")
        if slash and path:
            raise ShardSpecError(f"address {text!r}: a shard address names a host and port, not a "
                                 f"path ({'/' + path!r})")
        t = host_part
    tls = scheme in ("tls", "https")
    if scheme == "https" and not _has_port(t):
        t = f"{t}:{TLS_DEFAULT_PORT}"
    host, port = _host_port(text, t)
    return Endpoint(host, port, tls)


def _has_port(t: str) -> bool:
    if t.startswith("["):
        return "]:" in t
    return ":" in t


def _host_port(text: str, t: str) -> tuple[str, int]:
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ShardSpecError(f"address {text!r}: expected [ipv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = t.rpartition(":")
        if not sep:
            raise ShardSpecError(f"address {text!r} has no port: expected host:port")
    if not host:
        raise ShardSpecError(f"address {text!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ShardSpecError(f"address {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ShardSpecError(f"address {text!r}: port {port} out of range")
    return host, port


def _int_range(text: str, entry: str, what: str) -> tuple[int, int]:
    try:
        lo, hi = ranges.split_span(text, f"{what} range")
    except ranges.RangeError as e:
        raise ShardSpecError(f"shard entry {entry!r}: {e}") from None
    if lo > hi:
        raise ShardSpecError(f"shard entry {entry!r}: {what} range start {lo} is after its end {hi}")
    return lo, hi


def parse_shards(spec: str, num_experts: int, num_layers: int | None = None) -> list[ShardSpec]:
    """'0-63=a:1,64-127=b:2|c:3' -> [ShardSpec], validated so that every layer's experts
    0..num_experts-1 are served exactly once.

    An entry may name a layer range, 'EXPERTS@LAYERS=ADDR' (e.g. '0-127@0-14=a:1,0-127@15-29=b:1'),
    for servers started with --layers. Without num_layers only the named layers are checked."""
    if not spec or not spec.strip():
        raise ShardSpecError("empty shard map: expected e.g. '0-63=host:port,64-127=host:port'")
    shards: list[ShardSpec] = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            raise ShardSpecError(f"shard map {spec!r} has an empty entry")
        rng, sep, addrs = entry.partition("=")
        if not sep or not addrs.strip():
            raise ShardSpecError(f"shard entry {entry!r}: expected RANGE=HOST:PORT (e.g. 0-63=10.0.0.5:8080)")
        rng, at, lrng = rng.strip().partition("@")
        first, last = _int_range(rng.strip(), entry, "expert")
        if first < 0 or last >= num_experts:
            raise ShardSpecError(
                f"shard entry {entry!r}: experts {first}-{last} outside 0-{num_experts - 1} "
                f"(the model has {num_experts} experts)")
        layers = None
        if at:
            layers = _int_range(lrng.strip(), entry, "layer")
            if layers[0] < 0 or (num_layers is not None and layers[1] >= num_layers):
                limit = f"0-{num_layers - 1}" if num_layers is not None else "0-"
                raise ShardSpecError(f"shard entry {entry!r}: layers {layers[0]}-{layers[1]} outside {limit}")
        replicas = [parse_address(a) for a in addrs.split("|")]
        shards.append(ShardSpec(first, last, replicas, layers))
    shards.sort(key=lambda s: (s.first, s.layers or (0, 0)))
    if num_layers is not None:
        check = range(num_layers)
    else:  # without the model's depth: every layer some entry names (or layer 0)
        check = sorted({0} | {x for s in shards if s.layers for x in range(s.layers[0], s.layers[1] + 1)})
    for layer in check:
        expect = 0
        at_layer = f" at layer {layer}" if any(s.layers for s in shards) else ""
        for s in (s for s in shards if s.serves(layer)):
            if s.first > expect:
                gap = ranges.text(list(range(expect, s.first)))
                raise ShardSpecError(f"shard map {spec!r} leaves experts {gap} unserved{at_layer}")
            if s.first < expect:
                raise ShardSpecError(f"shard map {spec!r}: range {s.label} overlaps an earlier range"
                                     f"{at_layer}")
            expect = s.last + 1
        if expect != num_experts:
            gap = ranges.text(list(range(expect, num_experts)))
            raise ShardSpecError(f"shard map {spec!r} leaves experts {gap} unserved{at_layer}")
    return shards


def split_work(ids: np.ndarray, weights: np.ndarray, first: int, last: int):
    """The part of one layer's routing a shard owning experts first..last computes.

    Returns (rows, ids_s, w_s) for the tokens with at least one owned expert, K compacted to the
    largest per-token count (slot order preserved, -1/0 padding), or None if nothing is owned.
    Called once per shard per layer per token, so it keeps numpy calls few."""
    mask = (ids >= first) & (ids <= last)
    if ids.shape[0] == 1:   # decode: one token
        sel = np.flatnonzero(mask[0])
        if sel.size == 0:
            return None
        if sel.size == ids.shape[1]:
            return _ROW0, ids, weights
        return _ROW0, ids[:, sel], weights[:, sel]
    counts = mask.sum(axis=1)
    rows = np.flatnonzero(counts)
    if rows.size == 0:
        return None
    if rows.size == ids.shape[0] and counts.min() == ids.shape[1]:
        return rows, ids, weights
    r, c = np.nonzero(mask)                      # row-major: slot order kept within a row
    slot = np.arange(r.size) - np.searchsorted(r, r)
    K = int(counts.max())
    ids_s = np.full((ids.shape[0], K), -1, dtype=np.int32)
    w_s = np.zeros((ids.shape[0], K), dtype=np.float32)
    ids_s[r, slot] = ids[r, c]
    w_s[r, slot] = weights[r, c]
    return rows, ids_s[rows], w_s[rows]


_ROW0 = np.zeros(1, dtype=np.int64)
