"""The container entrypoint (`larql boot`) run for real on loopback against the Hub stand-in
(tests/hub_standin.py: HTTP with Range requests, counting the bytes it serves): first boot
downloads, second does not, an interrupted download resumes, a damaged file is repaired
alone, a shard downloads only its experts, every bad variable stops the boot with its
message, and the servers it execs give the same tokens as in-process experts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_standin import hub_env

from larql import deploy
from larql.demo import build_demo_vindex, demo_config, free_port
from larql.vindex import format as fm
from larql.vindex import open_vindex
from larql.vindex.report import verify
from larql.vindex.shard_pull import RESUME_GRANULE, TABLE_PROBE

E, L = 8, 2
ROOT = Path(__file__).resolve().parent.parent
REPO = "me/tiny-expert-server"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    # f32 experts of ~1 MiB each, so a layer file spans several MiB (the resume granule is 1 MiB)
    cfg = demo_config(num_layers=L, hidden=256, num_experts=E, top_k=2)
    return build_demo_vindex(tmp_path_factory.mktemp("deploysrc") / "v", quant="f32", config=cfg)


@pytest.fixture
def repo(hub, src):
    hub.add_folder(REPO, src)
    hub.repos["me/readme-only"], hub.commits["me/readme-only"] = {"README.md": b"hi"}, "1" * 40
    return hub


def boot_env(hub, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in deploy.VARIABLES}
    env.update(hub_env(hub, tmp_path))
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_REPO=REPO, VINDEX_PATH=str(tmp_path / "volume" / "vindex"), HOST="127.0.0.1",
               LARQL_SPIN_US="0")
    env.update(extra)
    return env


def boot(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "larql", "boot", "-q", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def layer_bytes_served(hub) -> int:
    return hub.bytes_served(fm.LAYERS_DIR + "/")


def test_first_boot_downloads_second_does_not(repo, tmp_path):
    env = boot_env(repo, tmp_path)
    r = boot(env, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "pulling me/tiny-expert-server" in r.stderr and "downloaded and verified" in r.stderr
    vindex = Path(env["VINDEX_PATH"])
    assert verify(vindex, progress=False) == []
    whole = sum(len(b) for n, b in repo.repos[REPO].items() if n.startswith("layers/"))
    assert layer_bytes_served(repo) == whole  # all experts: the layer files whole, once
    # the `experts` preset: what the server opens, nothing else
    assert not any(n.startswith(("embeddings", "attn_weights.bin", "interleaved.bin")) for n in repo.served)
    assert f"serve {vindex} --host 127.0.0.1 --port 8080" in r.stderr

    repo.served.clear()
    repo.calls.clear()
    r = boot(env, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "complete and intact (sha256 checked); nothing to download" in r.stderr
    assert repo.calls == []  # not even index.json: the volume's vindex answers everything


def test_shard_boot_downloads_only_its_experts(repo, tmp_path, src):
    env = boot_env(repo, tmp_path, EXPERTS="0-3", WARMUP="1")
    r = boot(env, "--dry-run")
    assert r.returncode == 0, r.stderr
    vx = open_vindex(env["VINDEX_PATH"])
    assert vx.experts_present == [0, 1, 2, 3]
    whole = open_vindex(src)
    owned = sum(whole.expert_file(ly).entry(e).end - whole.expert_file(ly).entry(e).start
                for ly in range(L) for e in range(4))
    total = sum(len(b) for n, b in repo.repos[REPO].items() if n.startswith("layers/"))
    served = layer_bytes_served(repo)
    assert owned <= served <= owned + L * (TABLE_PROBE + E * 4096)
    assert served / total < 0.55
    assert "--experts 0-3 --warmup" in r.stderr
    # the same volume, now asked for the other half: pulled again (state of 0-3 not reused)
    repo.served.clear()
    r = boot(boot_env(repo, tmp_path, EXPERTS="4-7"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "it does not hold experts 4-7" in r.stderr
    assert open_vindex(env["VINDEX_PATH"]).experts_present == [4, 5, 6, 7]


def test_interrupted_download_resumes(repo, tmp_path):
    env = boot_env(repo, tmp_path, EXPERTS="0-5")
    name = fm.layer_file(1)
    cut = 3 * RESUME_GRANULE + 777
    repo.stall[name] = cut  # layer 1's experts stop arriving after `cut` bytes ...
    proc = subprocess.Popen([sys.executable, "-m", "larql", "boot", "-q", "--dry-run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = Path(env["VINDEX_PATH"]) / (name + ".part")
    try:
        assert repo.stalled.wait(60), "the boot never reached the stall"
        deadline = time.monotonic() + 30  # until the bytes sent are on disk
        while not (part.exists() and part.stat().st_size >= cut - cut % RESUME_GRANULE):
            assert time.monotonic() < deadline, "the boot did not write what it received"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # ... and the machine restarts there
        proc.wait(30)
    finally:
        repo.release.set()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    vindex = Path(env["VINDEX_PATH"])
    assert not (vindex / "index.json").exists() and part.exists()
    first = repo.served[name]
    repo.served.clear()
    r = boot(env, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert verify(vindex, progress=False) == []
    again = repo.served[name] - TABLE_PROBE
    plan_bytes = open_vindex(vindex).expert_file(1).size
    # the second boot fetched only what the first had not written (from its last whole MiB)
    assert 0 < again <= plan_bytes - (cut - TABLE_PROBE) + RESUME_GRANULE
    assert first + again < plan_bytes + 2 * RESUME_GRANULE + TABLE_PROBE
    assert repo.served[fm.layer_file(0)] <= TABLE_PROBE  # finished before the kill: not again


def test_truncated_and_corrupt_files_are_repaired_alone(repo, tmp_path):
    env = boot_env(repo, tmp_path, EXPERTS="2-5")
    assert boot(env, "--dry-run").returncode == 0
    vindex = Path(env["VINDEX_PATH"])
    layer0 = vindex / fm.layer_file(0)
    good = layer0.read_bytes()
    layer0.write_bytes(good[: len(good) // 2])
    norms = vindex / fm.NORMS_BIN
    data = bytearray(norms.read_bytes())
    data[100] ^= 0x40
    norms.write_bytes(bytes(data))
    repo.served.clear()
    r = boot(env, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "2 bad file(s)" in r.stderr and fm.layer_file(0) in r.stderr and "norms.bin" in r.stderr
    assert layer0.read_bytes() == good
    assert verify(vindex, progress=False) == []
    assert set(repo.served) <= {fm.layer_file(0), fm.NORMS_BIN, fm.layer_file(1), "index.json"}
    assert repo.served[fm.layer_file(1)] <= TABLE_PROBE  # its table (the layout), not its experts
    # a boot asking for fewer experts than the volume holds repairs what it holds, file by file
    layer0.write_bytes(good[:1000])
    repo.served.clear()
    r = boot(boot_env(repo, tmp_path, EXPERTS="3-4"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "1 bad file(s)" in r.stderr and "--experts 3-4" in r.stderr
    assert layer0.read_bytes() == good and open_vindex(vindex).experts_present == [2, 3, 4, 5]
    assert repo.served[fm.layer_file(1)] <= TABLE_PROBE


BAD = [
    ({"EXPERTS": "64-200"}, "EXPERTS='64-200': 200 is outside the valid range 0-7 (the model in "
                            "me/tiny-expert-server has 8 experts)"),
    ({"EXPERTS": "0-3,x"}, "EXPERTS='0-3,x': expected A-B or N"),
    ({"EXPERTS": "5-2"}, "EXPERTS='5-2'"),
    ({"LAYERS": "0-9"}, "LAYERS='0-9': 9 is outside the valid range 0-1"),
    ({"WARMUP": "maybe"}, "WARMUP='maybe': expected 1 or 0"),
    ({"VERIFY": "2"}, "VERIFY='2': expected 1 or 0"),
    ({"PORT": "70000"}, "PORT='70000': expected an integer in 1-65535"),
    ({"PORT": "http"}, "PORT='http': expected an integer"),
    ({"THREADS": "0"}, "THREADS='0': expected an integer in 1-4096"),
    ({"WORKERS": "-1"}, "WORKERS='-1'"),
    ({"HF_REPO": "noslash"}, "HF_REPO='noslash': expected OWNER/NAME"),
    ({"HF_REPO": "me/absent"}, "HF_REPO='me/absent': repository not found"),
    ({"HF_REPO": "me/readme-only"}, "HF_REPO='me/readme-only': has no index.json; not a vindex repository"),
    ({"VINDEX_PATH": "data/vindex"}, "VINDEX_PATH='data/vindex': expected an absolute path"),
    ({"PULL_PRESET": "client"}, "PULL_PRESET='client': expected one of experts, expert-server, all"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud'"),
    ({"TLS_CERT": "/no/such/cert.pem", "TLS_KEY": "/no/such/key.pem"},
     "TLS_CERT='/no/such/cert.pem': no such"),
    ({"TLS_CERT": __file__}, "TLS_CERT and TLS_KEY: set both"),
    ({"API_KEY_FILE": "/no/such/key"}, "API_KEY_FILE='/no/such/key': no such readable file"),
    ({"API_KEY_FILE": __file__, "LARQL_API_KEY": "k"}, "set one of them, not both"),
    ({"HOST": "0.0.0.0"}, "HOST='0.0.0.0' is reachable from other machines but no API key is set"),
    ({"HOST": ""}, "HOST='' is reachable from other machines"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[",".join(b) + "=" + "|".join(b.values()) for b, _ in BAD])
def test_every_bad_variable_stops_the_boot_before_any_download(repo, tmp_path, monkeypatch, capsys,
                                                               bad, message):
    for k, v in boot_env(repo, tmp_path, **bad).items():
        monkeypatch.setenv(k, v)
    for k in deploy.VARIABLES:
        if k not in bad and k not in ("HF_REPO", "VINDEX_PATH", "HOST", "HF_TOKEN"):
            monkeypatch.delenv(k, raising=False)
    rc = deploy.boot_main(deploy.argparse.Namespace(dry_run=True, quiet=True))
    err = capsys.readouterr().err
    assert rc != 0 and message in err, err
    assert [n for n in repo.downloads if n != "index.json"] == []  # at most the small index
    assert not (Path(os.environ["VINDEX_PATH"]) / "layers").exists()


def test_several_bad_variables_are_reported_together_by_the_real_boot(repo, tmp_path):
    r = boot(boot_env(repo, tmp_path, WARMUP="sometimes", PORT="-5", EXPERTS="a-b"))
    assert r.returncode == 2
    for name in ("WARMUP='sometimes'", "PORT='-5'", "EXPERTS='a-b'"):
        assert name in r.stderr
    assert repo.calls == []


def test_unset_variables_add_no_flags_and_set_ones_pass_through(tmp_path):
    key, cert = tmp_path / "key", tmp_path / "cert"
    key.write_text("k")
    cert.write_text("c")
    base = {"VINDEX_PATH": str(tmp_path / "v"), "HOST": "127.0.0.1"}
    cmd = deploy.server_command(deploy.read_settings(base))
    assert cmd[1:] == ["-m", "larql", "serve", str(tmp_path / "v"), "--host", "127.0.0.1", "--port", "8080"]
    full = {**base, "HOST": "", "PORT": "9000", "EXPERTS": "0-63", "LAYERS": "0-14", "WARMUP": "yes",
            "THREADS": "8", "WORKERS": "0", "API_KEY_FILE": str(key), "TLS_CERT": str(cert),
            "TLS_KEY": str(key), "ALLOW_ANONYMOUS": "1", "LOG_LEVEL": "debug"}
    cmd = deploy.server_command(deploy.read_settings(full))
    assert cmd[4:] == [str(tmp_path / "v"), "--host", "", "--port", "9000", "--experts", "0-63",
                       "--layers", "0-14", "--warmup", "--threads", "8", "--workers", "0",
                       "--log-level", "debug", "--api-key-file", str(key), "--tls-cert", str(cert),
                       "--tls-key", str(key), "--allow-anonymous"]
    # the key itself never appears on a command line: the server reads LARQL_API_KEY
    cmd = deploy.server_command(deploy.read_settings({**base, "HOST": "0.0.0.0", "LARQL_API_KEY": "s3cret"}))
    assert "s3cret" not in " ".join(cmd) and "--api-key-file" not in cmd


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"boot exited {proc.returncode}:\n{proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not open its port")


def test_booted_shards_give_the_same_tokens_as_in_process_experts(repo, tmp_path, src):
    from larql import api
    from larql.health import check, parse_target

    procs, spec = [], []
    try:
        for a, b in ((0, 3), (4, 7)):
            port = free_port()
            env = boot_env(repo, tmp_path / f"shard{a}", EXPERTS=f"{a}-{b}", WARMUP="1", PORT=str(port),
                           THREADS="1")
            procs.append((subprocess.Popen([sys.executable, "-m", "larql", "boot", "-q"], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), port))
            spec.append(f"{a}-{b}=127.0.0.1:{port}")
        for proc, port in procs:
            wait_port(port, proc)
            assert check(parse_target(f"127.0.0.1:{port}"))["status"] == "ok"
        remote = api.load(src, shards=",".join(spec))
        local = api.load(src)
        try:
            prompt = "The capital of France is"
            assert remote.generate_ids(prompt, max_tokens=12, temperature=0) == \
                local.generate_ids(prompt, max_tokens=12, temperature=0)
        finally:
            remote.close()
            local.close()
    finally:
        logs = []
        for proc, _ in procs:
            proc.terminate()  # SIGTERM reaches the server itself (the boot exec'd it)
            _, err = proc.communicate(timeout=30)
            logs.append((proc.returncode, err))
    for rc, err in logs:
        assert rc == 0, err
        assert "larql-boot: exec" in err and "warm-up:" in err and "shutting down" in err
        # just downloaded, so in the page cache: the disk's rate is not what it would time
        assert "disk rate not measured (the pages were already cached)" in err or "warm-up/disk =" in err


def test_health_command(src, capsys):
    from larql.cli import main as cli
    from larql.health import local_target, parse_target
    from larql.server import ExpertServer

    t = parse_target("https://app.fly.dev")
    assert (t.host, t.port, t.tls) == ("app.fly.dev", 443, True)
    t = parse_target("tcp://[::1]:9000")
    assert (t.host, t.port, t.tls) == ("::1", 9000, False)
    assert (parse_target("tls://app.fly.dev:443").port, parse_target("10.0.0.5:8080").tls) == (443, False)
    t = local_target({"PORT": "9001", "TLS_CERT": "/c.pem"})
    assert (t.host, t.port, t.tls) == ("127.0.0.1", 9001, True)
    assert (local_target({}).port, local_target({}).tls) == (8080, False)
    with pytest.raises(ValueError, match="do not speak plain HTTP; use tls:// or https://"):
        parse_target("http://x:1")
    with ExpertServer(open_vindex(src), experts=range(0, 4)).start_in_thread() as h:
        assert cli(["health", h.address]) == 0
        assert '"status": "ok"' in capsys.readouterr().out
    port = free_port()  # nothing listens there now
    assert cli(["health", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    assert "unhealthy: ConnectionRefusedError" in capsys.readouterr().err


@pytest.mark.skipif(os.getuid() != 0, reason="the privilege drop runs as root (as in the image)")
def test_boot_as_root_gives_the_volume_to_the_user_and_drops_to_it(tmp_path):
    import pwd
    import tempfile

    volume = Path(tempfile.mkdtemp(prefix="larql-volume-"))  # outside pytest's root-only tmp
    try:
        (volume / "vindex" / "layers").mkdir(parents=True)
        (volume / "vindex" / "layers" / "old.weights").write_bytes(b"x")  # root-owned, older image
        nobody = pwd.getpwnam("nobody")
        pid = os.fork()
        if pid == 0:  # the child becomes `nobody`; the test process stays root
            code = 1
            try:
                user = deploy.drop_privileges({"LARQL_USER": "nobody", "VINDEX_PATH": str(volume / "vindex")})
                ok = (user == "nobody" and os.getuid() == nobody.pw_uid and os.getgid() == nobody.pw_gid
                      and os.access(volume / "vindex" / "layers" / "old.weights", os.W_OK))
                (volume / "vindex" / "new").write_bytes(b"y")
                code = 0 if ok else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for p in [volume, *volume.rglob("*")]:
            assert p.stat().st_uid == nobody.pw_uid, p
        assert deploy.drop_privileges({"VINDEX_PATH": str(volume / "vindex")}) is None  # no LARQL_USER
        with pytest.raises(deploy.BootError, match="LARQL_USER='no-such-user': no such user"):
            deploy.drop_privileges({"LARQL_USER": "no-such-user"})
    finally:
        import shutil

        shutil.rmtree(volume, ignore_errors=True)


def self_signed(tmp_path: Path, name: str = "localhost") -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TlsEdge:
    """What fly's `tls` handler does: terminate TLS, pass the plain stream to the server."""

    def __init__(self, cert: Path, key: Path, backend: tuple[str, int]) -> None:
        import ssl
        import threading

        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.backend = backend
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                tls = self.ctx.wrap_socket(raw, server_side=True)
            except OSError:
                raw.close()
                continue
            up = socket.create_connection(self.backend)
            for a, b in ((tls, up), (up, tls)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_health_over_tls_as_behind_fly_edge(src, tmp_path, monkeypatch, capsys):
    from larql.cli import main as cli
    from larql.health import check, parse_target
    from larql.server import ExpertServer

    cert, key = self_signed(tmp_path)
    with ExpertServer(open_vindex(src), experts=range(0, 4)).start_in_thread() as h:
        edge = TlsEdge(cert, key, ("127.0.0.1", h.port))
        try:
            assert check(parse_target(f"tls://localhost:{edge.port}"), ca_file=str(cert))["status"] == "ok"
            assert cli(["health", f"https://localhost:{edge.port}", "--tls-ca", str(cert)]) == 0
            # the certificate is checked: an unknown CA is refused
            assert cli(["health", f"https://localhost:{edge.port}", "--timeout", "5"]) == 1
            assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
            # the container's own check: 127.0.0.1:$PORT over TLS when TLS_CERT is set, trusting
            # that certificate (its name is not 127.0.0.1)
            monkeypatch.setenv("PORT", str(edge.port))
            monkeypatch.setenv("TLS_CERT", str(cert))
            assert cli(["health"]) == 0
            monkeypatch.delenv("TLS_CERT")
            assert cli(["health", "--timeout", "3"]) == 1  # plain TCP to a TLS port: no usable reply
        finally:
            edge.close()
