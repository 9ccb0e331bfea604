"""`larql run` as a user runs it: a subprocess on a tiny f32 vindex."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from larql.generate import generate
from larql.models.gemma4 import Gemma4Model
from larql.processes import free_port
from larql.sampling import Sampler
from larql.tokenizer import TextTokenizer
from larql.vindex import open_vindex
from larql.vindex.extract import extract

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vindex_path(tiny_checkpoint, tmp_path_factory) -> Path:
    _, ckpt = tiny_checkpoint("small", 0)
    return extract(ckpt, tmp_path_factory.mktemp("run") / "m.vindex", quant="f32", progress=False)


def larql_run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "larql", "run", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=120)


def test_json_output_shape_and_seed_determinism(vindex_path):
    args = [str(vindex_path), "Hello there", "-n", "12", "--json", "--temperature", "0.9", "--top-k", "50",
            "--seed", "7", "--logprobs", "3"]
    a, b = larql_run(*args), larql_run(*args)
    assert a.returncode == 0, a.stderr
    out = json.loads(a.stdout)
    assert _same_but_timing(out, json.loads(b.stdout))
    assert set(out) >= {"prompt_tokens", "prompt_ids", "tokens", "text", "stats", "logprobs"}
    assert out["prompt_tokens"] == len(out["prompt_ids"]) and out["prompt_ids"][0] == 2  # BOS first
    assert len(out["tokens"]) == len(out["logprobs"]) <= 12
    for step, tok in zip(out["logprobs"], out["tokens"], strict=True):
        assert step["token"] == tok and len(step["top"]) == 3
        lps = [lp for _, lp in step["top"]]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
    assert out["stats"]["generated_tokens"] == len(out["tokens"])
    # The same seed in process draws the same tokens; another seed (almost surely) does not.
    vindex = open_vindex(vindex_path)
    tok = TextTokenizer.from_vindex(vindex)
    want = [s.token for s in generate(Gemma4Model(vindex), out["prompt_ids"], 12,
                                      Sampler(0.9, 50, 1.0, 7), stop_ids=tok.stop_ids)]
    assert out["tokens"] == want
    other = json.loads(larql_run(*args[:-4], "--seed", "8").stdout)
    assert other["tokens"] != out["tokens"]


def _same_but_timing(a: dict, b: dict) -> bool:
    strip = ("prefill_ms", "prefill_tok_s", "decode_ms", "decode_tok_s")
    sa = {k: v for k, v in a["stats"].items() if k not in strip}
    sb = {k: v for k, v in b["stats"].items() if k not in strip}
    return {**a, "stats": sa} == {**b, "stats": sb}


def test_streamed_text_equals_json_text_and_stats_on_stderr(vindex_path):
    streamed = larql_run(str(vindex_path), "Hi", "-n", "10")
    js = json.loads(larql_run(str(vindex_path), "Hi", "-n", "10", "--json").stdout)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == js["text"] + "\n"
    assert "prompt 3 tok" in streamed.stderr and "decode" in streamed.stderr


def test_chat_stdin_and_batch_dispatch(vindex_path):
    r = larql_run(str(vindex_path), "-", "-n", "4", "--json", "--chat", "--moe-dispatch", "batch",
                  stdin="What is 2+2?")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tok = TextTokenizer.from_vindex(open_vindex(vindex_path))
    assert out["prompt_ids"] == tok.encode_chat("What is 2+2?")
    assert out["prompt_ids"].count(2) == 1  # the template's BOS, not a second one


def test_bad_input_is_a_clear_error(vindex_path, tmp_path):
    r = larql_run(str(tmp_path / "missing.vindex"), "x")
    assert r.returncode == 1 and "larql run: error:" in r.stderr and "missing.vindex" in r.stderr
    r = larql_run(str(vindex_path), "x", "--top-p", "0")
    assert r.returncode == 1 and "top_p" in r.stderr
    r = larql_run(str(vindex_path), "x", "--moe-dispatch", "fast")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import socket
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"expert server exited: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no expert server on port {port}")


def test_moe_shards_over_loopback_match_local_experts(vindex_path):
    """Two real `larql serve` processes, each owning half the experts: same tokens as in process,
    in exact and in batch dispatch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ports, procs = [free_port(), free_port()], []
    try:
        for port, experts in zip(ports, ("0-3", "4-7"), strict=True):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "larql", "serve", str(vindex_path), "--experts", experts,
                 "--host", "127.0.0.1", "--port", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
        for port, proc in zip(ports, procs, strict=True):
            _wait_listening(port, proc)
        spec = f"0-3=127.0.0.1:{ports[0]},4-7=127.0.0.1:{ports[1]}"
        for dispatch in ("exact", "batch"):
            base = [str(vindex_path), "The capital of France is", "-n", "10", "--json",
                    "--moe-dispatch", dispatch]
            local = json.loads(larql_run(*base).stdout)
            remote = larql_run(*base, "--moe-shards", spec)
            assert remote.returncode == 0, remote.stderr
            assert json.loads(remote.stdout)["tokens"] == local["tokens"], dispatch
        # A shard map that leaves experts unserved is refused before any work.
        r = larql_run(str(vindex_path), "x", "--moe-shards", f"0-3=127.0.0.1:{ports[0]}")
        assert r.returncode == 1 and "4-7" in r.stderr
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
