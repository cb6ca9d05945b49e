"""The real deployment: docker-compose.yml on a Docker engine, the deploy preset through ``flwr run``.

One module-scoped topology (one server site, three client sites, TLS, SuperNode authentication,
the nginx proxy in front of the Fleet API) under a unique Compose project, torn down with its
volumes at the end. What is checked:

* ``docker compose up -d --wait`` brings it up, and a second ``up`` (credentials and SuperNode
  registration already made) succeeds too;
* a client site's ClientApp container sees only its own site folder: no other site's manifest or
  images anywhere in its file system, and no route to the SuperLink;
* the proxy forwards the Fleet API and refuses the Control API (and everything else) with 403;
* ``flwr run . <connection> --run-config presets/deploy.toml`` ends ``finished:completed`` and the
  run directory on the server's volume holds ``result.json`` with status ``completed``.

Needs root or a running engine (installed and started when absent, see ``docker_support``); the
images are built once with the layer cache kept, so only the first run pays for torch (~5 GB).
Environment: ``TORCH_INDEX_URL`` (build arg of the project image), ``FEDSTO_BASE_IMAGE``,
``FEDSTO_DOCKER_RUN_TIMEOUT`` (seconds for the run, default 1200).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import docker_support as ds

pytestmark = [pytest.mark.docker, pytest.mark.integration]

ROOT = ds.ROOT
CONNECTION = "fedsto-docker"
RUN_DIR_NAME = "docker-deploy"
RUN_TIMEOUT = float(os.environ.get("FEDSTO_DOCKER_RUN_TIMEOUT", 1200))
SITES = ("server", "client-0", "client-1", "client-2")


def fedsto_cli() -> list[str]:
    script = Path(sys.executable).parent / "fedsto"
    return [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())"]


def flwr_cli() -> str:
    script = Path(sys.executable).parent / "flwr"
    return str(script) if script.exists() else "flwr"


def make_sites(out: Path) -> Path:
    """Synthetic data (~200 scenes, 96 px) federated into 3 clients, one exported folder per site."""
    src, fed, sites = out / "source", out / "federation", out / "sites"
    ds.run([*fedsto_cli(), "data", "synth", str(src), "--num-images", "200", "--imgsz", "96"], timeout=600)
    ds.run([*fedsto_cli(), "data", "federate", str(src), str(fed), "--weathers", "rainy,snowy,foggy", "--clients", "3",
            "--site-holdout", "4"], timeout=600)
    for site in SITES:
        ds.run([*fedsto_cli(), "data", "export-site", str(fed), site, str(sites / site)], timeout=600)
    return sites


class Topology:
    """``docker compose`` for one unique project, with its environment."""

    def __init__(self, engine: ds.Engine, work: Path, sites: Path):
        self.engine = engine
        self.project = f"fedsto-test-{os.getpid()}"
        self.credentials = work / "credentials"
        self.credentials.mkdir()
        self.credentials.chmod(0o755)
        self.control_port = ds.free_port()
        self.fleet_port = ds.free_port()
        while self.fleet_port == self.control_port:
            self.fleet_port = ds.free_port()
        self.env = {**engine.env, "FEDSTO_SITES": str(sites), "FEDSTO_CREDENTIALS": str(self.credentials),
                    "FEDSTO_CONTROL_PORT": str(self.control_port), "FEDSTO_FLEET_PORT": str(self.fleet_port),
                    "FEDSTO_FLEET_BIND": "127.0.0.1", "COMPOSE_PROJECT_NAME": self.project}
        self.flwr_home = work / "flwr-home"
        self.flwr_home.mkdir()
        self.ca = self.credentials / "cli" / "ca.crt"
        (self.flwr_home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.control_port}"\nroot-certificates = "{self.ca}"\n\n'
            f'[superlink.via-proxy]\naddress = "127.0.0.1:{self.fleet_port}"\nroot-certificates = "{self.ca}"\n')
        self.flwr_env = {**os.environ, "FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                         "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return ds.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "-p", self.project, *args],
                      env=self.env, cwd=ROOT, timeout=timeout, check=check)

    def exec(self, service: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", service, "sh", "-c", script, timeout=120, check=check)

    def flwr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return ds.run([flwr_cli(), *args], env=self.flwr_env, cwd=ROOT, timeout=timeout, check=False)

    def logs(self, tail: int = 150) -> str:
        proc = self.compose("logs", "--no-color", "--tail", str(tail), timeout=120, check=False)
        return proc.stdout + proc.stderr

    def up(self) -> float:
        start = time.monotonic()
        proc = self.compose("up", "-d", "--wait", "--wait-timeout", "600", timeout=900, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"`docker compose up -d --wait` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}\n--- logs ---\n{self.logs()}")
        return time.monotonic() - start


@pytest.fixture(scope="module")
def engine():
    try:
        engine = ds.ensure_engine()
        ds.ensure_compose(engine)
    except ds.Unavailable as err:
        pytest.skip(f"no usable Docker: {err}")
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def images(engine, record_measurement):
    try:
        base = ds.ensure_base_image(engine)
    except ds.Unavailable as err:
        pytest.skip(f"no base image for the builds: {err}")
    ds.ensure_extra_ca(engine.notes)
    build_args = {"TORCH_INDEX_URL": os.environ["TORCH_INDEX_URL"]} if os.environ.get("TORCH_INDEX_URL") else None
    seconds = ds.build_images(engine, base, build_args)
    sizes = ds.image_sizes(engine)
    for note in engine.notes:
        record_measurement(f"docker: {note}")
    record_measurement("docker build (base %s): %s" % (base, ", ".join(f"{t} {s:.0f} s" for t, s in seconds.items())))
    record_measurement("docker image sizes: " + ", ".join(f"{t} {b / 1e9:.2f} GB" for t, b in sizes.items()))
    return base


@pytest.fixture(scope="module")
def topology(engine, images, record_measurement):
    # Not pytest's tmp_path: its folders are 0700, and the containers' uid 49999 must read the sites.
    work = Path(tempfile.mkdtemp(prefix="fedsto-docker-"))
    work.chmod(0o755)
    topo = None
    try:
        sites = make_sites(work)
        topo = Topology(engine, work, sites)
        record_measurement(f"docker compose up -d --wait: {topo.up():.0f} s (fresh)")
        yield topo
    finally:
        if topo is not None:
            topo.compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)
        shutil.rmtree(work, ignore_errors=True)


def test_second_up_is_idempotent(topology, record_measurement):
    """Credentials and SuperNode registrations are kept: a second `up` changes nothing and succeeds."""
    before = (topology.credentials / "node0.pub").read_bytes()
    record_measurement(f"docker compose up -d --wait: {topology.up():.0f} s (second)")
    assert (topology.credentials / "node0.pub").read_bytes() == before
    register = topology.compose("logs", "--no-color", "register").stdout
    assert register.count("already registered") >= 3, register
    nodes = ds.json_payload(topology.flwr("supernode", "list", CONNECTION, "--format", "json").stdout)
    assert nodes.get("success"), nodes
    assert [n["status"] for n in nodes["nodes"]] == ["online"] * 3, nodes


def test_client_site_sees_only_its_own_data(topology):
    own = json.loads((Path(topology.env["FEDSTO_SITES"]) / "client-0" / "site.json").read_text())
    assert own["site"] == "client-0"
    listing = topology.exec("clientapp-0", "ls -A /data; echo --; ls -A /data/site").stdout.split("--")
    assert listing[0].split() == ["site"], listing
    assert sorted(listing[1].split()) == ["images", "site.json"], listing
    inside = json.loads(topology.exec("clientapp-0", "cat /data/site/site.json").stdout)
    assert inside["site"] == "client-0"

    # Nothing of another site anywhere in the container (its own data excepted).
    others = {}
    for site in ("client-1", "client-2", "server"):
        folder = Path(topology.env["FEDSTO_SITES"]) / site
        own_names = {p.name for p in (Path(topology.env["FEDSTO_SITES"]) / "client-0").rglob("*.png")}
        others[site] = sorted({p.name for p in folder.rglob("*.png")} - own_names)[:3]
        assert others[site], site
    names = " -o ".join(f"-name {n}" for site in others for n in others[site])
    found = topology.exec("clientapp-0", f"find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o "
                                         f"\\( -name site.json -o -name 'site-*.json' -o -name federation.json -o {names} \\) "
                                         f"-print 2>/dev/null; true").stdout.split()
    assert found == ["/data/site/site.json"], found

    # Its network holds its SuperNode only: no SuperLink, no proxy, no other site.
    for host in ("superlink", "proxy", "supernode-1", "clientapp-1", "serverapp"):
        probe = topology.exec("clientapp-0", f"python3 -c \"import socket; socket.getaddrinfo('{host}', 8000)\"", check=False)
        assert probe.returncode != 0, f"clientapp-0 resolves {host}"


def _post(url: str, ca: Path, body: bytes = b"") -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=15) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_proxy_forwards_only_the_fleet_api(topology, record_measurement):
    base = f"https://127.0.0.1:{topology.fleet_port}"
    # Control API (what `flwr run/ls/supernode register` use) and the SuperLink's internals: refused.
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/register-node",
                 "/v1/runtime/pull-task-input", "/health", "/docs"):
        assert _post(base + path, topology.ca) == 403, path
    # The CLI through the proxy gets nowhere either.
    ls = topology.flwr("ls", "via-proxy", "--format", "json", timeout=120)
    assert '"success": false' in ls.stdout or ls.returncode != 0, ls.stdout
    # The Fleet API is forwarded: the SuperLink itself answers (an empty, unsigned request is
    # rejected by it, not by nginx).
    assert _post(base + "/v1/fleet/get-run", topology.ca) not in (403, 404, 502, 503, 504)
    logs = topology.compose("logs", "--no-color", "proxy").stdout
    refused = re.search(r'.*"POST /v1/control/list-runs HTTP/1\.1" 403.*', logs)
    assert refused, logs[-2000:]
    record_measurement(f"proxy refused the Control API: {refused.group(0).strip()}")
    assert re.search(r'"POST /v1/fleet/pull-messages HTTP/1\.1" 200', logs), "SuperNodes do not go through the proxy"


def _run_config(out: Path) -> Path:
    """presets/deploy.toml with a fixed output-dir and a patient round timeout.

    The preset's 90 s round timeout is for fault tests; three ClientApps and the ServerApp on two
    shared cores took 83-97 s per round here, so a busy machine would fail the run for nothing.
    Neither key changes what is computed (both may differ on resume). flwr takes one TOML file or
    key=value pairs, not both, hence the merged file.
    """
    from server.presets import write_run_config

    values = tomllib.loads((ROOT / "presets" / "deploy.toml").read_text())
    values["output-dir"] = RUN_DIR_NAME
    values["round-timeout"] = max(float(values.get("round-timeout", 0)), 600.0)
    return write_run_config(out / "deploy-run.toml", values, "presets/deploy.toml + output-dir (test_docker_deploy)")


def test_deploy_preset_runs_to_completion(topology, record_measurement):
    config = _run_config(topology.flwr_home)
    start = time.monotonic()
    submitted = topology.flwr("run", str(ROOT), CONNECTION, "--run-config", str(config), "--format", "json")
    payload = ds.json_payload(submitted.stdout)
    assert payload.get("success") and payload.get("run-id"), submitted.stdout + submitted.stderr
    run_id = int(payload["run-id"])

    status = ""
    while time.monotonic() - start < RUN_TIMEOUT:
        listed = topology.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=120)
        try:
            listing = ds.json_payload(listed.stdout)
        except ValueError:
            listing = {}
        runs = listing.get("runs") or []
        status = str(runs[0].get("status", "")) if listing.get("success") and runs else status
        if status.startswith("finished"):
            break
        time.sleep(10)
    elapsed = time.monotonic() - start
    record_measurement(f"deploy preset through docker compose: {elapsed:.0f} s, flwr status {status!r}")
    if status != "finished:completed":
        log = topology.flwr("log", str(run_id), CONNECTION, "--show", timeout=120)
        if status == "" or not status.startswith("finished"):
            topology.flwr("stop", str(run_id), CONNECTION, timeout=60)
        pytest.fail(f"run {run_id} ended {status!r} after {elapsed:.0f} s\n--- flwr log ---\n{log.stdout[-5000:]}\n"
                    f"--- compose logs ---\n{topology.logs()}")

    result = json.loads(topology.exec("serverapp", f"cat /var/lib/fedsto/runs/{RUN_DIR_NAME}/result.json").stdout)
    assert result["status"] == "completed", result
    # The preset tolerates a lost site (min-reply-fraction 0.6); here none may be lost.
    assert result.get("failures") == 0, result
    assert sorted(result.get("sites") or {}) == ["client-0", "client-1", "client-2"], result
