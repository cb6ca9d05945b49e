"""Augmented views: a weak view for the teacher and the supervised loop, a strong view for the student.

The weak view is geometric only (horizontal flip). Labelled training uses the weak view plus
Ultralytics' default colour jitter. The strong view starts from the weak view and
adds photometric noise (colour jitter, blur, grayscale, cutout) and a scale jitter, transforming
the pseudo boxes with it, so the student learns from labels the teacher made on a cleaner image.
Every random choice comes from a seed derived from (seed, round, node, step, image), so a
client's local run is reproducible wherever it executes.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from detection.images import PAD_VALUE

_BBOXES = A.BboxParams(format="yolo", label_fields=["box_ids"], min_visibility=0.3, min_area=4.0, clip=True)


def weak_view() -> A.Compose:
    """Flip only: what the teacher sees, and the supervised loop's augmentation."""
    return A.Compose([A.HorizontalFlip(p=0.5)], bbox_params=_BBOXES)


def supervised_view() -> A.Compose:
    """Flip plus Ultralytics' default HSV jitter (hue 0.015, saturation 0.7, value 0.4): labelled training."""
    return A.Compose([A.HorizontalFlip(p=0.5),
                      A.ColorJitter(brightness=0.4, contrast=0.0, saturation=0.7, hue=0.015, p=1.0)],
                     bbox_params=_BBOXES)


def strong_view(scale_jitter: float = 0.2) -> A.Compose:
    """Photometric noise plus scale jitter, applied on top of the weak view (the student's input)."""
    return A.Compose(
        [
            A.Affine(scale=(1 - scale_jitter, 1 + scale_jitter), fill=PAD_VALUE, border_mode=cv2.BORDER_CONSTANT, p=0.5),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
            A.ToGray(p=0.2),
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 2.0), p=0.5),
            A.CoarseDropout(num_holes_range=(1, 5), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2),
                            fill=PAD_VALUE, p=0.7),
        ],
        bbox_params=_BBOXES,
    )


def apply_view(view: A.Compose, image: np.ndarray, boxes: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply a view with a fixed seed; returns (image, boxes, kept) where ``kept`` indexes the input boxes.

    Boxes that leave the image (or mostly so) are dropped; ``kept`` lets callers carry classes and
    pseudo-label scores along with the surviving boxes.
    """
    view.set_random_seed(seed)
    boxes = np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0.0, 1.0)
    ids = np.arange(len(boxes))
    out = view(image=image, bboxes=boxes, box_ids=ids)
    kept = np.asarray(out["box_ids"], dtype=np.int64)
    return out["image"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4), kept
