"""`larql pull --experts`: byte ranges of the owned experts only, against the Hub stand-in
(tests/hub_standin.py, real HTTP with Range requests), from repos written by `larql publish`
and from the reference's layout (LYRW v1 packed files, no larql fields in index.json)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from larql.demo import build_demo_vindex, demo_config
from larql.experts import LocalExperts
from larql.vindex import VindexError, open_vindex
from larql.vindex import format as fm
from larql.vindex.report import verify
from larql.vindex.shard_pull import STATE_FILE, TABLE_PROBE, pull_shard, remote_vindex
from larql.vindex.slicing import slice_vindex

E, L = 8, 2
LARQL_ONLY_FIELDS = ("layers_present", "experts_present", "expert_fingerprint", "slice", "larql_format")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    cfg = demo_config(num_layers=L, hidden=256, num_experts=E, top_k=2)
    return build_demo_vindex(tmp_path_factory.mktemp("shardsrc") / "v", quant="q4k", config=cfg)


@pytest.fixture(scope="module")
def reference_like(src, tmp_path_factory):
    """The same model as the reference writes it: v1 packed layer files, index without our fields."""
    from larql.vindex import write_vindex
    from larql.vindex.random_model import random_tensors

    cfg = open_vindex(src).config
    out = tmp_path_factory.mktemp("refsrc") / "v"
    write_vindex(out, cfg, random_tensors(cfg, 0), quant="q4k", lyrw_version=1, progress=False,
                 overwrite=True)
    index = json.loads((out / "index.json").read_text())
    for k in LARQL_ONLY_FIELDS:
        index.pop(k, None)
    (out / "index.json").write_text(json.dumps(index))
    return out


def layer_bytes(vx) -> int:
    return sum(s for n, s in vx.file_sizes().items() if n.startswith("layers/"))


def same_outputs(a, b, experts):
    rng = np.random.default_rng(1)
    H = a.config.hidden_size
    for layer in range(L):
        h = rng.standard_normal((3, H)).astype(np.float32)
        ids = rng.choice(experts, (3, 2)).astype(np.int32)
        w = rng.random((3, 2)).astype(np.float32)
        ya = LocalExperts(a, experts=experts).forward(layer, h, ids, w)
        yb = LocalExperts(b, experts=experts).forward(layer, h, ids, w)
        assert np.array_equal(ya, yb)


def test_shard_pull_of_a_published_vindex_is_the_slice(hub, src, tmp_path):
    from larql.vindex.hub import publish

    publish(src, "me/tiny")
    hub.served.clear()
    out = pull_shard("me/tiny", tmp_path / "shard", experts=list(range(4, 8)), preset="experts",
                     progress=False)
    assert verify(out, progress=False) == []
    ref = slice_vindex(src, tmp_path / "sliced", preset="experts", experts="4-7", progress=False)
    for layer in range(L):
        name = fm.layer_file(layer)
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    got, whole = open_vindex(out), open_vindex(src)
    assert got.experts_present == [4, 5, 6, 7] and got.layers_present == [0, 1]
    assert got.expert_fingerprint() == whole.expert_fingerprint()
    same_outputs(got, whole, [4, 5, 6, 7])
    # only the owned half of the layer files crossed the wire (+ each file's table probe)
    owned = sum(ent.end - ent.start for ly in range(L) for e in range(4, 8)
                for ent in [whole.expert_file(ly).entry(e)])
    table_probe = L * min(TABLE_PROBE, whole.expert_file(0).size)
    served = hub.bytes_served("layers/")
    assert owned <= served <= owned + table_probe + L * E * 4096
    assert served < 0.6 * layer_bytes(whole)
    # of the other files, only the small ones the server opens (norms, manifests, index)
    assert {n for n in hub.served if n.endswith(".bin")} == {fm.NORMS_BIN}


def test_shard_pull_of_the_reference_layout(hub, reference_like, tmp_path):
    hub.add_folder("ref/tiny-expert-server", reference_like)
    ref = open_vindex(reference_like)
    assert ref.expert_file(0).version == 1 and "expert_fingerprint" not in ref.index
    out = pull_shard("ref/tiny-expert-server", tmp_path / "a", experts=[0, 1, 2, 3], layers=[1],
                     progress=False)
    got = open_vindex(out)
    assert verify(out, progress=False) == []
    assert got.expert_file(1).version == 2 and got.layers_present == [1]
    assert not (out / fm.layer_file(0)).exists()
    # the fingerprint covers every layer of the repo, so it equals the client's full vindex
    assert got.expert_fingerprint() == ref.expert_fingerprint()
    rng = np.random.default_rng(2)
    h = rng.standard_normal((2, got.config.hidden_size)).astype(np.float32)
    ids, w = np.array([[0, 3], [2, 1]], np.int32), np.array([[0.3, 0.7], [0.5, 0.5]], np.float32)
    assert np.array_equal(LocalExperts(got, experts=[0, 1, 2, 3], layers=[1]).forward(1, h, ids, w),
                          LocalExperts(ref, experts=[0, 1, 2, 3]).forward(1, h, ids, w))
    # v1 packs experts back to back: the four owned ones are one range request per file
    assert len([r for r in hub.ranges if r[0] == fm.layer_file(1) and r[1] > 0]) == 1


def test_all_experts_downloads_layer_files_whole(hub, reference_like, tmp_path):
    hub.add_folder("ref/whole", reference_like)
    out = pull_shard("ref/whole", tmp_path / "w", progress=False)
    for layer in range(L):
        name = fm.layer_file(layer)
        assert (out / name).read_bytes() == (reference_like / name).read_bytes()
    assert verify(out, progress=False) == []
    assert open_vindex(out).expert_fingerprint() == open_vindex(reference_like).expert_fingerprint()


def test_resume_fetches_only_what_is_missing(hub, src, tmp_path):
    hub.add_folder("me/resume", src)
    full = pull_shard("me/resume", tmp_path / "full", experts=list(range(0, 6)), progress=False)
    name = fm.layer_file(1)
    want = (full / name).read_bytes()
    # a pull killed part-way: state written, layer 0 done, layer 1 half written, no index.json
    part = tmp_path / "resumed"
    shutil.copytree(full, part)
    (part / "index.json").unlink()
    (part / name).unlink()
    cut = len(want) // 2 + 12345
    (part / (name + ".part")).write_bytes(want[:cut])
    hub.served.clear()
    pull_shard("me/resume", part, experts=list(range(0, 6)), progress=False)
    assert (part / name).read_bytes() == want
    assert not (part / (name + ".part")).exists()
    resumed = hub.served[name] - TABLE_PROBE
    assert resumed <= len(want) - cut + (1 << 20)  # from the last whole MiB written
    assert hub.served[fm.layer_file(0)] <= TABLE_PROBE  # done before: only its table was read again
    assert verify(part, progress=False) == []
    # another expert set: the partial state is not reused
    state = json.loads((part / STATE_FILE).read_text())
    assert state["key"]["experts"] == "0-5"
    pull_shard("me/resume", part, experts=[6, 7], progress=False)
    assert open_vindex(part).experts_present == [6, 7]
    assert verify(part, progress=False) == []


def test_repair_only_refetches_the_named_file(hub, src, tmp_path):
    hub.add_folder("me/repair", src)
    out = pull_shard("me/repair", tmp_path / "r", experts=[1, 2], progress=False)
    name = fm.layer_file(0)
    good = (out / name).read_bytes()
    (out / name).write_bytes(good[: len(good) // 3])  # truncated
    bad = (out / fm.NORMS_BIN).read_bytes()
    (out / fm.NORMS_BIN).write_bytes(bytes([bad[0] ^ 1]) + bad[1:])  # one flipped bit
    problems = verify(out, progress=False)
    assert any(name in p for p in problems) and any(fm.NORMS_BIN in p for p in problems)
    hub.served.clear()
    pull_shard("me/repair", out, experts=[1, 2], only={name, fm.NORMS_BIN}, progress=False)
    assert verify(out, progress=False) == []
    assert set(hub.served) - {"index.json"} == {name, fm.NORMS_BIN, fm.layer_file(1)}
    assert hub.served[fm.layer_file(1)] <= TABLE_PROBE  # its table only (for the layout)


def test_bad_selections_name_the_flag_and_the_range(hub, src, tmp_path):
    hub.add_folder("me/sel", src)
    with pytest.raises(VindexError, match=r"--experts 6-9: 8-9 is outside 0-7"):
        pull_shard("me/sel", tmp_path / "x", experts=list(range(6, 10)), progress=False)
    with pytest.raises(VindexError, match=r"--layers 5: 5 is outside 0-1"):
        pull_shard("me/sel", tmp_path / "x", layers=[5], progress=False)
    # a repo that is itself a shard holds only some experts
    hub.add_folder("me/half", slice_vindex(src, tmp_path / "half", preset="experts", experts="0-3",
                                           progress=False))
    with pytest.raises(VindexError, match=r"does not hold experts 4-5 \(it holds 0-3\)"):
        pull_shard("me/half", tmp_path / "y", experts=[2, 3, 4, 5], progress=False)
    with pytest.raises(VindexError, match="OWNER/NAME"):
        remote_vindex("noslash")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_pull_experts(hub, src, tmp_path, capsys):
    from larql.cli import main as cli

    hub.add_folder("me/cli", src)
    assert cli(["pull", "me/cli", "-o", str(tmp_path / "c"), "--preset", "experts", "--experts", "2-5"]) == 0
    assert "experts 2-5" in capsys.readouterr().out
    vx = open_vindex(tmp_path / "c")
    assert vx.experts_present == [2, 3, 4, 5]
    blobs = {n for n in vx.file_sizes() if n.endswith((".bin", ".weights"))}
    assert blobs == {fm.NORMS_BIN, fm.layer_file(0), fm.layer_file(1)}
    assert cli(["pull", "me/cli", "-o", str(tmp_path / "d"), "--experts", "2-9"]) == 1
    assert "--experts 2-9: 8-9 is outside 0-7" in capsys.readouterr().err
