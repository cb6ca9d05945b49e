"""The ``fedsto`` command end to end: data synth / federate / inspect, eval, and bad input.

Most commands run in-process through :func:`server.cli.main` (fast); a few go through the
installed console script to check the entry point and the process's exit status.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detection.manifest_reader import Federation
from detection.metrics import evaluate_domains
from detection.model import export_ultralytics
from detection.synthetic import SYNTHETIC_CLASSES
from detection.yolo import read_yolo_dataset
from server.cli import main as fedsto_main

HIGHWAY_SUBSET = 60


def one_line_error(text: str) -> str:
    """The single non-empty line of an error report (fails on tracebacks or chatter)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ------------------------------------------------------------------------------------------
# data synth


def test_data_synth_writes_a_yolo_dataset(tmp_path, fedsto_cli):
    done = fedsto_cli("data", "synth", tmp_path / "synthetic", "--num-images", "12", "--imgsz", "64", "--seed", "5")
    assert done.returncode == 0, done.stderr
    assert "wrote 12 synthetic images" in done.stdout
    records, names, report = read_yolo_dataset(tmp_path / "synthetic")
    assert len(records) == 12 and names == list(SYNTHETIC_CLASSES)
    assert cv2.imread(records[0].path).shape == (64, 64, 3)
    assert sum(len(r.classes) for r in records) >= 12 * 2  # scenes hold 2-8 objects, a few may be hidden


# ------------------------------------------------------------------------------------------
# data federate


@pytest.fixture
def highway_subset(shared_data, tmp_path) -> Path:
    """A YOLO dataset of the first real highway test images (the whole set takes minutes to shift)."""
    source = shared_data / "highway"
    names = yaml.safe_load((source / "data.yaml").read_text())["names"]
    out = tmp_path / "highway"
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    for image in sorted((source / "test" / "images").iterdir())[:HIGHWAY_SUBSET]:
        shutil.copy(image, out / "images" / image.name)
        label = source / "test" / "labels" / f"{image.stem}.txt"
        if label.is_file():
            shutil.copy(label, out / "labels" / label.name)
    (out / "data.yaml").write_text(f"path: .\ntrain: images\nnames: {list(names)}\n")
    return out


def test_federate_real_road_images_into_weather_clients(highway_subset, tmp_path, capsys):
    out = tmp_path / "federation"
    code = fedsto_main(["data", "federate", str(highway_subset), str(out), "--weathers", "rainy,night",
                        "--clients", "2", "--server-fraction", "0.3", "--seed", "2"])
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    federation = Federation.load(out)
    assert federation.domains == ["clear", "rainy", "night"]
    assert federation.class_names == ["bus", "car", "motorbike", "person", "truck"]
    assert sorted(federation.client_domain(p) for p in range(2)) == ["night", "rainy"]
    sizes = federation.sizes()
    assert sizes["server"] + sum(sizes["clients"]) + sum(sizes["test"].values()) == HIGHWAY_SUBSET

    originals = {p.name: p for p in (highway_subset / "images").iterdir()}
    for pid in range(2):
        weather = federation.client_domain(pid)
        for record in federation.client_hidden_records(pid):
            shifted = Path(record.path)
            assert shifted.parent == out / "images" / weather  # written once, under the federation
            source = originals[shifted.name]
            before, after = cv2.imread(str(source)), cv2.imread(str(shifted))
            assert before.shape == after.shape
            assert np.abs(before.astype(int) - after.astype(int)).mean() > 5, f"{shifted} looks unchanged"
            # Labels travel with the image: weather changes pixels, never boxes.
            rows = np.loadtxt(highway_subset / "labels" / f"{source.stem}.txt", ndmin=2).reshape(-1, 5)
            assert np.allclose(record.boxes, rows[:, 1:], atol=1e-5) and list(record.classes) == rows[:, 0].tolist()


def federate_synthetic(source: Path, out: Path, split: str, *extra: str) -> Federation:
    code = fedsto_main(["data", "federate", str(source), str(out), "--weathers", "rainy,snowy,night",
                        "--clients", "6", "--split", split, "--server-fraction", "0.2", "--seed", "0", *extra])
    assert code == 0
    return Federation.load(out)


def domain_shares(federation: Federation) -> list[dict[str, float]]:
    shares = []
    for pid in range(federation.num_clients):
        counts = federation.client_domain_counts(pid)
        shares.append({d: n / sum(counts.values()) for d, n in counts.items()})
    return shares


def test_federate_splits_non_iid_iid_and_dirichlet(synthetic_dataset, tmp_path, capsys):
    non_iid = federate_synthetic(synthetic_dataset, tmp_path / "non-iid", "non-iid")
    iid = federate_synthetic(synthetic_dataset, tmp_path / "iid", "iid")
    dirichlet = federate_synthetic(synthetic_dataset, tmp_path / "dirichlet", "dirichlet", "--alpha", "0.1")
    capsys.readouterr()
    weathers = {"rainy", "snowy", "night"}

    # non-IID: one weather per client, every weather covered (the paper's setting).
    assert all(len(s) == 1 for s in domain_shares(non_iid))
    assert {non_iid.client_domain(p) for p in range(6)} == weathers
    # IID: every client holds every weather in about equal shares.
    for shares in domain_shares(iid):
        assert set(shares) == weathers and max(shares.values()) < 0.6, shares
    # Dirichlet with a small alpha: every client has images, most are dominated by one weather.
    assert all(n > 0 for n in dirichlet.sizes()["clients"])
    dominated = sum(max(s.values()) > 0.6 for s in domain_shares(dirichlet))
    assert dominated >= 3, domain_shares(dirichlet)
    # The split changes who holds what, not the server or the test split.
    for federation in (iid, dirichlet):
        assert [r.path for r in federation.server_records()] == [r.path for r in non_iid.server_records()]
        assert federation.sizes()["test"] == non_iid.sizes()["test"]


# ------------------------------------------------------------------------------------------
# data inspect


def test_inspect_prints_who_holds_what_and_writes_a_montage(weather_federation, tmp_path, capsys):
    montage = tmp_path / "montage.png"
    assert fedsto_main(["data", "inspect", str(weather_federation), "--montage", str(montage), "--per-domain", "3"]) == 0
    shown = capsys.readouterr().out
    for node in ("server", "client 0", "client 1", "test:clear", "test:rainy", "test:night"):
        assert node in shown
    image = cv2.imread(str(montage))
    assert image is not None and image.shape[0] > 3 * 32 and image.shape[1] > 3 * 32


# ------------------------------------------------------------------------------------------
# eval


def parse_table_row(stdout: str, first_cell: str) -> dict[str, tuple[float, float]]:
    """``{column: (mAP50, mAP50-95)}`` of one row of a printed rich domain table."""
    lines = stdout.splitlines()
    header = next(line for line in lines if "method" in line)
    row = next(line for line in lines if line.strip("│┃ ").startswith(first_cell))
    columns = [c.strip() for c in header.strip().strip("┃│").split("┃" if "┃" in header else "│")]
    cells = [c.strip() for c in row.strip().strip("│").split("│")]
    return {col: tuple(float(v) for v in cell.split("/")) for col, cell in zip(columns[1:], cells[1:])}


def test_eval_prints_a_per_domain_table_with_total(weather_federation, trained_detector, tmp_path, fedsto_cli):
    model = trained_detector.model()
    path = export_ultralytics(model, tmp_path / "model.pt", {"imgsz": trained_detector.imgsz})
    done = fedsto_cli("eval", path, weather_federation, "--device", "cpu", timeout=300)
    assert done.returncode == 0, done.stderr
    printed = parse_table_row(done.stdout, "model.pt")
    assert list(printed) == ["clear", "rainy", "night", "Total"]

    # The printed numbers are the library's, at the size stored in the exported file.
    expected = evaluate_domains(model, Federation.load(weather_federation).test_records(), trained_detector.imgsz)
    for domain, (map50, map50_95) in printed.items():
        assert map50 == pytest.approx(expected[domain]["map50"], abs=5e-4), domain
        assert map50_95 == pytest.approx(expected[domain]["map50_95"], abs=5e-4), domain
    mean = np.mean([printed[d][0] for d in ("clear", "rainy", "night")])
    assert printed["Total"][0] == pytest.approx(mean, abs=1e-3)
    assert expected["clear"]["map50"] > 0  # a real model, so the check compares real numbers


# ------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one line naming the problem


def test_missing_federation_exits_2_with_one_line(tmp_path, fedsto_cli):
    missing = tmp_path / "nowhere" / "federation.json"
    done = fedsto_cli("train", missing, "--epochs", "1", "--out", tmp_path / "run", timeout=120)
    assert done.returncode == 2
    line = one_line_error(done.stdout + done.stderr)
    assert "error" in line and str(missing) in line


@pytest.mark.parametrize("command", ["eval", "federate", "inspect"])
def test_bad_input_is_one_line_and_exit_2(command, weather_federation, tmp_path, capsys):
    missing = tmp_path / "missing"
    args = {
        "eval": ["eval", str(tmp_path / "model.pt"), str(weather_federation)],
        "federate": ["data", "federate", str(missing), str(tmp_path / "out")],
        "inspect": ["data", "inspect", str(missing / "federation.json")],
    }[command]
    assert fedsto_main(args) == 2
    captured = capsys.readouterr()
    line = one_line_error(captured.out + captured.err)
    assert "error" in line and ("model.pt" in line if command == "eval" else "missing" in line)


def test_eval_of_a_file_that_is_not_a_model_exits_2(weather_federation, tmp_path, capsys):
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("not a checkpoint\n")
    assert fedsto_main(["eval", str(not_a_model), str(weather_federation)]) == 2
    captured = capsys.readouterr()
    assert "notes.pt" in one_line_error(captured.out + captured.err)
