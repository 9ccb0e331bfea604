"""`--speculate` as users reach it: `larql run` (a subprocess), `larql.api`, and `larql bench wan`
(real expert servers behind real delay proxies on loopback, tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from larql import api
from larql.vindex.extract import extract

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vindex_path(tiny_checkpoint, tmp_path_factory) -> Path:
    _, ckpt = tiny_checkpoint("small", 0)
    return extract(ckpt, tmp_path_factory.mktemp("spec-cli") / "m.vindex", quant="f32", progress=False)


def larql(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "larql", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_run_speculate_json_is_identical_to_off_and_reports_drafts(vindex_path):
    base = ["run", str(vindex_path), "abcabcabcabc", "-n", "20", "--json"]
    off = larql(*base)
    assert off.returncode == 0, off.stderr
    off_out = json.loads(off.stdout)
    assert off_out["stats"]["speculate"] == "off"
    for extra in (["--speculate", "4"], ["--speculate", "6", "--draft", "batch"], ["--speculate", "auto"]):
        r = larql(*base, *extra)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["tokens"] == off_out["tokens"], extra
        stats = out["stats"]
        assert {"round_trips", "tokens_per_round_trip", "speculate"} <= set(stats)
        if extra[1] != "auto":        # auto is off with the experts in process
            assert stats["speculate"] == extra[1]
            assert {"drafted", "accepted", "decode_passes", "drafter"} <= set(stats)
            assert 0 <= stats["accepted"] <= stats["drafted"]
        else:
            assert stats["speculate"] == "off"


@pytest.mark.parametrize("value", ["sometimes", "-2", "1000"])
def test_run_rejects_a_bad_speculate_value(vindex_path, value):
    r = larql("run", str(vindex_path), "hi", "-n", "2", "--speculate", value)
    assert r.returncode != 0
    assert "--speculate" in r.stderr and value in r.stderr
    assert "Traceback" not in r.stderr


def test_api_speculate_argument(vindex_path):
    with api.load(vindex_path) as m:
        off = m.generate_ids("xyzxyzxyz", max_tokens=16)
        spec = m.generate_ids("xyzxyzxyz", max_tokens=16, speculate=8)
        assert spec == off
        s = m.last.stats
        assert s.speculate == "8" and s.drafter == "lookup" and s.speculation["decode_passes"] >= 1
        text = m.generate("xyzxyzxyz", max_tokens=16, speculate=3, draft="batch")
        assert m.last.tokens == off and isinstance(text, str)


def test_bench_wan_json_through_delay_proxies():
    r = larql("bench", "wan", "--layers", "2", "--rtt", "4", "--tokens", "8", "--shards", "2",
              "--modes", "exact,batch,lookup,auto", "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["greedy_speculative_tokens_identical"] is True
    assert report["measured_rtt_ms"] >= 4.0          # the proxies really delay
    rows = report["texts"]["repeated"]
    assert set(rows) == {"exact", "batch", "lookup", "auto"}
    assert rows["exact"]["vs_exact"] == 1.0
    assert rows["lookup"]["same_tokens_as_exact"] and rows["auto"]["same_tokens_as_exact"]
    # exact decoding: one request per shard per layer per token; batch: one per shard per token
    assert rows["exact"]["round_trips_per_token"] == pytest.approx(2 * 2)
    assert rows["batch"]["round_trips_per_token"] == pytest.approx(2)
    assert rows["lookup"]["round_trips_per_token"] <= rows["exact"]["round_trips_per_token"]
    assert set(report["texts"]) == {"repeated", "varied"}


def test_bench_wan_rejects_an_unknown_mode():
    r = larql("bench", "wan", "--modes", "exact,telepathy")
    assert r.returncode != 0 and "telepathy" in r.stderr
