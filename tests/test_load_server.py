"""Load: 50 concurrent clients against one `larql serve` process for a bounded time. Zero
errors, every answer bit-identical to in-process experts, the server's RSS flat after warm-up;
latency p50/p99 printed (measured, not asserted)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from rawwire import connect, read_frame

from larql import protocol as P
from larql.demo import build_demo_vindex, demo_config
from larql.experts import LocalExperts
from larql.processes import ServerProcess, free_port
from larql.vindex import open_vindex

CLIENTS = 50
SECONDS = 6.0
E, K, H = 16, 4, 256


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory):
    cfg = demo_config(num_layers=2, hidden=H, num_experts=E, top_k=K)
    return build_demo_vindex(tmp_path_factory.mktemp("load") / "v", quant="q4k", config=cfg)


def test_fifty_clients_no_errors_flat_rss(vindex_path, tmp_path):
    vindex = open_vindex(vindex_path)
    local = LocalExperts(vindex)
    rng = np.random.default_rng(0)
    cases = []
    for i in range(32):   # mostly decode steps, some small prefills
        T = 1 if i % 8 else 6
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
        w = rng.random((T, K)).astype(np.float32)
        layer = i % 2
        want = local.forward(layer, x, ids, w).astype("<f4").tobytes()
        cases.append((P.encode_work(layer, x, ids, w), want))

    proc = ServerProcess(vindex_path, f"0-{E - 1}", free_port(), tmp_path / "server.log", threads=1)
    errors: list[str] = []
    lat: list[float] = []
    counts = [0] * CLIENTS
    rss: list[int] = []
    try:
        proc.wait_ready()
        stop = threading.Event()

        def client(n: int) -> None:
            try:
                with connect("127.0.0.1", proc.port, timeout=30) as s:
                    i = n
                    while not stop.is_set():
                        item, want = cases[i % len(cases)]
                        t0 = time.perf_counter()
                        s.sendall(P.encode_frame({"op": "experts", "id": i, **item}))
                        r = read_frame(s)
                        lat.append(time.perf_counter() - t0)
                        if r.get("id") != i or not r.get("ok") or r.get("y") != want:
                            errors.append(f"client {n}: {str(r)[:200]}")
                            return
                        counts[n] += 1
                        i += CLIENTS
            except Exception as e:  # reported below
                errors.append(f"client {n}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        t_end = time.monotonic() + SECONDS
        time.sleep(1.5)                         # warm-up: buffers, pools, allocator arenas
        while time.monotonic() < t_end:
            rss.append(rss_bytes(proc.proc.pid))
            time.sleep(0.25)
        stop.set()
        for t in threads:
            t.join(30)
        assert proc.proc.poll() is None, "server died"
    finally:
        proc.stop()

    assert not errors, errors[:5]
    assert all(counts), counts                  # every client was served (none starved)
    growth = rss[-1] - rss[0]
    assert growth < 16 << 20, (f"server RSS grew {growth / 2**20:.1f} MiB under steady load",
                               [r >> 20 for r in rss])
    ms = np.array(lat) * 1e3
    print(f"\nload: {CLIENTS} clients x {SECONDS:g} s: {len(lat):,} requests, 0 errors; "
          f"latency p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms; "
          f"server RSS {rss[0] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB")
