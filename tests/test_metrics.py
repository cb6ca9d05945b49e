"""mAP: exact small cases, the per-domain Total, and a cross-check against COCO's evaluator.

The cross-check runs both implementations on the same noisy predictions of a briefly trained
yolo11n. They differ in known details (Ultralytics matches by IoU and integrates a 101-point
interpolated curve with the trapezoid rule, COCO matches greedily by score and averages 101
step samples), so they agree to about 0.01, not exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from detection.images import LetterboxCache
from detection.metrics import (
    DetectionStats,
    NmsConfig,
    evaluate_domains,
    evaluate_records,
    gt_xyxy_pixels,
    predict_records,
    total_row,
)

# Ultralytics' AP integrates a curve that ends at (recall 1, precision 0) with the trapezoid rule
# on 101 points, which gives a perfect detector 0.995, not 1.0 (COCO gives 1.0).
AP_TOLERANCE = 0.006
COCO_MAX_DETS = 100


def stats_for(images: list[tuple[list, list, list]]) -> dict[str, float]:
    """mAP of per-image ``(predictions, gt_classes, gt_xyxy)``; predictions ``x1 y1 x2 y2 conf cls``."""
    stats = DetectionStats()
    for pred, gt_classes, gt_xyxy in images:
        stats.add(np.asarray(pred, np.float64).reshape(-1, 6), np.asarray(gt_classes), np.asarray(gt_xyxy, np.float64).reshape(-1, 4))
    return stats.compute()


GT_BOXES = [[10, 10, 30, 30], [50, 40, 90, 60]]
GT_CLASSES = [1, 0]


def test_perfect_predictions_score_one():
    perfect = [[*box, 0.9, cls] for box, cls in zip(GT_BOXES, GT_CLASSES)]
    result = stats_for([(perfect, GT_CLASSES, GT_BOXES), (perfect, GT_CLASSES, GT_BOXES)])
    assert result["map50"] == pytest.approx(1.0, abs=AP_TOLERANCE)
    assert result["map50_95"] == pytest.approx(1.0, abs=AP_TOLERANCE)
    assert result["precision"] == 1.0 and result["recall"] == 1.0 and result["targets"] == 4


def test_no_predictions_score_zero():
    result = stats_for([([], GT_CLASSES, GT_BOXES)])
    assert result["map50"] == 0.0 and result["map50_95"] == 0.0 and result["targets"] == 2


def test_right_box_wrong_class_scores_zero():
    swapped = [[*box, 0.9, 1 - cls] for box, cls in zip(GT_BOXES, GT_CLASSES)]
    assert stats_for([(swapped, GT_CLASSES, GT_BOXES)])["map50"] == 0.0


def test_half_the_objects_found_scores_one_half():
    found_one = [[*GT_BOXES[0], 0.9, 1], [0, 70, 20, 90, 0.8, 1]]  # one hit, one miss of class 1
    result = stats_for([(found_one, [1, 1], [GT_BOXES[0], [60, 60, 90, 90]])])
    assert result["map50"] == pytest.approx(0.5, abs=AP_TOLERANCE)


def test_iou_thresholds_count_towards_map50_95():
    # IoU 0.62 with the ground truth: a hit at IoU thresholds 0.50, 0.55, 0.60 only -> 3 of 10.
    loose = [[0, 0, 20, 12.4, 0.9, 0]]
    result = stats_for([(loose, [0], [[0, 0, 20, 20]])])
    assert result["map50"] == pytest.approx(1.0, abs=AP_TOLERANCE)
    assert result["map50_95"] == pytest.approx(0.3, abs=AP_TOLERANCE)


def test_background_images_only_add_false_positives():
    clean = stats_for([([[*GT_BOXES[0], 0.9, 1]], [1], [GT_BOXES[0]])])
    with_background = stats_for([([[*GT_BOXES[0], 0.9, 1]], [1], [GT_BOXES[0]]), ([[5, 5, 15, 15, 0.95, 1]], [], [])])
    assert clean["map50"] == pytest.approx(1.0, abs=AP_TOLERANCE)
    assert with_background["map50"] < 0.6  # the most confident box is now a false positive


def test_total_is_the_unweighted_mean_of_domains():
    per_domain = {"clear": {"map50": 0.8, "map50_95": 0.4}, "rainy": {"map50": 0.2, "map50_95": 0.1},
                  "night": {"map50": 0.5, "map50_95": 0.3}}
    total = total_row(per_domain)
    assert total == pytest.approx({"map50": 0.5, "map50_95": 0.8 / 3})
    assert total_row({**per_domain, "Total": {"map50": 9.0, "map50_95": 9.0}}) == total  # an old Total is ignored


def test_evaluate_domains_total_is_not_pooled(trained_detector):
    model = trained_detector.model()
    small, large = trained_detector.test[:10], trained_detector.test[10:]
    results = evaluate_domains(model, {"small": small, "large": large}, trained_detector.imgsz)
    assert list(results) == ["small", "large", "Total"]
    assert results["small"]["images"] == 10 and results["large"]["images"] == len(large)
    for key in ("map50", "map50_95"):
        assert results["Total"][key] == pytest.approx((results["small"][key] + results["large"][key]) / 2)
    assert evaluate_records(model, small, trained_detector.imgsz) == results["small"]


# ------------------------------------------------------------------------------------------
# Cross-check against faster-coco-eval


def coco_map(records, predictions, cache: LetterboxCache, class_names) -> tuple[float, float, object]:
    """COCO's (mAP50-95, mAP50) over all areas with 100 detections per image."""
    from faster_coco_eval import COCO, COCOeval_faster

    images, annotations, detections = [], [], []
    for image_id, (record, pred) in enumerate(zip(records, predictions), start=1):
        images.append({"id": image_id, "width": cache.imgsz, "height": cache.imgsz, "file_name": record.path})
        for cls, (x1, y1, x2, y2) in zip(record.classes, gt_xyxy_pixels(record, cache)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0})
        for x1, y1, x2, y2, conf, cls in pred:
            detections.append({"image_id": image_id, "category_id": int(cls) + 1, "score": float(conf),
                               "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
    ground_truth = COCO()
    ground_truth.dataset = {"images": images, "annotations": annotations,
                            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    ground_truth.createIndex()
    evaluator = COCOeval_faster(ground_truth, ground_truth.loadRes(detections), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # stats[0]: AP@[.50:.95], stats[1]: AP@.50, both for area "all" and the largest maxDets.
    return float(evaluator.stats[0]), float(evaluator.stats[1]), evaluator.params


def test_map_agrees_with_coco_on_a_real_models_noisy_predictions(trained_detector, record_measurement):
    records, imgsz = trained_detector.test, trained_detector.imgsz
    cache = LetterboxCache(imgsz)
    predictions = predict_records(trained_detector.model(), records, imgsz, nms=NmsConfig(max_det=COCO_MAX_DETS), cache=cache)
    ours = DetectionStats()
    for record, pred in zip(records, predictions):
        ours.add(pred, record.classes, gt_xyxy_pixels(record, cache))
    ours = ours.compute()
    coco_50_95, coco_50, params = coco_map(records, predictions, cache, trained_detector.class_names)
    assert params.maxDets[-1] == COCO_MAX_DETS and list(params.areaRng[0]) == [0, 1e10]

    n_predictions = sum(len(p) for p in predictions)
    summary = (f"ours mAP50 {ours['map50']:.4f} mAP50-95 {ours['map50_95']:.4f}; COCO {coco_50:.4f} / {coco_50_95:.4f}; "
               f"{n_predictions} predictions for {ours['targets']} boxes in {len(records)} images")
    record_measurement(f"mAP cross-check: {summary}")
    # Noisy but not trivial, so that ranking, matching and interpolation all matter.
    assert 0.05 < ours["map50"] < 0.9, summary
    assert n_predictions > 3 * ours["targets"], summary
    assert ours["map50"] == pytest.approx(coco_50, abs=0.01), summary
    assert ours["map50_95"] == pytest.approx(coco_50_95, abs=0.01), summary
