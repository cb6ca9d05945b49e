"""``fedsto run`` pieces that need no Flower run: config merging, TOML for flwr, SuperLink checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from flwr.common.config import parse_config_args

from server.config import ConfigError
from server.flwr_cli import LaunchError, run_verdict
from server.launch import project_root
from server.presets import check_keys, merged_config, parse_methods, parse_overrides, write_run_config
from server.rundir import RunDir
from server.superlink import LocalSuperLink, find_superlink_pid, runtime_install_disabled


def test_methods_and_overrides():
    assert parse_methods(None, "demo", {"method": "fedsto"}) == ["partial", "fedsto"]
    assert parse_methods(None, "smoke", {"method": "ssfl"}) == ["ssfl"]
    assert parse_methods(["partial,fedsto", "full", "partial"], "demo", {}) == ["partial", "fedsto", "full"]
    with pytest.raises(ConfigError, match="fedprox"):
        parse_methods(["fedprox"], "demo", {})
    assert parse_overrides(["--", "seed=3", "ortho-form='symmetric'", "lr=0.02"]) == {"seed": 3, "ortho-form": "symmetric", "lr": 0.02}


def test_string_knobs_take_bare_values_and_other_knobs_say_how_to_quote():
    assert parse_overrides(["federation=/data/fed-bdd/federation.json", "ema-decay=0.99", "weights=", "model=\"a b.yaml\""]) == {
        "federation": "/data/fed-bdd/federation.json", "ema-decay": "0.99", "weights": "", "model": "a b.yaml"}
    assert parse_overrides(["output-dir=my runs"]) == {"output-dir": "my runs"}  # the shell already split the words
    with pytest.raises(ConfigError, match=r"run-config seed='abc': not a TOML int .*quoted"):
        parse_overrides(["seed=abc"])
    with pytest.raises(ConfigError, match="unknown run-config key 'no-such-knob'"):
        parse_overrides(["no-such-knob=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["seed"])


def test_merge_order_and_client_count(tmp_path):
    preset = {"method": "fedsto", "seed": 0, "synthetic-clients": 3, "federation": "federations/demo"}
    values = merged_config(preset, "partial", tmp_path, None, {"seed": 5})
    assert values["method"] == "partial" and values["seed"] == 5 and values["output-dir"] == str(tmp_path / "partial")
    assert values["federation"] == "federations/demo"
    values = merged_config(preset, "fedsto", tmp_path, 5, {})
    assert values["synthetic-clients"] == 5 and values["federation"] == "federations/demo-5clients"


def test_run_config_toml_reads_back_through_flower(tmp_path):
    values = {"method": "fedsto", "lr": 0.01, "seed": 3, "progress": False, "output-dir": str(tmp_path / 'a "b"'),
              "ema-decay": "auto", "ortho-lambda": 1e-05}
    path = write_run_config(tmp_path / "x.toml", values, "test")
    assert parse_config_args([str(path)]) == values  # exactly what `flwr run --run-config x.toml` will see
    check_keys(values, project_root())
    with pytest.raises(ConfigError, match="no-such-knob"):
        check_keys({"no-such-knob": 1}, project_root())


def test_verdict_needs_both_the_run_dir_and_flower(tmp_path):
    run = RunDir.create(tmp_path / "r", {"run_config": {}})
    assert run_verdict(run.path, "finished:completed") == (False, "result.json: missing; flwr: finished:completed")
    run.write_result("completed")
    assert run_verdict(run.path, "finished:completed")[0]
    assert not run_verdict(run.path, "finished:failed")[0]
    run.write_result("failed", reason="round 3: 1 of 3 clients replied")
    ok, text = run_verdict(run.path, "finished:completed")  # Flower says completed; the run knows better
    assert not ok and "1 of 3 clients replied" in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAKE_SUPERLINK = textwrap.dedent('''
    import http.server, sys
    port = int(sys.argv[sys.argv.index("--port") + 1])
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
''')


@pytest.fixture
def fake_superlink(tmp_path):
    """A process named flower-superlink that answers /health, like a SuperLink a user left running."""
    script = tmp_path / "flower-superlink"
    script.write_text(f"#!{sys.executable}\n" + FAKE_SUPERLINK)
    script.chmod(0o755)
    procs = []

    def start(disabled: bool) -> tuple[int, subprocess.Popen]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"}
        if disabled:
            env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        proc = subprocess.Popen([str(script), "--insecure", "--port", str(port)], env=env)
        procs.append(proc)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        return port, proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_refuses_a_superlink_that_installs_dependencies(fake_superlink, tmp_path):
    port, proc = fake_superlink(disabled=False)
    assert find_superlink_pid(port) == proc.pid
    assert not runtime_install_disabled(proc.pid)
    with pytest.raises(LaunchError, match="refusing to reuse"):
        LocalSuperLink(tmp_path / "flwr", (port, port + 2)).start()


def test_reuses_a_superlink_with_installation_disabled(fake_superlink, tmp_path):
    port, proc = fake_superlink(disabled=True)
    assert runtime_install_disabled(proc.pid)
    link = LocalSuperLink(tmp_path / "flwr", (port, port + 2))
    link.start()
    assert link.pid == proc.pid and link.process is None
    link.stop()  # not ours: left running
    assert proc.poll() is None


def test_refuses_an_output_folder_that_already_holds_a_run_before_starting_anything(tmp_path, capsys, monkeypatch):
    from server.cli import main as fedsto_main

    (tmp_path / "out" / "fedsto").mkdir(parents=True)
    (tmp_path / "out" / "fedsto" / "config.json").write_text("{}")
    monkeypatch.setattr(LocalSuperLink, "start", lambda self: pytest.fail("a SuperLink was started"))
    assert fedsto_main(["run", "--preset", "smoke", "--method", "fedsto", "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "already holds a run" in captured.out + captured.err and "--resume" in captured.out + captured.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fedsto"]


def run_refused(argv, capsys, monkeypatch) -> str:
    """``fedsto run`` with ``argv``: it must exit 2 with one line, before any SuperLink starts."""
    from server.cli import main as fedsto_main

    monkeypatch.setattr(LocalSuperLink, "start", lambda self: pytest.fail("a SuperLink was started"))
    assert fedsto_main(["run", *argv]) == 2
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def test_the_readme_own_data_example_reads_its_bare_path(tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "fed-bdd" / "federation.json"
    text = run_refused(["--preset", "demo", "--method", "partial,fedsto", "--out", str(tmp_path / "out"), "--",
                        f"federation={manifest}", "synthetic-images=0", "imgsz=320", "warmup-epochs=30",
                        "phase1-rounds=20", "phase2-rounds=30"], capsys, monkeypatch)
    assert str(manifest) in text  # the path arrived as a string: the run only lacks the manifest


def test_an_unknown_strategy_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    text = run_refused(["--preset", "smoke", "--out", str(tmp_path / "out"), "--", "strategy=fedprocs"], capsys, monkeypatch)
    assert "strategy='fedprocs'" in text and "unknown strategy" in text
    text = run_refused(["--preset", "smoke", "--out", str(tmp_path / "out"), "--", "strategy=fedprox", "strategy-options=mu=1"],
                       capsys, monkeypatch)
    assert "has no option 'mu'; it accepts: proximal-mu" in text
