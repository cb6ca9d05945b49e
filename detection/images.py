"""Reading images into fixed-size letterboxed arrays and batching them for the model.

Every image is read once, letterboxed to ``imgsz x imgsz`` (long side scaled to ``imgsz``, grey
padding), and kept in memory as ``uint8``: at the 128-320 px sizes used for CPU training this is
small, and it keeps the training loop free of disk and resize work. Boxes stay YOLO-normalised,
relative to the letterboxed image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

PAD_VALUE = 114  # Ultralytics' letterbox grey


class ImageReadError(ValueError):
    """An image file that cannot be decoded."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an RGB ``uint8`` array; a clear error names a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageReadError(f"{path}: cannot decode image (corrupt, truncated or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def letterbox(image: np.ndarray, imgsz: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Scale the long side to ``imgsz`` and pad to a square; returns (image, scale, (pad_x, pad_y))."""
    h, w = image.shape[:2]
    scale = imgsz / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    pad_y, pad_x = (imgsz - nh) // 2, (imgsz - nw) // 2
    out = np.full((imgsz, imgsz, 3), PAD_VALUE, np.uint8)
    out[pad_y:pad_y + nh, pad_x:pad_x + nw] = image
    return out, scale, (pad_x, pad_y)


def letterbox_boxes(boxes: np.ndarray, shape: tuple[int, int], scale: float, pad: tuple[int, int],
                    imgsz: int) -> np.ndarray:
    """Map normalised ``xywh`` boxes of an ``(h, w)`` image to the normalised letterboxed frame."""
    h, w = shape
    out = boxes.astype(np.float32).copy()
    out[:, 0] = (out[:, 0] * w * scale + pad[0]) / imgsz
    out[:, 1] = (out[:, 1] * h * scale + pad[1]) / imgsz
    out[:, 2] = out[:, 2] * w * scale / imgsz
    out[:, 3] = out[:, 3] * h * scale / imgsz
    return out


class LetterboxCache:
    """Letterboxed images by path, read on first use (the training loop never touches the disk again)."""

    def __init__(self, imgsz: int):
        self.imgsz = int(imgsz)
        self._images: dict[str, tuple[np.ndarray, tuple[int, int], float, tuple[int, int]]] = {}

    def get(self, path: str) -> np.ndarray:
        return self._entry(path)[0]

    def boxes(self, path: str, boxes: np.ndarray) -> np.ndarray:
        """Boxes of ``path`` (normalised to the original image) in the letterboxed frame."""
        _, shape, scale, pad = self._entry(path)
        return letterbox_boxes(boxes, shape, scale, pad, self.imgsz)

    def _entry(self, path: str):
        if path not in self._images:
            image = read_rgb(path)
            boxed, scale, pad = letterbox(image, self.imgsz)
            self._images[path] = (boxed, image.shape[:2], scale, pad)
        return self._images[path]


def to_model_batch(images: Sequence[np.ndarray], classes: Sequence[np.ndarray] | None = None,
                   boxes: Sequence[np.ndarray] | None = None, device: str | torch.device = "cpu") -> dict:
    """Stack RGB ``uint8`` images (and their boxes) into Ultralytics' training batch format.

    Returns a dict with ``img`` (float, 0-1, BCHW) and, when labels are given, ``batch_idx``,
    ``cls`` ``(N, 1)`` and ``bboxes`` ``(N, 4)`` normalised ``xywh``, as ``v8DetectionLoss`` expects.
    """
    img = torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))
    batch = {"img": img.to(device, non_blocking=True).float().div_(255.0)}
    if classes is not None:
        counts = [len(c) for c in classes]
        batch["batch_idx"] = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).float().to(device)
        batch["cls"] = torch.from_numpy(np.concatenate(classes).astype(np.float32)).view(-1, 1).to(device)
        batch["bboxes"] = torch.from_numpy(np.concatenate(boxes).astype(np.float32)).view(-1, 4).to(device)
    return batch
