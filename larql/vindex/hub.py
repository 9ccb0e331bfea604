"""`larql pull` / `larql publish`: a vindex to and from the Hugging Face Hub.

Only the documented huggingface_hub calls: `snapshot_download(allow_patterns=...)` to fetch the
files a preset needs, `create_repo` + `upload_folder` to publish. The endpoint follows
`HF_ENDPOINT` like every huggingface_hub program (tests point it at a local stand-in).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from . import format as fm
from .format import VindexError
from .slicing import ALIASES, PRESETS, preset_patterns, slice_vindex


class HubError(VindexError):
    """The Hub could not be reached, or refused (no such repository, no access, a server error)."""


@contextlib.contextmanager
def _hub_errors(what: str) -> Iterator[None]:
    """huggingface_hub's exceptions as one HubError line naming the endpoint (not a traceback)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no such repository on {constants.ENDPOINT}, or no access to it "
                       "(set HF_TOKEN for a private one)") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: no such revision on {constants.ENDPOINT}") from None
    except (HTTPError, OSError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = f"HTTP {status}" if status else (str(e).splitlines() or [type(e).__name__])[0]
        raise HubError(f"{what}: the Hub at {constants.ENDPOINT} failed ({why}); "
                       "check the network, HF_ENDPOINT and HF_TOKEN") from None


def pull(
    repo: str,
    out: str | os.PathLike,
    *,
    preset: str = "all",
    layers: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    experts: str | None = None,
) -> Path:
    """Download the files of `preset` (and, with `layers`, only those layer files) into `out`;
    with `experts`, each layer file holding only those experts (byte ranges: shard_pull.py).

    The repository is looked up first: snapshot_download alone, offline, returns whatever an
    existing `out` holds as if it had been pulled."""
    from huggingface_hub import HfApi, snapshot_download

    layer_ids = fm.parse_ranges(layers, None, "--layers")
    if experts is not None:
        from .shard_pull import pull_shard

        return pull_shard(repo, out, experts=fm.parse_ranges(experts, None, "--experts"), layers=layer_ids,
                          preset=preset, revision=revision, token=token)
    patterns = preset_patterns(preset, layer_ids)
    out = Path(out)
    with _hub_errors(f"pull {repo}"):
        HfApi(token=token).repo_info(repo, repo_type="model", revision=revision)
        path = snapshot_download(
            repo_id=repo,
            repo_type="model",
            revision=revision,
            local_dir=str(out),
            allow_patterns=patterns,
            token=token,
        )
    path = Path(path)
    if not (path / fm.INDEX_JSON).exists():
        raise VindexError(f"{repo}: has no {fm.INDEX_JSON}; not a vindex repository")
    # Opening validates what arrived (manifests against file sizes, index fields).
    from .reader import open_vindex

    open_vindex(path).close()
    return path


def slice_names(slices: str | None) -> list[str]:
    if slices is None or slices.strip().lower() in ("", "none"):
        return []
    names = [s.strip() for s in slices.split(",") if s.strip()]
    for n in names:
        if ALIASES.get(n, n) not in PRESETS or ALIASES.get(n, n) == "all":
            raise VindexError(
                f"unknown slice {n!r} (choose from {', '.join(p for p in PRESETS if p != 'all')} or none)"
            )
    return [ALIASES.get(n, n) for n in names]


def publish(
    folder: str | os.PathLike,
    repo: str,
    *,
    slices: str | None = "none",
    private: bool = False,
    token: str | None = None,
    message: str | None = None,
) -> list[str]:
    """Upload `folder` to `repo`; each named slice goes to its own repo `<repo>-<preset>`.
    Returns the repo ids written."""
    from huggingface_hub import HfApi

    from .reader import open_vindex

    folder = Path(folder)
    vindex = open_vindex(folder)  # refuse to publish something that does not open
    vindex.close()
    if "/" not in repo:
        raise VindexError(f"--repo {repo!r}: expected OWNER/NAME")
    api = HfApi(token=token)
    targets: list[tuple[str, Path]] = [(repo, folder)]
    tmp = None
    try:
        names = slice_names(slices)
        if names:
            tmp = Path(tempfile.mkdtemp(prefix="larql-publish-"))
            for name in names:
                targets.append(
                    (f"{repo}-{name}", slice_vindex(folder, tmp / name, preset=name, progress=False))
                )
        for repo_id, path in targets:
            with _hub_errors(f"publish {repo_id}"):
                api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
                api.upload_folder(
                    repo_id=repo_id,
                    repo_type="model",
                    folder_path=str(path),
                    commit_message=message or f"larql vindex ({path.name})",
                    ignore_patterns=["*.tmp-*", ".cache/*"],
                )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return [r for r, _ in targets]
