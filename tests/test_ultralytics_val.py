"""Our mAP and Ultralytics' ``YOLO(model).val()`` agree on a trained model's test images."""

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from detection.images import LetterboxCache, evaluation_cache
from detection.metrics import evaluate_records
from detection.model import export_ultralytics
from detection.ultralytics_val import ultralytics_val, write_yolo_split
from detection.yolo import read_yolo_dataset


def resized_copies(records, out_dir: Path, size: tuple[int, int]) -> list:
    """The records' images stretched to ``size`` (w, h) and saved losslessly; normalised boxes still fit."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for record in records:
        path = out_dir / f"{Path(record.path).stem}.png"
        cv2.imwrite(str(path), cv2.resize(cv2.imread(record.path), size, interpolation=cv2.INTER_CUBIC))
        copies.append(dataclasses.replace(record, path=str(path)))
    return copies


@pytest.mark.parametrize("stored_size", [None, (150, 130)], ids=["native", "shrunk-from-150x130"])
def test_our_map_agrees_with_ultralytics_val_at_its_defaults(tmp_path, trained_detector, record_measurement,
                                                             stored_size):
    # Stored at another size than imgsz, the images go through the resize: the step where our
    # pipeline and val() once differed (INTER_AREA vs bilinear) with no sign of it at native size.
    model, imgsz = trained_detector.model(), trained_detector.imgsz
    test = trained_detector.test if stored_size is None else resized_copies(trained_detector.test, tmp_path / "imgs", stored_size)
    path = export_ultralytics(model, tmp_path / "model.pt", {"imgsz": imgsz})
    data = write_yolo_split(test, tmp_path / "test", trained_detector.class_names)
    theirs = ultralytics_val(path, data, imgsz, tmp_path / "val")
    ours = evaluate_records(model, test, imgsz)
    summary = (f"ours mAP50 {ours['map50']:.4f} mAP50-95 {ours['map50_95']:.4f}; "
               f"val() {theirs['map50']:.4f} / {theirs['map50_95']:.4f}")
    record_measurement(f"Ultralytics val() cross-check at {imgsz} px, images {stored_size or 'native'}: {summary}")
    # A model that finds something (an untrained one scores 0.000-0.001), or agreement means little.
    # The fixture's detector scores 0.037-0.069 here depending on test order (tests/conftest.py).
    assert ours["map50"] > 0.02, summary
    assert ours["map50"] == pytest.approx(theirs["map50"], abs=0.02), summary
    assert ours["map50_95"] == pytest.approx(theirs["map50_95"], abs=0.02), summary


def test_evaluation_refuses_a_training_canvas(trained_detector):
    with pytest.raises(ValueError, match="evaluation_cache"):
        evaluate_records(trained_detector.model(), trained_detector.test[:2], trained_detector.imgsz,
                         cache=LetterboxCache(trained_detector.imgsz))



def val_dataset_items(data_yaml: Path, imgsz: int) -> dict[str, dict]:
    """What ``YOLO(model).val(data=data_yaml, imgsz=imgsz)`` feeds the model, by image name.

    The dataset is built as the validator builds it (``rect=True`` is what ``YOLO.val`` sets;
    batch 16 and stride 32 are its defaults for a YOLO detector).
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg = get_cfg(overrides={"data": str(data_yaml), "imgsz": imgsz, "rect": True, "mode": "val"})
    dataset = build_yolo_dataset(cfg, str(data_yaml.parent / "images"), 16, check_det_dataset(str(data_yaml)),
                                 mode="val", stride=32)
    return {Path(item["im_file"]).stem: item for item in (dataset[i] for i in range(len(dataset)))}


def assert_same_pixels_and_boxes_as_val(records, class_names, imgsz: int, tmp_path: Path) -> None:
    data = write_yolo_split(records, tmp_path / "split", class_names)
    theirs = val_dataset_items(data, imgsz)
    cache = evaluation_cache(imgsz)
    for i, record in enumerate(records):
        item = theirs[f"{i:06d}_{Path(record.path).stem}"]
        ours = cache.get(record.path)
        image = item["img"].numpy().transpose(1, 2, 0)  # CHW RGB uint8
        assert image.shape == ours.shape, record.path
        assert np.abs(image.astype(int) - ours.astype(int)).max() == 0, f"{record.path}: pixels differ from val()'s"
        h, w = ours.shape[:2]
        ours_boxes = cache.boxes(record.path, record.boxes)
        assert np.allclose(np.sort(item["bboxes"].numpy(), 0), np.sort(ours_boxes, 0), atol=0.5 / max(h, w)), record.path


@pytest.mark.parametrize("stored_size,imgsz", [((150, 130), 96), ((60, 44), 96), ((97, 61), 64)],
                         ids=["shrink", "enlarge", "odd-sides"])
def test_evaluation_canvas_has_val_pixels_and_boxes(tmp_path, synthetic_records, stored_size, imgsz):
    records, class_names = synthetic_records
    copies = resized_copies(records[:6], tmp_path / "imgs", stored_size)
    assert_same_pixels_and_boxes_as_val(copies, class_names, imgsz, tmp_path)


def test_evaluation_canvas_has_val_pixels_on_real_road_images(tmp_path, shared_data):
    records, class_names, _ = read_yolo_dataset(shared_data / "highway" / "data.yaml", splits=["test"])
    assert_same_pixels_and_boxes_as_val(records[:12], class_names, 160, tmp_path)
