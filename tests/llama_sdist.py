"""The pinned llama-cpp-python source archive, shared by the tests that read files it ships
(the real Gemma 4 vocabulary, llama.cpp's GGUF converter). Downloaded once, never built."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from pathlib import Path

SDIST_NAME, SDIST_VERSION = "llama-cpp-python", "0.3.36"
CACHE_ROOT = Path(os.environ.get("LARQL_TEST_CACHE", Path.home() / ".cache" / "larql-tests"))


def fetch_sdist() -> Path:
    """The pinned llama-cpp-python source archive, downloaded once into CACHE_ROOT.

    Its URL and sha256 come from PyPI's simple index (the JSON form, PEP 691) and the archive
    is fetched directly: `pip download` of an sdist prepares its metadata, which builds cmake
    from source (minutes on a cold machine)."""
    filename = f"{SDIST_NAME.replace('-', '_')}-{SDIST_VERSION}.tar.gz"
    dst = CACHE_ROOT / filename
    if dst.exists():
        return dst
    req = urllib.request.Request(f"https://pypi.org/simple/{SDIST_NAME}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    (entry,) = [f for f in files if f["filename"] == filename]
    want = entry["hashes"]["sha256"]
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(filename + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(entry["url"], timeout=300) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != want:
        tmp.unlink()
        raise RuntimeError(f"{entry['url']}: sha256 {digest.hexdigest()} is not the index's {want}")
    tmp.rename(dst)
    return dst
