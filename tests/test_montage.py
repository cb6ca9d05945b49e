"""PNG montages: size, boxes drawn in class colours, empty tiles, clear errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detection.montage import class_colour, short_name, write_montage
from detection.records import ImageRecord
from detection.synthetic import SYNTHETIC_CLASSES, generate_scene


def _records(tmp_path, domain: str, count: int, size: int = 64) -> list[ImageRecord]:
    records = []
    for i in range(count):
        image, classes, boxes = generate_scene(i, seed=0, imgsz=size)
        path = tmp_path / f"{domain}_{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        records.append(ImageRecord(str(path), classes, boxes, domain))
    return records


def test_montage_written_with_expected_size(tmp_path):
    by_domain = {"clear": _records(tmp_path, "clear", 3), "rainy": _records(tmp_path, "rainy", 3, size=80)}
    out = write_montage(by_domain, list(SYNTHETIC_CLASSES), tmp_path / "out" / "montage.png", per_domain=3, tile=96)
    assert out == tmp_path / "out" / "montage.png"
    image = cv2.imread(str(out))
    assert image.shape[:2] == (2 * 96, 4 * 96)  # a label cell + 3 tiles per row


def test_boxes_drawn_in_class_colour(tmp_path):
    image = np.full((64, 64, 3), 128, np.uint8)
    path = tmp_path / "grey.png"
    cv2.imwrite(str(path), image)
    record = ImageRecord(str(path), [2], [[0.5, 0.5, 0.5, 0.5]], "clear")
    out = cv2.cvtColor(cv2.imread(str(write_montage({"clear": [record]}, ["a", "b", "c"], tmp_path / "m.png", 1, 64))), cv2.COLOR_BGR2RGB)
    tile = out[:, 64:]
    colour = np.array(class_colour(2))
    hits = np.all(tile == colour, axis=2)
    # The rectangle runs from pixel 16 to 47 in the 64 px tile (the image is shown at scale 1).
    assert hits[16:48, 16].all() and hits[16:48, 47].all() and hits[47, 16:48].all()
    assert not hits[30:34, 30:34].any()  # drawn as an outline, not filled


def test_short_domain_gets_empty_tiles_and_order_is_kept(tmp_path):
    by_domain = {"night": _records(tmp_path, "night", 1), "clear": _records(tmp_path, "clear", 2)}
    out = cv2.imread(str(write_montage(by_domain, list(SYNTHETIC_CLASSES), tmp_path / "m.png", per_domain=2, tile=64)))
    empty = out[:63, 2 * 64 :]  # the first row's second image slot (last row is a separator)
    assert np.all(empty == 64)
    assert not np.all(out[64:127, 2 * 64 :] == 64)


def test_short_names():
    assert short_name("traffic sign") == "sign"
    assert short_name("motorbike") == "motorbi"
    assert short_name("car") == "car"


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_montage({}, ["car"], tmp_path / "m.png")
    missing = ImageRecord(str(tmp_path / "missing.png"), domain="clear")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_montage({"clear": [missing]}, ["car"], tmp_path / "m.png")
