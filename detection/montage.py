"""PNG montages of labelled images: one row per domain, boxes drawn, for checking data by eye.

Open one before trusting a data transform: a weather shift that does not look like weather, a
label file off by a class id, or boxes in the wrong format show up here at a glance.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from detection.records import ImageRecord

# Distinct, saturated RGB colours, one per class id (cycled for more classes).
_PALETTE = (
    (255, 56, 56), (50, 120, 255), (255, 178, 29), (72, 249, 10), (255, 55, 199),
    (0, 212, 187), (146, 204, 23), (134, 58, 255), (255, 112, 31), (0, 194, 255),
)
_LABEL_BG = (32, 32, 32)
_EMPTY_TILE = (64, 64, 64)


def class_colour(class_id: int) -> tuple[int, int, int]:
    """RGB colour used for class ``class_id`` in montages."""
    return _PALETTE[int(class_id) % len(_PALETTE)]


def short_name(name: str, limit: int = 7) -> str:
    """A box caption short enough for a small tile: last word of the name, at most ``limit`` chars."""
    return name.split()[-1][:limit] if name.strip() else "?"


def _read_rgb(path: str) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"montage: cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _tile(record: ImageRecord, class_names: list[str], tile: int) -> np.ndarray:
    """The record's image letterboxed into a ``tile`` x ``tile`` square, with its boxes drawn."""
    image = _read_rgb(record.path)
    h, w = image.shape[:2]
    scale = tile / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    # INTER_AREA when shrinking keeps thin rain streaks and noise as they look, not aliased.
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.full((tile, tile, 3), _EMPTY_TILE, np.uint8)
    top, left = (tile - nh) // 2, (tile - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    font_scale = max(0.3, tile / 600)
    for cls, (cx, cy, bw, bh) in zip(record.classes.tolist(), record.boxes.tolist()):
        x0, y0 = left + (cx - bw / 2) * nw, top + (cy - bh / 2) * nh
        x1, y1 = left + (cx + bw / 2) * nw, top + (cy + bh / 2) * nh
        colour = class_colour(cls)
        cv2.rectangle(out, (round(x0), round(y0)), (round(x1) - 1, round(y1) - 1), colour, 1)
        name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
        text = short_name(name)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        tx, ty = int(np.clip(x0, 0, tile - tw)), int(max(y0, th + 2))
        cv2.rectangle(out, (tx, ty - th - 2), (tx + tw, ty), colour, -1)
        cv2.putText(out, text, (tx, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _label_cell(domain: str, count: int, tile: int) -> np.ndarray:
    cell = np.full((tile, tile, 3), _LABEL_BG, np.uint8)
    scale = tile / 256
    # Shrink the font until a long domain name fits the cell.
    while scale > 0.25 and cv2.getTextSize(domain, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > tile - 8:
        scale *= 0.9
    thickness = 2 if scale >= 0.6 else 1
    (tw, th), _ = cv2.getTextSize(domain, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.putText(cell, domain, (4, tile // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    cv2.putText(cell, f"{count} images", (4, tile // 2 + th + 10), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.6, (190, 190, 190), 1, cv2.LINE_AA)
    return cell


def write_montage(
    records_by_domain: dict[str, list[ImageRecord]],
    class_names: list[str],
    out_png,
    per_domain: int = 4,
    tile: int = 192,
) -> Path:
    """Write a grid of labelled images, one row per domain.

    Parameters
    ----------
    records_by_domain : dict of str to list of ImageRecord
        Images per domain; the first ``per_domain`` of each list are shown (rows keep dict order).
    class_names : list of str
        Class names indexed by class id, for the box captions.
    out_png : str or Path
        Output PNG path; parent folders are created.
    per_domain : int, optional
        Images per row; a domain with fewer images gets grey empty tiles.
    tile : int, optional
        Side of each square tile in pixels; images are letterboxed into it.

    Returns
    -------
    Path
        ``out_png``: one row of ``tile`` pixels per domain, a label cell and ``per_domain`` tiles wide.

    Raises
    ------
    ValueError
        If there is no domain or ``per_domain``/``tile`` is not positive.
    FileNotFoundError
        If an image cannot be read (it is named in the message).
    """
    if not records_by_domain:
        raise ValueError("write_montage: records_by_domain is empty, nothing to draw")
    if per_domain < 1 or tile < 16:
        raise ValueError(f"write_montage: need per_domain >= 1 and tile >= 16, got {per_domain} and {tile}")
    rows = []
    for domain, records in records_by_domain.items():
        cells = [_label_cell(str(domain), len(records), tile)]
        for record in records[:per_domain]:
            cells.append(_tile(record, class_names, tile))
        cells += [np.full((tile, tile, 3), _EMPTY_TILE, np.uint8)] * (per_domain + 1 - len(cells))
        row = np.hstack(cells)
        row[-1, :] = 0  # thin separator line between domains
        rows.append(row)
    grid = np.vstack(rows)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise OSError(f"write_montage: could not write {out_png}")
    return out_png
