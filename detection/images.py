"""Reading images into letterboxed arrays and batching them for the model.

Every image is read once, its long side scaled to ``imgsz``, padded with grey, and kept in memory
as ``uint8``: at the 128-320 px sizes used for CPU training this is small, and it keeps the
training loop free of disk and resize work. Boxes stay YOLO-normalised, relative to the canvas.

Two canvases: training pads to an ``imgsz x imgsz`` square; evaluation pads as Ultralytics'
``val()`` does at its defaults (``rect=True``, ``pad=0.5``): each side rounded up to a multiple of
the stride after adding half a stride, so a 160 px square image sits in a 192 px canvas. Scoring
on the same canvas as ``val()`` is what makes our mAP and Ultralytics' agree.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

PAD_VALUE = 114  # Ultralytics' letterbox grey
STRIDE = 32  # the detector's largest stride
VAL_RECT_PAD = 0.5  # Ultralytics' validation padding, in strides


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


def canvas_shape(h: int, w: int, imgsz: int, rect_pad: float | None = None) -> tuple[int, int]:
    """``(height, width)`` of the canvas an ``h x w`` image is letterboxed into.

    ``rect_pad`` None: the ``imgsz`` square (training). A number: Ultralytics' rectangular
    validation shape for this aspect ratio, ``ceil(side * imgsz / STRIDE + rect_pad) * STRIDE``
    with the long side counted as 1 (``val()`` computes it per batch of images sorted by aspect
    ratio; for images of one aspect ratio, the usual case, the two are the same).
    """
    if rect_pad is None:
        return imgsz, imgsz
    long = max(h, w)
    return tuple(int(math.ceil(side / long * imgsz / STRIDE + rect_pad)) * STRIDE for side in (h, w))


def letterbox(image: np.ndarray, imgsz: int, rect_pad: float | None = None) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Scale the long side to ``imgsz`` and pad to the canvas (see :func:`canvas_shape`), centred.

    Returns (image, (resized_h, resized_w), (pad_x, pad_y)).
    """
    h, w = image.shape[:2]
    scale = imgsz / max(h, w)
    # Ultralytics' own resize (``BaseDataset.load_image``: sides rounded up, bilinear both ways), so
    # the model sees the very pixels ``val()`` and Ultralytics' trainer give it. INTER_AREA, smoother
    # when shrinking, put our mAP 0.01-0.025 above ``val()``'s on 640 px road images at 160 px.
    nh, nw = min(math.ceil(h * scale), imgsz), min(math.ceil(w * scale), imgsz)
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    ch, cw = canvas_shape(h, w, imgsz, rect_pad)
    pad_y, pad_x = (ch - nh) // 2, (cw - nw) // 2
    out = np.full((ch, cw, 3), PAD_VALUE, np.uint8)
    out[pad_y:pad_y + nh, pad_x:pad_x + nw] = image
    return out, (nh, nw), (pad_x, pad_y)


def letterbox_boxes(boxes: np.ndarray, resized: tuple[int, int], pad: tuple[int, int],
                    canvas: tuple[int, int]) -> np.ndarray:
    """Map normalised ``xywh`` boxes of an image resized to ``(h, w)`` into the normalised ``(height, width)`` canvas."""
    h, w = resized
    ch, cw = canvas
    out = boxes.astype(np.float32).copy()
    out[:, 0] = (out[:, 0] * w + pad[0]) / cw
    out[:, 1] = (out[:, 1] * h + pad[1]) / ch
    out[:, 2] = out[:, 2] * w / cw
    out[:, 3] = out[:, 3] * h / ch
    return out


class LetterboxCache:
    """Letterboxed images by path, read on first use and kept up to a byte budget (least recently used go first).

    Parameters
    ----------
    imgsz : int
        The long side of every image.
    rect_pad : float, optional
        None: square ``imgsz`` canvases (training). :data:`VAL_RECT_PAD`: Ultralytics' validation
        canvases (see :func:`canvas_shape`; :func:`evaluation_cache`).
    max_bytes : int, optional
        Budget for the kept ``uint8`` pixels (None: keep everything). A partition that fits stays
        in memory, so the training loop never touches the disk again; one that does not is read
        again as it comes round, and memory stays flat however many partitions a process serves.
    """

    def __init__(self, imgsz: int, rect_pad: float | None = None, max_bytes: int | None = None):
        self.imgsz = int(imgsz)
        self.rect_pad = rect_pad
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.reads = 0
        self._images: OrderedDict[str, tuple[np.ndarray, tuple[int, int], tuple[int, int]]] = OrderedDict()

    @property
    def count(self) -> int:
        """Images held now."""
        return len(self._images)

    def get(self, path: str) -> np.ndarray:
        return self._entry(path)[0]

    def canvas(self, path: str) -> tuple[int, int]:
        """``(height, width)`` of the letterboxed image of ``path``."""
        return self._entry(path)[0].shape[:2]

    def boxes(self, path: str, boxes: np.ndarray) -> np.ndarray:
        """Boxes of ``path`` (normalised to the original image) in the letterboxed frame."""
        image, resized, pad = self._entry(path)
        return letterbox_boxes(boxes, resized, pad, image.shape[:2])

    def _entry(self, path: str):
        entry = self._images.get(path)
        if entry is not None:
            self._images.move_to_end(path)
            return entry
        image = read_rgb(path)
        self.reads += 1
        entry = letterbox(image, self.imgsz, self.rect_pad)
        boxed = entry[0]
        self._images[path] = entry
        self.nbytes += boxed.nbytes
        while self.max_bytes is not None and self.nbytes > self.max_bytes and len(self._images) > 1:
            _, (old, *_) = self._images.popitem(last=False)
            self.nbytes -= old.nbytes
        return entry


def evaluation_cache(imgsz: int) -> LetterboxCache:
    """Letterboxed images on Ultralytics' validation canvases (what every mAP in the project uses)."""
    return LetterboxCache(imgsz, VAL_RECT_PAD)


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
