#!/usr/bin/env python3
"""Expert-server benchmarks as a script: same as `larql bench server` (see larql/benchmarks/server.py).

    python3 bench/bench_server.py [--what rtt|throughput|e2e|all] [--layers 2] [--vocab 262144] ...
    sudo python3 bench/netem.py      # exact vs batch dispatch behind a 45 ms round trip

Also a pytest-benchmark suite (`pytest bench/ --benchmark-only`): one layer's top-8 experts for
one token in process (the baseline) and through a `larql serve` child on loopback; the remote
benchmark records its p50 as a ratio of the baseline's in `extra_info`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pytest

from larql.benchmarks import server

_MEDIANS: dict[str, float] = {}


@pytest.fixture(scope="module")
def shapes():
    """A 2-layer vindex of 26B-A4B shapes (cached in the temp dir, as `larql bench server`)."""
    from larql.benchmarks import synthetic_vindex
    from larql.vindex import open_vindex

    path = synthetic_vindex(Path(tempfile.gettempdir()) / "larql-bench", 2, 4096)
    vindex = open_vindex(path)
    for layer in range(vindex.config.num_layers):
        vindex.expert_file(layer).prefault()
    return path, vindex, server.random_work(vindex.config, 64)


def _cycle(fn, works):
    it = iter(range(1 << 62))
    return lambda: fn(*works[next(it) % len(works)])


def test_one_layer_in_process(benchmark, shapes):
    from larql.experts import LocalExperts

    _, vindex, works = shapes
    benchmark.pedantic(_cycle(LocalExperts(vindex).forward, works), rounds=200, warmup_rounds=10)
    _MEDIANS["local"] = benchmark.stats.stats.median


def test_one_layer_loopback_server(benchmark, shapes, tmp_path):
    from larql.client import connect_shards

    path, vindex, works = shapes
    n = vindex.config.num_experts
    servers, spec = server.start_servers(path, [(0, n - 1)], 1, tmp_path)
    try:
        remote = connect_shards(spec, vindex)
        try:
            benchmark.pedantic(_cycle(remote.forward, works), rounds=200, warmup_rounds=10)
        finally:
            remote.close()
    finally:
        for s in servers:
            s.stop()
    if "local" in _MEDIANS:
        benchmark.extra_info["x in-process"] = round(benchmark.stats.stats.median / _MEDIANS["local"], 2)


def main() -> int:
    p = argparse.ArgumentParser(description=server.__doc__.splitlines()[0])
    server.add_arguments(p)
    return server.main(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
