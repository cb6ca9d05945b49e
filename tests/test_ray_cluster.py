"""The simulation on an existing two-host Ray cluster: clients run on both hosts.

The second host is a network namespace joined to this one by a veth pair (its own interface and
IP address, as a second machine on a LAN would have; it shares the file system, as a cluster
with a shared disk does). ``ray start --head`` runs here, ``ray start --address`` there; ``fedsto
run`` finds the cluster through ``RAY_ADDRESS``, as the README's "Scaling up" says. Each client's
train reply names the Ray node it ran on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from test_flower_integration import free_port_pair

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@pytest.fixture
def two_host_cluster():
    """(address, {node ip: node id}) of a Ray cluster with one CPU here and one in a second network namespace."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a second host needs root and iproute2 (ip netns) to make a network namespace")
    tag = f"{os.getpid() % 10000}"
    netns, here_if, there_if = f"fedsto-ray{tag}", f"fr{tag}a", f"fr{tag}b"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    head_ip, worker_ip = f"{subnet}.1", f"{subnet}.2"
    port = free_port_pair()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", here_if, "type", "veth", "peer", "name", there_if)
        sh("ip", "link", "set", there_if, "netns", netns)
        sh("ip", "addr", "add", f"{head_ip}/24", "dev", here_if)
        sh("ip", "link", "set", here_if, "up")
        sh("ip", "netns", "exec", netns, "ip", "addr", "add", f"{worker_ip}/24", "dev", there_if)
        sh("ip", "netns", "exec", netns, "ip", "link", "set", there_if, "up")
        sh("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.strip()}")
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    try:
        sh(RAY, "start", "--head", "--node-ip-address", head_ip, "--port", str(port), "--include-dashboard=false",
           "--temp-dir", f"{temp}/head", *common)
        sh("ip", "netns", "exec", netns, RAY, "start", "--address", f"{head_ip}:{port}", "--node-ip-address", worker_ip,
           "--temp-dir", f"{temp}/worker", *common)
        import ray

        ray.init(address=f"{head_ip}:{port}", logging_level="ERROR")
        nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
        ray.shutdown()
        assert set(nodes) == {head_ip, worker_ip}, nodes
        yield f"{head_ip}:{port}", nodes
    finally:
        # Not `ray stop`: it would stop every Ray process of this machine, other runs' included.
        for proc in psutil.process_iter(["cmdline"]):
            text = " ".join(proc.info["cmdline"] or [])
            if temp in text or f"{head_ip}:{port}" in text or worker_ip in text:
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        subprocess.run(["ip", "link", "del", here_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_simulation_on_an_existing_two_host_ray_cluster_runs_clients_on_both(two_host_cluster, tmp_path):
    address, nodes = two_host_cluster
    env = {**os.environ, "FEDSTO_HOME": str(tmp_path / "home"), "RAY_ADDRESS": address}
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-m", "server.cli", "run", "--preset", "smoke", "--method", "ssfl", "--out", str(out),
                           "--port", str(free_port_pair()), "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "ssfl" / "metrics.jsonl").read_text().splitlines()]
    ran_on = {c["ray_node"] for r in rows if r.get("clients") for c in r["clients"].values()}
    assert ran_on == set(nodes.values()), (ran_on, nodes)
