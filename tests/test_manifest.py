"""Manifest validation: every malformed manifest is one FederationError naming file, JSON path and expectation."""

from __future__ import annotations

import json
import math

import pytest
from helpers import sample_manifest

from detection.federation import build_federation
from detection.manifest import FederationError, dump_manifest, validate_manifest
from detection.manifest_reader import Federation
from detection.records import ImageRecord


def mutated(change) -> dict:
    manifest = sample_manifest()
    change(manifest)
    return manifest


def setter(*path_and_value):
    *path, value = path_and_value

    def change(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def deleter(*path):
    def change(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return change


# (mutation, JSON path named, what the message must also say)
BAD = {
    "x is NaN": (setter("test", "rainy", 0, "labels", 2, 1, math.nan), "test.rainy[0].labels[2]", "x must be a finite number in [0, 1], got number nan"),
    "y is inf": (setter("server", "images", 0, "labels", 1, 2, math.inf), "server.images[0].labels[1]", "y must be a finite number in [0, 1], got number inf"),
    "w is -inf": (setter("clients", 1, "images", 1, "hidden_labels", 0, 3, -math.inf), "clients[1].images[1].hidden_labels[0]", "w must be a finite number"),
    "x above 1": (setter("test", "clear", 0, "labels", 0, 1, 1.5), "test.clear[0].labels[0]", "x must be a finite number in [0, 1], got number 1.5"),
    "h below 0": (setter("server", "images", 2, "labels", 0, 4, -0.2), "server.images[2].labels[0]", "h must be a finite number in [0, 1]"),
    "zero width": (setter("test", "rainy", 0, "labels", 1, 3, 0), "test.rainy[0].labels[1]", "width and height must be > 0"),
    "box past the edge": (setter("test", "rainy", 0, "labels", 1, 3, 0.5), "test.rainy[0].labels[1]", "reaches outside the image"),
    "float class id": (setter("test", "clear", 0, "labels", 0, 0, 1.5), "test.clear[0].labels[0]", "class id must be an integer, got number 1.5"),
    "integral float class id": (setter("test", "clear", 0, "labels", 0, 0, 1.0), "test.clear[0].labels[0]", "class id must be an integer, got number 1.0"),
    "string class id": (setter("server", "images", 0, "labels", 0, 0, "car"), "server.images[0].labels[0]", "class id must be an integer, got string 'car'"),
    "bool class id": (setter("server", "images", 0, "labels", 0, 0, True), "server.images[0].labels[0]", "class id must be an integer, got boolean True"),
    "class id out of range": (setter("clients", 0, "images", 0, "hidden_labels", 0, 0, 2), "clients[0].images[0].hidden_labels[0]", "class id 2 outside 0..1 (class_names has 2 names)"),
    "short label row": (setter("server", "images", 0, "labels", 0, [0, 0.5, 0.5, 0.2]), "server.images[0].labels[0]", "expected a label row [class, x, y, w, h]"),
    "server not an object": (setter("server", ["clear"]), "server", "expected an object, got list"),
    "server domain differs": (setter("server", "domain", "rainy"), "server.domain", "'rainy' differs from server_domain 'clear'"),
    "server without images": (setter("server", "images", []), "server.images", "expected at least one image"),
    "class_names a string": (setter("class_names", "car,person"), "class_names", "expected a list, got string"),
    "class_names holds a number": (setter("class_names", 1, 7), "class_names[1]", "expected a non-empty string, got integer 7"),
    "class_names empty": (setter("class_names", []), "class_names", "expected at least one class name"),
    "class name twice": (setter("class_names", 1, "car"), "class_names[1]", "'car' is listed twice (also at class_names[0])"),
    "domains an object": (setter("domains", {"clear": 1}), "domains", "expected a list, got object"),
    "domains holds null": (setter("domains", 2, None), "domains[2]", "expected a non-empty string, got null"),
    "server_domain not in domains": (setter("server_domain", "foggy"), "server_domain", "'foggy' is not one of domains ['clear', 'rainy', 'night']"),
    "server_domain a number": (setter("server_domain", 3), "server_domain", "expected a non-empty string, got integer 3"),
    "test domain not in domains": (setter("test", "foggy", []), "test.foggy", "'foggy' is not one of domains"),
    "test split not a list": (setter("test", "night", {}), "test.night", "expected a list, got object"),
    "test not an object": (setter("test", []), "test", "expected an object, got list"),
    "client with no images": (setter("clients", 1, "images", []), "clients[1].images", "expected at least one image, got an empty list"),
    "no clients": (setter("clients", []), "clients", "expected at least one client"),
    "client not an object": (setter("clients", 0, "rainy"), "clients[0]", "expected an object, got string 'rainy'"),
    "wrong partition id": (setter("clients", 1, "partition_id", 0), "clients[1].partition_id", "expected 1 (its position in clients), got integer 0"),
    "bool partition id": (setter("clients", 1, "partition_id", True), "clients[1].partition_id", "got boolean True"),
    "client domains a list": (setter("clients", 0, "domains", ["rainy"]), "clients[0].domains", "expected an object, got list"),
    "client domain count wrong": (setter("clients", 0, "domains", "rainy", 3), "clients[0].domains.rainy", "3 images, but clients[0].images holds 2 'rainy' images"),
    "client domain count a float": (setter("clients", 0, "domains", "rainy", 2.0), "clients[0].domains.rainy", "expected an integer >= 1, got number 2.0"),
    "client image domain unknown": (setter("clients", 0, "images", 1, "domain", "foggy"), "clients[0].images[1].domain", "'foggy' is not one of domains"),
    "client image domain not the client's": (setter("clients", 0, "images", 1, "domain", "night"), "clients[0].images[1].domain", "'night' is not among clients[0].domains ['rainy']"),
    "client image leaks labels": (setter("clients", 0, "images", 0, "labels", []), "clients[0].images[0].labels", "unexpected key"),
    "image entry not an object": (setter("test", "clear", 0, "t0.png"), "test.clear[0]", "expected an object, got string"),
    "file not a string": (setter("server", "images", 1, "file", 5), "server.images[1].file", "expected a non-empty string, got integer 5"),
    "file empty": (setter("server", "images", 1, "file", ""), "server.images[1].file", "expected a non-empty string, got string ''"),
    "file listed twice": (setter("test", "clear", 0, "file", "images/c1.png"), "test.clear[0].file", "'images/c1.png' is listed twice (also at clients[0].images[1].file)"),
    "labels missing": (deleter("server", "images", 0, "labels"), "server.images[0].labels", "required key is missing"),
    "labels not a list": (setter("server", "images", 0, "labels", {"0": [0.5, 0.5, 0.1, 0.1]}), "server.images[0].labels", "expected a list, got object"),
    "seed a string": (setter("seed", "0"), "seed", "expected an integer >= 0, got string '0'"),
    "seed a float": (setter("seed", 1.5), "seed", "expected an integer >= 0, got number 1.5"),
    "seed negative": (setter("seed", -1), "seed", "expected an integer >= 0, got integer -1"),
    "split unknown": (setter("split", "random"), "split", "expected one of 'non-iid', 'iid', 'dirichlet', got string 'random'"),
    "split a list": (setter("split", ["iid"]), "split", "got list ['iid']"),
    "paths absolute": (setter("paths", "absolute"), "paths", "expected 'relative', got string 'absolute'"),
    "created_by a string": (setter("created_by", "me"), "created_by", "expected an object, got string 'me'"),
    "unused a list": (setter("unused", []), "unused", "expected an object, got list"),
    "unused domain unknown": (setter("unused", "foggy", {"count": 1, "reason": "x"}), "unused.foggy", "'foggy' is not one of domains"),
    "unused count a string": (setter("unused", "clear", "count", "4"), "unused.clear.count", "expected an integer >= 1, got string '4'"),
    "unused reason missing": (deleter("unused", "clear", "reason"), "unused.clear.reason", "required key is missing"),
    "report a list": (setter("report", ["missing image"]), "report", "expected an object, got list"),
    "report count NaN": (setter("report", "missing image", "count", math.nan), 'report["missing image"].count', "expected an integer >= 1, got number nan"),
    "report examples not strings": (setter("report", "missing image", "examples", 0, 3), 'report["missing image"].examples[0]', "expected a non-empty string, got integer 3"),
    "top-level key missing": (deleter("clients"), "clients", "required key is missing"),
    "top-level key unexpected": (setter("labels", []), "labels", "unexpected key; expected only format, created_by"),
    "format wrong": (setter("format", "fedsto-federation/2"), "format", "expected 'fedsto-federation/1', got string 'fedsto-federation/2'"),
    "format missing": (deleter("format"), "format", "required key is missing (expected 'fedsto-federation/1')"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_input_names_the_json_path_and_the_expectation(case):
    change, where, what = BAD[case]
    with pytest.raises(FederationError) as info:
        validate_manifest(mutated(change), "/data/fed/federation.json")
    message = str(info.value)
    assert message.startswith(f"/data/fed/federation.json: {where}: "), message
    assert what in message, message
    assert len(message.splitlines()) == 1


def test_the_sample_is_valid_and_loads(tmp_path):
    path = tmp_path / "federation.json"
    path.write_text(dump_manifest(sample_manifest()))
    fed = Federation.load(path, check_files=False)
    assert fed.sizes() == {"server": 3, "clients": [2, 2], "test": {"clear": 1, "rainy": 1, "night": 0}}
    assert fed.client_domain(1) == "rainy"  # tie between night and rainy: the one first in domains


def test_load_from_disk_names_the_manifest_file(tmp_path):
    path = tmp_path / "fed" / "federation.json"
    path.parent.mkdir()
    manifest = sample_manifest()
    manifest["test"]["rainy"][0]["labels"][2][1] = math.nan
    path.write_text(json.dumps(manifest))  # Python writes the NaN literal; its parser accepts it
    assert "NaN" in path.read_text()
    with pytest.raises(FederationError, match=r"fed/federation.json: test\.rainy\[0\]\.labels\[2\]: x must be a finite"):
        Federation.load(path.parent, check_files=False)


def test_a_non_object_document_and_broken_json(tmp_path):
    path = tmp_path / "federation.json"
    for text, expected in [
        ("[1, 2]", "federation.json: expected a JSON object, got list"),
        ('{"format": ', "federation.json: not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "federation.json: not valid JSON"),
        ('{"seed": ' + "9" * 5000 + "}", "federation.json: not valid JSON"),
    ]:
        path.write_text(text)
        with pytest.raises(FederationError) as info:
            Federation.load(path, check_files=False)
        assert expected in str(info.value) and len(str(info.value).splitlines()) == 1
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(FederationError, match="not valid JSON"):
        Federation.load(path, check_files=False)


def test_build_refuses_to_write_a_manifest_that_would_not_load(tmp_path):
    records = [ImageRecord(str(tmp_path / f"{k}.png"), [0], [[0.5, 0.5, 0.2, 0.2]], "clear") for k in range(12)]
    records += [ImageRecord(str(tmp_path / f"r{k}.png"), [0], [[0.5, 0.5, 0.2, 0.2]], "rainy") for k in range(12)]
    records[3] = ImageRecord(records[3].path, [0], [[0.05, 0.5, 0.3, 0.2]], "clear")  # reaches past the left edge
    out = tmp_path / "fed"
    with pytest.raises(FederationError, match=r"fed/federation.json: \w+.*reaches outside the image"):
        build_federation(records, ["car"], out, domain_rule="folder", num_clients=1, test_fraction=0.0,
                         server_fraction=0.5)
    assert not (out / "federation.json").exists()
