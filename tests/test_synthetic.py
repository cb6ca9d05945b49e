"""Synthetic driving scenes: shapes, determinism, box sanity, class coverage, YOLO files on disk."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from detection.synthetic import SYNTHETIC_CLASSES, generate_scene, write_synthetic_dataset


@pytest.mark.parametrize("imgsz, hw", [(96, (96, 96)), ((72, 128), (72, 128)), ((128, 64), (128, 64))])
def test_scene_has_requested_size_and_types(imgsz, hw):
    image, classes, boxes = generate_scene(0, seed=0, imgsz=imgsz)
    assert image.shape == (*hw, 3) and image.dtype == np.uint8
    assert classes.dtype == np.int64 and classes.ndim == 1
    assert boxes.dtype == np.float32 and boxes.shape == (len(classes), 4)


def test_same_seed_same_bytes_other_seed_or_index_differs():
    a = generate_scene(3, seed=11, imgsz=96)
    b = generate_scene(3, seed=11, imgsz=96)
    assert a[0].tobytes() == b[0].tobytes()
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert generate_scene(3, seed=12, imgsz=96)[0].tobytes() != a[0].tobytes()
    assert generate_scene(4, seed=11, imgsz=96)[0].tobytes() != a[0].tobytes()


def test_boxes_inside_image_positive_and_on_pixel_edges():
    size = 96
    for index in range(30):
        _, classes, boxes = generate_scene(index, seed=0, imgsz=size)
        assert np.all((classes >= 0) & (classes < len(SYNTHETIC_CLASSES)))
        x, y, w, h = boxes.T
        assert np.all(w > 0) and np.all(h > 0)
        assert np.all(x - w / 2 >= -1e-6) and np.all(x + w / 2 <= 1 + 1e-6)
        assert np.all(y - h / 2 >= -1e-6) and np.all(y + h / 2 <= 1 + 1e-6)
        # Boxes are exact silhouettes, so their edges fall on whole pixels and no side is tiny.
        edges = np.stack([x - w / 2, x + w / 2, y - h / 2, y + h / 2]) * size
        assert np.allclose(edges, np.round(edges), atol=1e-3)
        assert np.all(w * size >= 4 - 1e-3) and np.all(h * size >= 4 - 1e-3)


def test_every_class_appears_and_scenes_hold_a_few_objects():
    counts = np.zeros(len(SYNTHETIC_CLASSES), int)
    per_image = []
    for index in range(50):
        _, classes, _ = generate_scene(index, seed=0, imgsz=64)
        counts += np.bincount(classes, minlength=len(SYNTHETIC_CLASSES))
        per_image.append(len(classes))
    assert np.all(counts >= 10), counts
    assert max(per_image) <= 8 and 2 <= np.mean(per_image) <= 8


def test_objects_are_not_tiny_nor_huge():
    sizes = []
    for index in range(40):
        _, _, boxes = generate_scene(index, seed=0, imgsz=160)
        sizes += boxes[:, 2:].max(axis=1).tolist()
    sizes = np.asarray(sizes)
    # Clipping at the image edge can shrink a box, so look at the bulk, not the extremes.
    assert 0.08 <= np.median(sizes) <= 0.4
    assert sizes.max() <= 0.45


def test_nearer_objects_are_lower_and_bigger():
    lows, sizes = [], []
    for index in range(60):
        _, classes, boxes = generate_scene(index, seed=0, imgsz=160)
        cars = classes == 0
        lows += (boxes[cars, 1] + boxes[cars, 3] / 2).tolist()
        sizes += boxes[cars, 2].tolist()
    assert np.corrcoef(lows, sizes)[0, 1] > 0.5


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="imgsz"):
        generate_scene(0, imgsz=(8, 100))


def test_write_synthetic_dataset_yolo_layout(tmp_path):
    import cv2

    out = write_synthetic_dataset(tmp_path / "syn", num_images=4, imgsz=64, seed=2, progress=False)
    assert out == tmp_path / "syn"
    images = sorted((out / "images").glob("*.png"))
    labels = sorted((out / "labels").glob("*.txt"))
    assert len(images) == 4 and [p.stem for p in images] == [p.stem for p in labels]

    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["train"] == "images" and data["val"] == "images" and data["nc"] == 5
    assert data["names"] == dict(enumerate(SYNTHETIC_CLASSES))

    for i, (image_path, label_path) in enumerate(zip(images, labels)):
        image, classes, boxes = generate_scene(i, seed=2, imgsz=64)
        on_disk = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
        assert np.array_equal(on_disk, image)
        rows = [line.split() for line in label_path.read_text().splitlines()]
        assert [int(r[0]) for r in rows] == classes.tolist()
        assert all(len(v.split(".")[1]) == 6 for r in rows for v in r[1:])
        assert np.allclose(np.array([[float(v) for v in r[1:]] for r in rows]).reshape(-1, 4), boxes, atol=1e-6)
