"""The scale benchmarks' own pieces: same work per client at every size, memory labels, GPU check on a CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.sim_scale import federation_settings
from benchmarks.simrun import process_kind

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("clients", [10, 100, 1000])
def test_every_size_gives_each_client_the_same_images_and_the_server_the_same(clients):
    keys = federation_settings(clients, images_per_client=4, server_images=16, test_images=24)
    total = keys["synthetic-images"]
    test = round(total * keys["synthetic-test-fraction"])
    server = round((total - test) * keys["synthetic-server-fraction"])
    assert (test, server) == (24, 16)
    assert (total - test - server) / clients == 4


def test_processes_of_a_simulation_are_told_apart_for_the_memory_breakdown():
    assert process_kind(["ray::ClientAppActor.run"]) == "ray actors"
    assert process_kind(["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=1"]) == "ray daemons"
    assert process_kind(["/venv/bin/python", "/venv/bin/flower-superlink", "--insecure"]) == "flower"
    assert process_kind(["python", "-m", "pytest"]) == "other"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host the benchmark measures instead")
def test_gpu_throughput_says_so_in_one_line_and_exits_0_without_a_gpu():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_throughput"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0
    assert done.stdout.strip().splitlines() == [
        "gpu_throughput: no CUDA device on this machine (torch.cuda.is_available() is False); nothing measured"]
