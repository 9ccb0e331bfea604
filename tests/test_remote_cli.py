"""The user's path end to end: `larql serve` processes and `larql run --moe-shards` (--json)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from larql.demo import build_demo_vindex, demo_config
from larql.processes import ServerProcess, free_port


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    path = build_demo_vindex(tmp / "v", config=demo_config(num_layers=3, num_experts=8, top_k=2))
    servers = [ServerProcess(path, rng, free_port(), tmp / f"s{i}.log", threads=1)
               for i, rng in enumerate(("0-3", "4-7"))]
    try:
        for s in servers:
            s.wait_ready()
        yield path, f"0-3=127.0.0.1:{servers[0].port},4-7=tcp://127.0.0.1:{servers[1].port}", servers
    finally:
        for s in servers:
            s.stop()


def run(*args):
    return subprocess.run([sys.executable, "-m", "larql", "run", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_run_with_moe_shards_matches_in_process(served):
    path, spec, _ = served
    local = run(path, "Hello there", "-n", "10", "--json")
    remote = run(path, "Hello there", "-n", "10", "--json", "--moe-shards", spec)
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["prompt_tokens"] == b["prompt_tokens"]
    assert b["tokens"] == a["tokens"] and len(b["tokens"]) == 10
    batch = run(path, "Hello there", "-n", "4", "--json", "--moe-shards", spec, "--moe-dispatch", "batch")
    assert batch.returncode == 0, batch.stderr
    assert len(json.loads(batch.stdout)["tokens"]) == 4


@pytest.mark.parametrize("spec_fn, needle", [
    (lambda spec, p: spec.split(",")[0], "leaves experts 4-7 unserved"),
    (lambda spec, p: f"0-7=127.0.0.1:{p}", "does not hold experts 4-7"),
    (lambda spec, p: "0-3=127.0.0.1:1,4-7=127.0.0.1:1", "cannot connect"),
    (lambda spec, p: "0-7=http://expert.example", "use tls:// or https:// for TLS"),
])
def test_run_with_bad_shards_fails_before_generating(served, spec_fn, needle):
    path, spec, servers = served
    out = run(path, "Hi", "-n", "2", "--moe-shards", spec_fn(spec, servers[0].port))
    assert out.returncode == 1
    assert needle in out.stderr, out.stderr
    assert out.stdout == ""
