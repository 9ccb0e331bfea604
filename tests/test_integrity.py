"""The expert bytes a server serves are the ones its vindex records: the fingerprint is derived
from recorded digests (equal on every shard and slice of one extraction), servers check their
bytes against them, manifests cannot name files outside the folder, and a file truncated under
a running server fails requests instead of killing it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_server_protocol import rt

from larql import protocol as P
from larql.cli import main as cli
from larql.client import connect_shards
from larql.demo import demo_config
from larql.processes import ServerProcess, free_port
from larql.server import ExpertServer
from larql.shardmap import ShardSpecError
from larql.vindex import VindexError, integrity, open_vindex, write_vindex
from larql.vindex import format as fm
from larql.vindex.random_model import random_tensors
from larql.vindex.slicing import slice_vindex

E, L, H = 8, 2, 64


def build(path: Path, seed: int, lyrw_version: int = 2) -> Path:
    cfg = demo_config(num_layers=L, hidden=H, num_experts=E, top_k=2)
    return write_vindex(path, cfg, random_tensors(cfg, seed), quant="f32", progress=False,
                        lyrw_version=lyrw_version)


@pytest.fixture(scope="module")
def extractions(tmp_path_factory):
    """Two extractions of one architecture with different weights: the original and an impostor."""
    root = tmp_path_factory.mktemp("integrity")
    return build(root / "orig.vindex", seed=1), build(root / "other.vindex", seed=2)


def shard(src: Path, dst: Path, experts: str) -> Path:
    return slice_vindex(src, dst, preset="experts", experts=experts, progress=False)


def swap_layer_files(victim: Path, donor: Path) -> None:
    """Replace the victim's layer files with the donor's; the victim's index.json stays."""
    for p in sorted((donor / fm.LAYERS_DIR).iterdir()):
        shutil.copyfile(p, victim / fm.LAYERS_DIR / p.name)


def compute(sock: socket.socket, layer: int, rid: int = 5, experts=(0, 1)) -> dict:
    rng = np.random.default_rng(layer)
    ids = np.array([experts], dtype=np.int32)
    msg = {"op": "experts", "id": rid, **P.encode_work(layer, rng.standard_normal((1, H)).astype(np.float32),
                                                       ids, np.full(ids.shape, 0.5, np.float32), "f32")}
    return rt(sock, msg)


def hello(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    assert rt(s, {"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION})["ok"] is True
    return s


# --- the fingerprint ---------------------------------------------------------------------------

def test_fingerprint_is_one_value_per_extraction(extractions, tmp_path):
    orig, other = extractions
    want = open_vindex(orig).expert_fingerprint()
    assert want and want != open_vindex(other).expert_fingerprint()
    # every shard (whatever it owns), a client-only slice and the v1 layout of the same weights
    a = shard(orig, tmp_path / "a", "0-3")
    b = shard(orig, tmp_path / "b", "4-7")
    odd = shard(orig, tmp_path / "odd", "1,5-6")
    client = slice_vindex(orig, tmp_path / "c", preset="client", progress=False)
    v1 = build(tmp_path / "v1.vindex", seed=1, lyrw_version=1)
    for p in (a, b, odd, client, v1):
        assert open_vindex(p).expert_fingerprint() == want, p
    assert not open_vindex(client).layers_present and open_vindex(a).experts_present == [0, 1, 2, 3]
    # a re-slice of a shard keeps it too
    assert open_vindex(shard(a, tmp_path / "a2", "2-3")).expert_fingerprint() == want


def test_fingerprint_is_not_read_from_index_json(extractions, tmp_path):
    """Copying the original's expert_fingerprint field into an impostor's index.json changes nothing."""
    orig, other = extractions
    fake = shard(other, tmp_path / "fake", "0-7")
    idx = json.loads((fake / fm.INDEX_JSON).read_text())
    idx["expert_fingerprint"] = open_vindex(orig).expert_fingerprint()
    (fake / fm.INDEX_JSON).write_text(json.dumps(idx))
    assert open_vindex(fake).expert_fingerprint() == open_vindex(other).expert_fingerprint()
    with ExpertServer(open_vindex(fake)).start_in_thread() as h:
        with pytest.raises(ShardSpecError, match="different expert weights"):
            connect_shards(f"0-7={h.address}", open_vindex(orig), connect_timeout=10)


def test_recorded_digests_match_the_bytes(extractions):
    vindex = open_vindex(extractions[0])
    rec = vindex.integrity
    assert rec.basis == "experts" and len(rec.norms) == L
    for layer in range(L):
        ef = vindex.expert_file(layer)
        for e in range(E):
            ent = ef.entry(e)
            assert rec.experts[fm.layer_file(layer)][e] == integrity.expert_digest(
                ent.gate_up_fmt, ent.down_fmt, ef.gate_up(e), ef.down(e))
    assert integrity.verify_layer(vindex, 1, list(range(E))) == "experts"


# --- a shard whose layer files were replaced under a copied index.json --------------------------

def test_warmup_server_refuses_swapped_layer_files(extractions, tmp_path):
    orig, other = extractions
    victim = shard(orig, tmp_path / "victim", "0-3")
    swap_layer_files(victim, shard(other, tmp_path / "donor", "0-3"))
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "larql", "serve", str(victim), "--warmup", "--host", "127.0.0.1",
         "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert "layer_00.weights" in err and "experts 0-3 differ from the digests" in err, err
    assert "Traceback" not in err


def test_server_without_warmup_fails_requests_on_swapped_layer(extractions, tmp_path):
    orig, other = extractions
    victim = shard(orig, tmp_path / "victim", "0-7")
    donor = shard(other, tmp_path / "donor", "0-7")
    shutil.copyfile(donor / fm.layer_file(1), victim / fm.layer_file(1))  # only layer 1 swapped
    srv = ExpertServer(open_vindex(victim))
    with srv.start_in_thread() as h, hello(h.port) as s:
        r = compute(s, 1)
        assert r["ok"] is False and r["error"]["code"] == P.E_INTEGRITY
        assert "layer_01.weights" in r["error"]["message"] and "differ" in r["error"]["message"]
        ok = compute(s, 0, rid=6)  # the intact layer is still served
        assert ok["ok"] is True and len(ok["y"]) == 4 * H
        srv.integrity.close()  # the background check has finished
        assert srv.integrity.status().startswith("failed: ") and "layer_01" in srv.integrity.status()
        # health says so (and `larql health`, a container's check, exits 1 on it)
        got = rt(s, {"op": "health", "id": 9})
        assert got["status"] == "failed" and got["failed_layers"] == [1]
        assert got["integrity"].startswith("failed: ") and "layer_01" in got["integrity"]


def test_client_fails_over_from_a_replica_whose_layer_failed_its_check(extractions, tmp_path):
    """`integrity` is retryable: another replica's intact copy answers, and the result is the
    intact shard's alone."""
    orig, other = extractions
    victim = shard(orig, tmp_path / "victim", "0-7")
    shutil.copyfile(shard(other, tmp_path / "donor", "0-7") / fm.layer_file(1), victim / fm.layer_file(1))
    good = ExpertServer(open_vindex(shard(orig, tmp_path / "good", "0-7")))
    bad = ExpertServer(open_vindex(victim))
    client_vindex = open_vindex(orig)
    with good.start_in_thread() as g, bad.start_in_thread() as b:
        rng = np.random.default_rng(4)
        h = rng.standard_normal((1, H)).astype(np.float32)
        ids, w = np.array([[1, 6]]), np.array([[0.3, 0.7]], np.float32)
        with connect_shards(f"0-7={g.address}", client_vindex, api_key="") as ref, \
                connect_shards(f"0-7={b.address}|{g.address}", client_vindex, api_key="") as rx:
            for _ in range(4):    # replicas take turns: the failed one is asked at least once
                assert rx.forward(1, h, ids, w).tobytes() == ref.forward(1, h, ids, w).tobytes()
            assert rx.client.retries >= 1


def test_norms_replaced_under_copied_index_are_refused(extractions, tmp_path):
    orig, other = extractions
    victim = shard(orig, tmp_path / "victim", "0-7")
    shutil.copyfile(other / fm.NORMS_BIN, victim / fm.NORMS_BIN)
    with pytest.raises(VindexError, match="pre_feedforward_layernorm_2 of layers 0-1 differs"):
        ExpertServer(open_vindex(victim))


# --- reference vindexes: index.json `checksums {file: sha256}` only ----------------------------

def as_reference(path: Path, keep_checksums: bool = True) -> Path:
    idx = json.loads((path / fm.INDEX_JSON).read_text())
    for ours in (integrity.FIELD, "expert_fingerprint", "layers_present", "experts_present", "larql_format"):
        idx.pop(ours, None)
    if not keep_checksums:
        idx.pop("checksums")
    (path / fm.INDEX_JSON).write_text(json.dumps(idx))
    return path


def test_reference_checksums_are_the_basis(extractions, tmp_path):
    ref = as_reference(Path(shutil.copytree(extractions[0], tmp_path / "ref")))
    v = open_vindex(ref)
    assert v.integrity.basis == "files"
    want = v.expert_fingerprint()
    # our slices of it keep the reference's per-file checksums and add per-expert digests
    half = shard(ref, tmp_path / "half", "4-7")
    client = slice_vindex(ref, tmp_path / "client", preset="client", progress=False)
    assert open_vindex(half).expert_fingerprint() == open_vindex(client).expert_fingerprint() == want
    assert integrity.verify_layer(open_vindex(half), 0, [4, 5, 6, 7]) == "experts"
    assert integrity.verify_layer(v, 0, [0, 1]) == "file"
    # a reference shard whose layer file was replaced is refused at warm-up
    other = shard(extractions[1], tmp_path / "other", "0-7")
    shutil.copyfile(other / fm.layer_file(0), ref / fm.layer_file(0))
    with pytest.raises(VindexError, match="layer_00.weights: sha256 .* differs"):
        ExpertServer(open_vindex(ref), experts=range(0, 4)).warmup(progress=False)


def test_reference_without_checksums_falls_back_to_tables(extractions, tmp_path):
    ref = as_reference(Path(shutil.copytree(extractions[0], tmp_path / "ref")), keep_checksums=False)
    v = open_vindex(ref)
    assert v.integrity.basis == "tables" and v.expert_fingerprint()
    srv = ExpertServer(v)
    assert srv.integrity.check(0) == "unverified"
    client = slice_vindex(ref, tmp_path / "client", preset="client", progress=False)
    assert open_vindex(client).expert_fingerprint() == v.expert_fingerprint()  # recorded by the slicer


def test_slicing_refuses_a_corrupt_source(extractions, tmp_path):
    src = Path(shutil.copytree(extractions[0], tmp_path / "src"))
    p = src / fm.layer_file(1)
    b = bytearray(p.read_bytes())
    b[-5] ^= 0x40
    p.write_bytes(bytes(b))
    with pytest.raises(VindexError, match="expert 7's bytes differ"):
        shard(src, tmp_path / "s", "4-7")
    with pytest.raises(VindexError, match="layer_01.weights: sha256"):
        slice_vindex(src, tmp_path / "t", preset="experts", progress=False)


# --- manifest file names ---------------------------------------------------------------------

@pytest.mark.parametrize("name, why", [("/etc/passwd", "absolute path"), ("../outside.bin", "contains '..'"),
                                       ("layers/../../x.bin", "contains '..'")])
def test_manifest_files_must_stay_inside(extractions, tmp_path, name, why):
    d = Path(shutil.copytree(extractions[0], tmp_path / "v"))
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    wm = json.loads((d / fm.WEIGHT_MANIFEST).read_text())
    wm[0]["file"] = name
    (d / fm.WEIGHT_MANIFEST).write_text(json.dumps(wm))
    with pytest.raises(VindexError, match=why) as ei:
        open_vindex(d)
    assert "inside the vindex folder" in str(ei.value)


def test_verify_refuses_checksum_names_outside(extractions, tmp_path):
    d = Path(shutil.copytree(extractions[0], tmp_path / "v"))
    idx = json.loads((d / fm.INDEX_JSON).read_text())
    idx["checksums"]["/etc/hostname"] = "0" * 64
    (d / fm.INDEX_JSON).write_text(json.dumps(idx))
    with pytest.raises(VindexError, match="absolute path"):
        from larql.vindex.report import verify

        verify(d, progress=False)


# --- files changing under a running server ---------------------------------------------------

def test_truncated_layer_file_fails_requests_not_the_server(extractions, tmp_path):
    """A real `larql serve` process: truncating a layer file in place gets an error reply naming
    it, the server stays up and the other layer keeps working (was: SIGBUS)."""
    d = Path(shutil.copytree(extractions[0], tmp_path / "v"))
    port = free_port()
    srv = ServerProcess(d, "0-7", port, tmp_path / "server.log", warmup=True)
    try:
        srv.wait_ready()
        with hello(port) as s:
            assert compute(s, 1, experts=(6, 7))["ok"] is True
            p = d / fm.layer_file(1)
            with open(p, "r+b") as f:  # experts 6 and 7 lie in the cut half
                f.truncate(p.stat().st_size // 2)
            for rid in (7, 8):  # every request on that layer, not only the first
                r = compute(s, 1, rid=rid, experts=(6, 7))
                assert r["ok"] is False and r["id"] == rid, r
                assert "layer_01.weights" in r["error"]["message"] and "shrank" in r["error"]["message"]
            assert compute(s, 0, rid=9)["ok"] is True
            assert rt(s, {"op": "health", "id": 10})["status"] == "ok"
        assert srv.proc.poll() is None
    finally:
        code = srv.stop()
    assert code == 0, (tmp_path / "server.log").read_text()


def test_slice_force_replaces_files_a_server_maps(extractions, tmp_path):
    """`slice --force` over a served vindex renames new files in: the mapped old bytes stay
    readable and unchanged (no truncation, no SIGBUS), the new ones are on disk."""
    orig, other = extractions
    dst = shard(orig, tmp_path / "s", "0-7")
    served = open_vindex(dst)
    before = np.array(served.expert_file(0).gate_up(3))
    slice_vindex(other, dst, preset="experts", experts="0-3", progress=False, overwrite=True)
    assert np.array_equal(served.expert_file(0).gate_up(3), before)
    served.check_intact(0)
    assert open_vindex(dst).experts_present == [0, 1, 2, 3]
    assert not list(tmp_path.glob("s.*")), "no temporary or old directory left behind"


# --- info and verify on a truncated vindex -------------------------------------------------

@pytest.mark.parametrize("name, reason", [(fm.layer_file(1), "truncated"), (fm.EMBEDDINGS_BIN, "truncated")])
def test_info_and_verify_fail_on_truncated_files(extractions, tmp_path, capsys, name, reason):
    d = Path(shutil.copytree(extractions[0], tmp_path / "v"))
    with open(d / name, "r+b") as f:
        f.truncate(1000)
    assert cli(["info", str(d)]) == 1
    err = capsys.readouterr().err
    assert name.split("/")[-1] in err and reason in err, err
    assert cli(["verify", "-q", str(d)]) == 1
    err = capsys.readouterr().err
    assert reason in err and name.split("/")[-1] in err, err
    assert cli(["info", str(extractions[0])]) == 0  # the intact one still passes
