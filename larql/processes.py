"""Expert servers as child processes on loopback, for the demo, the benchmarks and the tests.

    port = free_port()
    srv = ServerProcess(vindex_path, "0-63", port, log_path)   # `larql serve` in a child
    srv.wait_ready(); ...; srv.stop()
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`larql serve` in a child process on a loopback port; stopped with SIGTERM."""

    def __init__(self, vindex: Path, experts: str, port: int, log_path: Path, *, threads: int = 1,
                 warmup: bool = True, extra: tuple[str, ...] = ()) -> None:
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "larql", "serve", str(vindex), "--experts", experts,
               "--host", "127.0.0.1", "--port", str(port), *extra]
        if threads:
            cmd += ["--threads", str(threads)]
        if warmup:
            cmd.append("--warmup")
        # The child imports this very larql, installed or not, from whatever directory.
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        # Servers here share the cores with the client: idle kernel threads must not spin
        # (see docs/DEPLOY.md); an explicit LARQL_SPIN_US still wins.
        env.setdefault("LARQL_SPIN_US", "0")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"expert server on port {self.port} exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"expert server on port {self.port} did not start within {timeout:g}s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
