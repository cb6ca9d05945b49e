"""Pseudo-label split, quality counting, and how each loss mode routes reliable and uncertain boxes."""

import numpy as np
import pytest
import torch

from detection.model import build_model
from detection.pseudo_labels import PseudoLabelLoss, match_counts, pad_per_image, split_pseudo_labels
from ultralytics.utils.loss import v8DetectionLoss

IMGSZ = 64


def test_split_by_thresholds():
    det = np.array([[0, 0, 10, 10, 0.95, 1], [5, 5, 20, 20, 0.6, 2], [1, 1, 9, 9, 0.59, 0], [3, 3, 8, 8, 0.1, 4],
                    [3, 3, 8, 8, 0.09, 3]], np.float32)
    split = split_pseudo_labels(det, IMGSZ, tau_low=0.1, tau_high=0.6)
    assert split.reliable_classes.tolist() == [1, 2]
    assert split.uncertain_classes.tolist() == [0, 4]
    np.testing.assert_allclose(split.uncertain_scores, [0.59, 0.1])
    np.testing.assert_allclose(split.reliable_boxes[0], [5 / 64, 5 / 64, 10 / 64, 10 / 64])
    with pytest.raises(ValueError):
        split_pseudo_labels(det, IMGSZ, tau_low=0.7, tau_high=0.6)


def test_match_counts_one_to_one_same_class():
    gt = np.array([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]], np.float32)
    pred = np.array([[0.5, 0.5, 0.2, 0.2], [0.51, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]], np.float32)
    assert match_counts(pred, np.array([0, 0, 1]), gt, np.array([0, 1])) == 2  # duplicate not counted twice
    assert match_counts(pred, np.array([1, 1, 0]), gt, np.array([0, 1])) == 0  # wrong classes


def test_pad_per_image_matches_box_layout():
    values = torch.tensor([1.0, 2.0, 3.0])
    out = pad_per_image(values, torch.tensor([0.0, 0.0, 2.0]), 3)
    assert out.tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]


@pytest.fixture(scope="module")
def model_and_preds():
    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", 5)
    model.train()
    with torch.no_grad():
        preds = model(torch.rand(2, 3, IMGSZ, IMGSZ))
    return model, preds


def loss_grads(model, preds, batch, mode):
    """Loss and its gradients with respect to the raw box and class outputs."""
    boxes = preds["boxes"].clone().requires_grad_(True)
    scores = preds["scores"].clone().requires_grad_(True)
    loss, items = PseudoLabelLoss(model, mode)({"boxes": boxes, "scores": scores, "feats": preds["feats"]}, batch)
    loss.sum().backward()
    return boxes.grad, scores.grad, items


def make_batch(uncertain, score=0.4):
    return {"batch_idx": torch.tensor([0.0]), "cls": torch.tensor([[2.0]]),
            "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
            "pl_scores": torch.tensor([score if uncertain else 0.9]), "pl_uncertain": torch.tensor([uncertain])}


def test_reliable_box_gets_box_and_class_loss(model_and_preds):
    model, preds = model_and_preds
    g_boxes, g_scores, items = loss_grads(model, preds, make_batch(False), "soft")
    assert g_boxes.abs().sum() > 0 and items["box_loss"] > 0
    # a reliable box is exactly Ultralytics' loss
    ref, _ = v8DetectionLoss(model)(preds, make_batch(False))
    ours, _ = PseudoLabelLoss(model, "soft")(preds, make_batch(False))
    torch.testing.assert_close(ours, ref)


def test_soft_uncertain_box_gets_score_as_class_target_and_no_box_loss(model_and_preds):
    model, preds = model_and_preds
    g_boxes, g_scores, items = loss_grads(model, preds, make_batch(True, 0.4), "soft")
    assert g_boxes.abs().sum() == 0 and items["box_loss"] == 0
    # the positive anchors are pulled towards the teacher's score on class 2, not towards 1
    _, g_bg, _ = loss_grads(model, preds, {**make_batch(True), "pl_uncertain": torch.tensor([True]),
                                           "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4),
                                           "batch_idx": torch.zeros(0), "pl_scores": torch.zeros(0)}, "soft")
    changed = (g_scores - g_bg * (g_scores.abs().sum() / g_bg.abs().sum())).abs()[0, 2]
    assert g_scores[0, 2].min() < 0 or changed.max() > 0  # some anchor pushed up on class 2
    probs = preds["scores"].sigmoid()
    positives = (g_scores[0, 2] < 0).nonzero().flatten()
    assert len(positives) > 0
    assert bool((probs[0, 2, positives] < 0.4).all())  # pulled up only where below the teacher's score


def test_ignore_uncertain_box_has_no_gradient_on_its_anchors(model_and_preds):
    model, preds = model_and_preds
    g_boxes_soft, g_soft, _ = loss_grads(model, preds, make_batch(True, 0.9), "soft")
    g_boxes, g_ignore, items = loss_grads(model, preds, make_batch(True, 0.9), "ignore")
    assert g_boxes.abs().sum() == 0 and items["box_loss"] == 0
    assigned = (g_soft[0, 2] < 0).nonzero().flatten()  # anchors the assigner gave the box (pulled up in soft)
    assert len(assigned) > 0
    assert g_ignore[0, :, assigned].abs().max() == 0


def test_drop_mode_is_plain_loss_on_reliable_boxes(model_and_preds):
    model, preds = model_and_preds
    batch = make_batch(False)
    ref, _ = v8DetectionLoss(model)(preds, batch)
    ours, _ = PseudoLabelLoss(model, "drop")(preds, batch)
    torch.testing.assert_close(ours, ref)
    with pytest.raises(ValueError, match="mode"):
        PseudoLabelLoss(model, "weird")
