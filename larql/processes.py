"""Expert servers as child processes on loopback, for the demo, the benchmarks and the tests.

    port = free_port()
    srv = ServerProcess(vindex_path, "0-63", port, log_path)   # `larql serve` in a child
    srv.wait_ready(); ...; srv.stop()

Children are started with `larql_command()`, not a bare `python -m larql`: that puts the
current directory first on sys.path, so run in a larql checkout after `pip install .` it
imported the source tree, which has no compiled `larql._kernels`, and every server died.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import LarqlError


class ServerStartError(LarqlError, RuntimeError):
    """A child expert server exited or did not listen in time (the message has its log's tail)."""


# For Pythons without -P (3.10): drop the '' entry `-c` puts first on sys.path, then run larql.
_BOOTSTRAP = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
              "sys.argv[0] = 'larql'; runpy.run_module('larql', run_name='__main__', alter_sys=True)")


def larql_command(*args: str) -> list[str]:
    """argv that runs `larql ARGS` in this interpreter without the current directory on sys.path.

    The child still honours PYTHONPATH (developers running from a source tree set it; see
    `child_env`)."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "larql", *args]
    return [sys.executable, "-c", _BOOTSTRAP, *args]


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with the directory this very larql was imported from first on
    PYTHONPATH: the child runs the same code, installed or not, from whatever directory."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def default_server_threads(servers: int) -> int:
    """Kernel threads for each of `servers` expert servers sharing this machine with a client."""
    return max(1, (os.cpu_count() or 1) // max(1, servers))


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
        cmd = larql_command("serve", str(vindex), "--experts", experts,
                            "--host", "127.0.0.1", "--port", str(port), *extra)
        if threads:
            cmd += ["--threads", str(threads)]
        if warmup:
            cmd.append("--warmup")
        env = child_env()
        # Servers here share the cores with the client: idle kernel threads must not spin
        # (see docs/DEPLOY.md); an explicit LARQL_SPIN_US still wins.
        env.setdefault("LARQL_SPIN_US", "0")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"expert server on port {self.port} exited with {self.proc.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise ServerStartError(f"expert server on port {self.port} did not start within {timeout:g}s")

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
