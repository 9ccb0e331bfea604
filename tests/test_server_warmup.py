"""`larql serve --warmup` faults in the owned experts and nothing else (mincore + the server's RSS)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from larql.demo import build_demo_vindex, demo_config
from larql.vindex import open_vindex

E = 16


def drop_page_cache(path: Path) -> None:
    """Evict one file's clean pages (this file only; nothing else on the machine is touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mapped_rss(pid: int, name_part: str) -> int:
    """Resident bytes of the mappings of files whose path contains name_part (from smaps)."""
    total, current = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = len(head) >= 6 and name_part in head[-1]
        elif current and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory):
    # f32 experts of ~1 MiB each: every expert spans hundreds of pages
    cfg = demo_config(num_layers=2, hidden=256, num_experts=E, top_k=2)
    return build_demo_vindex(tmp_path_factory.mktemp("warm") / "v", quant="f32", config=cfg)


@pytest.mark.parametrize("owned_text, OWNED, UNOWNED", [("0-7", range(0, 8), range(8, 16)),
                                                       ("8-15", range(8, 16), range(0, 8))])
def test_warmup_faults_owned_experts_only(vindex_path, owned_text, OWNED, UNOWNED):
    vindex = open_vindex(vindex_path)
    files = [vindex.expert_file(layer) for layer in vindex.layers_present]
    owned_bytes = sum(ef.entry(e).down_off + ef.entry(e).down_len - ef.entry(e).gate_up_off
                      for ef in files for e in OWNED)
    for ef in files:
        drop_page_cache(ef.path)
    assert max(ef.resident(list(range(E))) for ef in files) < 0.05, "page cache could not be dropped"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "larql", "serve", str(vindex_path), "--experts", owned_text, "--warmup",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
        # the page cache (mincore) holds the owned experts and not the others
        for ef in files:
            assert ef.resident(list(OWNED)) > 0.99
            assert ef.resident(list(UNOWNED)) < 0.02
        # the server's own resident memory for the expert files is the owned bytes (+ page rounding)
        rss = mapped_rss(proc.pid, "/layers/layer_")
        # slack: page rounding at expert edges, and the header/offset-table page each file's
        # reader parses (plus the kernel's fault-around next to it)
        slack = 2 * 4096 * len(OWNED) * len(files) + 192 * 1024
        assert owned_bytes * 0.99 <= rss <= owned_bytes + slack, (rss, owned_bytes)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    log = out.decode()
    assert proc.returncode == 0, log
    assert "warm-up:" in log and "faulted" in log
    # the page cache was dropped first: the disk's sequential rate is measured in the same run
    assert "the disk reads sequentially at" in log and "warm-up/disk = " in log
