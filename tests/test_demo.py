"""`larql demo` end to end: real server processes, remote generation identical to in-process."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_matches_in_process():
    out = subprocess.run([sys.executable, "-m", "larql", "demo", "--max-tokens", "12"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "started 2 expert servers (processes)" in text
    assert re.search(r'--moe-shards "0-7=127\.0\.0\.1:\d+,8-15=127\.0\.0\.1:\d+"', text)
    assert "the 12 tokens are identical to a run with the experts in process" in text
    m = re.search(r"prefill of (\d+) prompt tokens: (\d+) round trips", text)
    assert m and int(m.group(2)) <= 2 * 4        # one request per shard per layer at most
    assert re.search(r"decode [\d.]+ tok/s", text)
    # both servers answered requests and reported their latency
    assert len(re.findall(r"server +\d+-\d+ @ 127\.0\.0\.1:\d+: [1-9]\d* requests", text)) == 2


def test_demo_batch_dispatch_in_process_servers():
    out = subprocess.run([sys.executable, "-m", "larql", "demo", "--max-tokens", "6", "--dispatch", "batch",
                          "--in-process", "--shards", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "started 4 expert servers (threads)" in out.stdout
    assert "batch dispatch is approximate" in out.stdout


def test_embedding_examples_run():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "examples"
    out = subprocess.run([sys.executable, str(root / "stream_tokens.py"), "--max-tokens", "6"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sync:  prompt" in out.stdout and "async: prompt" in out.stdout
    assert len(re.findall(r"server \d+-\d+ at 127\.0\.0\.1:\d+: [1-9]\d* requests", out.stdout)) == 2
    out = subprocess.run([sys.executable, str(root / "expert_client.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"\|remote - in-process\| max = ([\d.e+-]+) .* async == sync: True", out.stdout)
    assert m and float(m.group(1)) < 1e-4


def test_demo_keep_refuses_an_existing_dir_and_writes_only_there(tmp_path):
    parent = tmp_path / "parent"
    keep = parent / "kept.vindex"
    keep.mkdir(parents=True)
    (keep / "precious.txt").write_text("mine")
    demo = [sys.executable, "-m", "larql", "demo", "--max-tokens", "2", "--keep", str(keep)]
    out = subprocess.run(demo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "exists; pass --force" in out.stderr, out.stderr
    assert (keep / "precious.txt").read_text() == "mine"
    out = subprocess.run([*demo, "--force"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (keep / "index.json").exists() and not (keep / "precious.txt").exists()
    assert sorted(p.name for p in parent.iterdir()) == ["kept.vindex"]  # no server logs beside it
    assert not list(keep.glob("*.log"))
    fresh = parent / "new.vindex"
    out = subprocess.run([*demo[:-1], str(fresh)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and (fresh / "index.json").exists(), out.stderr
    out = subprocess.run([sys.executable, "-m", "larql", "demo", "--force"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "--force only applies with --keep" in out.stderr
