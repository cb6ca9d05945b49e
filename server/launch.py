"""``fedsto run``: the common case of ``flwr run`` (Ray simulation) made safe and checked.

For each method: merge preset + method + overrides into one TOML (``flwr run`` does not accept a
TOML file *and* ``key=value`` overrides together), make sure the federation exists (the synthetic
one is built here, once, before any run), make sure a local SuperLink with runtime dependency
installation *disabled* is up (reuse one only if it provably has it disabled; otherwise start our
own and stop it by pid afterwards), submit with ``flwr run ... --format json``, stream the run's
log, wait, and check the real outcome: the run directory's ``result.json`` *and* ``flwr list``'s
status (``flwr run``'s exit code says nothing about the run). Finally print the per-domain table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from detection.ultralytics_env import fedsto_home
from server import rundir as rd
from server.config import METHODS, ConfigError, RunConfig

console = Console(highlight=False)

# Methods a preset runs when --method is not given (a preset can only hold run-config keys).
DEFAULT_METHODS = {"demo": ("partial", "fedsto")}
DEFAULT_PORTS = (39091, 39093)  # Flower's local SuperLink: HTTP API, Control API
RUNTIME_INSTALL_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"


class LaunchError(RuntimeError):
    """Something that stops ``fedsto run`` before or around a run (message says what to do)."""


# -- configuration -------------------------------------------------------------------------------


def project_root() -> Path:
    """The Flower app folder (this project's ``pyproject.toml``)."""
    return Path(__file__).resolve().parent.parent


def preset_path(name: str, app: Path) -> Path:
    """``presets/<name>.toml`` of the app, or a path to a TOML file."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path.resolve()
    candidate = app / "presets" / f"{name}.toml"
    if not candidate.exists():
        known = sorted(p.stem for p in (app / "presets").glob("*.toml"))
        raise LaunchError(f"no preset {name!r} (looked for {candidate}); presets: {', '.join(known)}")
    return candidate


def parse_methods(values: Sequence[str] | None, preset: str, preset_config: Mapping[str, Any]) -> list[str]:
    """``--method a --method b,c`` -> ``[a, b, c]`` (validated); default from the preset."""
    if not values:
        return list(DEFAULT_METHODS.get(preset, (preset_config.get("method", "fedsto"),)))
    methods = [m.strip() for v in values for m in v.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise LaunchError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` words as Flower parses ``--run-config`` (TOML values)."""
    from flwr.common.config import parse_config_args

    items = [i for i in items if i != "--"]
    return dict(parse_config_args([" ".join(items)])) if items else {}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    raise LaunchError(f"run-config values must be scalars, got {value!r}")


def write_run_config(path: Path, values: Mapping[str, Any], note: str) -> Path:
    lines = [f"# {note}"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_keys(values: Mapping[str, Any], app: Path) -> None:
    """Fail early, naming the key, where ``flwr run`` would reject an unknown run-config key."""
    with (app / "pyproject.toml").open("rb") as handle:
        known = set(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
    unknown = sorted(set(values) - known)
    if unknown:
        raise LaunchError(f"unknown run-config key(s) {unknown}; see [tool.flwr.app.config] in {app / 'pyproject.toml'}")


def merged_config(preset_config: Mapping[str, Any], method: str, out: Path, clients: int | None,
                  extra: Mapping[str, Any]) -> dict[str, Any]:
    """Preset, then method / output dir / client count, then the user's overrides (last wins)."""
    values = dict(preset_config)
    values["method"] = method
    values["output-dir"] = str(out / method)
    if clients is not None:
        base = values.get("synthetic-clients", RunConfig.synthetic_clients)
        values["synthetic-clients"] = clients
        if clients != base and values.get("synthetic-images", RunConfig.synthetic_images) > 0:
            # A synthetic federation's client count is baked into its manifest: one folder per count.
            values["federation"] = f"{values.get('federation', RunConfig.federation)}-{clients}clients"
    values.update(extra)
    return values


# -- the local SuperLink ---------------------------------------------------------------------------


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


def flwr_env(flwr_home: Path, ports: tuple[int, int]) -> dict[str, str]:
    """Environment for ``flwr`` and the SuperLink: project-owned FLWR_HOME, no installs, no telemetry."""
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update({"FLWR_HOME": str(flwr_home), RUNTIME_INSTALL_ENV: "1", "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
                "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]), "FEDSTO_HOME": str(fedsto_home()),
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PYTHONWARNINGS": "ignore::FutureWarning"})
    return env


def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise LaunchError(f"`{name}` not found next to {sys.executable} or on PATH (is flwr[simulation] installed?)")
    return found


class LocalSuperLink:
    """A local simulation SuperLink that is known to run apps in this environment.

    Parameters
    ----------
    flwr_home : Path
        Project-owned ``FLWR_HOME`` (apps, state database, logs).
    ports : (int, int)
        HTTP API and Control API ports (Flower's ``local`` connection reads them from the environment).
    """

    def __init__(self, flwr_home: Path, ports: tuple[int, int] = DEFAULT_PORTS) -> None:
        self.flwr_home = flwr_home
        self.ports = ports
        self.env = flwr_env(flwr_home, ports)
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None

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
            console.print(f"reusing local SuperLink pid {pid} on 127.0.0.1:{port} (runtime dependency installation off)")
            return
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        state = self.flwr_home / "local-superlink"
        state.mkdir(parents=True, exist_ok=True)
        cmd = [_executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
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
        console.print(f"started local SuperLink pid {self.pid} on 127.0.0.1:{port} (FLWR_HOME={self.flwr_home})")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the SuperLink we started and everything it spawned; a reused one is left running.

        The SuperExec and the simulation runtime (with Ray) run in their own sessions, and the
        simulation outlives a dead SuperLink, so their process groups are collected *before* the
        SuperLink goes (afterwards they are orphans of pid 1) and signalled too.
        """
        if self.process is None or self.process.poll() is not None:
            return
        groups = {info[2] for pid in descendants(self.process.pid) if (info := process_stat(pid)) is not None} | {self.process.pid}
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            for pgid in groups:
                try:
                    os.killpg(pgid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while _any_group_alive(groups) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _any_group_alive(groups):
                break
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


# -- one run ---------------------------------------------------------------------------------------


def flwr_cmd(*args: str) -> list[str]:
    return [_executable("flwr"), *args]


def submit(app: Path, connection: str, config_file: Path, federation_config: str, env: Mapping[str, str]) -> int:
    """``flwr run`` -> run id (raises with flwr's own message on failure)."""
    proc = subprocess.run(flwr_cmd("run", str(app), connection, "--run-config", str(config_file),
                                   "--federation-config", federation_config, "--format", "json"),
                          env=dict(env), capture_output=True, text=True, cwd=str(app))
    try:
        payload = json.loads(proc.stdout[proc.stdout.index("{"):])
    except (ValueError, json.JSONDecodeError):
        payload = {}
    if proc.returncode != 0 or not payload.get("success") or not payload.get("run-id"):
        raise LaunchError(f"flwr run failed (exit {proc.returncode}): {proc.stdout.strip()} {proc.stderr.strip()}")
    return int(payload["run-id"])


def flwr_status(run_id: int, connection: str, env: Mapping[str, str]) -> str:
    """``flwr list --run-id`` status text (``running``, ``finished:completed``, ...), "" if unknown."""
    proc = subprocess.run(flwr_cmd("list", connection, "--run-id", str(run_id), "--format", "json"), env=dict(env),
                          capture_output=True, text=True)
    try:
        runs = json.loads(proc.stdout[proc.stdout.index("{"):]).get("runs", [])
    except (ValueError, json.JSONDecodeError):
        return ""
    return str(runs[0].get("status", "")) if runs else ""


class LogFollower:
    """``flwr log --stream`` in the background: lines printed and saved to a file."""

    def __init__(self, run_id: int, connection: str, env: Mapping[str, str], path: Path, echo: bool) -> None:
        self.path = path
        self.proc = subprocess.Popen(flwr_cmd("log", str(run_id), connection, "--stream"), env=dict(env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.thread = threading.Thread(target=self._pump, args=(echo,), daemon=True)
        self.thread.start()

    def _pump(self, echo: bool) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if echo:
                    console.print(line.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.thread.join(5)


def wait_for_run(run_id: int, run_dir: Path, connection: str, env: Mapping[str, str], timeout: float | None,
                 label: str, poll: float = 1.0, status_every: float = 15.0) -> str:
    """Wait until Flower reports the run finished; a rich bar follows ``progress.json``. Returns the status.

    The run directory is cheap to watch; ``flwr list`` starts a Python process per call, so it is
    asked only every ``status_every`` seconds (to notice a ServerApp that died without a word) and
    once the run directory says the run ended.
    """
    start = last_status = time.monotonic()
    progress_file = run_dir / rd.PROGRESS
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=None)
        while True:
            ended = False
            if progress_file.exists():
                try:
                    p = json.loads(progress_file.read_text())
                    bar.update(task, total=p["total"], completed=p["done"], description=f"{label}: {p['label']}")
                    ended = p.get("status") in ("completed", "failed")
                except (json.JSONDecodeError, KeyError, OSError):
                    pass
            if ended or time.monotonic() - last_status > status_every:
                last_status = time.monotonic()
                status = flwr_status(run_id, connection, env)
                if status.startswith("finished"):
                    return status
            if timeout and time.monotonic() - start > timeout:
                subprocess.run(flwr_cmd("stop", str(run_id), connection), env=dict(env), capture_output=True)
                return "finished:timeout"
            time.sleep(poll)


def run_verdict(run_dir: Path, flwr_status_text: str) -> tuple[bool, str]:
    """A run succeeded only if its own ``result.json`` says completed *and* Flower says completed."""
    result = rd.RunDir(run_dir).read_json(rd.RESULT) if rd.holds_run(run_dir) else None
    own = (result or {}).get("status", "missing")
    if own == "completed" and flwr_status_text == "finished:completed":
        return True, "completed"
    reason = (result or {}).get("reason", "")
    return False, f"result.json: {own}{(' (' + reason + ')') if reason else ''}; flwr: {flwr_status_text or 'unknown'}"


# -- the command -----------------------------------------------------------------------------------


def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run methods in Flower's Ray simulation (wraps `flwr run`) and print the table",
                              description="Extra run-config after `--`, e.g. fedsto run --preset smoke -- seed=1 lr=0.02")
    p.add_argument("--preset", default="demo", help="presets/<NAME>.toml or a TOML file (default: demo)")
    p.add_argument("--method", action="append", help=f"method(s), repeatable or comma-separated: {', '.join(METHODS)} "
                   "(default: the preset's; demo: partial,fedsto)")
    p.add_argument("--clients", type=int, default=None, help="simulated clients (default: the federation's)")
    p.add_argument("--out", default=None, help="folder for the run dirs (default: $FEDSTO_HOME/runs/<preset>-<time>)")
    p.add_argument("--resume", default=None, help="continue a run dir from its last checkpoint (same config)")
    p.add_argument("--app", default=str(project_root()), help="the Flower app folder (default: this project)")
    p.add_argument("--connection", default="local", help="SuperLink connection (default: local simulation)")
    p.add_argument("--port", type=int, default=None, help="local SuperLink HTTP port (Control API: port+2)")
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=0.0, help="seconds per run before it is stopped (0: none)")
    p.add_argument("--quiet", action="store_true", help="do not echo the ServerApp's log")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- key=value ... (run-config overrides)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        return _cmd_run(args)
    except (LaunchError, ConfigError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


def _plan_runs(args: argparse.Namespace, app: Path) -> tuple[list[tuple[str, dict]], Path]:
    extra = parse_overrides(args.extra or [])
    if args.resume:
        run_dir = Path(args.resume).resolve()
        saved = rd.RunDir(run_dir).config()["run_config"] if rd.holds_run(run_dir) else None
        if saved is None:
            raise LaunchError(f"--resume {run_dir}: not a run directory (no {rd.CONFIG})")
        values = {**saved, **extra, "resume": str(run_dir)}
        return [(saved["method"], values)], run_dir.parent
    preset_file = preset_path(args.preset, app)
    with preset_file.open("rb") as handle:
        preset_config = tomllib.load(handle)
    methods = parse_methods(args.method, Path(args.preset).stem, preset_config)
    out = Path(args.out).resolve() if args.out else fedsto_home() / "runs" / f"{Path(args.preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return [(m, merged_config(preset_config, m, out, args.clients, extra)) for m in methods], out


def _cmd_run(args: argparse.Namespace) -> int:
    from server.prepare import ensure_synthetic_federation
    from detection.federation import Federation

    app = Path(args.app).resolve()
    runs, out = _plan_runs(args, app)
    ports = (args.port, args.port + 2) if args.port else DEFAULT_PORTS
    superlink = LocalSuperLink(fedsto_home() / "flwr", ports)
    env = superlink.env
    run_dirs, ok_all = [], True
    prepared: dict[Path, int] = {}
    for method, values in runs:
        check_keys(values, app)
        cfg = RunConfig.from_run_config(values)
        if not cfg.resume and rd.holds_run(cfg.run_dir()):
            # Refused here, before anything starts: the ServerApp would refuse too, but only after
            # the SuperLink and the simulation are up, and the old run's table would be printed.
            raise LaunchError(f"{cfg.run_dir()} already holds a run; use another --out, or continue it with "
                              f"fedsto run --resume {cfg.run_dir()}")
        manifest = cfg.federation_path()
        if manifest not in prepared:
            manifest, built = ensure_synthetic_federation(
                manifest, num_images=cfg.synthetic_images, imgsz=cfg.synthetic_imgsz, num_clients=cfg.synthetic_clients,
                weathers=cfg.weathers, server_fraction=cfg.synthetic_server_fraction,
                test_fraction=cfg.synthetic_test_fraction, seed=cfg.seed)
            prepared[manifest] = Federation.load(manifest).num_clients
            console.print(f"{'built' if built else 'using'} federation {manifest} ({prepared[manifest]} clients)")
        # Absolute: a reused SuperLink may have another $FEDSTO_HOME than this shell.
        values["federation"] = str(manifest)
        clients = prepared[manifest]
        if args.clients is not None and args.clients != clients:
            raise LaunchError(f"--clients {args.clients} but {manifest} has {clients} clients; use another 'federation'")
    out.mkdir(parents=True, exist_ok=True)
    superlink.start()
    try:
        for method, values in runs:
            cfg = RunConfig.from_run_config(values)
            clients = prepared[cfg.federation_path()]
            run_dir = cfg.run_dir()
            config_file = write_run_config(out / f"{method}.run-config.toml", values,
                                           f"fedsto run: merged run config of {method} (flwr run --run-config {out / f'{method}.run-config.toml'})")
            federation_config = (f"num-supernodes={clients} client-resources-num-cpus={args.cpus_per_client:g} "
                                 f"client-resources-num-gpus={args.gpus_per_client:g}")
            console.rule(f"{method}: {clients} clients, run dir {run_dir}")
            t0 = time.monotonic()
            run_id = submit(app, args.connection, config_file, federation_config, env)
            follower = LogFollower(run_id, args.connection, env, out / f"{method}.log", echo=not args.quiet)
            try:
                status = wait_for_run(run_id, run_dir, args.connection, env, args.timeout or None, method)
            except KeyboardInterrupt:
                console.print(f"interrupted: stopping run {run_id} (resume with: fedsto run --resume {run_dir})")
                subprocess.run(flwr_cmd("stop", str(run_id), args.connection), env=dict(env), capture_output=True)
                raise
            finally:
                time.sleep(1.0)  # let the last log lines arrive
                follower.stop()
            ok, verdict = run_verdict(run_dir, status)
            console.print(f"{method}: run {run_id} {verdict} in {time.monotonic() - t0:.0f}s", style="green" if ok else "bold red")
            ok_all &= ok
            if rd.holds_run(run_dir):
                run_dirs.append(run_dir)
    finally:
        superlink.stop()
    if run_dirs:
        from server.report import print_comparison, write_comparison

        _, summaries, written = write_comparison(run_dirs, out if len(run_dirs) > 1 else None)
        print_comparison(summaries, console)
        if written:
            console.print(f"comparison: {written}")
    return 0 if ok_all else 1
