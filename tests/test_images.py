"""The container images, checked without building them (a build takes minutes: that run is
``bench/deployment.py --containers``): what each Dockerfile runs and as whom, that the build
installs from the wheelhouse only, that the build context carries nothing else, the build
scripts' syntax, and the server image's HEALTHCHECK against a real SuperLink.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from localfed import free_port, kill_tree, wait_until

from biofp_cli.certs import init_certificates

ROOT = Path(__file__).resolve().parents[1]
UID = "10001"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    assert not pending, f"{dockerfile}: unfinished continuation"
    return out


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage (index 0: the ARGs before the first FROM)."""
    out: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(dockerfile):
        if ins[0] == "FROM":
            out.append([])
        out[-1].append(ins)
    return out


def values(stage: list[tuple[str, str]], word: str) -> list[str]:
    return [rest for ins, rest in stage if ins == word]


IMAGES = {  # Dockerfile: (entry point, the state volume, exposed ports)
    "client/Dockerfile": (["biofp", "client", "start"], "/state", []),
    "server/Dockerfile": (["biofp", "server", "start"], "/srv/biofp", ["9092"]),
}


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_image_runs_biofp_unprivileged_from_the_wheelhouse_only(dockerfile: str) -> None:
    entrypoint, volume, ports = IMAGES[dockerfile]
    preamble, deps, biofp, final = stages(ROOT / dockerfile)
    assert values(preamble, "ARG") == ["BASE_IMAGE=python:3.11-slim"]
    assert values(deps, "FROM") == ["${BASE_IMAGE} AS deps"]
    assert values(biofp, "FROM") == ["${BASE_IMAGE} AS biofp"]
    assert values(final, "FROM") == ["${BASE_IMAGE}"]
    # the dependencies: the wheelhouse bind-mounted (no layer keeps it), keyed by its digest, the
    # same step in both Dockerfiles (one build serves both images)
    assert values(deps, "COPY") == []
    (run,) = values(deps, "RUN")
    assert re.findall(r"--mount=(\S+)", run) == [
        "type=bind,source=build/wheelhouse/deps,target=/wheels/deps"
    ]
    assert run.endswith('sh /wheels/deps/install-venv.sh deps "${DEPS_DIGEST:-?}"')
    other = "server/Dockerfile" if dockerfile == "client/Dockerfile" else "client/Dockerfile"
    assert deps == stages(ROOT / other)[1]
    # BioFP alone: its wheel COPY'd (the bytes are the cache key), installed by the same script
    assert values(biofp, "COPY") == [
        "build/wheelhouse/deps/install-venv.sh /wheels/",
        "build/wheelhouse/biofp/ /wheels/biofp/",
    ]
    assert values(biofp, "RUN") == ["sh /wheels/install-venv.sh biofp"]
    script = "\n".join(
        line for line in (ROOT / "deploy/install-venv.sh").read_text().splitlines()
        if not line.lstrip().startswith("#")
    )  # fmt: skip
    assert script.count("--no-index") == 2 and "TORCH_INDEX_URL" in script
    assert "--no-deps --prefix /opt/biofp" in script
    assert not re.search(r"https?://", script)
    text = " ".join(rest for _, rest in instructions(ROOT / dockerfile))
    assert not re.search(r"https?://", text)
    # the image: the dependencies' venv, then BioFP over it as the last (small) layer, and
    # nothing else of the build
    assert final[-2:] == [
        ("COPY", "--from=deps /opt/venv /opt/venv"),
        ("COPY", "--from=biofp /opt/biofp/ /opt/venv/"),
    ]
    assert len(values(final, "COPY")) == 2
    assert "pip uninstall" in script and "-name tests" in script
    assert values(final, "USER") == [UID]
    assert f"--uid {UID}" in " ".join(values(final, "RUN"))
    assert json.loads(values(final, "VOLUME")[0]) == [volume]
    assert values(final, "EXPOSE") == ports
    assert json.loads(values(final, "ENTRYPOINT")[0]) == entrypoint
    env = " ".join(values(final, "ENV"))
    assert "PATH=/opt/venv/bin:" in env and "FLWR_TELEMETRY_ENABLED=0" in env


def test_site_image_healthcheck_is_the_running_site_check() -> None:
    (check,) = values(stages(ROOT / "client/Dockerfile")[-1], "HEALTHCHECK")
    argv = shlex.split(check.split(" CMD ", 1)[1])
    assert argv == ["biofp", "client", "start", "--config", "$BIOFP_SITE_CONFIG", "--health"]
    env = " ".join(values(stages(ROOT / "client/Dockerfile")[-1], "ENV"))
    assert "BIOFP_SITE_CONFIG=/etc/biofp/site.toml" in env
    assert "BIOFP_CACHE_DIR=/state/cache" in env and "FLWR_HOME=/state/flower" in env


def test_build_context_is_the_wheelhouse_only() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    assert patterns[0] == "*"
    assert all(p.startswith("!build/wheelhouse/") for p in patterns[1:]), patterns


@pytest.mark.parametrize(
    "script",
    [
        "deploy/build-images.sh",
        "deploy/base-image.sh",
        "deploy/wheelhouse.sh",
        "deploy/install-venv.sh",
    ],
)
def test_build_scripts_parse_and_are_executable(script: str) -> None:
    path = ROOT / script
    assert os.access(path, os.X_OK)
    done = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_build_script_refuses_an_unknown_option_in_one_line() -> None:
    done = subprocess.run([str(ROOT / "deploy/build-images.sh"), "--offlin"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown option --offlin (see --help)"


# ---- the server image's HEALTHCHECK, run against a real `biofp server start` -------------------
def server_health_argv() -> list[str]:
    (check,) = values(stages(ROOT / "server/Dockerfile")[-1], "HEALTHCHECK")
    argv = shlex.split(check.split(" CMD ", 1)[1])
    assert argv[:3] == ["python", "-m", "biofp_cli.health"]
    return [sys.executable, *argv[1:]]  # `python` of the image's venv: this interpreter


def health(config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BIOFP_SERVER_CONFIG": str(config)}
    argv = [a.replace("$BIOFP_SERVER_CONFIG", str(config)) for a in server_health_argv()]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def server_toml(folder: Path, *, port: int, name: str = "localhost") -> Path:
    certs = folder / "certs"
    init_certificates(certs, server_name=name)
    toml = folder / "server.toml"
    toml.write_text(
        f'[superlink]\nhost = "127.0.0.1"\nport = {port}\npublic_name = "{name}"\n'
        'state_dir = "state"\nworkdir = "runs"\n\n'
        '[tls]\nca_cert = "certs/ca.crt"\ncert = "certs/server.crt"\nkey = "certs/server.key"\n'
    )
    return toml


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[Path]:
    """A real SuperLink (TLS, node auth) started with `biofp server start`; its server.toml."""
    port = free_port()
    toml = server_toml(tmp_path / "server", port=port)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "biofp_cli", "server", "start", "--config", str(toml)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: proc.poll() is not None or health(toml).returncode == 0,
                   timeout_s=60, what="the SuperLink")  # fmt: skip
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        yield toml
    finally:
        kill_tree(proc)
        log.close()


def test_server_healthcheck_passes_while_the_superlink_serves(superlink: Path) -> None:
    done = health(superlink)
    assert done.returncode == 0, done.stderr
    port = superlink.read_text().split("port = ")[1].split("\n")[0]
    assert done.stdout.strip() == f"healthy: 127.0.0.1:{port} serves TLS trusted for localhost"


def test_server_healthcheck_fails_in_one_line(superlink: Path, tmp_path: Path) -> None:
    # the certificate renewed for another name than the one the sites dial
    port = int(superlink.read_text().split("port = ")[1].split("\n")[0])
    other = server_toml(tmp_path / "other", port=port, name="fl.other.example")
    text = other.read_text().replace('"fl.other.example"', '"fl.example.org"')
    other.write_text(text)
    done = health(other)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "not for public_name 'fl.example.org'" in done.stderr, done.stderr
    # a CA that did not sign the running SuperLink's certificate
    foreign = server_toml(tmp_path / "foreign", port=port)
    done = health(foreign)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "TLS as localhost fails" in done.stderr and "CERTIFICATE_VERIFY_FAILED" in done.stderr
    # nothing listening
    idle = server_toml(tmp_path / "idle", port=free_port())
    done = health(idle)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "not serving" in done.stderr, done.stderr
