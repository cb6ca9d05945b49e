"""The local simulation SuperLink of ``fedsto run``, and supervision of the processes it spawns.

``flwr run . local`` starts a detached SuperLink that would install the app's dependencies with
uv at run time. :class:`LocalSuperLink` reuses one only if it provably has that disabled, or
starts its own, and stops it *with everything it spawned* (SuperExec, ``flwr-simulation``, Ray
and its actors run in sessions of their own and outlive a dead SuperLink). Linux ``/proc`` only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from rich.console import Console

from server.flwr_cli import RUNTIME_INSTALL_ENV, LaunchError, executable, flwr_env

DEFAULT_PORTS = (39091, 39093)  # Flower's local SuperLink: HTTP API, Control API


def _proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def find_superlink_pid(port: int) -> int | None:
    """Pid of a ``flower-superlink`` process serving ``--port port`` (Linux ``/proc``), or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _proc_cmdline(int(entry.name))
        if not any(Path(a).name == "flower-superlink" for a in argv[:2]):
            continue
        if "--port" in argv and argv.index("--port") + 1 < len(argv) and argv[argv.index("--port") + 1] == str(port):
            return int(entry.name)
    return None


def runtime_install_disabled(pid: int) -> bool:
    """Did this SuperLink start with runtime dependency installation disabled (flag or env)?"""
    argv = _proc_cmdline(pid)
    if "--disable-runtime-dependency-installation" in argv:
        return True
    return _proc_environ(pid).get(RUNTIME_INSTALL_ENV) == "1" and "--allow-runtime-dependency-installation" not in argv


def superlink_healthy(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success
    except httpx.HTTPError:
        return False


class LocalSuperLink:
    """A local simulation SuperLink that is known to run apps in this environment.

    Parameters
    ----------
    flwr_home : Path
        Project-owned ``FLWR_HOME`` (apps, state database, logs).
    ports : (int, int)
        HTTP API and Control API ports (Flower's ``local`` connection reads them from the environment).
    console : rich.console.Console, optional
        Where the one-line start/reuse notes go.
    """

    def __init__(self, flwr_home: Path, ports: tuple[int, int] = DEFAULT_PORTS, console: Console | None = None) -> None:
        self.flwr_home = flwr_home
        self.ports = ports
        self.env = flwr_env(flwr_home, ports)
        self.console = console or Console(highlight=False)
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None
        self._groups: set[int] = set()

    def start(self, timeout: float = 60.0) -> None:
        """Reuse a compliant SuperLink on the port, refuse a non-compliant one, or start one."""
        port = self.ports[0]
        if superlink_healthy(port):
            pid = find_superlink_pid(port)
            if pid is None:
                raise LaunchError(f"a SuperLink answers on 127.0.0.1:{port} but no flower-superlink process of this user "
                                  "serves that port, so whether it installs dependencies at run time cannot be checked; "
                                  "stop it or pass --port to use other ports")
            if not runtime_install_disabled(pid):
                raise LaunchError(f"refusing to reuse the local SuperLink (pid {pid}, port {port}): it was started without "
                                  f"{RUNTIME_INSTALL_ENV}=1 / --disable-runtime-dependency-installation and would install "
                                  f"the app's dependencies into a fresh environment per run. Stop it (kill {pid}) or "
                                  "pass --port to start a separate one")
            self.pid = pid
            self.console.print(f"reusing local SuperLink pid {pid} on 127.0.0.1:{port} (runtime dependency installation off)")
            return
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        state = self.flwr_home / "local-superlink"
        state.mkdir(parents=True, exist_ok=True)
        cmd = [executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--control-api-address", f"127.0.0.1:{self.ports[1]}", "--host", "127.0.0.1", "--port", str(port),
               "--database", str(state / "state.db"), "--disable-runtime-dependency-installation",
               "--log-file", str(state / "superlink.log")]
        log = (state / "superlink.out").open("ab")
        # Its own session: stopping it later signals its whole process group (SuperExec, simulation, Ray).
        self.process = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=str(state),
                                        start_new_session=True)
        self.pid = self.process.pid
        deadline = time.monotonic() + timeout
        while not superlink_healthy(port):
            if self.process.poll() is not None:
                raise LaunchError(f"flower-superlink exited with code {self.process.returncode}; see {state / 'superlink.out'}")
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchError(f"flower-superlink did not become healthy within {timeout:.0f}s; see {state / 'superlink.out'}")
            time.sleep(0.3)
        self.console.print(f"started local SuperLink pid {self.pid} on 127.0.0.1:{port} (FLWR_HOME={self.flwr_home})")

    def process_groups(self) -> set[int]:
        """Process groups of the SuperLink we started and of everything it spawned so far.

        The SuperExec and the simulation runtime (with Ray) run in sessions of their own, and the
        simulation outlives a dead SuperLink: once the SuperLink is gone they are orphans of pid 1,
        no longer its descendants. So every group seen is remembered.
        """
        if self.process is not None:
            self._groups |= {info[2] for pid in descendants(self.process.pid) if (info := process_stat(pid)) is not None}
            self._groups.add(self.process.pid)
        return set(self._groups)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the SuperLink we started and everything it spawned (SIGTERM, then SIGKILL after
        ``timeout`` seconds; 0: SIGKILL at once); a reused SuperLink is left running."""
        if self.process is None:
            return
        groups = self.process_groups()
        steps = ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)) if timeout > 0 else ((signal.SIGKILL, 5.0),)
        for sig, wait in steps:
            if not _any_group_alive(groups):
                break
            for pgid in groups:
                try:
                    os.killpg(pgid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while _any_group_alive(groups) and time.monotonic() < deadline:
                time.sleep(0.2)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process from ``/proc/<pid>/stat``, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def _processes() -> dict[int, tuple[str, int, int]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := process_stat(int(entry.name))) is not None:
            out[int(entry.name)] = info
    return out


def descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in _processes().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _any_group_alive(pgids: set[int]) -> bool:
    """Whether a live (not zombie) process is left in any of the process groups ``pgids``."""
    return any(g in pgids and state not in ("Z", "X") for state, _, g in _processes().values())
