"""Fixtures shared by the whole suite: the real data beside the repository, a tiny synthetic
dataset, a synthetic weather federation and one briefly trained detector.

The session-scoped fixtures are built once, in pytest's temporary folder, and must be treated as
read-only by tests (copy before changing anything). Flower's home goes to a temporary folder so
tests never read or write the user's ``~/.flwr``; Ultralytics keeps the project's default config
dir (``~/.cache/fedsto/ultralytics``, set by :mod:`detection.ultralytics_env`) so its settings and
font file are made once per machine, not once per run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Before anything imports flwr: Flower reads these from the environment, and child processes
# (CLI subprocesses, Ray workers) inherit them.
_FLWR_HOME = tempfile.mkdtemp(prefix="fedsto-tests-flwr-")
os.environ["FLWR_HOME"] = _FLWR_HOME
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Size of the tiny synthetic set: 96 px keeps a training step (batch 8) at about 0.2 s on one CPU
# thread, and 300 scenes leave 60 held-out images (313 boxes) for the metric cross-check.
SYNTHETIC_IMAGES = 300
SYNTHETIC_IMGSZ = 96
DETECTOR_TEST_IMAGES = 60
# 160 steps of batch 8 from scratch: measured mAP50 0.17-0.26 on the held-out scenes over three
# seeds (0.03 after 80 steps), noisy enough to exercise every branch of the AP computation, in
# about 30 s on one thread. With val()'s canvas and scale/translate augmentation (2026-12-05):
# 0.16 with zoom 0.25 (0.08 with Ultralytics' 0.5). Short runs from scratch magnify last-bit
# differences: on 2026-12-07's machine the same fixture scored 0.069 alone and 0.048 in the quick
# loop (0.037 on the test images shrunk from 150 x 130), so floors on it sit at 0.02.
DETECTOR_STEPS = 160


_MEASUREMENTS: list[str] = []


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_FLWR_HOME, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """Show what tests measured (scores, wall-clock times), so CI logs carry the numbers."""
    if _MEASUREMENTS:
        terminalreporter.section("fedsto measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Start every test with one intra-op torch thread.

    The suite's tensors are small (64-160 px), so a second thread gains little, while an OpenMP
    pool that shares its cores with another busy process (a CLI child, a Ray worker, a parallel
    job) runs several times slower: a 96 px training step took 0.2 s on one thread and 1.2-1.6 s
    on two with the other core busy. Reset per test because code under test may change it (the
    server runner sets its own count). Child processes are not affected.
    """
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def record_measurement():
    """``record_measurement(line)``: a line for the terminal summary's "fedsto measurements" section."""
    return _MEASUREMENTS.append


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real road images, BDD100K sample)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data {SHARED_DATA} is absent (it lives outside the repository, in ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fedsto_cli():
    """Run the installed ``fedsto`` console script in a child process: ``fedsto_cli(*args) -> CompletedProcess``.

    Output is captured as text; ``COLUMNS`` is set wide so rich does not wrap result tables.
    """
    script = Path(sys.executable).with_name("fedsto")  # beside the venv's python, not its resolved target
    assert script.is_file(), f"{script}: the fedsto console script is missing; install with pip install -e '.[test]'"

    def run(*args, timeout: float = 600, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "COLUMNS": "200"}
        return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=cwd, stdin=subprocess.DEVNULL)

    return run


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A YOLO dataset of synthetic road scenes (``data.yaml``, ``images/``, ``labels/``)."""
    from detection.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(out, num_images=SYNTHETIC_IMAGES, imgsz=SYNTHETIC_IMGSZ, seed=0, progress=False)


@pytest.fixture(scope="session")
def synthetic_records(synthetic_dataset):
    """``(records, class_names)`` of :func:`synthetic_dataset`, in file order."""
    from detection.yolo import read_yolo_dataset

    records, class_names, _ = read_yolo_dataset(synthetic_dataset)
    assert len(records) == SYNTHETIC_IMAGES
    return records, class_names


@pytest.fixture(scope="session")
def weather_federation(synthetic_records, tmp_path_factory) -> Path:
    """``federation.json`` of a clear server and rainy / night clients made from 120 synthetic scenes."""
    from detection.federation import build_federation

    records, class_names = synthetic_records
    out = tmp_path_factory.mktemp("weather_federation")
    return build_federation(records[:120], class_names, out, domain_rule="weather", weathers=["rainy", "night"],
                            num_clients=2, server_fraction=0.4, test_fraction=0.3, seed=0, progress=False)


@dataclass(frozen=True)
class TrainedDetector:
    """A yolo11n trained briefly on synthetic scenes: its state and the data around it."""

    state: dict
    class_names: list
    imgsz: int
    train: list
    test: list

    def model(self):
        """A fresh model holding the trained state (tests may change it freely)."""
        from detection.model import build_model, set_state

        model = build_model("yolo11n.yaml", len(self.class_names), self.class_names)
        set_state(model, self.state)
        return model.eval()


@pytest.fixture(scope="session")
def trained_detector(synthetic_records) -> TrainedDetector:
    """yolo11n after :data:`DETECTOR_STEPS` steps on the synthetic scenes (noisy but non-trivial)."""
    import torch

    from detection.images import LetterboxCache
    from detection.model import build_model, get_state
    from detection.train import TrainConfig, train_labelled

    records, class_names = synthetic_records
    train, test = records[:-DETECTOR_TEST_IMAGES], records[-DETECTOR_TEST_IMAGES:]
    torch.manual_seed(0)  # build_model draws the initial weights from torch's global generator
    model = build_model("yolo11n.yaml", len(class_names), class_names)
    cfg = TrainConfig(imgsz=SYNTHETIC_IMGSZ, batch_size=8, max_steps=DETECTOR_STEPS, warmup_steps=20, seed=0, scale=0.25)
    train_labelled(model, train, cfg, cache=LetterboxCache(SYNTHETIC_IMGSZ))
    return TrainedDetector(get_state(model), list(class_names), SYNTHETIC_IMGSZ, list(train), list(test))
