"""A local stand-in for the Hugging Face Hub API, for `larql pull`, `publish` and the boot.

A real HTTP server on 127.0.0.1 implementing the endpoints huggingface_hub's `create_repo`,
`upload_folder` (regular, non-LFS uploads), `snapshot_download`, `hf_hub_download` and
`get_hf_file_metadata` call, plus HTTP Range requests on file downloads (206 + Content-Range)
as the Hub's CDN serves them. The library itself runs unmodified with HF_ENDPOINT pointing at
it. It counts the bytes it serves per file, and can stall a download part-way (to kill the
client there: an interrupted download) or cut the connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.downloads: list[str] = []          # file names, one per GET of a file
        self.served: Counter[str] = Counter()   # body bytes sent per file name
        self.ranges: list[tuple[str, int, int]] = []  # (file, first, last) of each Range GET
        # file name -> body bytes after which a GET of it stops sending and waits for
        # `release` (then drops the connection): the client is killed meanwhile
        self.stall: dict[str, int] = {}
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.endpoint = ""

    def add_folder(self, repo: str, folder: Path) -> None:
        """A repo holding every file of `folder` (as `larql publish` would upload them)."""
        self.repos[repo] = {str(p.relative_to(folder)): p.read_bytes()
                            for p in sorted(folder.rglob("*")) if p.is_file()}
        h = hashlib.sha1(repo.encode())
        for name, data in sorted(self.repos[repo].items()):
            h.update(name.encode() + hashlib.sha1(data).digest())
        self.commits[repo] = h.hexdigest()

    def bytes_served(self, prefix: str = "") -> int:
        return sum(n for f, n in self.served.items() if f.startswith(prefix))


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _handler(hub: FakeHub):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", ctype="application/json", headers=None, head=False):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, code: int, obj, **kw):
            self._send(code, json.dumps(obj).encode(), **kw)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n)

        def _missing(self, repo):
            self._json(
                404, {"error": f"Repository {repo} not found"}, headers={"X-Error-Code": "RepoNotFound"}
            )

        def do_POST(self):
            path = urlparse(self.path).path
            hub.calls.append(("POST", path))
            body = self._body()
            if path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                hub.repos.setdefault(repo, {})
                hub.commits.setdefault(repo, "0" * 40)
                return self._json(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)$", path)
            if m:
                repo, what = m.group(1), m.group(2)
                if repo not in hub.repos:
                    return self._missing(repo)
                if what == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(
                        200,
                        {
                            "files": [
                                {
                                    "path": f["path"],
                                    "uploadMode": "regular",
                                    "shouldIgnore": False,
                                    "oid": None,
                                }
                                for f in files
                            ]
                        },
                    )
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        v = item["value"]
                        hub.repos[repo][v["path"]] = base64.b64decode(v["content"])
                sha = hashlib.sha1(json.dumps(sorted(hub.repos[repo])).encode() + body[:64]).hexdigest()
                hub.commits[repo] = sha
                return self._json(
                    200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{sha}", "commitOid": sha}
                )
            self._json(404, {"error": f"no route {path}"})

        def do_HEAD(self):
            self.do_GET(head=True)

        def do_GET(self, head: bool = False):
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.calls.append(("HEAD" if head else "GET", path))
            m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
            if m:
                repo = m.group(1)
                if repo not in hub.repos:
                    return self._missing(repo)
                return self._json(
                    200,
                    {
                        "id": repo,
                        "modelId": repo,
                        "sha": hub.commits[repo],
                        "private": False,
                        "siblings": [{"rfilename": f} for f in sorted(hub.repos[repo])],
                    },
                    head=head,
                )
            m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path)
            if m:
                repo = m.group(1)
                if repo not in hub.repos:
                    return self._missing(repo)
                entries = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in sorted(hub.repos[repo].items())
                ]
                dirs = sorted({f.rsplit("/", 1)[0] for f in hub.repos[repo] if "/" in f})
                entries += [{"type": "directory", "path": d, "size": 0, "oid": "0" * 40} for d in dirs]
                return self._json(200, entries, head=head)
            m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                repo, _, fname = m.groups()
                if repo not in hub.repos:
                    return self._missing(repo)
                data = hub.repos[repo].get(fname)
                if data is None:
                    return self._json(
                        404,
                        {"error": "entry not found"},
                        headers={"X-Error-Code": "EntryNotFound"},
                        head=head,
                    )
                return self._file(repo, fname, data, head)
            self._json(404, {"error": f"no route {path}"}, head=head)

        def _file(self, repo: str, fname: str, data: bytes, head: bool):
            headers = {"ETag": '"' + hashlib.sha1(data).hexdigest() + '"',
                       "X-Repo-Commit": hub.commits[repo], "Accept-Ranges": "bytes"}
            code, first, last = 200, 0, len(data) - 1
            rng = self.headers.get("Range")
            if rng and not head:
                m = _RANGE.match(rng.strip())
                if not m or (not m.group(1) and not m.group(2)):
                    return self._json(416, {"error": f"bad range {rng!r}"})
                if m.group(1):
                    first = int(m.group(1))
                    last = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
                else:  # suffix range: the last N bytes
                    first = max(0, len(data) - int(m.group(2)))
                if first > last or first >= len(data):
                    return self._send(416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
                code = 206
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                hub.ranges.append((fname, first, last))
            body = data[first : last + 1]
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) if head else len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                return
            hub.downloads.append(fname)
            cut = hub.stall.get(fname)
            if cut is not None and cut < len(body):
                del hub.stall[fname]
                self.wfile.write(body[:cut])
                self.wfile.flush()
                hub.served[fname] += cut
                hub.stalled.set()
                hub.release.wait(60)
                self.close_connection = True
                return
            self.wfile.write(body)
            hub.served[fname] += len(body)

    return H


def start_hub() -> tuple[FakeHub, ThreadingHTTPServer]:
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    return state, server


def hub_env(state: FakeHub, tmp_path: Path) -> dict[str, str]:
    """Environment for a child process (the boot) talking to the stand-in."""
    return {"HF_ENDPOINT": state.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
            "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, with this process's huggingface_hub pointed at it."""
    state, server = start_hub()
    import huggingface_hub.constants as C

    for k, v in hub_env(state, tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(C, "ENDPOINT", state.endpoint)
    monkeypatch.setattr(
        C, "HUGGINGFACE_CO_URL_TEMPLATE", state.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield state
    state.release.set()
    server.shutdown()
