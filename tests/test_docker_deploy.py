"""The real deployment, made by running README.md's one-host deployment block as written.

README.md's "Deployment" section has a bash block marked ``<!-- deploy-one-host: ... -->``. This
module copies the project's git-tracked files into a temp folder and runs that block there with
``bash -euo pipefail``, commands as written (venv first on PATH, a fresh HOME, a unique Compose
project): everything up to ``docker compose up -d --wait`` in the module fixture, the rest (the
CLI connection in ``~/.flwr/config.toml``, ``flwr run``, ``flwr ls``) in
``test_deploy_preset_runs_to_completion``. What is checked, against that README-made topology
(one server site, three client sites, TLS, SuperNode authentication, the nginx proxy):

* the block's ``docker compose build`` and ``docker compose up -d --wait`` work, and a second
  ``up`` (credentials and SuperNode registration already made) succeeds too;
* a client site's ClientApp container sees only its own site folder: no other site's manifest or
  images anywhere in its file system, and no route to the SuperLink;
* the proxy forwards the Fleet API and refuses the Control API (and everything else) with 403;
* the block's ``flwr run . fedsto-compose --run-config presets/deploy.toml`` ends
  ``finished:completed`` and the run directory on the server's volume holds ``result.json`` with
  status ``completed``, no failed reply and all three client sites.

The block uses the compose defaults, so the host's ports 127.0.0.1:8000 (Control API) and 9443
(proxy) must be free. Needs root or a running engine (installed and started when absent, see
``docker_support``); ``docker compose build`` keeps its layer cache, so only the first run pays for
torch (~5 GB). Environment: ``TORCH_INDEX_URL`` (build arg of the project image),
``FEDSTO_BASE_IMAGE``, ``FEDSTO_DOCKER_RUN_TIMEOUT`` (seconds for the run, default 1200).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import docker_support as ds

pytestmark = [pytest.mark.docker, pytest.mark.integration]

ROOT = ds.ROOT
README_MARKER = "<!-- deploy-one-host:"
SPLIT_AFTER = "docker compose up -d --wait"
CONNECTION = "fedsto-compose"  # the connection the README block writes to ~/.flwr/config.toml
CONTROL_PORT = 8000  # docker-compose.yml's defaults, which the README block uses
FLEET_PORT = 9443
RUN_TIMEOUT = float(os.environ.get("FEDSTO_DOCKER_RUN_TIMEOUT", 1200))
SITES = ("server", "client-0", "client-1", "client-2")
# bash -x with a timestamp per traced command (PS4 is not taken from the environment as root).
TRACE = "+[fedsto-trace "
TRACE_PRELUDE = "PS4='+[fedsto-trace $EPOCHREALTIME] '\nset -x\n"


def readme_block(readme: Path = ROOT / "README.md") -> str:
    """The first ```bash block after the deploy-one-host marker comment of README.md."""
    text = readme.read_text()
    at = text.find(README_MARKER)
    if at < 0:
        pytest.fail(f"{readme} has no `{README_MARKER} ... -->` marker comment before its one-host deployment block")
    match = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M).search(text, at)
    if match is None:
        pytest.fail(f"{readme}: no ```bash ... ``` block after the `{README_MARKER}` marker comment")
    return match.group(1)


def split_block(block: str) -> tuple[str, str]:
    """(everything up to and including the line `docker compose up -d --wait`, the rest)."""
    lines = block.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() == SPLIT_AFTER:
            return "".join(lines[:i + 1]), "".join(lines[i + 1:])
    pytest.fail(f"README deployment block has no line `{SPLIT_AFTER}` to split it at:\n{block}")


def copy_project(dest: Path) -> None:
    """The git-tracked files of the checkout (as they are in the working tree) into ``dest``."""
    listed = ds.run(["git", "ls-files", "-z"], cwd=ROOT, timeout=60).stdout.split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    if ds.EXTRA_CA.exists():
        (dest / "deploy" / "extra-ca").mkdir(parents=True, exist_ok=True)
        shutil.copy2(ds.EXTRA_CA, dest / "deploy" / "extra-ca" / ds.EXTRA_CA.name)


def port_busy(port: int, host: str) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def venv_bin() -> Path:
    bin_dir = ROOT / ".venv" / "bin"
    return bin_dir if (bin_dir / "fedsto").exists() else Path(sys.executable).parent


def readme_env(engine: ds.Engine, home: Path, project: str, base_image: str) -> dict[str, str]:
    """What a user's shell would have: the project's venv first on PATH, a fresh HOME, the engine."""
    drop = ("FEDSTO_", "COMPOSE_", "FLWR_", "DOCKER_BUILDKIT", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in engine.env.items() if not k.startswith(drop)}
    env.update({"PATH": f"{venv_bin()}{os.pathsep}{env.get('PATH', os.defpath)}", "HOME": str(home),
                "COMPOSE_PROJECT_NAME": project, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    if base_image != ds.DEFAULT_BASE_IMAGE:
        env["BASE_IMAGE"] = base_image
    if os.environ.get("TORCH_INDEX_URL"):
        env["TORCH_INDEX_URL"] = os.environ["TORCH_INDEX_URL"]
    return env


def run_bash(script: str, env: dict, cwd: Path, log: Path, timeout: float) -> tuple[int, str, list[tuple[float, str]]]:
    """``bash -euo pipefail`` on ``script`` (traced); (exit code, stdout, [(start time, traced command)]).

    stderr (trace and the commands' own stderr) goes to ``log``.
    """
    with log.open("a") as err:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", TRACE_PRELUDE + script], env=env, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, timeout=timeout)
    trace = []
    for line in log.read_text(errors="replace").splitlines():
        found = re.match(r"^\++\[fedsto-trace (\d+(?:\.\d+)?)\] (.*)$", line)
        if found:
            trace.append((float(found.group(1)), found.group(2)))
    return proc.returncode, proc.stdout, trace


def command_seconds(trace: list[tuple[float, str]], command: str, end: float) -> float | None:
    """Seconds from the traced ``command`` to the next traced command (or ``end``)."""
    for i, (start, text) in enumerate(trace):
        if text.strip() == command:
            return (trace[i + 1][0] if i + 1 < len(trace) else end) - start
    return None


def json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in ``text`` (flwr --format json outputs, one after another)."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) >= 0:
        try:
            obj, end = decoder.raw_decode(text, at)
        except ValueError:
            at += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
        at = end
    return out


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


class Topology:
    """The README-made compose project: ``docker compose`` and ``flwr`` against it."""

    def __init__(self, engine: ds.Engine, project_dir: Path, home: Path, env: dict[str, str], project: str,
                 work: Path):
        self.engine = engine
        self.dir = project_dir
        self.home = home
        self.env = env
        self.project = project
        self.compose_file = project_dir / "docker-compose.yml"
        self.credentials = project_dir / "deploy" / "credentials"
        self.sites = project_dir / "deploy" / "sites"
        self.control_port = CONTROL_PORT
        self.fleet_port = FLEET_PORT
        self.ca = self.credentials / "cli" / "ca.crt"
        # The tests' own CLI config (the README's ~/.flwr/config.toml is only written by the
        # block's second part): the README's connection, plus one through the proxy.
        self.flwr_home = work / "flwr-home"
        self.flwr_home.mkdir()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.control_port}"\nroot-certificates = "{self.ca}"\n\n'
            f'[superlink.via-proxy]\naddress = "127.0.0.1:{self.fleet_port}"\nroot-certificates = "{self.ca}"\n')
        self.flwr_env = {**env, "FLWR_HOME": str(self.flwr_home)}

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return ds.run(["docker", "compose", "-f", str(self.compose_file), "-p", self.project, *args],
                      env=self.env, cwd=self.dir, timeout=timeout, check=check)

    def exec(self, service: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", service, "sh", "-c", script, timeout=120, check=check)

    def flwr(self, *args: str, timeout: float = 300, readme_home: bool = False) -> subprocess.CompletedProcess:
        """flwr from the venv; with the README's ~/.flwr (``readme_home``) or the tests' config."""
        return ds.run([str(venv_bin() / "flwr"), *args], env=self.env if readme_home else self.flwr_env,
                      cwd=self.dir, timeout=timeout, check=False)

    def logs(self, tail: int = 150) -> str:
        proc = self.compose("logs", "--no-color", "--tail", str(tail), timeout=120, check=False)
        return proc.stdout + proc.stderr

    def up(self) -> float:
        start = time.monotonic()
        proc = self.compose("up", "-d", "--wait", timeout=900, check=False)
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
def base_image(engine, record_measurement):
    """The base the README's `docker compose build` uses (BASE_IMAGE when python:3.11-slim is out of reach)."""
    try:
        base = ds.ensure_base_image(engine)
    except ds.Unavailable as err:
        pytest.skip(f"no base image for the builds: {err}")
    ds.ensure_extra_ca(engine.notes)
    for note in engine.notes:
        record_measurement(f"docker: {note}")
    return base


@pytest.fixture(scope="module")
def topology(engine, base_image, record_measurement):
    first, _ = split_block(readme_block())
    busy = [f"{host}:{port}" for port, host in ((CONTROL_PORT, "127.0.0.1"), (FLEET_PORT, "0.0.0.0"))
            if port_busy(port, host)]
    if busy:
        pytest.fail(f"the README block publishes the compose defaults 127.0.0.1:{CONTROL_PORT} and "
                    f"0.0.0.0:{FLEET_PORT}, but {', '.join(busy)} is already in use on this host "
                    f"(another compose project? `docker ps`); free it and rerun")
    project = f"fedsto-readme-{os.getpid()}"
    # Not pytest's tmp_path: its folders are 0700, and the containers' uid 49999 must read the sites.
    work = Path(tempfile.mkdtemp(prefix="fedsto-readme-"))
    work.chmod(0o755)
    copy, home = work / "project", Path(tempfile.mkdtemp(prefix="fedsto-readme-home-"))
    copy.mkdir(mode=0o755)
    env = readme_env(engine, home, project, base_image)
    log = work / "readme-part1.log"
    topo = None
    try:
        copy_project(copy)
        topo = Topology(engine, copy, home, env, project, work)
        start = time.monotonic()
        code, out, trace = run_bash(first, env, copy, log, timeout=3600)
        end = time.time()
        if code != 0:
            pytest.fail(f"README deployment block (up to `{SPLIT_AFTER}`) failed with exit code {code} in {copy}:\n"
                        f"{out[-3000:]}\n--- stderr (bash -x trace) ---\n{tail(log)}\n--- compose logs ---\n{topo.logs()}")
        record_measurement(f"README block up to `{SPLIT_AFTER}`: {time.monotonic() - start:.0f} s (base {base_image})")
        for command in ("docker compose build", SPLIT_AFTER):
            seconds = command_seconds(trace, command, end)
            record_measurement(f"README `{command}`: " + (f"{seconds:.0f} s" if seconds is not None else "not traced"))
        yield topo
    finally:
        if topo is not None:
            topo.compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


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
    own = json.loads((topology.sites / "client-0" / "site.json").read_text())
    assert own["site"] == "client-0"
    listing = topology.exec("clientapp-0", "ls -A /data; echo --; ls -A /data/site").stdout.split("--")
    assert listing[0].split() == ["site"], listing
    assert sorted(listing[1].split()) == ["images", "site.json"], listing
    inside = json.loads(topology.exec("clientapp-0", "cat /data/site/site.json").stdout)
    assert inside["site"] == "client-0"

    # Nothing of another site anywhere in the container (its own data excepted).
    others = {}
    own_names = {p.name for p in (topology.sites / "client-0").rglob("*.png")}
    for site in ("client-1", "client-2", "server"):
        others[site] = sorted({p.name for p in (topology.sites / site).rglob("*.png")} - own_names)[:3]
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


def test_deploy_preset_runs_to_completion(topology, record_measurement):
    """The rest of the README block as written: the CLI connection, `flwr run`, `flwr ls`."""
    _, second = split_block(readme_block())
    log = topology.dir.parent / "readme-part2.log"
    start = time.monotonic()
    code, out, _ = run_bash(second, topology.env, topology.dir, log, timeout=600)
    assert code == 0, (f"README deployment block (after `{SPLIT_AFTER}`) failed with exit code {code}:\n{out[-3000:]}\n"
                       f"--- stderr (bash -x trace) ---\n{tail(log)}")
    config = topology.home / ".flwr" / "config.toml"
    assert f"[superlink.{CONNECTION}]" in config.read_text(), config.read_text()
    outputs = json_objects(out)
    submitted = next((o for o in outputs if "run-id" in o), None)
    assert submitted and submitted.get("success"), f"no successful `flwr run` JSON in the block's output:\n{out[-3000:]}"
    run_id = int(submitted["run-id"])
    listed = [o for o in outputs if "runs" in o]
    assert listed and listed[-1].get("success"), f"`flwr ls` JSON missing or unsuccessful:\n{out[-3000:]}"
    assert run_id in [int(r.get("run-id", -1)) for r in listed[-1]["runs"]], listed[-1]

    status = ""
    while time.monotonic() - start < RUN_TIMEOUT:
        polled = topology.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=120,
                               readme_home=True)
        try:
            listing = ds.json_payload(polled.stdout)
        except ValueError:
            listing = {}
        runs = listing.get("runs") or []
        status = str(runs[0].get("status", "")) if listing.get("success") and runs else status
        if status.startswith("finished"):
            break
        time.sleep(10)
    elapsed = time.monotonic() - start
    record_measurement(f"README `flwr run` (presets/deploy.toml as is) through docker compose: {elapsed:.0f} s, "
                       f"flwr status {status!r}")
    if status != "finished:completed":
        log_out = topology.flwr("log", str(run_id), CONNECTION, "--show", timeout=120, readme_home=True)
        if not status.startswith("finished"):
            topology.flwr("stop", str(run_id), CONNECTION, timeout=60, readme_home=True)
        pytest.fail(f"run {run_id} ended {status!r} after {elapsed:.0f} s\n--- flwr log ---\n{log_out.stdout[-5000:]}\n"
                    f"--- compose logs ---\n{topology.logs()}")

    # Fresh volumes (down -v at the end, unique project): the only run directory is this run's.
    found = topology.exec("serverapp", "ls /var/lib/fedsto/runs/*/result.json").stdout.split()
    assert len(found) == 1, found
    result = json.loads(topology.exec("serverapp", f"cat {found[0]}").stdout)
    assert result["status"] == "completed", result
    # The preset tolerates a lost site (min-reply-fraction 0.6); here none may be lost.
    assert result.get("failures") == 0, result
    assert sorted(result.get("sites") or {}) == ["client-0", "client-1", "client-2"], result
    rounds = result.get("rounds") or result.get("history")
    if rounds:
        record_measurement(f"run result: {json.dumps(rounds)[:400]}")
