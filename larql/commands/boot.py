"""`larql boot`: the container entrypoint (larql/deploy.py does the work)."""

from __future__ import annotations

from ..deploy import boot_main as main

__all__ = ["add_parser", "main"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "boot",
        help="container entrypoint: check the environment, download/repair the vindex, exec the server",
        description="Reads EXPERTS, LAYERS, WARMUP, HF_REPO, HF_REVISION, HF_TOKEN, VINDEX_PATH, "
                    "PULL_PRESET, VERIFY, HOST, PORT, THREADS, WORKERS, LARQL_API_KEY, API_KEY_FILE, "
                    "TLS_CERT, TLS_KEY, ALLOW_ANONYMOUS, LOG_LEVEL (see docs/DEPLOY.md), downloads only "
                    "what the volume lacks, then execs `larql serve`.",
    )
    p.add_argument("--dry-run", action="store_true",
                   help="prepare the vindex and print the server command instead of running it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
