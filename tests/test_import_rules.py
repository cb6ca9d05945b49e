"""The direction of imports is a contract (``[tool.importlinter]`` in pyproject.toml), checked here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("detection", "server", "client", "strategies")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(lint), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_a_server_module_importing_the_client_breaks_the_contract(tmp_path):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "server" / "shortcut.py").write_text("from client.task import ClientData\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "server and client never import each other BROKEN" in result.stdout
    assert "server.shortcut -> client.task" in result.stdout
