"""Procedurally drawn driving scenes: the built-in dataset of the demo and the tests.

Every scene is a clear-weather road view (sky gradient, horizon, ground, a perspective road with
lane markings, buildings and trees as clutter) with 2-8 objects of five classes drawn from far to
near, so nearer objects occlude farther ones. Perspective is kept simple but consistent: an object
standing lower in the image is nearer and drawn bigger.

Boxes are exact: each object's silhouette is painted into an owner map at the moment the object is
drawn (it is then the nearest thing drawn so far, so the silhouette is complete), and its box is the
bounding box of that silhouette, clipped to the image. Objects whose visible part ends up tiny are
dropped, so no label points at something a detector cannot see.

The drawing itself (painter, background, objects) is in :mod:`detection.synthetic_draw`; this
module decides what goes where. A scene depends only on ``(seed, index, imgsz)``: the generator
is ``numpy.random.default_rng([seed, index])``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from detection.synthetic_draw import (
    BUS_COLOURS,
    CARGO_COLOURS,
    CLOTHES,
    VEHICLE_COLOURS,
    Painter,
    Placed,
    Road,
    draw_background,
    draw_bus,
    draw_car,
    draw_person,
    draw_sign,
    draw_truck,
)

SYNTHETIC_CLASSES = ("car", "bus", "truck", "person", "traffic sign")
CAR, BUS, TRUCK, PERSON, SIGN = range(5)

# Roughly balanced so every class is learnable; cars slightly more common, as on real roads.
_CLASS_WEIGHTS = np.array([0.28, 0.17, 0.19, 0.19, 0.17])

# Largest side of each class, as a fraction of the image side, when the object stands at the bottom
# edge (perspective scale 1). Vehicles are measured by width, people and signs by height.
_BASE_SIZE = {CAR: 0.42, BUS: 0.80, TRUCK: 0.66, PERSON: 0.32, SIGN: 0.38}
# Height / width of each class's box.
_ASPECT = {CAR: 0.42, BUS: 0.36, TRUCK: 0.46, PERSON: 3.0, SIGN: 2.6}
# Size range of an object's largest side, as a fraction of the image side.
_MIN_FRAC, _MAX_FRAC = 0.10, 0.42

# Smallest visible part kept: a side of 4 px, and a quarter of the object's own silhouette.
_MIN_VISIBLE_PX = 4
_MIN_VISIBLE_FRACTION = 0.25


def _size_hw(imgsz) -> tuple[int, int]:
    if isinstance(imgsz, (int, np.integer)):
        return int(imgsz), int(imgsz)
    h, w = (int(v) for v in imgsz)
    if h < 16 or w < 16:
        raise ValueError(f"imgsz must be at least 16 px per side, got {imgsz!r}")
    return h, w


_DRAW = {CAR: draw_car, BUS: draw_bus, TRUCK: draw_truck, PERSON: draw_person, SIGN: draw_sign}


# ---------------------------------------------------------------------------------------- placement
def _place_object(cls: int, road: Road, h: int, w: int, rng: np.random.Generator) -> Placed:
    side = min(h, w)
    base = _BASE_SIZE[cls]
    # Perspective scale s: 0 at the horizon, 1 at the bottom edge; object size grows with it.
    s_lo, s_hi = max(_MIN_FRAC / base, 0.12), min(1.0, _MAX_FRAC / base)
    s = rng.uniform(s_lo, s_hi)
    big = base * s * side
    if cls in (PERSON, SIGN):
        bh, bw = big, big / _ASPECT[cls]
    else:
        bw, bh = big, big * _ASPECT[cls]
    bottom = road.horizon + s * (h - road.horizon)
    left, right = road.edges_at(bottom, h)
    if cls in (CAR, BUS, TRUCK):
        cx = rng.uniform(left + 0.1 * bw, right - 0.1 * bw) if right - left > 0.2 * bw else (left + right) / 2
    elif cls == SIGN:  # at the roadside, just off the asphalt
        gap = rng.uniform(0.5, 3.0) * bw
        cx = left - gap if rng.random() < 0.5 else right + gap
    else:  # people on the verge or crossing the road
        cx = rng.uniform(left - 0.3 * (right - left), right + 0.3 * (right - left))
    # Vehicles may be cut by the image edge (at most a quarter of them); people and signs are thin,
    # so a cut one is a sliver that says nothing: keep them whole.
    margin = -0.25 * bw if cls in (CAR, BUS, TRUCK) else 0.5 * bw
    cx = float(np.clip(cx, margin, w - margin))
    if cls == CAR:
        colour = VEHICLE_COLOURS[rng.integers(0, len(VEHICLE_COLOURS))]
    elif cls == BUS:
        colour = BUS_COLOURS[rng.integers(0, len(BUS_COLOURS))]
    elif cls == TRUCK:
        colour = CARGO_COLOURS[rng.integers(0, len(CARGO_COLOURS))]
    else:
        colour = CLOTHES[rng.integers(0, len(CLOTHES))]
    colour = np.clip(colour * rng.uniform(0.85, 1.1), 0, 255)
    return Placed(cls, cx - bw / 2, bottom - bh, bw, bh, bool(rng.random() < 0.5), colour, int(rng.integers(0, 1 << 16)))


def _overlaps_too_much(o: Placed, placed: list[Placed], limit: float = 0.45) -> bool:
    """True if ``o`` would cover (or be covered by) more than ``limit`` of the smaller box."""
    for q in placed:
        iw = min(o.x0 + o.w, q.x0 + q.w) - max(o.x0, q.x0)
        ih = min(o.y0 + o.h, q.y0 + q.h) - max(o.y0, q.y0)
        if iw > 0 and ih > 0 and iw * ih > limit * min(o.w * o.h, q.w * q.h):
            return True
    return False


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel-edge box ``(x0, y0, x1, y1)`` of the true pixels of ``mask``, or None."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def generate_scene(index: int, seed: int = 0, imgsz=160) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one synthetic road scene.

    Parameters
    ----------
    index : int
        Scene number; together with ``seed`` it fixes the scene.
    seed : int, optional
        Dataset seed.
    imgsz : int or tuple of int, optional
        Image size: a side for a square image, or ``(height, width)``.

    Returns
    -------
    image : np.ndarray
        ``(H, W, 3)`` RGB ``uint8`` image.
    classes : np.ndarray
        ``(N,)`` int64 ids into :data:`SYNTHETIC_CLASSES`.
    boxes : np.ndarray
        ``(N, 4)`` float32 normalised ``xywh`` boxes: each object's full extent, clipped to the image.
    """
    h, w = _size_hw(imgsz)
    rng = np.random.default_rng([int(seed), int(index)])
    img = np.zeros((h, w, 3), np.uint8)
    road = draw_background(img, rng)

    placed: list[Placed] = []
    for _ in range(int(rng.integers(2, 9))):
        cls = int(rng.choice(len(SYNTHETIC_CLASSES), p=_CLASS_WEIGHTS))
        for _attempt in range(6):  # a few tries to find a spot that does not bury another object
            o = _place_object(cls, road, h, w, rng)
            if not _overlaps_too_much(o, placed):
                placed.append(o)
                break
    placed.sort(key=lambda o: o.y0 + o.h)  # far (higher up) first, so near objects occlude

    owner = np.zeros((h, w), np.uint8)
    painter = Painter(img, owner)
    full: list[tuple[int, tuple[int, int, int, int], int]] = []
    for k, o in enumerate(placed, start=1):
        if o.cls in (CAR, BUS, TRUCK):  # contact shadow: part of the ground, not of the object
            cv2.ellipse(img, (int(o.x0 + o.w / 2), int(o.y0 + o.h)), (max(1, int(o.w * 0.52)), max(1, int(o.h * 0.07))), 0, 0, 360, (40, 40, 42), -1, cv2.LINE_AA)
        painter.id = k
        _DRAW[o.cls](painter, o)
        silhouette = owner == k
        box = _bbox(silhouette)
        if box is not None:
            full.append((k, box, int(silhouette.sum())))

    # Mild sensor look: brightness jitter and a little noise, so flat colours are not a giveaway.
    gain = rng.uniform(0.92, 1.08)
    noise = rng.normal(0.0, 2.5, img.shape)
    img = np.clip(cv2.GaussianBlur(img, (3, 3), 0.6).astype(np.float32) * gain + noise, 0, 255).astype(np.uint8)

    classes, boxes = [], []
    for k, (x0, y0, x1, y1), area in full:
        visible = owner == k
        vbox = _bbox(visible)
        if vbox is None or min(vbox[2] - vbox[0], vbox[3] - vbox[1]) < _MIN_VISIBLE_PX:
            continue
        if visible.sum() < _MIN_VISIBLE_FRACTION * area or min(x1 - x0, y1 - y0) < _MIN_VISIBLE_PX:
            continue
        classes.append(placed[k - 1].cls)
        boxes.append([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
    return img, np.asarray(classes, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4)


def _data_yaml(out_dir: Path) -> str:
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(SYNTHETIC_CLASSES))
    return f"path: {out_dir.resolve()}\ntrain: images\nval: images\nnc: {len(SYNTHETIC_CLASSES)}\nnames:\n{names}\n"


def write_synthetic_dataset(out_dir, num_images: int = 1000, imgsz=160, seed: int = 0, progress: bool = True) -> Path:
    """Write synthetic scenes as a YOLO dataset.

    Parameters
    ----------
    out_dir : str or Path
        Output folder; gets ``images/<name>.png``, ``labels/<name>.txt`` (``cls x y w h`` rows, 6
        decimals) and ``data.yaml``.
    num_images : int, optional
        Number of scenes (indices ``0 .. num_images - 1``).
    imgsz : int or tuple of int, optional
        Image size, as in :func:`generate_scene`.
    seed : int, optional
        Dataset seed.
    progress : bool, optional
        Show a rich progress bar.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    indices = range(int(num_images))
    if progress:
        from rich.progress import track

        indices = track(indices, description=f"synthetic scenes -> {out_dir}", total=int(num_images))
    width = max(6, len(str(max(int(num_images) - 1, 0))))
    for i in indices:
        image, classes, boxes = generate_scene(i, seed=seed, imgsz=imgsz)
        name = f"scene_{i:0{width}d}"
        if not cv2.imwrite(str(out_dir / "images" / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {out_dir / 'images' / (name + '.png')}")
        rows = [f"{c} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}" for c, (x, y, bw, bh) in zip(classes.tolist(), boxes.tolist())]
        (out_dir / "labels" / f"{name}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    (out_dir / "data.yaml").write_text(_data_yaml(out_dir))
    return out_dir
