"""Dataset readers: the real fixtures in ../shared/data and every bad-input case of the policy."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from detection.bdd100k import FEDSTO_CATEGORY_MAP, bdd_layout, category_map_for, read_bdd100k
from detection.datasets import DatasetError, clip_or_reject_box, detect_format
from detection.probe import probe_image
from detection.yolo import label_path_for, read_yolo_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HIGHWAY = SHARED_DATA / "highway"
BDD = SHARED_DATA / "bdd100k_sample"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data {path} is absent (it lives outside the repository, in ../shared/data)")
    return path


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A small random JPEG/PNG (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def make_yolo(root: Path, labels: dict[str, str | None], names=("car", "person"), yaml_extra: str = "") -> Path:
    """A YOLO dataset: images/<name>.jpg with labels/<name>.txt (None = no label file)."""
    for i, (name, text) in enumerate(labels.items()):
        write_image(root / "images" / f"{name}.jpg", seed=i)
        if text is not None:
            (root / "labels").mkdir(parents=True, exist_ok=True)
            (root / "labels" / f"{name}.txt").write_text(text)
    (root / "data.yaml").write_text(f"path: .\ntrain: images\nnames: {list(names)}\n{yaml_extra}")
    return root


# ------------------------------------------------------------------------------------------
# YOLO: real data


def test_highway_test_split_reads_cleanly():
    records, names, report = read_yolo_dataset(need(HIGHWAY), splits=["test"])
    assert names == ["bus", "car", "motorbike", "person", "truck"]
    assert len(records) == 251
    assert sum(len(r.classes) for r in records) == 539  # README: 539 test boxes
    assert report.total == 0
    assert all(r.attributes["split"] == "test" for r in records)
    boxes = np.concatenate([r.boxes for r in records])
    assert boxes.min() >= 0 and boxes.max() <= 1


@pytest.mark.slow
def test_highway_all_splits():
    records, names, report = read_yolo_dataset(need(HIGHWAY))
    assert len(records) == 2442
    assert sum(len(r.classes) for r in records) == 3853 + 858 + 539
    assert dict(report.counts) == {"empty label file": 29}  # README: 29 train images have no box
    assert sum(1 for r in records if len(r.classes) == 0) == 29


def test_highway_data_yaml_path_is_accepted():
    records, _, _ = read_yolo_dataset(need(HIGHWAY) / "data.yaml", splits=["test"], verify_images=False)
    assert len(records) == 251


# ------------------------------------------------------------------------------------------
# YOLO: layouts


def test_label_path_follows_ultralytics_convention():
    assert label_path_for("/d/images/train/images/x.jpg") == Path("/d/images/train/labels/x.txt")
    assert label_path_for("/d/x/a.png") == Path("/d/x/a.txt")


def test_yolo_folder_boxes_and_dict_names(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "1 0.5 0.5 0.2 0.4\n0 0.25 0.25 0.1 0.1\n", "b": "0 0.5 0.5 1 1"})
    (root / "data.yaml").write_text("path: .\ntrain: images\nnames: {0: car, 1: person}\nnc: 2\n")
    records, names, report = read_yolo_dataset(root)
    assert names == ["car", "person"]
    assert report.total == 0
    a = records[0]
    assert Path(a.path).name == "a.jpg" and Path(a.path).is_absolute()
    assert a.classes.tolist() == [1, 0]
    np.testing.assert_allclose(a.boxes[0], [0.5, 0.5, 0.2, 0.4], atol=1e-6)
    assert a.boxes.dtype == np.float32 and a.classes.dtype == np.int64


def test_yaml_lists_txt_files_and_roboflow_parent_paths(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "valid"):
        write_image(root / split / "images" / f"{split}.jpg")
        (root / split / "labels").mkdir(parents=True)
        (root / split / "labels" / f"{split}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "val.txt").write_text("./valid/images/valid.jpg\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: [val.txt]\nnames: [car]\n")
    records, _, report = read_yolo_dataset(root)
    assert [Path(r.path).name for r in records] == ["train.jpg", "valid.jpg"]
    assert [r.attributes["split"] for r in records] == ["train", "val"]
    assert report.total == 0


def test_val_reusing_train_folder_is_read_once_and_reported(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2"}, yaml_extra="val: images\n")
    records, _, report = read_yolo_dataset(root)
    assert len(records) == 1
    assert report.counts["split reuses another split's images"] == 1


def test_folder_without_yaml_needs_class_names(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "images" / "a.jpg")
    with pytest.raises(DatasetError, match="classes.txt"):
        read_yolo_dataset(root)
    (root / "classes.txt").write_text("car\nperson\n")
    records, names, report = read_yolo_dataset(root)
    assert names == ["car", "person"] and len(records) == 1
    assert report.counts["missing label file"] == 1


def test_domains_from_folders(tmp_path):
    root = tmp_path / "ds"
    for domain in ("rainy", "clear"):
        for k in range(2):
            write_image(root / "images" / domain / f"{domain}{k}.jpg")
            (root / "labels" / domain).mkdir(parents=True, exist_ok=True)
            (root / "labels" / domain / f"{domain}{k}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("path: .\ntrain: images\nnames: [car]\n")
    records, _, report = read_yolo_dataset(root, domain_from="folder")
    assert sorted(r.domain for r in records) == ["clear", "clear", "rainy", "rainy"]
    assert all(len(r.classes) == 1 for r in records) and report.total == 0
    write_image(root / "images" / "stray.jpg")
    with pytest.raises(DatasetError, match="stray.jpg.*images/<domain>/<file>"):
        read_yolo_dataset(root, domain_from="folder")


def test_missing_dataset_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_yolo_dataset(tmp_path / "nowhere")


def test_names_and_nc_disagree(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": ""}, yaml_extra="nc: 3\n")
    with pytest.raises(DatasetError, match=r"data.yaml: nc=3 but 2 names"):
        read_yolo_dataset(root)


def test_missing_split_folder(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": ""}, yaml_extra="test: nothere/images\n")
    with pytest.raises(DatasetError, match="nothere"):
        read_yolo_dataset(root)


# ------------------------------------------------------------------------------------------
# YOLO: bad input policy


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    root = make_yolo(tmp_path / "ds", {"good": "0 0.5 0.5 0.2 0.2", "bad": "0 0.5 0.5 0.2 0.2"})
    (root / "images" / "bad.jpg").write_bytes(b"this is not a jpeg at all")
    records, _, report = read_yolo_dataset(root)
    assert [Path(r.path).name for r in records] == ["good.jpg"]
    assert report.counts["corrupt image"] == 1
    assert report.examples["corrupt image"][0].endswith("bad.jpg")


def test_truncated_jpeg_is_caught(tmp_path):
    root = make_yolo(tmp_path / "ds", {"good": "", "cut": ""})
    jpeg = root / "images" / "cut.jpg"
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])
    assert cv2.imread(str(jpeg)) is not None  # OpenCV alone would have accepted it
    assert probe_image(jpeg) == "corrupt image"
    records, _, report = read_yolo_dataset(root)
    assert [Path(r.path).name for r in records] == ["good.jpg"]
    assert report.counts["corrupt image"] == 1


def test_missing_image_in_list_file_is_counted(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2"})
    (root / "list.txt").write_text("images/a.jpg\nimages/gone.jpg\n")
    (root / "data.yaml").write_text("path: .\ntrain: list.txt\nnames: [car, person]\n")
    records, _, report = read_yolo_dataset(root)
    assert len(records) == 1
    assert report.counts["missing image"] == 1
    assert report.examples["missing image"][0].endswith("gone.jpg")


def test_class_id_out_of_range_names_file_line_and_range(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(DatasetError, match=r"a\.txt:2: class id 7 out of range 0\.\.1"):
        read_yolo_dataset(root)
    records, _, report = read_yolo_dataset(root, strict=False)
    assert records[0].classes.tolist() == [0]
    assert report.counts["class id out of range"] == 1
    assert report.examples["class id out of range"][0].endswith("a.txt:2")


def test_box_far_outside_image_names_file_line(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 320 240 50 40\n"})  # pixel units, not normalised
    with pytest.raises(DatasetError, match=r"a\.txt:1: box '0 320 240 50 40' lies outside the image"):
        read_yolo_dataset(root)
    records, _, report = read_yolo_dataset(root, strict=False)
    assert len(records[0].classes) == 0
    assert report.counts["box outside image"] == 1


def test_tiny_overshoot_is_clipped_and_counted(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.95 0.5 0.1004 0.2\n"})  # right edge at 1.0002
    records, _, report = read_yolo_dataset(root)
    x, _, w, _ = records[0].boxes[0]
    assert x + w / 2 == pytest.approx(1.0, abs=1e-6)
    assert report.counts["box clipped to image"] == 1


def test_non_positive_box_is_dropped_and_counted(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0 0.2\n1 0.5 0.5 0.2 -0.1\n0 0.5 0.5 0.2 0.2\n"})
    records, _, report = read_yolo_dataset(root)
    assert records[0].classes.tolist() == [0]
    assert report.counts["non-positive box size"] == 2


@pytest.mark.parametrize(
    "line, problem",
    [
        ("0 0.5 0.5 0.2", "expected 5 fields"),
        ("0 0.5 0.5 0.2 0.2 0.3", "expected 5 fields"),
        ("car 0.5 0.5 0.2 0.2", "not a number"),
        ("0 0.5 nan 0.2 0.2", "NaN"),
        ("1.5 0.5 0.5 0.2 0.2", "class id must be an integer"),
    ],
)
def test_malformed_line_names_file_line_and_text(tmp_path, line, problem):
    root = make_yolo(tmp_path / "ds", {"a": f"0 0.5 0.5 0.1 0.1\n{line}\n"})
    with pytest.raises(DatasetError) as info:
        read_yolo_dataset(root)
    message = str(info.value)
    assert "a.txt:2" in message and problem in message and line in message


def test_empty_label_file_is_background_and_counted(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "", "b": "  \n\n", "c": "0 0.5 0.5 0.2 0.2"})
    records, _, report = read_yolo_dataset(root)
    assert [len(r.classes) for r in records] == [0, 0, 1]
    assert report.counts["empty label file"] == 2


def test_missing_label_file_is_background_and_counted(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": None, "b": "0 0.5 0.5 0.2 0.2"})
    records, _, report = read_yolo_dataset(root)
    assert len(records) == 2 and len(records[0].classes) == 0
    assert report.counts["missing label file"] == 1
    assert report.examples["missing label file"][0].endswith("a.txt")


def test_duplicate_boxes_are_dropped_and_counted(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n"})
    records, _, report = read_yolo_dataset(root)
    assert records[0].classes.tolist() == [0, 1]
    assert report.counts["duplicate box"] == 1


def test_polygon_line_becomes_its_bounding_box(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "1 0.2 0.2 0.6 0.2 0.6 0.8 0.2 0.8\n"})
    records, _, report = read_yolo_dataset(root)
    np.testing.assert_allclose(records[0].boxes[0], [0.4, 0.5, 0.4, 0.6], atol=1e-6)
    assert report.counts["polygon converted to box"] == 1


def test_non_image_files_are_counted(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": ""})
    (root / "images" / "notes.md").write_text("hello")
    _, _, report = read_yolo_dataset(root)
    assert report.counts["non-image file ignored"] == 1


def test_clip_or_reject_box_verdicts():
    assert clip_or_reject_box(0.1, 0.1, 0.5, 0.5)[0] == "ok"
    assert clip_or_reject_box(-0.0005, 0.1, 0.5, 0.5) == ("clipped", (0.0, 0.1, 0.5, 0.5))
    assert clip_or_reject_box(-0.01, 0.1, 0.5, 0.5)[0] == "outside"
    assert clip_or_reject_box(0.5, 0.1, 0.5, 0.5)[0] == "empty"


# ------------------------------------------------------------------------------------------
# BDD100K: real fixture


def test_bdd_detection_json():
    labels, images = bdd_layout(need(BDD) / "det")
    assert detect_format(BDD / "det") == "bdd100k"
    records, names, report = read_bdd100k(labels, images)
    assert names == ["car", "traffic light", "traffic sign"]  # categories present
    assert len(records) == 1 and report.total == 0
    record = records[0]
    assert record.attributes == {"weather": "clear", "timeofday": "dawn/dusk", "scene": "city street"}
    assert np.bincount(record.classes).tolist() == [4, 5, 1]
    frame = json.loads((labels / "annotation.json").read_text())[0]
    first = frame["labels"][0]["box2d"]
    width, height = 1280, 720
    expected = [
        (first["x1"] + first["x2"]) / 2 / width,
        (first["y1"] + first["y2"]) / 2 / height,
        (first["x2"] - first["x1"]) / width,
        (first["y2"] - first["y1"]) / height,
    ]
    np.testing.assert_allclose(record.boxes[0], expected, rtol=1e-5)


def test_bdd_detection_with_fedsto_mapping_counts_unmapped_categories():
    labels, images = bdd_layout(need(BDD) / "det")
    records, names, report = read_bdd100k(labels, images, category_map=FEDSTO_CATEGORY_MAP)
    assert names == ["car", "bus", "truck", "person", "traffic sign"]
    assert len(records[0].classes) == 5  # 4 cars + 1 sign
    assert dict(report.counts) == {"unmapped category 'traffic light'": 5}
    with pytest.raises(DatasetError, match=r"annotation.json: frame #0 .* category 'traffic light' is not mapped"):
        read_bdd100k(labels, images, category_map=FEDSTO_CATEGORY_MAP, strict=True)


def test_bdd_box_track_per_video_files():
    labels, images = bdd_layout(need(BDD) / "box_track")
    records, names, report = read_bdd100k(labels, images, classes=["car", "truck", "person"])
    assert names == ["car", "truck", "person"]
    assert len(records) == 12
    assert {r.attributes["videoName"] for r in records} == {"00091078-875c1f73", "b1c66a42-6f7d68ca"}
    assert all("weather" not in r.attributes for r in records)
    counts = np.bincount(np.concatenate([r.classes for r in records]), minlength=3).tolist()
    assert counts == [44 + 143, 8 + 12, 35 + 6]  # pedestrian and rider both map to person
    assert dict(report.counts) == {"unmapped category 'motorcycle'": 6}


def test_category_map_for_collects_aliases():
    expected = {"person": "person", "car": "car", "pedestrian": "person", "rider": "person"}
    assert category_map_for(["person", "car"]) == expected


# ------------------------------------------------------------------------------------------
# BDD100K: bad input


def make_bdd(root: Path, frames: list[dict], images: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    for i, (name, size) in enumerate(images.items()):
        write_image(root / "images" / name, size=size, seed=i)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "labels.json").write_text(json.dumps(frames))
    return root / "labels" / "labels.json", root / "images"


def box(category, x1, y1, x2, y2):
    return {"category": category, "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}}


def test_bdd_missing_and_corrupt_images_are_counted(tmp_path):
    frames = [{"name": n, "labels": [box("car", 1, 1, 10, 10)]} for n in ("ok.jpg", "gone.jpg", "bad.jpg")]
    labels, images = make_bdd(tmp_path, frames, {"ok.jpg": (64, 48), "bad.jpg": (64, 48)})
    (images / "bad.jpg").write_bytes((images / "bad.jpg").read_bytes()[:200])
    records, _, report = read_bdd100k(labels, images)
    assert [Path(r.path).name for r in records] == ["ok.jpg"]
    assert report.counts["missing image"] == 1 and report.counts["corrupt image"] == 1


def test_bdd_boxes_use_the_real_image_size_and_policy(tmp_path):
    frame = {
        "name": "a.jpg",
        "attributes": {"weather": "rainy"},
        "labels": [
            box("car", 0, 0, 32, 24),  # top-left quarter of a 64x48 image
            box("car", 32, 24, 64.3, 48),  # 0.3 px overshoot: clipped
            box("car", 10, 10, 10, 20),  # zero width
            box("car", 10, 10, 200, 20),  # far outside
            box("car", 0, 0, 32, 24),  # duplicate
            {"category": "drivable area", "poly2d": []},  # no box2d
        ],
    }
    labels, images = make_bdd(tmp_path, [frame], {"a.jpg": (64, 48)})
    records, names, report = read_bdd100k(labels, images)
    assert names == ["car"]
    np.testing.assert_allclose(records[0].boxes, [[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]], atol=1e-6)
    assert records[0].attributes["weather"] == "rainy"
    assert dict(report.counts) == {
        "box clipped to image": 1,
        "non-positive box size": 1,
        "box outside image": 1,
        "duplicate box": 1,
        "label without box2d": 1,
    }
    where = r"labels.json: frame #0 \(a.jpg\) label #3"
    with pytest.raises(DatasetError, match=where + r": box2d .* outside the 64x48 image"):
        read_bdd100k(labels, images, strict=True)


def test_bdd_malformed_json_names_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "broken.json"
    bad.write_text('[{"name": "a.jpg", ')
    with pytest.raises(DatasetError, match="broken.json: not valid JSON"):
        read_bdd100k(bad, tmp_path / "images")
    bad.write_text('[{"labels": []}]')
    with pytest.raises(DatasetError, match=r"broken.json: frame #0 has no 'name'"):
        read_bdd100k(bad, tmp_path / "images")


def test_bdd_non_numeric_box_names_the_label(tmp_path):
    frame = {"name": "a.jpg", "labels": [{"category": "car", "box2d": {"x1": "left", "y1": 0, "x2": 1, "y2": 1}}]}
    labels, images = make_bdd(tmp_path, [frame], {"a.jpg": (64, 48)})
    with pytest.raises(DatasetError, match=r"frame #0 \(a.jpg\) label #0: box2d must have numeric"):
        read_bdd100k(labels, images)


def test_bdd_mapping_target_must_be_a_class(tmp_path):
    labels, images = make_bdd(tmp_path, [{"name": "a.jpg", "labels": []}], {"a.jpg": (64, 48)})
    with pytest.raises(DatasetError, match="targets \\['vehicle'\\] are not in classes"):
        read_bdd100k(labels, images, classes=["car"], category_map={"car": "vehicle"})
