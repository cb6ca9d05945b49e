"""The deployment topology as real processes on 127.0.0.1, and the faults it must survive.

One SuperLink (TLS, SuperNode authentication, a database file), the ServerApp's SuperExec, and
per client site a SuperNode in process isolation plus the SuperExec that runs its ClientApp, each
site reading only the folder ``fedsto data export-site`` made for it (``tests/topology.py``). The
runs use ``presets/deploy.toml`` through ``flwr run``; success is read from ``flwr list --format
json`` and the run's own ``result.json``, never from an exit code.

The module's tests share one topology and run in order: a clean run (the reference), a ServerApp
killed and resumed, then a client site and the SuperLink killed mid-run. A fourth SuperNode whose
data folder is missing stays connected throughout: every run reports it by node and path.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from server.superlink import descendants
from topology import ROOT, ProcessTopology, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRESET = ROOT / "presets" / "deploy.toml"
CLIENTS = ("client-0", "client-1", "client-2")
RUN_TIMEOUT = 900.0


@pytest.fixture(scope="module")
def site_folders(tmp_path_factory) -> dict[str, Path]:
    """A synthetic weather federation (3 clients, a 4-image hold-out each) exported as site folders."""
    from detection.data_cli import main as data_main

    root = tmp_path_factory.mktemp("deploy_sites")
    assert data_main(["synth", str(root / "scenes"), "--num-images", "240", "--imgsz", "96", "--seed", "0"]) == 0
    assert data_main(["federate", str(root / "scenes"), str(root / "fed"), "--weathers", "rainy,snowy,foggy",
                      "--clients", "3", "--site-holdout", "4"]) == 0
    folders = {}
    for site in ("server", *CLIENTS):
        assert data_main(["export-site", str(root / "fed"), site, str(root / "sites" / site)]) == 0
        folders[site] = root / "sites" / site
    folders["client-3"] = root / "sites" / "client-3-never-exported"  # a site whose data folder is missing
    return folders


@pytest.fixture(scope="module")
def topology(site_folders, tmp_path_factory):
    topo = ProcessTopology(tmp_path_factory.mktemp("topology"), site_folders)
    try:
        topo.start()
        topo.wait_online(4)
        yield topo
    finally:
        topo.stop()


def finished(topo: ProcessTopology, run_id: int) -> dict:
    info = topo.wait(run_id, RUN_TIMEOUT)
    assert info["success"] is True
    return info


def result_of(topo: ProcessTopology, output_dir: str) -> dict:
    return json.loads((topo.run_dir(output_dir) / "result.json").read_text())


def eval_rows(topo: ProcessTopology, output_dir: str) -> list[tuple]:
    rows = [json.loads(line) for line in (topo.run_dir(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], json.dumps(r.get("eval"), sort_keys=True)) for r in rows if "eval" in r]


def test_a_deployed_run_completes_and_names_the_site_without_data(topology):
    start = time.monotonic()
    run_id = topology.submit(topology.run_config(PRESET, output_dir="reference"))
    info = finished(topology, run_id)
    assert info["status"] == "finished:completed", info
    result = result_of(topology, "reference")
    assert result["status"] == "completed" and result["failures"] == 0, result
    assert len([s for s in json.loads((topology.run_dir("reference") / "config.json").read_text())["plan"]
                if s[0] != "warmup"]) >= 2
    rounds = [json.loads(line) for line in (topology.run_dir("reference") / "metrics.jsonl").read_text().splitlines()
              if '"kind": "round"' in line]
    assert len(rounds) >= 5 and all(r["replies"] == 3 for r in rounds)
    # Federated evaluation: every site reports mAP of the broadcast and of its own model on its hold-out.
    assert set(result["sites"]) == set(CLIENTS)
    # The fourth node holds no data: named by node id and path, in the result, not a traceback.
    (missing,) = [f for f in result["site_failures"] if "client-3-never-exported" in f["reason"]]
    assert re.match(r"node \d+: partition query failed: .*no federation or site manifest at \S+client-3-never-exported",
                    missing["reason"]), missing
    # README: `flwr log <run-id> <connection> --stream` follows the ServerApp (it returns once the run has ended).
    log = topology.flwr("log", str(run_id), "topology", "--stream", timeout=120).stdout
    assert "fedsto fedsto (fedavg) on" in log and "done: fedsto" in log, log[-2000:]
    print(f"\nfedsto measurements: deployed reference run {time.monotonic() - start:.0f}s, "
          f"Total mAP50 {result['final']['Total']['map50']:.3f}")


def serverapp_processes(topo: ProcessTopology) -> list[int]:
    """Pids of the ``flwr-serverapp`` processes the ServerApp's SuperExec started."""
    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""

    return [pid for pid in descendants(topo.components["serverapp"].proc.pid) if "flwr-serverapp" in cmdline(pid)]


def test_a_killed_serverapp_resumes_from_its_checkpoint_to_the_same_result(topology):
    reference = result_of(topology, "reference")
    run_id = topology.submit(topology.run_config(PRESET, output_dir="resumed"))
    topology.wait_for_progress("resumed", 5, RUN_TIMEOUT)  # warm-up, teacher check and round 1 checkpointed
    (app,) = serverapp_processes(topology)
    os.kill(app, signal.SIGKILL)
    topology.flwr("stop", str(run_id), "topology", check=False)
    killed = topology.wait(run_id, 300)
    assert killed["status"] != "finished:completed", killed
    run_dir = topology.run_dir("resumed")
    resumed_id = topology.submit(topology.run_config(PRESET, output_dir="resumed", resume=str(run_dir)))
    assert finished(topology, resumed_id)["status"] == "finished:completed"
    result = result_of(topology, "resumed")
    assert result["status"] == "completed"
    assert result["final"] == reference["final"]
    assert eval_rows(topology, "resumed") == eval_rows(topology, "reference")


def test_a_killed_client_site_and_a_killed_superlink_do_not_stop_the_run(topology):
    run_id = topology.submit(topology.run_config(PRESET, output_dir="faults"))
    progress = topology.wait_for_progress("faults", 4, RUN_TIMEOUT)  # round 1 done: round 2's messages go out
    time.sleep(3.0)
    topology.kill_site("client-1")
    killed_at = progress["done"]
    # Down past the round timeout: the round ends with the other two. (Back within it, the site
    # would pull its pending message and answer: Flower keeps it for the same node id.)
    topology.wait_for_progress("faults", killed_at + 1, RUN_TIMEOUT)
    # Refused ([code: 2004]) until the SuperLink has marked its old session offline, the SuperNode
    # restarts on failure until it gets in (compose: restart: on-failure).
    topology.start_site("client-1")
    topology.wait_for_progress("faults", killed_at + 2, RUN_TIMEOUT)
    topology.components["superlink"].kill(signal.SIGKILL)
    time.sleep(2.0)
    topology.start_superlink()  # same --database: runs, registrations and node ids survive
    info = finished(topology, run_id)
    assert info["status"] == "finished:completed", info
    result = result_of(topology, "faults")
    assert result["status"] == "completed"
    reasons = [f for f in result["failure_reasons"] if "partition 1 " in f["reason"] and f["round"] != "teacher check"]
    assert reasons and re.match(r"partition 1 \(node \d+\): ", reasons[0]["reason"]), result["failure_reasons"]
    rows = [json.loads(line) for line in (topology.run_dir("faults") / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and len(steps) == result["steps"], steps  # no step lost, none twice
    last_failure = max(f["step"] for f in reasons)
    rejoined = [r for r in rows if r.get("kind") == "round" and r["step"] > last_failure and "1" in r.get("clients", {})]
    assert rejoined, "client-1 never replied again after its restart"


# -- refused connections: no run needed ---------------------------------------------------------


def supernode_exit(topo: ProcessTopology, cmd: list[str], timeout: float = 60.0) -> tuple[int, str]:
    proc = subprocess.run(cmd, env=topo.env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_an_unregistered_key_and_a_wrong_ca_are_refused(topology, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    stranger = topology.supernode_cmd("client-0", key=tmp_path / "stranger", port=free_port()) + ["--max-retries", "0"]
    code, text = supernode_exit(topology, stranger)
    assert code != 0 and "Failed to activate SuperNode" in text, text[-2000:]
    assert "No SuperNode found with the given public key" in topology.components["superlink"].text()

    other_ca = tmp_path / "other"
    subprocess.run(["sh", str(ROOT / "deploy" / "make-credentials.sh"), str(other_ca), "0"], check=True, capture_output=True)
    wrong_ca = topology.supernode_cmd("client-0", ca=other_ca / "ca.crt", port=free_port()) + ["--max-retries", "0"]
    code, text = supernode_exit(topology, wrong_ca)
    assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in text, text[-2000:]


def sign_server_certificate(creds: Path, out: Path, hosts: list[str], not_before, not_after) -> None:
    """A SuperLink certificate from the topology's own CA with chosen names and validity."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert = x509.load_pem_x509_certificate((creds / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((creds / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (out.parent).mkdir(parents=True, exist_ok=True)
    out.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


@pytest.mark.parametrize("case", ["expired", "other-host"])
def test_a_superlink_certificate_that_is_expired_or_names_another_host_is_refused(topology, tmp_path, case):
    now = datetime.datetime.now(datetime.timezone.utc)
    if case == "expired":
        hosts, validity = ["localhost", "127.0.0.1"], (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
    else:
        hosts, validity = ["fl.example.org"], (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    sign_server_certificate(topology.creds, tmp_path / "bad", hosts, *validity)
    port = free_port()
    cmd = topology.superlink_cmd()
    cmd[cmd.index("--ssl-certfile") + 1] = str(tmp_path / "bad.crt")
    cmd[cmd.index("--ssl-keyfile") + 1] = str(tmp_path / "bad.key")
    cmd[cmd.index("--database") + 1] = str(tmp_path / "bad.db")
    cmd[cmd.index("--port") + 1] = str(port)
    superlink = subprocess.Popen(cmd, env=topology.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(5.0)
        node = topology.supernode_cmd("client-0", port=free_port()) + ["--max-retries", "0"]
        node[node.index("--superlink") + 1] = f"127.0.0.1:{port}"
        code, text = supernode_exit(topology, node)
    finally:
        superlink.kill()
        superlink.wait(10)
    assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in text, text[-2000:]
    expected = "certificate has expired" if case == "expired" else "IP address mismatch|Hostname mismatch|doesn't match"
    assert re.search(expected, text), text[-2000:]


def test_adding_a_site_and_rotating_its_key_as_the_readme_says(topology, tmp_path):
    """README "Adding a site, rotating a key": the credentials script adds a key and keeps the rest;
    the new key registers and its SuperNode comes online; after ``unregister`` and a new key, the
    old key is refused and the new one gets in."""
    creds = topology.creds
    kept = (creds / "node0").read_bytes()
    subprocess.run(["sh", str(ROOT / "deploy" / "make-credentials.sh"), str(creds), "5"], check=True, capture_output=True)
    assert (creds / "node0").read_bytes() == kept and (creds / "node4.pub").exists()

    def start_node(key: Path) -> subprocess.Popen:
        cmd = topology.supernode_cmd("client-0", key=key, port=free_port())
        cmd[cmd.index("--node-config") + 1] = f'site="{tmp_path / "new-site"}"'
        return subprocess.Popen(cmd, env=topology.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    online = topology.online_nodes()
    node_id = topology.register("client-0", key=creds / "node4.pub")["node-id"]
    node = start_node(creds / "node4")
    try:
        topology.wait_online(online + 1, timeout=120)
    finally:
        node.kill()
        node.wait(10)

    old_key = tmp_path / "node4-old"
    old_key.write_bytes((creds / "node4").read_bytes())
    old_key.chmod(0o600)
    topology.flwr("supernode", "unregister", str(node_id), "topology")
    for name in ("node4", "node4.pub"):
        (creds / name).unlink()
    subprocess.run(["sh", str(ROOT / "deploy" / "make-credentials.sh"), str(creds), "5"], check=True, capture_output=True)
    assert (creds / "node4").read_bytes() != old_key.read_bytes()
    code, text = supernode_exit(topology, topology.supernode_cmd("client-0", key=old_key, port=free_port())
                                + ["--max-retries", "0"])
    assert code != 0 and "Failed to activate SuperNode" in text, text[-2000:]
    topology.register("client-0", key=creds / "node4.pub")
    node = start_node(creds / "node4")
    try:
        topology.wait_online(online + 1, timeout=180)  # the unregistered node no longer counts
    finally:
        node.kill()
        node.wait(10)
