"""Augmented views: a weak view for the teacher and the supervised loop, a strong view for the student.

The weak view is geometric only (horizontal flip). Labelled training uses the weak view plus
Ultralytics' default colour jitter and its default scale and translation (``scale=0.5``,
``translate=0.1``): without them a detector learns where the canvas edge is, and loses most of its
mAP when ``val()`` pads the same image into a larger canvas. The strong view starts from the weak
view and adds the same scale and translation and photometric noise (colour jitter, blur,
grayscale, cutout), transforming the pseudo boxes with it, so the student learns from labels the
teacher made on a cleaner image. Mosaic is not implemented.
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


# Ultralytics' defaults (``scale``, ``translate`` in its default.yaml).
SCALE, TRANSLATE = 0.5, 0.1


def scale_translate(scale: float = SCALE, translate: float = TRANSLATE) -> A.Affine:
    """Ultralytics' random affine without rotation or shear: zoom by ``1 +- scale``, shift by ``+- translate``."""
    return A.Affine(scale=(1 - scale, 1 + scale), translate_percent=(-translate, translate), fill=PAD_VALUE,
                    border_mode=cv2.BORDER_CONSTANT, p=1.0)


def supervised_view(scale: float = SCALE, translate: float = TRANSLATE) -> A.Compose:
    """Labelled training: flip, Ultralytics' default HSV jitter (hue 0.015, saturation 0.7, value 0.4), scale and translation."""
    return A.Compose([A.HorizontalFlip(p=0.5), scale_translate(scale, translate),
                      A.ColorJitter(brightness=0.4, contrast=0.0, saturation=0.7, hue=0.015, p=1.0)],
                     bbox_params=_BBOXES)


def strong_view(scale: float = SCALE, translate: float = TRANSLATE) -> A.Compose:
    """Scale, translation and photometric noise, applied on top of the weak view (the student's input)."""
    return A.Compose(
        [
            scale_translate(scale, translate),
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
