"""``fedsto run``: the common case of ``flwr run`` (Ray simulation) made safe and checked.

For each method: merge preset + method + overrides into one TOML (:mod:`server.presets`), make
sure the federation exists (the synthetic one is built here, once, before any run), make sure a
local SuperLink with runtime dependency installation *disabled* is up
(:mod:`server.superlink`), submit with ``flwr run ... --format json``, stream the run's log, wait,
and check the real outcome (:func:`server.flwr_cli.run_verdict`). Finally print the table.

Ctrl-C or SIGTERM stops the run it submitted (``flwr stop``, then the processes it started),
leaves the run directory resumable from its last checkpoint, says how to resume and exits with
130 / 143; a second Ctrl-C kills everything at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

from detection.ultralytics_env import fedsto_home
from server import rundir as rd
from server.config import METHODS, ConfigError, RunConfig
from server.flwr_cli import LaunchError, LogFollower, flwr_stop, run_verdict, submit, wait_for_run
from server.presets import (check_keys, merged_config, parse_methods, parse_overrides, preset_path, read_preset,
                            write_run_config)
from server.superlink import DEFAULT_PORTS, LocalSuperLink

console = Console(highlight=False, soft_wrap=True)  # long paths and errors stay on one line


def project_root() -> Path:
    """The Flower app folder (this project's ``pyproject.toml``)."""
    return Path(__file__).resolve().parent.parent


class Interrupted(Exception):
    """SIGINT or SIGTERM reached ``fedsto run``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class InterruptGuard:
    """SIGINT/SIGTERM handlers for the life of a ``fedsto run``.

    The first signal raises :class:`Interrupted` in the main thread, so the run is stopped in
    order (the ``finally`` blocks run); a second one kills the SuperLink's process groups at once
    and exits. Python's default SIGTERM would end the process without any clean-up, leaving the
    simulation training in the background.
    """

    def __init__(self, superlink: LocalSuperLink) -> None:
        self.superlink = superlink
        self.signum: int | None = None
        self.current_run: tuple[int, str] | None = None  # (run id, connection) of the run being followed

    def __enter__(self) -> "InterruptGuard":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            raise Interrupted(signum)
        console.print("second interrupt: killing the simulation now", style="bold red")
        self.superlink.stop(timeout=0)
        os._exit(128 + signum)


def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run methods in Flower's Ray simulation (wraps `flwr run`) and print the table",
                              description="Extra run-config after `--`, e.g. fedsto run --preset smoke -- seed=1 lr=0.02 "
                                          "federation=/data/fed/federation.json (one key=value per word)")
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
    except (LaunchError, ConfigError, rd.RunDirError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2


def plan_runs(args: argparse.Namespace, app: Path) -> tuple[list[tuple[str, dict]], Path]:
    """(method, merged run config) of every run this command makes, and the folder they go to."""
    extra = parse_overrides(args.extra or [])
    if args.resume:
        run_dir = Path(args.resume).resolve()
        if not rd.holds_run(run_dir):
            raise LaunchError(f"--resume {run_dir}: not a run directory (no {rd.CONFIG})")
        saved = rd.RunDir(run_dir).config()["run_config"]
        values = {**saved, **extra, "resume": str(run_dir)}
        return [(saved["method"], values)], run_dir.parent
    preset_config = read_preset(preset_path(args.preset, app))
    methods = parse_methods(args.method, Path(args.preset).stem, preset_config)
    out = Path(args.out).resolve() if args.out else fedsto_home() / "runs" / f"{Path(args.preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return [(m, merged_config(preset_config, m, out, args.clients, extra)) for m in methods], out


def prepare_federations(runs: list[tuple[str, dict]], app: Path, clients: int | None) -> dict[Path, int]:
    """Check every run's config and build its federation if missing; manifest -> client count.

    Everything here happens before any process starts, so a bad key, value, strategy or output
    folder costs nothing.
    """
    from detection.manifest_reader import Federation
    from server.prepare import ensure_synthetic_federation

    prepared: dict[Path, int] = {}
    for method, values in runs:
        check_keys(values, app)
        cfg = RunConfig.from_run_config(values)
        if not cfg.resume and rd.holds_run(cfg.run_dir()):
            # The ServerApp would refuse too, but only after the SuperLink and the simulation are
            # up, and the old run's table would be printed.
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
        if clients is not None and clients != prepared[manifest]:
            raise LaunchError(f"--clients {clients} but {manifest} has {prepared[manifest]} clients; use another 'federation'")
    return prepared


def _cmd_run(args: argparse.Namespace) -> int:
    app = Path(args.app).resolve()
    ports = (args.port, args.port + 2) if args.port else DEFAULT_PORTS
    superlink = LocalSuperLink(fedsto_home() / "flwr", ports, console)
    with InterruptGuard(superlink) as guard:
        run_dir: Path | None = None
        try:
            runs, out = plan_runs(args, app)
            prepared = prepare_federations(runs, app, args.clients)
            out.mkdir(parents=True, exist_ok=True)
            superlink.start()
            run_dirs, ok_all = [], True
            for method, values in runs:
                cfg = RunConfig.from_run_config(values)
                run_dir = cfg.run_dir()
                ok = _run_one(args, app, guard, method, values, run_dir, prepared[cfg.federation_path()], out)
                ok_all &= ok
                if rd.holds_run(run_dir):
                    run_dirs.append(run_dir)
        except Interrupted as stop:
            _stop_after_interrupt(guard, run_dir)
            return 128 + stop.signum
        finally:
            if guard.signum is None:
                superlink.stop()
    if run_dirs:
        from server.report import print_comparison, write_comparison

        _, summaries, written = write_comparison(run_dirs, out if len(run_dirs) > 1 else None)
        print_comparison(summaries, console)
        if written:
            console.print(f"comparison: {written}")
    return 0 if ok_all else 1


def _run_one(args: argparse.Namespace, app: Path, guard: InterruptGuard, method: str, values: dict, run_dir: Path,
             clients: int, out: Path) -> bool:
    """Submit one method's run (``values``, which writes to ``run_dir``), follow it to its end and say how it went."""
    env = guard.superlink.env
    config_file = out / f"{method}.run-config.toml"
    write_run_config(config_file, values, f"fedsto run: merged run config of {method} (flwr run --run-config {config_file})")
    federation_config = (f"num-supernodes={clients} client-resources-num-cpus={args.cpus_per_client:g} "
                         f"client-resources-num-gpus={args.gpus_per_client:g}")
    console.rule(f"{method}: {clients} clients, run dir {run_dir}")
    t0 = time.monotonic()
    run_id = submit(app, args.connection, config_file, federation_config, env)
    guard.current_run = (run_id, args.connection)
    follower = LogFollower(run_id, args.connection, env, out / f"{method}.log", console=None if args.quiet else console)
    try:
        status = wait_for_run(run_id, run_dir, args.connection, env, args.timeout or None, method, console)
    finally:
        time.sleep(1.0)  # let the last log lines arrive
        follower.stop()
    guard.current_run = None
    ok, verdict = run_verdict(run_dir, status)
    console.print(f"{method}: run {run_id} {verdict} in {time.monotonic() - t0:.0f}s", style="green" if ok else "bold red")
    return ok


def _stop_after_interrupt(guard: InterruptGuard, run_dir: Path | None) -> None:
    """After the first Ctrl-C / SIGTERM: stop the submitted run, then the processes we started."""
    if guard.current_run is not None:
        run_id, connection = guard.current_run
        console.print(f"interrupted: stopping Flower run {run_id} (Ctrl-C again to kill at once)", style="bold red")
        flwr_stop(run_id, connection, guard.superlink.env, timeout=20.0)
    else:
        console.print("interrupted (Ctrl-C again to kill at once)", style="bold red")
    guard.superlink.stop()
    if run_dir is not None and rd.holds_run(run_dir):
        console.print(f"stopped; resume with: fedsto run --resume {run_dir}", style="bold")
    sys.stdout.flush()
