"""`larql boot` (`python -m larql.deploy`): the container entrypoint of an expert server.

It reads the environment contract below, checks every variable before downloading anything
(the expert and layer counts come from the repo's index.json, fetched first, or from the
vindex already on the volume), makes sure the vindex on the volume is complete and intact,
downloading only what is missing or bad, then execs `larql serve` (so SIGTERM reaches the
server, which finishes in-flight requests before exiting).

On boot:
  - no vindex (or an incomplete one: index.json is written last) -> pull, resuming whatever an
    interrupted earlier boot left (shard_pull.py); with EXPERTS set only those experts' bytes;
  - a vindex that does not hold EXPERTS / LAYERS, or came from another repo -> pull again;
  - otherwise check it (VERIFY=1: every file's sha256, as `larql verify`); files that fail are
    downloaded again, just those, and checked once more.

Every variable is optional; unset (or empty) ones add no flag to the server's command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_REPO = "chrishayuk/gemma-4-26b-a4b-it-vindex-expert-server"
DEFAULT_VINDEX_PATH = "/data/vindex"
DEFAULT_PORT = 8080
DEFAULT_PRESET = "experts"  # exactly what `larql serve` opens: index, manifests, norms.bin, layers/

# name -> (default shown in docs, meaning). docs/DEPLOY.md and deploy/fly/README.md list the
# same table; tests/test_deploy.py checks that they do.
VARIABLES: dict[str, tuple[str, str]] = {
    "EXPERTS": ("", "experts this shard owns and downloads, e.g. 0-63; empty: all"),
    "LAYERS": ("", "layers this shard owns and downloads, e.g. 0-14; empty: all"),
    "WARMUP": ("0", "1: read the owned experts into memory before opening the port"),
    "HF_REPO": (DEFAULT_REPO, "Hugging Face repo the vindex is pulled from"),
    "HF_REVISION": ("", "branch, tag or commit of HF_REPO; empty: main"),
    "HF_TOKEN": ("", "Hugging Face token (secret) for a private or gated repo"),
    "VINDEX_PATH": (DEFAULT_VINDEX_PATH, "where the vindex lives on the persistent volume"),
    "PULL_PRESET": (DEFAULT_PRESET, "files to pull: experts (what the server opens), expert-server or all"),
    "VERIFY": ("1", "1: check every file's sha256 at boot and repair bad ones; 0: structure only"),
    "HOST": ("", "listen address; empty: every IPv4 and IPv6 address"),
    "PORT": (str(DEFAULT_PORT), "TCP port"),
    "THREADS": ("", "kernel threads (`--threads`); empty: all cores"),
    "WORKERS": ("", "computations in flight (`--workers`); empty: the server's default (2)"),
    "LARQL_API_KEY": ("", "API key (secret) the server requires of clients; read by the server"),
    "API_KEY_FILE": ("", "file holding the API key instead (`--api-key-file`), e.g. a Docker secret"),
    "TLS_CERT": ("", "certificate file: the server speaks TLS itself (`--tls-cert`)"),
    "TLS_KEY": ("", "its private key file (`--tls-key`)"),
    "ALLOW_ANONYMOUS": ("0", "1: serve a non-loopback address without an API key (`--allow-anonymous`)"),
    "LOG_LEVEL": ("info", "debug, info, warning or error"),
    "LARQL_USER": ("larql", "the image's user: started as root, the boot gives it the volume and runs as it"),
}

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
PULL_PRESETS = ("experts", "expert-server", "all")  # the presets holding layers/
LOG_LEVELS = ("debug", "info", "warning", "error")


class BootError(ValueError):
    """A variable is wrong (every message names it) or the vindex cannot be made whole."""


@dataclass
class Settings:
    experts_text: str = ""
    layers_text: str = ""
    warmup: bool = False
    repo: str = DEFAULT_REPO
    revision: str | None = None
    vindex_path: Path = Path(DEFAULT_VINDEX_PATH)
    preset: str = DEFAULT_PRESET
    verify: bool = True
    host: str = ""
    port: int = DEFAULT_PORT
    threads: int | None = None
    workers: int | None = None
    api_key: bool = False
    api_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_anonymous: bool = False
    log_level: str = "info"
    experts: list[int] | None = field(default=None)
    layers: list[int] | None = field(default=None)


def log(msg: str) -> None:
    print(f"larql-boot: {msg}", file=sys.stderr, flush=True)


def _flag(env, name: str, errors: list[str]) -> bool:
    v = env.get(name, VARIABLES[name][0]).strip().lower()
    if v in TRUE:
        return True
    if v not in FALSE:
        errors.append(f"{name}={env[name]!r}: expected 1 or 0 (also true/false, yes/no, on/off)")
    return False


def _int(env, name: str, lo: int, hi: int, errors: list[str]) -> int | None:
    v = env.get(name, "").strip()
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        errors.append(f"{name}={v!r}: expected an integer in {lo}-{hi}")
        return None
    if not lo <= n <= hi:
        errors.append(f"{name}={v!r}: expected an integer in {lo}-{hi}")
        return None
    return n


def _ranges(env, name: str, errors: list[str]) -> tuple[str, list[int] | None]:
    from .vindex.format import parse_ranges

    v = env.get(name, "").strip()
    try:
        return v, parse_ranges(v, None, name)
    except ValueError as e:
        errors.append(f"{name}={v!r}: {str(e).split(': ', 1)[-1]}")
        return v, None


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_settings(env: dict[str, str] | None = None) -> Settings:
    """Every variable checked on its own (no network); raises BootError listing all that are bad."""
    env = dict(os.environ if env is None else env)
    errors: list[str] = []
    s = Settings()
    s.experts_text, s.experts = _ranges(env, "EXPERTS", errors)
    s.layers_text, s.layers = _ranges(env, "LAYERS", errors)
    s.warmup = _flag(env, "WARMUP", errors)
    s.verify = _flag(env, "VERIFY", errors)
    s.allow_anonymous = _flag(env, "ALLOW_ANONYMOUS", errors)
    s.repo = env.get("HF_REPO", "").strip() or DEFAULT_REPO
    if s.repo.count("/") != 1 or not all(s.repo.split("/")) or any(c.isspace() for c in s.repo):
        errors.append(f"HF_REPO={s.repo!r}: expected OWNER/NAME of a Hugging Face model repo")
    s.revision = env.get("HF_REVISION", "").strip() or None
    s.vindex_path = Path(env.get("VINDEX_PATH", "").strip() or DEFAULT_VINDEX_PATH)
    if not s.vindex_path.is_absolute():
        errors.append(f"VINDEX_PATH={str(s.vindex_path)!r}: expected an absolute path (on the volume)")
    elif s.vindex_path.exists() and not s.vindex_path.is_dir():
        errors.append(f"VINDEX_PATH={str(s.vindex_path)!r}: exists and is not a directory")
    else:
        parent = next((p for p in [s.vindex_path, *s.vindex_path.parents] if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK):
            errors.append(f"VINDEX_PATH={str(s.vindex_path)!r}: {parent} is not writable by this user "
                          f"(uid {os.getuid()}); the volume must belong to it")
    s.preset = env.get("PULL_PRESET", "").strip() or DEFAULT_PRESET
    if s.preset not in PULL_PRESETS:
        errors.append(f"PULL_PRESET={s.preset!r}: expected one of {', '.join(PULL_PRESETS)}")
    s.host = env.get("HOST", "").strip()
    port = _int(env, "PORT", 1, 65535, errors)
    s.port = DEFAULT_PORT if port is None else port
    s.threads = _int(env, "THREADS", 1, 4096, errors)
    s.workers = _int(env, "WORKERS", 0, 1024, errors)
    s.log_level = env.get("LOG_LEVEL", "").strip().lower() or "info"
    if s.log_level not in LOG_LEVELS:
        errors.append(f"LOG_LEVEL={s.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    s.api_key = bool(env.get("LARQL_API_KEY", "").strip())
    for name in ("API_KEY_FILE", "TLS_CERT", "TLS_KEY"):
        v = env.get(name, "").strip() or None
        if v is not None and not os.access(v, os.R_OK):
            errors.append(f"{name}={v!r}: no such readable file")
        setattr(s, name.lower(), v)
    if bool(s.tls_cert) != bool(s.tls_key):
        errors.append("TLS_CERT and TLS_KEY: set both (the certificate and its key) or neither")
    if s.api_key and s.api_key_file:
        errors.append("LARQL_API_KEY and API_KEY_FILE: set one of them, not both")
    if not (s.api_key or s.api_key_file or s.allow_anonymous or _is_loopback(s.host)):
        errors.append(f"HOST={s.host!r} is reachable from other machines but no API key is set: set "
                      "the secret LARQL_API_KEY (or API_KEY_FILE), or ALLOW_ANONYMOUS=1 to serve "
                      "without authentication (only on a private network)")
    if errors:
        raise BootError("bad environment:\n  " + "\n  ".join(errors))
    return s


def check_against_model(s: Settings, num_experts: int, num_layers: int, where: str) -> None:
    """EXPERTS and LAYERS against the model's counts (from index.json)."""
    errors = []
    for name, text, ids, limit, what in (("EXPERTS", s.experts_text, s.experts, num_experts, "experts"),
                                         ("LAYERS", s.layers_text, s.layers, num_layers, "layers")):
        if ids and ids[-1] >= limit:
            errors.append(f"{name}={text!r}: {ids[-1]} is outside the valid range 0-{limit - 1} "
                          f"(the model in {where} has {limit} {what})")
    if errors:
        raise BootError("bad environment:\n  " + "\n  ".join(errors))


def server_command(s: Settings) -> list[str]:
    """`larql serve ...` for these settings: unset variables add no flag."""
    cmd = [sys.executable, "-m", "larql", "serve", str(s.vindex_path),
           "--host", s.host, "--port", str(s.port)]
    if s.experts_text:
        cmd += ["--experts", s.experts_text]
    if s.layers_text:
        cmd += ["--layers", s.layers_text]
    if s.warmup:
        cmd.append("--warmup")
    if s.threads is not None:
        cmd += ["--threads", str(s.threads)]
    if s.workers is not None:
        cmd += ["--workers", str(s.workers)]
    if s.log_level != "info":
        cmd += ["--log-level", s.log_level]
    if s.api_key_file:
        cmd += ["--api-key-file", s.api_key_file]
    if s.tls_cert:
        cmd += ["--tls-cert", s.tls_cert, "--tls-key", str(s.tls_key)]
    if s.allow_anonymous:
        cmd.append("--allow-anonymous")
    return cmd


# ------------------------------------------------------------------------------------------
# The vindex on the volume


def _local_index(path: Path) -> dict | None:
    import json

    try:
        index = json.loads((path / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def _holds(index: dict, s: Settings, num_experts: int, num_layers: int) -> str | None:
    """Why the local vindex cannot serve these settings, or None if it can."""
    have_e = index.get("experts_present")
    have_e = set(range(num_experts)) if not isinstance(have_e, list) else {int(x) for x in have_e}
    have_l = index.get("layers_present")
    have_l = set(range(num_layers)) if not isinstance(have_l, list) else {int(x) for x in have_l}
    from .ranges import text as format_ranges

    if miss := sorted(set(s.experts or range(num_experts)) - have_e):
        return f"it does not hold experts {format_ranges(miss)}"
    if miss := sorted(set(s.layers or range(num_layers)) - have_l):
        return f"it does not hold layers {format_ranges(miss)}"
    origin = (index.get("slice") or {}).get("pulled_from") if isinstance(index.get("slice"), dict) else None
    if isinstance(origin, dict) and origin.get("repo") != s.repo:
        return f"it was pulled from {origin.get('repo')}, not HF_REPO={s.repo}"
    if isinstance(origin, dict) and s.revision and origin.get("revision") != s.revision:
        return f"it was pulled at revision {origin.get('revision')}, not HF_REVISION={s.revision}"
    return None


def problems(path: Path, full: bool, progress: bool = True) -> tuple[dict[str, str], str | None]:
    """(bad files -> why, structural error): sha256 of every recorded file when `full`, sizes and
    presence otherwise; then the vindex must open and every layer file's table parse."""
    from .vindex import open_vindex
    from .vindex.format import VindexError
    from .vindex.report import file_problems

    index = _local_index(path) or {}
    sums = index.get("checksums") or {}
    if full:
        bad = file_problems(path, sums, progress=progress)
    else:
        bad = {n: "missing" for n in sums if not (path / n).exists()}
    try:
        vindex = open_vindex(path)
        for layer in vindex.layers_present:
            vindex.expert_file(layer)
        vindex.close()
        structural = None
    except VindexError as e:
        structural = str(e)
        for name in sums:  # a structural error names its file: that one is bad too
            if name in structural and name not in bad:
                bad[name] = structural
    return bad, structural


def prepare(s: Settings, progress: bool = True) -> Path:
    """Make VINDEX_PATH a complete, intact vindex for these settings; returns its path."""
    from .config import ModelConfig
    from .vindex.shard_pull import pull_shard, remote_vindex

    path = s.vindex_path
    local = _local_index(path)
    remote = None
    if local is not None:
        try:
            cfg = ModelConfig.from_index(local)
        except Exception:  # an unreadable index: treat as incomplete
            local = None
    if local is None:
        log(f"no complete vindex at {path}; reading {s.repo}'s index.json")
        remote = _remote(s, remote_vindex)
        cfg = remote.config
        where = s.repo
    else:
        where = str(path)
    check_against_model(s, cfg.num_experts, cfg.num_layers, where)
    why = "no complete vindex there" if local is None else _holds(local, s, cfg.num_experts, cfg.num_layers)
    if why is None:
        bad, structural = problems(path, s.verify, progress)
        if not bad and structural is None:
            log(f"{path}: complete and intact ({'sha256 checked' if s.verify else 'structure checked'}); "
                "nothing to download")
            return path
        if not bad:
            raise BootError(f"{path}: {structural}")
        log(f"{path}: {len(bad)} bad file(s): " + "; ".join(f"{n}: {w}" for n, w in sorted(bad.items())))
        remote = remote or _remote(s, remote_vindex)
        # Repair what the volume holds (it may hold more than EXPERTS/LAYERS ask for): the same
        # selection as its pull, so only the bad files are fetched again.
        held = local.get("slice") if isinstance(local.get("slice"), dict) else {}
        pull_shard(remote, path, experts=local.get("experts_present") or s.experts,
                   layers=local.get("layers_present") or s.layers, preset=held.get("preset") or s.preset,
                   only=set(bad), progress=progress)
    else:
        log(f"pulling {s.repo} into {path} ({why}): experts {s.experts_text or 'all'}, "
            f"layers {s.layers_text or 'all'}, preset {s.preset}")
        remote = remote or _remote(s, remote_vindex)
        check_against_model(s, remote.config.num_experts, remote.config.num_layers, s.repo)
        pull_shard(remote, path, experts=s.experts, layers=s.layers, preset=s.preset, progress=progress)
    # What was just downloaded was hashed while pulling (against the repo's sha256 where it
    # records one); presence and structure are what is left to check.
    bad, structural = problems(path, False, progress)
    if bad or structural:
        raise BootError(f"{path}: still not intact after downloading: "
                        + "; ".join([*(f"{n}: {w}" for n, w in sorted(bad.items())), structural or ""]))
    log(f"{path}: downloaded and verified")
    return path


def _remote(s: Settings, remote_vindex):
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return remote_vindex(s.repo, s.revision, token=os.environ.get("HF_TOKEN") or None)
    except RepositoryNotFoundError:
        raise BootError(f"HF_REPO={s.repo!r}: repository not found (a private repo needs the secret "
                        "HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise BootError(f"HF_REVISION={s.revision!r}: no such revision in {s.repo}") from None
    except EntryNotFoundError:
        raise BootError(f"HF_REPO={s.repo!r}: has no index.json; not a vindex repository") from None
    except HfHubHTTPError as e:
        raise BootError(f"HF_REPO={s.repo!r}: {e}") from None


def drop_privileges(env: dict[str, str] | None = None) -> str | None:
    """Started as root with LARQL_USER set (the image): give the volume to that user, then
    become it, before anything else happens. fly.io mounts a fresh volume owned by root, and
    volumes written by older images hold root-owned files; the server never runs as root.
    Returns the user name switched to, or None (not root, or no LARQL_USER)."""
    import pwd

    env = os.environ if env is None else env
    user = env.get("LARQL_USER", "").strip()
    if os.getuid() != 0 or not user:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise BootError(f"LARQL_USER={user!r}: no such user in this image") from None
    target = Path(env.get("VINDEX_PATH", "").strip() or DEFAULT_VINDEX_PATH)
    if target.is_absolute():
        volume = target.parent
        volume.mkdir(parents=True, exist_ok=True)
        paths = [volume]
        if target.exists():
            paths.append(target)
            for root, dirs, files in os.walk(target):
                paths += [Path(root, n) for n in (*dirs, *files)]
        for p in paths:
            st = p.lstat()
            if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid):
                os.lchown(p, pw.pw_uid, pw.pw_gid)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = user
    return user


def boot_main(args: argparse.Namespace) -> int:
    from .vindex.format import VindexError

    try:
        if user := drop_privileges():
            where = os.environ.get("VINDEX_PATH") or DEFAULT_VINDEX_PATH
            log(f"running as {user} (uid {os.getuid()}); {where} and its volume belong to it")
        s = read_settings()
        prepare(s, progress=not args.quiet)
    except (BootError, VindexError) as e:
        log(f"error: {e}")
        return 2 if isinstance(e, BootError) and str(e).startswith("bad environment") else 1
    cmd = server_command(s)
    log("exec " + " ".join(repr(a) if not a or " " in a else a for a in cmd))
    if args.dry_run:
        return 0
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    """`python -m larql.deploy ...` is `larql boot ...`."""
    from .cli import main as cli_main

    return cli_main(["boot", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
