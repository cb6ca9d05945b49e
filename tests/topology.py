"""The deployment topology as plain processes on 127.0.0.1 (test support).

The same components as ``docker-compose.yml``, without containers: a SuperLink with TLS, SuperNode
authentication and a database file; the ServerApp's SuperExec; per client site a SuperNode
(process isolation, its own key and ``site`` node config) and the SuperExec that runs its
ClientApp. Every site has its own ``FEDSTO_HOME`` (runs on the server, node-local state on a
client). Quicker than compose, and each component can be killed and restarted on its own, which
the fault tests need.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from server.flwr_cli import stop_process_group

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "topology"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_credentials(folder: Path, nodes: int, *sans: str) -> Path:
    """``deploy/make-credentials.sh`` (the script the compose file runs)."""
    subprocess.run(["sh", str(ROOT / "deploy" / "make-credentials.sh"), str(folder), str(nodes), *sans], check=True,
                   capture_output=True)
    return folder


@dataclass
class Component:
    """One long-running process, its log file, and how it ended."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    restart_on_failure: bool = False  # as compose's ``restart: on-failure``
    exits: list[int] = field(default_factory=list)
    _watch: threading.Thread | None = None

    def start(self) -> "Component":
        self._spawn()
        if self.restart_on_failure and (self._watch is None or not self._watch.is_alive()):
            self._watch = threading.Thread(target=self._restart_loop, daemon=True)
            self._watch.start()
        return self

    def _spawn(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as handle:
            handle.write(f"\n--- start: {' '.join(self.cmd)}\n")
            handle.flush()
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=str(self.log.parent))

    def _restart_loop(self) -> None:
        """Start the process again after a failed exit, as often as it fails; a kill or exit 0 ends it."""
        while self.restart_on_failure:
            proc = self.proc
            code = proc.wait()
            if not self.restart_on_failure or proc is not self.proc:
                return
            self.exits.append(code)
            if code in (0, -signal.SIGKILL, -signal.SIGTERM):
                return
            time.sleep(2.0)
            if self.restart_on_failure and proc is self.proc:
                self._spawn()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process group (a SuperExec's app processes die with it)."""
        if self.proc is not None:
            stop_process_group(self.proc, sig, grace=20.0)

    def stop(self) -> None:
        self.restart_on_failure = False
        self.kill(signal.SIGTERM)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ProcessTopology:
    """SuperLink + server SuperExec + N client sites on 127.0.0.1, TLS and node auth on.

    Parameters
    ----------
    root : Path
        Working folder: credentials, logs, the SuperLink database, every site's FEDSTO_HOME.
    sites : mapping of str to Path
        ``server`` and ``client-<i>`` -> the folder each site holds (``fedsto data export-site``).
        A client site's folder need not exist (fault tests).
    """

    def __init__(self, root: Path, sites: Mapping[str, Path], extra_env: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.extra_env = dict(extra_env or {})
        self.sites = dict(sites)
        self.clients = sorted((s for s in self.sites if s != "server"), key=lambda s: int(s.split("-")[1]))
        self.port = free_port()
        self.node_ports = {site: free_port() for site in self.clients}
        self.creds = make_credentials(self.root / "credentials", len(self.clients))
        self.flwr_home = self.root / "flwr-cli"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: {
            "address": f"127.0.0.1:{self.port}", "root-certificates": str(self.creds / "ca.crt")}}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))
        self.components: dict[str, Component] = {}

    # -- environment and processes ---------------------------------------------------------------

    def env(self, site: str | None = None) -> dict[str, str]:
        env = os.environ.copy()
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.update({"FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "YOLO_OFFLINE": "1",
                    "PYTHONWARNINGS": "ignore::FutureWarning", **self.extra_env})
        if site is not None:
            env["FEDSTO_HOME"] = str(self.home(site))
        return env

    def home(self, site: str) -> Path:
        return self.root / "homes" / site

    def node_index(self, site: str) -> int:
        return self.clients.index(site)

    def _component(self, name: str, cmd: list[str], site: str | None, restart: bool = False) -> Component:
        old = self.components.get(name)
        if old is not None:
            old.stop()
        comp = Component(name, cmd, self.env(site), self.root / "logs" / f"{name}.log", restart_on_failure=restart)
        self.components[name] = comp
        return comp.start()

    def superlink_cmd(self, cert: str = "server") -> list[str]:
        c = self.creds
        return [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / f"{cert}.crt"),
                "--ssl-keyfile", str(c / f"{cert}.key"), "--enable-supernode-auth", "--database", str(self.root / "state.db"),
                "--isolation", "process", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                "--port", str(self.port)]

    def start_superlink(self, cert: str = "server", timeout: float = 60.0) -> None:
        self._component("superlink", self.superlink_cmd(cert), None)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.creds / "ca.crt"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.components["superlink"].alive():
                raise RuntimeError(f"flower-superlink exited: {self.components['superlink'].text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", context=context, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"SuperLink not healthy within {timeout}s")

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "flwr"), *args], env=self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd=str(ROOT))
        if check and proc.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} exited {proc.returncode}: {proc.stdout} {proc.stderr}")
        return proc

    def register(self, site: str, key: Path | None = None) -> dict:
        """``flwr supernode register`` (a key already registered counts as done: a second ``up``)."""
        key = key or self.creds / f"node{self.node_index(site)}.pub"
        out = self.flwr("supernode", "register", str(key), CONNECTION, "--format", "json", check=False)
        payload = json.loads(out.stdout[out.stdout.index("{"):]) if "{" in out.stdout else {}
        if not payload.get("success") and "already in use" not in out.stdout + out.stderr:
            raise RuntimeError(f"register {key}: {out.stdout} {out.stderr}")
        return payload

    def supernode_cmd(self, site: str, ca: Path | None = None, key: Path | None = None, port: int | None = None) -> list[str]:
        """``site``'s SuperNode command; ``ca``, ``key`` and runtime-API ``port`` may be swapped (refusal tests)."""
        i = self.node_index(site)
        return [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(ca or self.creds / "ca.crt"),
                "--auth-supernode-private-key", str(key or self.creds / f"node{i}"),
                "--node-config", f'site="{self.sites[site]}"', "--isolation", "process",
                "--host", "127.0.0.1", "--port", str(port or self.node_ports[site])]

    def start_site(self, site: str) -> None:
        """A client site: its SuperNode (restarted on failure) and the SuperExec running its ClientApp."""
        self._component(f"supernode-{site}", self.supernode_cmd(site), site, restart=True)
        self._component(f"clientapp-{site}", [str(BIN / "flower-superexec"), "--insecure", "--runtime-api-address",
                                              f"127.0.0.1:{self.node_ports[site]}"], site, restart=True)

    def kill_site(self, site: str) -> None:
        for name in (f"supernode-{site}", f"clientapp-{site}"):
            self.components[name].restart_on_failure = False
            self.components[name].kill()

    def start_serverapp(self) -> None:
        self._component("serverapp", [str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{self.port}",
                                      "--root-certificates", str(self.creds / "ca.crt")], "server", restart=True)

    def start(self) -> "ProcessTopology":
        self.start_superlink()
        for site in self.clients:
            self.register(site)
        self.start_serverapp()
        for site in self.clients:
            self.start_site(site)
        return self

    def stop(self) -> None:
        for comp in reversed(list(self.components.values())):
            comp.stop()

    def online_nodes(self) -> int:
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json", check=False)
        try:
            nodes = json.loads(out.stdout[out.stdout.index("{"):]).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for n in nodes if n.get("status") == "online")

    def wait_online(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout}s")
            time.sleep(1.0)

    # -- runs ------------------------------------------------------------------------------------

    def run_config(self, preset: Path, **overrides) -> Path:
        """The preset with the server's site folder and ``overrides``, as a TOML file for ``flwr run``."""
        with preset.open("rb") as handle:
            values = tomllib.load(handle)
        values["federation"] = str(self.sites["server"])
        values.update({k.replace("_", "-"): v for k, v in overrides.items()})
        path = self.root / f"run-config-{len(list(self.root.glob('run-config-*.toml')))}.toml"
        path.write_text(tomli_w.dumps(values))
        return path

    def submit(self, config: Path) -> int:
        out = self.flwr("run", str(ROOT), CONNECTION, "--run-config", str(config), "--format", "json")
        payload = json.loads(out.stdout[out.stdout.index("{"):])
        if not payload.get("success"):
            raise RuntimeError(f"flwr run: {out.stdout}")
        return int(payload["run-id"])

    def run_info(self, run_id: int) -> dict:
        out = self.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json", check=False)
        try:
            payload = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            return {}
        runs = payload.get("runs") or [{}]
        return {"success": payload.get("success"), **runs[0]}

    def wait(self, run_id: int, timeout: float, poll: float = 3.0) -> dict:
        """Poll ``flwr list`` until the run finished (the exit code of ``flwr run`` says nothing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.run_info(run_id)
            if str(info.get("status", "")).startswith("finished"):
                return info
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} not finished after {timeout}s: {self.run_info(run_id)}")

    def run_dir(self, output_dir: str) -> Path:
        return self.home("server") / "runs" / output_dir

    def wait_for_progress(self, output_dir: str, done: int, timeout: float) -> dict:
        """Wait until the run dir's ``progress.json`` shows at least ``done`` finished steps."""
        path = self.run_dir(output_dir) / "progress.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                progress = json.loads(path.read_text())
                if progress["done"] >= done:
                    return progress
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{path}: fewer than {done} steps after {timeout}s")

    def log(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show", check=False, timeout=60).stdout
