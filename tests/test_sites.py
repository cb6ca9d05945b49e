"""Site manifests and site folders: each site holds only its own data, and a deployment run shows it.

``fedsto data federate`` writes one manifest per site; ``fedsto data export-site`` copies one
site into a folder of its own. A run whose server and clients read only their exported folders
(through the real ServerApp loop and ClientApp, in-process) completes, refuses ``full``, refuses a
site of another federation or version, reports a site without data by node and path, and every
reply it receives carries only what ``docs/deployment.md`` lists: numbers, weights, a domain and
phase name, never a path, a file list or a label.
"""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path

import pytest
import torch
from flwr.app import Message

import client.app
from detection.data_cli import main as data_main
from detection.manifest import FederationError, validate_site_manifest
from detection.model import build_model, get_state
from detection.sites import export_site, load_client_site, load_server_site
from server.config import RunConfig
from server.inprocess import InProcessGrid
from server.runner import FederatedRun, RunFailed
from strategies import protocol
from strategies.transport import LAYOUT, unpack_content

IMGSZ = 96
HOLDOUT = 4

# Every key a deployed site's replies may carry (docs/deployment.md, "What leaves a site").
SITE_METRIC_KEYS = {
    "num-examples", "partition-id", "local_images", "threads", "client_seconds", "setup_seconds", "train_seconds",
    "steps", "images", "seconds", "oom_batch_size",
    "steps_skipped", "images_skipped", "pseudo_images", "pseudo_reliable", "pseudo_uncertain", "ema_decay",
    "reliable_per_image", "uncertain_per_image", "site_map50", "site_map50_95", "personal_map50", "personal_map50_95",
}
SITE_INFO_KEYS = {"partition-id", "domain", "images", "holdout", "federation-id", "phase",
                  "version-flwr", "version-fedsto", "version-model"}


@pytest.fixture(scope="module")
def sites(synthetic_records, tmp_path_factory):
    """A 2-client weather federation with a 4-image hold-out per client, and its three site folders."""
    from detection.federation import build_federation

    records, class_names = synthetic_records
    out = tmp_path_factory.mktemp("site_federation")
    manifest = build_federation(records[:120], class_names, out / "fed", domain_rule="weather", weathers=["rainy", "night"],
                                num_clients=2, server_fraction=0.4, test_fraction=0.3, seed=0, progress=False,
                                site_holdout=HOLDOUT)
    folders = {name: export_site(manifest, name, out / name, progress=False).parent
               for name in ("server", "client-0", "client-1")}
    return manifest, folders


def files_under(folder: Path) -> set[str]:
    """Image names in a site folder (files from outside the federation folder get a ``NNNNNN_`` prefix)."""
    return {re.sub(r"^\d{6}_", "", p.name) if p.parent.name == "files" else p.name
            for p in folder.rglob("*") if p.is_file() and p.name != "site.json"}


def test_federate_writes_one_manifest_per_site_holding_only_its_own_data(sites):
    manifest, _ = sites
    fed = json.loads(manifest.read_text())
    folder = manifest.parent
    server = json.loads((folder / "site-server.json").read_text())
    assert validate_site_manifest(server, "site-server.json") == "server"
    assert server["images"] == fed["server"]["images"] and server["test"] == fed["test"]
    assert server["num_clients"] == 2 and "clients" not in server
    for pid in (0, 1):
        text = (folder / f"site-client-{pid}.json").read_text()
        site = json.loads(text)
        assert validate_site_manifest(site, "x") == "client" and site["partition_id"] == pid
        own = {e["file"] for e in fed["clients"][pid]["images"]}
        listed = {e["file"] for e in site["images"]} | {e["file"] for e in site["holdout"]}
        assert listed == own and len(site["holdout"]) == HOLDOUT
        assert "hidden_labels" not in text and all(set(e) == {"file", "domain"} for e in site["images"])
        other = {e["file"] for e in fed["clients"][1 - pid]["images"]} | {e["file"] for e in fed["server"]["images"]}
        assert not any(f in text for f in other)


def test_export_site_copies_one_site_and_loads_like_the_full_manifest(sites):
    manifest, folders = sites
    fed = json.loads(manifest.read_text())
    for pid in (0, 1):
        folder = folders[f"client-{pid}"]
        mine = {Path(e["file"]).name for e in fed["clients"][pid]["images"]}
        assert files_under(folder) == mine  # its images (hold-out included), nothing of anyone else
        deployed, simulated = load_client_site(folder), load_client_site(manifest, pid)
        assert deployed.deployed and deployed.hidden is None and len(deployed.eval_records) == HOLDOUT
        assert not simulated.deployed and simulated.hidden is not None
        assert deployed.partition_id == pid and deployed.domain == simulated.domain
        assert deployed.federation_id == simulated.federation_id
        # training images: the same files in the same order, less the hold-out
        held = {Path(r.path).name for r in deployed.eval_records}
        assert [Path(p).name for p in deployed.images] == [Path(p).name for p in simulated.images if Path(p).name not in held]
    server = load_server_site(folders["server"])
    assert server.deployed and len(server.labelled) == len(fed["server"]["images"])
    assert files_under(folders["server"]) == {Path(e["file"]).name for e in fed["server"]["images"]} | {
        Path(e["file"]).name for rs in fed["test"].values() for e in rs}


def site_fields(site) -> tuple:
    """A client site as plain values (records compared by path, classes and boxes)."""
    def records(rs):
        return None if rs is None else [(r.path, r.domain, r.classes.tolist(), r.boxes.tolist()) for r in rs]
    return (site.path, site.partition_id, site.class_names, site.domain, site.images, records(site.hidden),
            records(site.eval_records), site.federation_id, site.deployed)


def test_a_partition_index_lets_a_client_read_only_its_own_partition_and_never_outlives_its_manifest(sites):
    from detection import sites as site_module

    manifest, _ = sites
    fed = json.loads(manifest.read_text())
    site_module._parsed_federation.cache_clear()
    full = {pid: site_fields(load_client_site(manifest, pid)) for pid in (0, 1)}  # no index yet: the whole manifest
    folder = site_module.write_partition_index(manifest)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["client-0.json", "client-1.json", "complete", *(f"test-{d}.json" for d in fed["test"])])
    assert json.loads((folder / "client-1.json").read_text())["images"] == fed["clients"][1]["images"]
    site_module._parsed_federation.cache_clear()
    assert {pid: site_fields(load_client_site(manifest, pid)) for pid in (0, 1)} == full
    assert site_module._parsed_federation.cache_info().misses == 0  # the whole manifest was never parsed
    with pytest.raises(FederationError, match="out of range"):  # no slice: the full manifest names the error
        load_client_site(manifest, 7)
    # A rewritten manifest (another stamp) does not use the old index.
    stat = manifest.stat()
    site_module._parsed_federation.cache_clear()
    try:
        os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert site_module.partition_index_folder(manifest) != folder
        assert site_fields(load_client_site(manifest, 0)) == full[0]
        assert site_module._parsed_federation.cache_info().misses == 1
    finally:
        os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_export_site_cli_refuses_a_non_empty_folder_and_an_unknown_site(sites, tmp_path, capsys):
    manifest, _ = sites
    assert data_main(["export-site", str(manifest.parent), "client-7", str(tmp_path / "a")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no site 'client-7'" in err and "(sites: client-0, client-1, server)" in err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stray.txt").write_text("x")
    assert data_main(["export-site", str(manifest), "client-0", str(tmp_path / "b")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert data_main(["export-site", str(manifest), "client-0", str(tmp_path / "c")]) == 0
    assert "client-0 (partition 0)" in capsys.readouterr().out


def test_site_manifest_errors_are_one_line_naming_the_file(sites, tmp_path):
    _, folders = sites
    site = json.loads((folders["client-0"] / "site.json").read_text())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "site.json").write_text(json.dumps({**site, "images": []}))
    with pytest.raises(FederationError, match=r"empty/site.json: images: expected at least one image, got an empty list"):
        load_client_site(tmp_path / "empty")
    with pytest.raises(FederationError, match="site 'client-0' is partition 0, but the node config says partition-id=1"):
        load_client_site(folders["client-0"], 1)
    with pytest.raises(FederationError, match="a server site manifest .* expected a client site's"):
        load_client_site(folders["server"])
    with pytest.raises(FileNotFoundError, match="no federation.json or site.json in"):
        load_client_site(tmp_path)


def deploy_config(server_folder, out, **changes) -> RunConfig:
    values = {"method": "fedsto", "federation": str(server_folder), "synthetic-images": 0, "imgsz": IMGSZ, "batch-size": 8,
              "warmup-epochs": 0, "phase1-rounds": 1, "phase2-rounds": 1, "eval-every": 1, "ema-decay": "auto",
              "weak-teacher-map50": 0.0, "weak-teacher-density": 0.0, "output-dir": str(out), "progress": False,
              "server-threads": 2, "client-threads": 2, "discovery-timeout": 5}
    values.update(changes)
    return RunConfig.from_run_config(values)


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every reply the server receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies += replies
        return replies


def site_grid(folders, **kwargs) -> RecordingGrid:
    return RecordingGrid(client.app.app, 2, node_configs=[{"site": str(folders[f"client-{i}"])} for i in (0, 1)], **kwargs)


@pytest.fixture
def warm_weights(trained_detector, tmp_path):
    path = tmp_path / "warm.pt"
    torch.save(trained_detector.state, path)
    return str(path)


def test_a_deployment_run_completes_and_every_reply_carries_only_what_may_leave_a_site(sites, warm_weights, tmp_path):
    manifest, folders = sites
    grid = site_grid(folders)
    result = FederatedRun(grid, deploy_config(folders["server"], tmp_path / "run", weights=warm_weights)).run()
    assert result["status"] == "completed" and result["failures"] == 0
    assert set(result["sites"]) == {"client-0", "client-1"}  # federated evaluation on each site's hold-out
    assert all(0 <= m["broadcast_map50"] <= 1 and 0 <= m["personal_map50"] <= 1 for m in result["sites"].values())

    fed = json.loads(manifest.read_text())
    names = {Path(e["file"]).name for c in fed["clients"] for e in c["images"]} | {
        Path(e["file"]).name for e in fed["server"]["images"]}
    model_keys = set(get_state(build_model("yolo11n.yaml", len(fed["class_names"]), fed["class_names"])))
    kinds = {r.metadata.message_type for r in grid.replies}
    assert kinds == {"query.partition", "evaluate.teacher", "train"} and len(grid.replies) == 2 * 4
    for reply in grid.replies:  # as they arrive: weights packed (strategies/transport.py), their layout beside them
        assert not reply.has_error(), reply.error.reason
        wire = dict(reply.content.config_records)
        if LAYOUT in wire:  # tensor names, dtypes and shapes of the model, nothing else
            assert set(wire.pop(LAYOUT)) == {"layout"}
            layout = json.loads(reply.content.config_records[LAYOUT]["layout"])
            assert {key for key, _, _ in layout} <= model_keys
        for record in wire.values():
            assert set(record) <= SITE_INFO_KEYS, set(record) - SITE_INFO_KEYS
            for value in record.values():
                assert not isinstance(value, (list, bytes)), value  # no file lists, no blobs
                text = str(value)
                assert "/" not in text.replace(".yaml@", "") or text.startswith("yolo"), text
                assert not any(name in text for name in names), text
        for record in reply.content.metric_records.values():
            assert set(record) <= SITE_METRIC_KEYS | {k for k in record if re.fullmatch(r"loss_\w+", k)}, set(record)
            assert not any("precision" in k or "recall" in k or "true" in k for k in record)  # label-derived
            assert all(not isinstance(v, list) for v in record.values())
        for record in unpack_content(reply.content).array_records.values():
            assert set(record) <= model_keys | {k for k in record if k.startswith("strategy/")}


def test_full_is_refused_on_a_server_site(sites, tmp_path):
    _, folders = sites
    with pytest.raises(FederationError, match="method 'full' needs every client's labels in one place"):
        FederatedRun(site_grid(folders), deploy_config(folders["server"], tmp_path / "run", method="full")).run()


def test_a_site_of_another_federation_or_version_is_refused_by_name(sites, sites_other, warm_weights, tmp_path, monkeypatch):
    _, folders = sites
    mixed = {**folders, "client-1": sites_other}
    real = protocol.site_versions

    def old_flwr_on_partition_0(model):  # what an outdated client-0 image would report
        return {**real(model), "version-flwr": "1.41.2"}

    proxy = types.SimpleNamespace(**{k: getattr(protocol, k) for k in dir(protocol) if not k.startswith("__")})
    proxy.site_versions = old_flwr_on_partition_0
    monkeypatch.setattr(client.app, "protocol", proxy)
    with pytest.raises(RunFailed, match="only 0 of the 2 clients round 1 samples answered") as err:
        FederatedRun(site_grid(mixed), deploy_config(folders["server"], tmp_path / "run", weights=warm_weights)).run()
    text = str(err.value)
    assert re.search(r"site client-0 \(node \d+\) refused: flwr 1.41.2 there, 1.42.\d+ here", text), text
    assert re.search(r"site client-1 \(node \d+\) refused: federation [0-9a-f]{16} there, [0-9a-f]{16} here", text), text
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert len(result["site_failures"]) == 2


@pytest.fixture(scope="module")
def sites_other(synthetic_records, tmp_path_factory):
    """client-1 of a federation built with another seed (a site folder from the wrong federation)."""
    from detection.federation import build_federation

    records, class_names = synthetic_records
    out = tmp_path_factory.mktemp("other_federation")
    manifest = build_federation(records[:120], class_names, out / "fed", domain_rule="weather", weathers=["rainy", "night"],
                                num_clients=2, server_fraction=0.4, test_fraction=0.3, seed=1, progress=False)
    return export_site(manifest, "client-1", out / "client-1", progress=False).parent


@pytest.mark.parametrize("case", ["missing folder", "empty site manifest"])
def test_a_site_without_data_fails_by_node_and_path_and_the_run_goes_on(sites, warm_weights, tmp_path, case):
    _, folders = sites
    if case == "missing folder":
        broken_site, expected = tmp_path / "missing-site", r"no federation or site manifest at .*missing-site"
    else:
        broken_site = tmp_path / "empty-site"
        broken_site.mkdir()
        site = json.loads((folders["client-1"] / "site.json").read_text())
        (broken_site / "site.json").write_text(json.dumps({**site, "images": []}))
        expected = r"empty-site/site.json: images: expected at least one image, got an empty list"
    cfg = deploy_config(folders["server"], tmp_path / "run", weights=warm_weights, **{"min-reply-fraction": 0.5,
                                                                                     "phase2-rounds": 0})
    result = FederatedRun(site_grid({**folders, "client-1": broken_site}), cfg).run()
    assert result["status"] == "completed"
    (failure,) = result["site_failures"]
    assert re.fullmatch(rf"node \d+: partition query failed: .*{expected}.*", failure["reason"]), failure
