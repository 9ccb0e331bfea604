"""`larql pull` / `larql publish` against a local stand-in for the Hugging Face Hub API
(the `hub` fixture of tests/hub_standin.py: a real HTTP server on 127.0.0.1; huggingface_hub
runs unmodified)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import make_config

from larql.config import ModelConfig
from larql.vindex import VindexError, open_vindex, write_vindex
from larql.vindex.random_model import random_tensors
from larql.vindex.report import verify


@pytest.fixture(scope="module")
def vindex(tmp_path_factory):
    cfg = ModelConfig.from_hf(make_config("small").to_dict())
    out = tmp_path_factory.mktemp("hubsrc") / "m.vindex"
    from larql.tokenizer import byte_level_tokenizer

    write_vindex(
        out,
        cfg,
        random_tensors(cfg, 1),
        quant="f16",
        progress=False,
        tokenizer_json=byte_level_tokenizer().to_str().encode(),
    )
    return out


def test_publish_then_pull_presets(hub, vindex, tmp_path):
    from larql.vindex.hub import publish, pull

    repos = publish(vindex, "me/tiny-vindex", slices="expert-server,client")
    assert repos == ["me/tiny-vindex", "me/tiny-vindex-expert-server", "me/tiny-vindex-client"]
    local = sorted(str(p.relative_to(vindex)) for p in vindex.rglob("*") if p.is_file())
    assert sorted(hub.repos["me/tiny-vindex"]) == local
    assert "attn_weights.bin" not in hub.repos["me/tiny-vindex-expert-server"]
    assert "layers/layer_03.weights" in hub.repos["me/tiny-vindex-expert-server"]
    assert "layers/layer_03.weights" not in hub.repos["me/tiny-vindex-client"]
    assert ("POST", "/api/repos/create") in hub.calls

    # pull only what an expert server needs, and only two layers' expert files
    hub.downloads.clear()
    out = pull("me/tiny-vindex", tmp_path / "pulled", preset="expert-server", layers="1-2")
    got = set(hub.downloads)
    assert "attn_weights.bin" not in got and "layers/layer_00.weights" not in got
    assert {
        "index.json",
        "norms.bin",
        "embeddings.bin",
        "layers/layer_01.weights",
        "layers/layer_02.weights",
    } <= got
    pulled = open_vindex(out)
    src = open_vindex(vindex)
    assert np.array_equal(pulled.expert_file(2).gate_up(5), src.expert_file(2).gate_up(5))
    assert pulled.expert_fingerprint() == src.expert_fingerprint()

    # the full repo round-trips byte for byte (checksums hold)
    out2 = pull("me/tiny-vindex", tmp_path / "full")
    assert verify(out2, progress=False) == []


def test_cli_publish_and_pull(hub, vindex, tmp_path, capsys):
    from larql.cli import main as cli

    assert cli(["publish", str(vindex), "--repo", "me/cli-vindex"]) == 0
    assert "published me/cli-vindex" in capsys.readouterr().out
    assert cli(["pull", "me/cli-vindex", "-o", str(tmp_path / "p"), "--preset", "embed"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if p.is_file()) == [
        "embeddings.bin",
        "index.json",
        "tokenizer.json",
    ]
    with pytest.raises(SystemExit):  # argparse rejects an unknown preset before any download
        cli(["pull", "me/cli-vindex", "-o", str(tmp_path / "q"), "--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_pull_missing_repo_and_non_vindex(hub, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    from larql.vindex.hub import pull

    with pytest.raises((HfHubHTTPError, OSError, ValueError)):
        pull("me/absent", tmp_path / "x")
    hub.repos["me/notvindex"] = {"README.md": b"hello"}
    hub.commits["me/notvindex"] = "1" * 40
    with pytest.raises(VindexError, match="not a vindex"):
        pull("me/notvindex", tmp_path / "y")


def test_publish_refuses_bad_input(hub, vindex, tmp_path):
    from larql.vindex.hub import publish

    with pytest.raises(VindexError, match="OWNER/NAME"):
        publish(vindex, "noslash")
    with pytest.raises(VindexError, match="unknown slice"):
        publish(vindex, "me/x", slices="bogus")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VindexError, match="index.json"):
        publish(tmp_path / "empty", "me/x")
    assert "me/x" not in hub.repos


def _upload_raw(hub, repo: str, files: dict[str, bytes], commit: str) -> None:
    """Put files into the stand-in as they are (publish would refuse a bad vindex first)."""
    hub.repos[repo] = dict(files)
    hub.commits[repo] = commit


def _folder(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name, why", [("/etc/hostname", "absolute path"), ("../../outside.bin", "'..'")])
def test_pull_refuses_manifest_names_outside_the_folder(hub, vindex, tmp_path, name, why):
    import json

    from larql.vindex.hub import pull

    files = _folder(vindex)
    wm = json.loads(files["weight_manifest.json"])
    wm[0]["file"] = name
    files["weight_manifest.json"] = json.dumps(wm).encode()
    _upload_raw(hub, "me/evil", files, "2" * 40)
    with pytest.raises(VindexError, match=why) as ei:
        pull("me/evil", tmp_path / "evil")
    assert "inside the vindex folder" in str(ei.value) and "weight_manifest.json" in str(ei.value)


def test_pull_replaces_changed_files_by_rename(hub, vindex, tmp_path):
    """A second pull of a changed repo into a folder a server maps: the mapped old bytes stay
    readable (the file was renamed over, not rewritten in place) and the new bytes land."""
    from larql.vindex.hub import pull

    files = _folder(vindex)
    _upload_raw(hub, "me/moving", files, "3" * 40)
    out = pull("me/moving", tmp_path / "p")
    served = open_vindex(out)
    before = np.array(served.expert_file(1).gate_up(2))
    name = "layers/layer_01.weights"
    changed = bytearray(files[name])
    changed[-8:] = b"\x01" * 8  # a different last expert, same size
    _upload_raw(hub, "me/moving", {**files, name: bytes(changed)}, "4" * 40)
    pull("me/moving", tmp_path / "p")
    assert (out / name).read_bytes() == bytes(changed)
    assert np.array_equal(served.expert_file(1).gate_up(2), before)
    served.check_intact(1)
