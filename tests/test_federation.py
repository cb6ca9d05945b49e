"""Federation manifest: partitions, sizes, determinism, loading, and the ``fedsto data`` commands."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from detection.data_cli import main as data_main
from detection.federation import build_federation
from detection.manifest import MANIFEST_KEYS, FederationError
from detection.manifest_reader import Federation
from detection.records import ImageRecord
from detection.splits import even_sizes, largest_remainder_counts

CLASSES = ["car", "person"]


def make_records(root: Path, counts: dict[str, int], touch: bool = True) -> list[ImageRecord]:
    """Records with one box each, ``counts`` images per domain (empty files: only existence matters)."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for domain, n in counts.items():
        for k in range(n):
            path = root / f"{domain}_{k:05d}.jpg"
            if touch:
                path.touch()
            records.append(ImageRecord(str(path), [k % 2], [[0.5, 0.5, 0.2, 0.2]], domain, {"weather": domain}))
    return records


def write_images(root: Path, n: int) -> list[ImageRecord]:
    """Real tiny images (for the weather rule, which reads and writes pixels)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for k in range(n):
        path = root / f"img_{k:03d}.png"
        image = np.full((48, 64, 3), 120, np.uint8)
        image[10:30, 10:40] = rng.integers(0, 255, 3)
        cv2.imwrite(str(path), image)
        records.append(ImageRecord(str(path), [k % 2], [[0.4, 0.4, 0.4, 0.4]], "whatever"))
    return records


def entries(manifest: dict) -> dict[str, list[str]]:
    """Files per node: server, client <pid>, test <domain>, from the raw JSON."""
    nodes = {"server": [e["file"] for e in manifest["server"]["images"]]}
    for node in manifest["clients"]:
        nodes[f"client {node['partition_id']}"] = [e["file"] for e in node["images"]]
    for domain, items in manifest["test"].items():
        nodes[f"test {domain}"] = [e["file"] for e in items]
    return nodes


def federate(records, out: Path, domain_rule: str = "folder", **kwargs) -> Federation:
    """Build a federation and load it back."""
    return Federation.load(build_federation(records, CLASSES, out, domain_rule=domain_rule, **kwargs))


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------
# Sizes, disjointness, roles


@pytest.fixture
def four_domains(tmp_path):
    return make_records(tmp_path / "imgs", {"clear": 400, "rainy": 200, "snowy": 120, "night": 80})


def test_counts_add_up_and_nodes_are_disjoint(tmp_path, four_domains):
    path = build_federation(four_domains, CLASSES, tmp_path / "fed", domain_rule="folder", num_clients=3)
    manifest = load_json(path)
    assert tuple(manifest) == MANIFEST_KEYS
    nodes = entries(manifest)
    files = [f for fs in nodes.values() for f in fs]
    assert len(files) == len(set(files)), "an image is held by two nodes"
    unused = sum(u["count"] for u in manifest["unused"].values())
    assert len(files) + unused == len(four_domains)


def test_server_fraction_and_server_domain(tmp_path, four_domains):
    fed = Federation.load(
        build_federation(four_domains, CLASSES, tmp_path / "fed", domain_rule="attribute:weather", server_fraction=0.25)
    )
    n_test = sum(len(v) for v in fed.test_records().values())
    n_train = len(four_domains) - n_test
    server = fed.server_records()
    assert len(server) == round(0.25 * n_train)
    assert {r.domain for r in server} == {"clear"}
    assert all(Path(r.path).name.startswith("clear_") for r in server)
    assert all(len(r.classes) == 1 for r in server), "server keeps its labels"


def test_test_split_is_per_domain_server_domain_included(tmp_path, four_domains):
    fed = federate(four_domains, tmp_path / "fed", test_fraction=0.15)
    sizes = {d: len(v) for d, v in fed.test_records().items()}
    assert sizes == {"clear": 60, "night": 12, "rainy": 30, "snowy": 18}
    assert fed.domains[0] == "clear"
    for domain, records in fed.test_records().items():
        assert all(Path(r.path).name.startswith(domain) for r in records)
        assert all(len(r.classes) == 1 for r in records)
    assert list(fed.test_records("rainy")) == ["rainy"]
    with pytest.raises(FederationError, match="no test split for domain 'foggy'"):
        fed.test_records("foggy")


def test_non_iid_gives_one_domain_per_client_round_robin(tmp_path, four_domains):
    fed = federate(four_domains, tmp_path / "fed", num_clients=6)
    # 3 non-server domains (sorted) for 6 clients, leftover clear images join as a 4th domain.
    expected = ["night", "rainy", "snowy", "clear", "night", "rainy"]
    assert [fed.client_domain(pid) for pid in range(6)] == expected
    for pid in range(6):
        assert len(fed.client_domain_counts(pid)) == 1
        assert {r.domain for r in fed.client_hidden_records(pid)} == {expected[pid]}
    night = [len(fed.client_images(pid)) for pid in (0, 4)]
    assert abs(night[0] - night[1]) <= 1, "a domain is split evenly across its clients"
    assert fed.unused == {}


def test_non_iid_reports_leftover_server_images_and_domains_without_clients(tmp_path, four_domains):
    fed = federate(four_domains, tmp_path / "fed", num_clients=2)
    assert [fed.client_domain(pid) for pid in range(2)] == ["night", "rainy"]
    assert set(fed.unused) == {"clear", "snowy"}
    assert fed.unused["snowy"]["count"] == 120 - 18
    assert "no client" in fed.unused["snowy"]["reason"]
    assert "not on the server" in fed.unused["clear"]["reason"]


def test_iid_mixes_domains_evenly(tmp_path, four_domains):
    fed = federate(four_domains, tmp_path / "fed", num_clients=4, split="iid")
    sizes = [len(fed.client_images(pid)) for pid in range(4)]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(fed.client_domain_counts(pid)) >= 3 for pid in range(4))
    n_test = sum(len(v) for v in fed.test_records().values())
    assert sum(sizes) + len(fed.server_records()) + n_test == len(four_domains)  # leftover clear joins the pool


def test_dirichlet_is_skewed_and_every_client_has_an_image(tmp_path, four_domains):
    fed = federate(four_domains, tmp_path / "fed", num_clients=50, split="dirichlet", dirichlet_alpha=0.1)
    sizes = [len(fed.client_images(pid)) for pid in range(50)]
    assert min(sizes) >= 1
    assert max(sizes) > 3 * np.median(sizes), "alpha=0.1 should give skewed clients"
    n_test = sum(len(v) for v in fed.test_records().values())
    assert sum(sizes) + len(fed.server_records()) + n_test == len(four_domains)


def test_helpers_split_exact_totals():
    assert even_sizes(10, 3).tolist() == [4, 3, 3]
    counts = largest_remainder_counts(np.array([0.5, 0.3, 0.2]), 7)
    assert counts.sum() == 7 and counts.tolist() == [4, 2, 1]


@pytest.mark.parametrize("split", ["non-iid", "iid", "dirichlet"])
def test_thousand_clients_is_fast(tmp_path, split):
    # Files are not created: the point is that planning and loading scale with clients, not disk.
    records = make_records(tmp_path / "imgs", {"clear": 3000, "rainy": 2000, "snowy": 1500, "night": 1000}, touch=False)
    start = time.perf_counter()
    path = build_federation(records, CLASSES, tmp_path / "fed", domain_rule="folder", num_clients=1000, split=split)
    fed = Federation.load(path, check_files=False)
    elapsed = time.perf_counter() - start
    assert fed.num_clients == 1000
    assert min(len(fed.client_images(pid)) for pid in range(1000)) >= 1
    assert elapsed < 8, f"{split}: 1,000 clients took {elapsed:.1f} s"


# ------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_manifest_different_seed_different(tmp_path, four_domains):
    kwargs = dict(domain_rule="folder", num_clients=5, split="dirichlet")
    a = build_federation(four_domains, CLASSES, tmp_path / "a", seed=3, **kwargs).read_text()
    b = build_federation(four_domains, CLASSES, tmp_path / "b", seed=3, **kwargs).read_text()
    c = build_federation(four_domains, CLASSES, tmp_path / "c", seed=4, **kwargs).read_text()
    assert a == b
    assert entries(json.loads(a)) != entries(json.loads(c))


# ------------------------------------------------------------------------------------------
# Loading


def test_missing_file_names_manifest_files_and_count(tmp_path, four_domains):
    path = build_federation(four_domains, CLASSES, tmp_path / "fed", domain_rule="folder")
    fed = Federation.load(path)
    gone = [fed.client_images(0)[0], fed.server_records()[0].path]
    for file in gone:
        os.remove(file)
    with pytest.raises(FederationError) as info:
        Federation.load(path)
    message = str(info.value)
    assert str(path) in message and "2 of" in message and "missing" in message
    assert any(Path(f).name in message for f in gone)


def test_client_images_exposes_paths_only(tmp_path, four_domains):
    fed = federate(four_domains, tmp_path / "fed")
    images = fed.client_images(1)
    assert images and all(isinstance(p, str) and os.path.isabs(p) and os.path.isfile(p) for p in images)
    hidden = fed.client_hidden_records(1)
    assert [r.path for r in hidden] == images
    assert all(len(r.classes) == 1 for r in hidden)
    with pytest.raises(FederationError, match="partition id 7 out of range 0..2"):
        fed.client_images(7)


def test_all_train_records_is_server_plus_clients(tmp_path, four_domains):
    fed = federate(four_domains, tmp_path / "fed", num_clients=4)
    expected = len(fed.server_records()) + sum(len(fed.client_images(p)) for p in range(4))
    records = fed.all_train_records()
    assert len(records) == expected and all(len(r.classes) == 1 for r in records)
    assert fed.class_names == CLASSES


def test_paths_are_relative_to_manifest_not_cwd(tmp_path, monkeypatch):
    work = tmp_path / "work"
    inside = make_records(work / "fed" / "data", {"clear": 40, "rainy": 40})
    outside = make_records(tmp_path / "elsewhere", {"snowy": 40})
    monkeypatch.chdir(work)
    path = build_federation(inside + outside, CLASSES, Path("fed"), domain_rule="folder", num_clients=2)
    files = [f for fs in entries(load_json(work / "fed" / "federation.json")).values() for f in fs]
    assert any(f.startswith("data/") for f in files)
    assert all(f.startswith("data/") or (os.path.isabs(f) and "elsewhere" in f) for f in files)
    monkeypatch.chdir(tmp_path)
    fed = Federation.load(work / "fed")
    assert all(os.path.isfile(r.path) for r in fed.all_train_records())
    assert path.is_absolute()


def test_load_rejects_bad_manifests(tmp_path, four_domains):
    path = build_federation(four_domains, CLASSES, tmp_path / "fed", domain_rule="folder")
    manifest = load_json(path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**manifest, "format": "something/9"}))
    with pytest.raises(FederationError, match="bad.json: format: expected 'fedsto-federation/1', got string 'something/9'"):
        Federation.load(bad)
    del manifest["test"]
    bad.write_text(json.dumps(manifest))
    with pytest.raises(FederationError, match="bad.json: test: required key is missing"):
        Federation.load(bad)
    with pytest.raises(FileNotFoundError):
        Federation.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------
# Domain rules and impossible configurations


def test_server_domain_too_small_is_a_clear_error(tmp_path):
    records = make_records(tmp_path / "imgs", {"clear": 10, "rainy": 300})
    with pytest.raises(FederationError, match=r"server domain 'clear' has only 8 training images.*needs \d+"):
        build_federation(records, CLASSES, tmp_path / "fed", domain_rule="folder")
    with pytest.raises(FederationError, match="server domain 'foggy' not among the domains"):
        build_federation(records, CLASSES, tmp_path / "fed", domain_rule="folder", server_domain="foggy")


def test_attribute_rule_needs_the_attribute(tmp_path):
    records = make_records(tmp_path / "imgs", {"clear": 20})
    records[3].attributes = {}
    with pytest.raises(FederationError, match="1 of 20 images have no 'weather' attribute"):
        build_federation(records, CLASSES, tmp_path / "fed", domain_rule="attribute:weather")


def test_unknown_rule_and_split(tmp_path):
    records = make_records(tmp_path / "imgs", {"clear": 20})
    with pytest.raises(FederationError, match="unknown domain rule 'colour'"):
        build_federation(records, CLASSES, tmp_path / "fed", domain_rule="colour")
    with pytest.raises(FederationError, match="apply to the weather rule only"):
        build_federation(records, CLASSES, tmp_path / "fed", domain_rule="folder", weathers=["rainy"])
    with pytest.raises(FederationError, match="split must be one of"):
        build_federation(records, CLASSES, tmp_path / "fed", domain_rule="folder", split="random")


def test_csv_rule_matches_absolute_relative_and_basename(tmp_path):
    records = make_records(tmp_path / "data" / "imgs", {"a": 30, "b": 30, "c": 30})
    for r in records:
        r.domain = "?"
    lines = ["file,domain"]
    for r in records:
        name = Path(r.path).name
        if name.startswith("a_"):
            lines.append(f"{r.path},clear")  # absolute
        elif name.startswith("b_"):
            lines.append(f"imgs/{name},rainy")  # relative to the CSV's folder
        else:
            lines.append(f"{name},night")  # file name only
    table = tmp_path / "data" / "domains.csv"
    table.write_text("\n".join(lines) + "\n")
    fed = federate(records, tmp_path / "fed", domain_rule=f"csv:{table}", server_fraction=0.2)
    assert sorted(fed.domains) == ["clear", "night", "rainy"]
    assert all(Path(r.path).name.startswith("b_") for r in fed.test_records("rainy")["rainy"])

    table.write_text("\n".join(lines[:40]) + "\n")
    with pytest.raises(FederationError, match=r"domains.csv: 51 of 90 images have no row.*b_00009.jpg"):
        build_federation(records, CLASSES, tmp_path / "fed", domain_rule=f"csv:{table}")
    table.write_text("path,where\nx,y\n")
    with pytest.raises(FederationError, match="columns 'file' and 'domain'"):
        build_federation(records, CLASSES, tmp_path / "fed", domain_rule=f"csv:{table}")


def test_weather_rule_writes_shifted_images_once(tmp_path):
    records = write_images(tmp_path / "src", 40)
    out = tmp_path / "fed"
    weather_kwargs = dict(domain_rule="weather", weathers=["rainy", "foggy"], num_clients=2, progress=False)
    path = build_federation(records, CLASSES, out, **weather_kwargs)
    fed = Federation.load(path)
    assert fed.domains == ["clear", "rainy", "foggy"]
    # test: round(0.15 * 40) = 6 over 3 domains; train 34: server round(0.25 * 34) = 8; 26 shifted -> 13 + 13
    assert {d: len(v) for d, v in fed.test_records().items()} == {"clear": 2, "rainy": 2, "foggy": 2}
    assert len(fed.server_records()) == 8
    assert [fed.client_domain(p) for p in range(2)] == ["rainy", "foggy"]
    assert [len(fed.client_images(p)) for p in range(2)] == [13, 13]
    for record in fed.server_records() + fed.test_records("clear")["clear"]:
        assert Path(record.path).parent == tmp_path / "src"
    for pid in range(2):
        for record in fed.client_hidden_records(pid):
            assert Path(record.path).parent == out / "images" / record.domain
            np.testing.assert_allclose(record.boxes, [[0.4, 0.4, 0.4, 0.4]])  # labels unchanged
            shifted = cv2.imread(record.path)
            source = cv2.imread(str(tmp_path / "src" / Path(record.path).name))
            assert shifted.shape == source.shape and not np.array_equal(shifted, source)
    raw = json.dumps(load_json(path)["clients"])
    assert '"file": "images/rainy/' in raw, "shifted images are stored relative to the manifest"
    assert sum(1 for _ in (out / "images").rglob("*.png")) == 26 + 4

    again = build_federation(records, CLASSES, tmp_path / "fed2", **weather_kwargs)
    first = fed.client_images(0)[0]
    twin = Path(str(first).replace(str(out), str(tmp_path / "fed2")))
    assert again.read_text().replace("fed2", "fed") == path.read_text().replace("fed2", "fed")
    assert np.array_equal(cv2.imread(first), cv2.imread(str(twin))), "same seed, same weather pixels"


def test_weather_rule_rejects_unknown_weather(tmp_path):
    records = make_records(tmp_path / "imgs", {"clear": 20})
    with pytest.raises(FederationError, match="unknown weather.*'sandstorm'"):
        build_federation(records, CLASSES, tmp_path / "fed", domain_rule="weather", weathers=["sandstorm"])


# ------------------------------------------------------------------------------------------
# CLI


def make_yolo_domains(root: Path, per_domain: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for domain in ("clear", "rainy", "night"):
        for k in range(per_domain):
            image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            (root / "images" / domain).mkdir(parents=True, exist_ok=True)
            (root / "labels" / domain).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "images" / domain / f"{k}.png"), image)
            (root / "labels" / domain / f"{k}.txt").write_text(f"{k % 2} 0.5 0.5 0.3 0.3\n")
    (root / "data.yaml").write_text("path: .\ntrain: images\nnames: [car, person]\n")
    return root


def test_cli_federate_and_inspect(tmp_path, capsys):
    source = make_yolo_domains(tmp_path / "ds")
    out = tmp_path / "fed"
    options = ["--domain-rule", "folder", "--clients", "2", "--server-fraction", "0.3"]
    code = data_main(["federate", str(source), str(out), *options])
    assert code == 0
    fed = Federation.load(out)
    assert [fed.client_domain(p) for p in range(2)] == ["night", "rainy"]
    capsys.readouterr()
    assert data_main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    for node in ("server", "client 0", "client 1", "test:clear", "test:night", "test:rainy"):
        assert node in shown


def test_cli_bad_input_is_one_red_line_exit_2(tmp_path, capsys):
    source = make_yolo_domains(tmp_path / "ds", per_domain=2)
    (source / "labels" / "clear" / "0.txt").write_text("0 0.5 0.5\n")
    code = data_main(["federate", str(source), str(tmp_path / "fed"), "--domain-rule", "folder"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "0.txt:1" in err and "expected 5 fields" in err
    assert data_main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_add_data_commands_registers_the_group():
    import argparse

    from detection.data_cli import add_data_commands, cmd_federate

    parser = argparse.ArgumentParser(prog="fedsto")
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "federate", "SRC", "OUT", "--split", "iid", "--weathers", "rainy,snowy"])
    assert args.func is cmd_federate and args.split == "iid" and args.weathers == ["rainy", "snowy"]
