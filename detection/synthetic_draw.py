"""Drawing the synthetic scenes: the painter, the road background and the five kinds of object.

:mod:`detection.synthetic` decides what goes where (class, footprint, colour, style) with its seeded
generator and calls these; a painter draws every shape of an object on the image and, with the same
geometry, on the owner map from which the object's exact box is read. Only the background drawing
consumes random numbers (from the generator it is given), so a scene stays a pure function of
``(seed, index, imgsz)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

VEHICLE_COLOURS = np.array(
    [
        (200, 30, 30), (30, 60, 170), (235, 235, 235), (160, 165, 170), (25, 25, 28),
        (230, 190, 20), (30, 120, 60), (120, 20, 30), (90, 140, 200), (210, 110, 30),
    ],
    dtype=np.int32,
)
BUS_COLOURS = np.array([(240, 190, 20), (200, 35, 35), (30, 80, 180), (240, 240, 240), (40, 140, 70), (235, 120, 25)])
CARGO_COLOURS = np.array([(235, 235, 235), (190, 190, 195), (60, 100, 170), (170, 40, 40), (220, 180, 60), (70, 110, 70)])
SKIN = np.array([(240, 200, 170), (210, 160, 120), (160, 110, 75), (100, 70, 50)])
CLOTHES = np.array(
    [(200, 40, 40), (40, 70, 170), (30, 30, 30), (230, 230, 230), (40, 140, 60), (230, 160, 30), (120, 60, 140), (90, 90, 95)]
)


@dataclass
class Placed:
    """One object waiting to be drawn: its class, footprint (box in pixels) and look."""

    cls: int
    x0: float
    y0: float
    w: float
    h: float
    facing_right: bool
    colour: np.ndarray
    style: int


class Painter:
    """Draws filled shapes on the image and, with the same geometry, on the owner map."""

    def __init__(self, image: np.ndarray, owner: np.ndarray) -> None:
        self.image = image
        self.owner = owner
        self.id = 0

    def _col(self, colour) -> tuple[int, int, int]:
        return tuple(int(c) for c in np.clip(colour, 0, 255))

    def poly(self, pts: np.ndarray, colour) -> None:
        pts = np.round(pts).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(self.image, [pts], self._col(colour), cv2.LINE_AA)
        cv2.fillPoly(self.owner, [pts], self.id)

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour) -> None:
        self.poly(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), colour)

    def circle(self, cx: float, cy: float, r: float, colour) -> None:
        c, r = (int(round(cx)), int(round(cy))), max(1, int(round(r)))
        cv2.circle(self.image, c, r, self._col(colour), -1, cv2.LINE_AA)
        cv2.circle(self.owner, c, r, self.id, -1)

    def line(self, x0: float, y0: float, x1: float, y1: float, colour, thickness: float) -> None:
        p0, p1, t = (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), max(1, int(round(thickness)))
        cv2.line(self.image, p0, p1, self._col(colour), t, cv2.LINE_AA)
        cv2.line(self.owner, p0, p1, self.id, t)


def shade(colour, factor: float) -> np.ndarray:
    """``colour`` darkened (factor < 1) or lightened, kept in 0..255."""
    return np.clip(np.asarray(colour, dtype=np.float64) * factor, 0, 255)


# --------------------------------------------------------------------------------------- background
@dataclass
class Road:
    horizon: float
    vanish_x: float
    bottom_left: float
    bottom_right: float

    def edges_at(self, y: float, height: int) -> tuple[float, float]:
        """Left and right road edge at image row ``y``."""
        t = (y - self.horizon) / max(height - self.horizon, 1e-6)
        return (
            self.vanish_x + t * (self.bottom_left - self.vanish_x),
            self.vanish_x + t * (self.bottom_right - self.vanish_x),
        )


def draw_background(img: np.ndarray, rng: np.random.Generator) -> Road:
    h, w = img.shape[:2]
    horizon = h * rng.uniform(0.34, 0.48)
    hz = int(round(horizon))

    # Sky: deeper blue at the top, paler near the horizon.
    top = np.array([rng.uniform(40, 90), rng.uniform(100, 150), rng.uniform(190, 240)])
    low = np.array([rng.uniform(170, 215), rng.uniform(200, 230), rng.uniform(225, 250)])
    t = np.linspace(0, 1, max(hz, 1))[:, None]
    img[:hz] = (top * (1 - t) + low * t)[:, None, :].astype(np.uint8)
    for _ in range(rng.integers(0, 4)):  # soft clouds
        cx, cy = rng.uniform(0, w), rng.uniform(0.05, 0.7) * horizon
        ax, ay = rng.uniform(0.08, 0.2) * w, rng.uniform(0.02, 0.05) * h
        cloud = img.copy()
        cv2.ellipse(cloud, (int(cx), int(cy)), (int(ax), max(1, int(ay))), 0, 0, 360, (245, 245, 248), -1, cv2.LINE_AA)
        cv2.addWeighted(cloud, 0.6, img, 0.4, 0, dst=img)

    # Ground: grass or dry earth, darker toward the viewer.
    ground = np.array(
        [(90, 140, 60), (110, 150, 70), (150, 140, 100), (120, 125, 80)][rng.integers(0, 4)]
    ) * rng.uniform(0.85, 1.1)
    t = np.linspace(0, 1, h - hz)[:, None]
    img[hz:] = np.clip(ground * (1.05 - 0.25 * t), 0, 255)[:, None, :].astype(np.uint8)

    _draw_buildings(img, horizon, rng)

    # Road: a trapezoid to a vanishing point on the horizon.
    vanish_x = w * rng.uniform(0.38, 0.62)
    half_bottom = w * rng.uniform(0.45, 0.85)
    centre_bottom = w * rng.uniform(0.4, 0.6)
    road = Road(horizon, vanish_x, centre_bottom - half_bottom, centre_bottom + half_bottom)
    top_half = w * 0.02
    asphalt = np.full(3, rng.uniform(85, 125)) + rng.uniform(-6, 6, 3)
    pts = np.array(
        [[vanish_x - top_half, horizon], [vanish_x + top_half, horizon], [road.bottom_right, h], [road.bottom_left, h]]
    )
    cv2.fillPoly(img, [np.round(pts).astype(np.int32)], tuple(float(c) for c in asphalt), cv2.LINE_AA)
    _draw_lane_markings(img, road, top_half, rng)
    _draw_trees(img, road, rng)
    return road


def _draw_buildings(img: np.ndarray, horizon: float, rng: np.random.Generator) -> None:
    h, w = img.shape[:2]
    x = rng.uniform(-0.1, 0.05) * w
    while x < w and rng.random() < 0.85:
        bw, bh = rng.uniform(0.08, 0.22) * w, rng.uniform(0.05, 0.22) * h
        # Muted, low-contrast blocks so clutter never looks like a bus or a truck.
        base = np.array([(150, 150, 155), (175, 165, 145), (140, 120, 100), (185, 180, 170)][rng.integers(0, 4)])
        base = base * rng.uniform(0.8, 1.05)
        x0, y0 = int(x), int(horizon - bh)
        cv2.rectangle(img, (x0, y0), (int(x + bw), int(horizon)), tuple(float(c) for c in base), -1)
        win = tuple(float(c) for c in base * 0.8)
        step = max(3.0, 0.035 * w)
        for wy in np.arange(y0 + step * 0.6, horizon - step * 0.6, step):
            for wx in np.arange(x0 + step * 0.5, x + bw - step * 0.5, step):
                cv2.rectangle(img, (int(wx), int(wy)), (int(wx + step * 0.4), int(wy + step * 0.4)), win, -1)
        x += bw + rng.uniform(0.0, 0.15) * w


def _draw_lane_markings(img: np.ndarray, road: Road, top_half: float, rng: np.random.Generator) -> None:
    h, w = img.shape[:2]
    white = (235, 235, 230)
    thick = max(1, round(0.008 * w))
    for frac in (0.04, 0.96):  # solid edge lines just inside the road edges
        bx = road.bottom_left + frac * (road.bottom_right - road.bottom_left)
        tx = road.vanish_x - top_half + frac * 2 * top_half
        cv2.line(img, (int(tx), int(road.horizon)), (int(bx), h), white, thick, cv2.LINE_AA)
    # Dashed centre line whose dashes grow toward the viewer.
    centre_bottom = (road.bottom_left + road.bottom_right) / 2
    depth = h - road.horizon
    phase = rng.uniform(0, 1)
    for k in range(12):
        t0, t1 = ((k + phase) / 12) ** 2, ((k + phase + 0.5) / 12) ** 2
        y0, y1 = road.horizon + t0 * depth, road.horizon + min(t1, 1.0) * depth
        x0 = road.vanish_x + t0 * (centre_bottom - road.vanish_x)
        x1 = road.vanish_x + min(t1, 1.0) * (centre_bottom - road.vanish_x)
        cv2.line(img, (int(x0), int(y0)), (int(x1), int(y1)), (240, 230, 200), max(1, round(thick * (0.5 + t1))), cv2.LINE_AA)


def _draw_trees(img: np.ndarray, road: Road, rng: np.random.Generator) -> None:
    h, w = img.shape[:2]
    for _ in range(rng.integers(0, 5)):
        t = rng.uniform(0.0, 0.35)  # trees stay far away: small, near the horizon
        y = road.horizon + t * (h - road.horizon)
        left, right = road.edges_at(y, h)
        x = rng.uniform(0, left - 2) if rng.random() < 0.5 else rng.uniform(right + 2, w)
        size = (0.08 + 0.5 * t) * h
        trunk = max(1, int(size * 0.08))
        cv2.line(img, (int(x), int(y)), (int(x), int(y - size * 0.5)), (90, 65, 40), trunk)
        green = (rng.uniform(30, 70), rng.uniform(90, 130), rng.uniform(30, 60))
        cv2.ellipse(img, (int(x), int(y - size * 0.65)), (max(1, int(size * 0.3)), max(1, int(size * 0.38))), 0, 0, 360, green, -1, cv2.LINE_AA)


# ------------------------------------------------------------------------------------------ objects
def _draw_wheel(p: Painter, cx: float, cy: float, r: float) -> None:
    p.circle(cx, cy, r, (25, 25, 25))
    if r >= 2.5:
        p.circle(cx, cy, r * 0.45, (150, 150, 155))


def _vehicle_frame(o: Placed) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """Box-relative coordinates: ``X(u)``, ``Y(v)`` for u, v in [0, 1], u measured from the vehicle's tail."""
    def X(u: float) -> float:
        return o.x0 + (u if o.facing_right else 1 - u) * o.w

    def Y(v: float) -> float:
        return o.y0 + v * o.h

    return X, Y


def draw_car(p: Painter, o: Placed) -> None:
    X, Y = _vehicle_frame(o)
    c = o.colour
    glass = (60, 80, 100) if o.style % 2 else (140, 175, 200)
    r = 0.19 * o.h
    # Cabin (roof) then lower body; the body's bottom edge stays above the wheel bottoms.
    p.poly(np.array([[X(0.20), Y(0.48)], [X(0.32), Y(0.02)], [X(0.68), Y(0.02)], [X(0.84), Y(0.48)]]), c)
    p.poly(np.array([[X(0.0), Y(0.50)], [X(0.06), Y(0.42)], [X(0.96), Y(0.42)], [X(1.0), Y(0.55)], [X(1.0), Y(0.82)], [X(0.0), Y(0.82)]]), c)
    p.poly(np.array([[X(0.26), Y(0.44)], [X(0.35), Y(0.10)], [X(0.49), Y(0.10)], [X(0.49), Y(0.44)]]), glass)
    p.poly(np.array([[X(0.53), Y(0.44)], [X(0.53), Y(0.10)], [X(0.66), Y(0.10)], [X(0.78), Y(0.44)]]), glass)
    p.rect(X(0.0), Y(0.50), X(0.03), Y(0.60), (240, 60, 40))  # tail light
    p.rect(X(0.97), Y(0.56), X(1.0), Y(0.64), (250, 240, 180))  # headlight
    _draw_wheel(p, X(0.22), Y(1.0) - r, r)
    _draw_wheel(p, X(0.78), Y(1.0) - r, r)


def draw_bus(p: Painter, o: Placed) -> None:
    X, Y = _vehicle_frame(o)
    c = o.colour
    r = 0.12 * o.h
    p.poly(np.array([[X(0.0), Y(0.03)], [X(0.02), Y(0.0)], [X(0.97), Y(0.0)], [X(1.0), Y(0.06)], [X(1.0), Y(0.88)], [X(0.0), Y(0.88)]]), c)
    p.rect(X(0.0), Y(0.62), X(1.0), Y(0.70), shade(c, 0.6))  # side stripe
    glass = (50, 65, 85)
    n = 5 + o.style % 3
    span = 0.80 / n
    for k in range(n):  # the row of passenger windows
        u = 0.04 + k * span
        p.rect(X(u), Y(0.12), X(u + span * 0.78), Y(0.46), glass)
    p.rect(X(0.88), Y(0.10), X(0.99), Y(0.50), glass)  # windscreen
    p.rect(X(0.87), Y(0.52), X(0.95), Y(0.86), shade(c, 0.55))  # door
    _draw_wheel(p, X(0.16), Y(1.0) - r, r)
    _draw_wheel(p, X(0.78), Y(1.0) - r, r)


def draw_truck(p: Painter, o: Placed) -> None:
    X, Y = _vehicle_frame(o)
    c = o.colour
    r = 0.12 * o.h
    cab_colour = VEHICLE_COLOURS[o.style % len(VEHICLE_COLOURS)]
    p.rect(X(0.0), Y(0.0), X(0.68), Y(0.80), c)  # tall blank cargo box
    p.rect(X(0.02), Y(0.04), X(0.66), Y(0.10), shade(c, 0.8))  # roof rail
    p.rect(X(0.0), Y(0.78), X(0.97), Y(0.86), (45, 45, 48))  # chassis
    p.poly(np.array([[X(0.71), Y(0.84)], [X(0.71), Y(0.30)], [X(0.90), Y(0.30)], [X(1.0), Y(0.50)], [X(1.0), Y(0.84)]]), cab_colour)
    p.poly(np.array([[X(0.75), Y(0.50)], [X(0.75), Y(0.36)], [X(0.88), Y(0.36)], [X(0.95), Y(0.50)]]), (60, 85, 110))
    _draw_wheel(p, X(0.13), Y(1.0) - r, r)
    _draw_wheel(p, X(0.40), Y(1.0) - r, r)
    _draw_wheel(p, X(0.86), Y(1.0) - r, r)


def draw_person(p: Painter, o: Placed) -> None:
    x0, y0, w, h = o.x0, o.y0, o.w, o.h
    cx = x0 + w / 2
    skin = SKIN[o.style % len(SKIN)]
    shirt = o.colour
    pants_id = (o.style // 4) % len(CLOTHES)
    if np.abs(CLOTHES[pants_id] - shirt).sum() < 120:  # a one-colour figure loses its torso/legs shape
        pants_id = (pants_id + 3) % len(CLOTHES)
    pants = CLOTHES[pants_id]
    hr = 0.085 * h
    leg = max(1.0, 0.28 * w)
    stride = 0.12 * w * (1 if o.style % 2 else -1)
    p.line(cx - 0.18 * w, y0 + 0.55 * h, cx - 0.18 * w - stride, y0 + h - leg / 2, pants, leg)
    p.line(cx + 0.18 * w, y0 + 0.55 * h, cx + 0.18 * w + stride, y0 + h - leg / 2, pants, leg)
    p.poly(np.array([[cx - 0.32 * w, y0 + 0.21 * h], [cx + 0.32 * w, y0 + 0.21 * h], [cx + 0.30 * w, y0 + 0.58 * h], [cx - 0.30 * w, y0 + 0.58 * h]]), shirt)
    arm = max(1.0, 0.16 * w)
    p.line(cx - 0.38 * w, y0 + 0.24 * h, cx - 0.42 * w, y0 + 0.50 * h, shirt, arm)
    p.line(cx + 0.38 * w, y0 + 0.24 * h, cx + 0.42 * w, y0 + 0.50 * h, shirt, arm)
    p.circle(cx, y0 + hr + 0.01 * h, hr, skin)
    p.rect(cx - hr, y0 + 0.01 * h, cx + hr, y0 + 0.06 * h, CLOTHES[2] if o.style % 3 else skin * 0.4)  # hair


def draw_sign(p: Painter, o: Placed) -> None:
    x0, y0, w, h = o.x0, o.y0, o.w, o.h
    cx = x0 + w / 2
    plate = w  # plate is as wide as the box; the pole fills the rest down to the ground
    p.line(cx, y0 + plate * 0.5, cx, y0 + h - 1, (130, 130, 135), max(1.0, 0.12 * w))
    shape = o.style % 4
    if shape == 0:  # round prohibition sign: red ring, white face
        p.circle(cx, y0 + plate / 2, plate / 2, (210, 30, 30))
        p.circle(cx, y0 + plate / 2, plate * 0.33, (245, 245, 245))
        p.rect(cx - plate * 0.2, y0 + plate * 0.45, cx + plate * 0.2, y0 + plate * 0.55, (30, 30, 30))
    elif shape == 1:  # round blue mandatory sign
        p.circle(cx, y0 + plate / 2, plate / 2, (30, 80, 190))
        p.line(cx - plate * 0.2, y0 + plate * 0.5, cx + plate * 0.2, y0 + plate * 0.5, (245, 245, 245), max(1.0, plate * 0.1))
    elif shape == 2:  # triangular warning sign
        tri = np.array([[x0, y0 + plate * 0.9], [cx, y0], [x0 + w, y0 + plate * 0.9]])
        p.poly(tri, (210, 30, 30))
        inner = (tri - [cx, y0 + plate * 0.6]) * 0.55 + [cx, y0 + plate * 0.6]
        p.poly(inner, (245, 240, 220))
    else:  # square information / priority sign
        colour = ((30, 80, 190), (30, 130, 70), (240, 200, 30))[(o.style // 4) % 3]
        p.rect(x0, y0, x0 + w, y0 + plate, (245, 245, 245))
        p.rect(x0 + plate * 0.12, y0 + plate * 0.12, x0 + w - plate * 0.12, y0 + plate * 0.88, colour)
