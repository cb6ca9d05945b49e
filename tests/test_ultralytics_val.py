"""Our mAP and Ultralytics' ``YOLO(model).val()`` agree on a trained model's test images."""

import pytest

from detection.images import LetterboxCache
from detection.metrics import evaluate_records
from detection.model import export_ultralytics
from detection.ultralytics_val import ultralytics_val, write_yolo_split


def test_our_map_agrees_with_ultralytics_val_at_its_defaults(tmp_path, trained_detector, record_measurement):
    model, imgsz = trained_detector.model(), trained_detector.imgsz
    path = export_ultralytics(model, tmp_path / "model.pt", {"imgsz": imgsz})
    data = write_yolo_split(trained_detector.test, tmp_path / "test", trained_detector.class_names)
    theirs = ultralytics_val(path, data, imgsz, tmp_path / "val")
    ours = evaluate_records(model, trained_detector.test, imgsz)
    summary = (f"ours mAP50 {ours['map50']:.4f} mAP50-95 {ours['map50_95']:.4f}; "
               f"val() {theirs['map50']:.4f} / {theirs['map50_95']:.4f}")
    record_measurement(f"Ultralytics val() cross-check at {imgsz} px: {summary}")
    assert ours["map50"] > 0.05, summary  # a model that finds something, or agreement means little
    assert ours["map50"] == pytest.approx(theirs["map50"], abs=0.02), summary
    assert ours["map50_95"] == pytest.approx(theirs["map50_95"], abs=0.02), summary


def test_evaluation_refuses_a_training_canvas(trained_detector):
    with pytest.raises(ValueError, match="evaluation_cache"):
        evaluate_records(trained_detector.model(), trained_detector.test[:2], trained_detector.imgsz,
                         cache=LetterboxCache(trained_detector.imgsz))

