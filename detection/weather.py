"""Weather shifts that turn clear road images into other domains (overcast, rain, snow, fog, night).

Each shift must read as that weather on small images (160-320 px), both on the synthetic scenes and
on real road photos; every one was checked by eye on montages (``detection.montage``). Rain streaks
come from albumentations' ``RandomRain`` and sensor noise from its ``GaussNoise``; albumentations'
``RandomSnow`` is not used because with ``method="texture"`` it turns road photos into posterised
colour noise, and its ``RandomFog`` draws white discs that look like smoke puffs at these sizes, so
snow and fog are built here from simple physics-like parts (a depth-dependent haze, settled snow,
falling flakes).

A shift depends only on ``(image, weather, seed)``: albumentations runs in ``A.Compose(..., seed=)``
built afresh per call, and our own randomness comes from ``numpy.random.default_rng``.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np

WEATHERS = ("overcast", "rainy", "snowy", "foggy", "night")


def _as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _luma(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of a float RGB image, keeping a channel axis for broadcasting."""
    return (image @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _grade(image: np.ndarray, saturation: float, contrast: float, brightness: float, tint) -> np.ndarray:
    """Colour grade a float RGB image: desaturate, flatten contrast around mid-grey, scale, tint."""
    y = _luma(image)
    out = y + saturation * (image - y)
    out = 0.5 + contrast * (out - 0.5)
    return out * brightness * np.asarray(tint, np.float32)


def _vertical_ramp(h: int, start: float, end: float) -> np.ndarray:
    """``(h, 1, 1)`` ramp: 0 above row ``start * h``, 1 below ``end * h``, smooth in between."""
    t = np.clip((np.arange(h, dtype=np.float32) / max(h - 1, 1) - start) / max(end - start, 1e-6), 0, 1)
    return (t * t * (3 - 2 * t))[:, None, None]


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """``(h, w, 1)`` low-frequency noise in [0, 1]: random values on a coarse grid, upsampled."""
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    grid = rng.random((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)[..., None]


def content_box(image: np.ndarray, dark: int = 10) -> tuple[int, int, int, int]:
    """Rows and columns ``(y0, y1, x0, x1)`` of an image inside its black letterbox bars, if any.

    Letterboxed datasets (e.g. Roboflow exports) pad photos with black bars; weather belongs to the
    photo, not to the padding, and the fog/sky models assume the photo's own top and bottom.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W, 3)`` ``uint8`` image.
    dark : int, optional
        A bar row/column has no channel value above this (JPEG leaves a few grey levels).

    Returns
    -------
    tuple of int
        ``(y0, y1, x0, x1)``, half-open; the whole image when there are no bars.
    """
    peak = image.max(axis=2)
    rows = np.flatnonzero(peak.max(axis=1) > dark)
    cols = np.flatnonzero(peak.max(axis=0) > dark)
    h, w = peak.shape
    if len(rows) == 0 or len(cols) == 0:
        return 0, h, 0, w
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    # Only a clear bar counts; a dark edge of a few pixels is part of the photo.
    if y1 - y0 < 16 or x1 - x0 < 16:
        return 0, h, 0, w
    if y0 < 3 and h - y1 < 3:
        y0, y1 = 0, h
    if x0 < 3 and w - x1 < 3:
        x0, x1 = 0, w
    return y0, y1, x0, x1


def _scale(image: np.ndarray) -> float:
    """Size of the image relative to the 160 px the effects were tuned on."""
    return min(image.shape[:2]) / 160.0


# ------------------------------------------------------------------------------------------- effects
def _overcast(image: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    x = _as_float(image)
    x = _grade(x, saturation=rng.uniform(0.3, 0.4), contrast=rng.uniform(0.7, 0.78), brightness=rng.uniform(0.8, 0.87), tint=(0.97, 0.99, 1.03))
    # A flat grey sky: the top of the frame (where the sky is in road views) fades to cloud grey.
    sky = _vertical_ramp(x.shape[0], 0.0, 0.45)
    cloud = np.float32(rng.uniform(0.62, 0.7))
    x = x * (0.65 + 0.35 * sky) + cloud * 0.35 * (1 - sky)
    return _to_uint8(x)


def _rainy(image: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    x = _as_float(image)
    x = _grade(x, saturation=rng.uniform(0.45, 0.55), contrast=rng.uniform(0.72, 0.8), brightness=rng.uniform(0.72, 0.8), tint=(0.95, 0.98, 1.04))
    s = _scale(image)
    h = image.shape[0]
    # The whole scene goes soft behind the rain before the streaks are drawn on top.
    x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.6, 0.9) * s)
    # One wind for both layers of streaks, so they fall in the same direction.
    slant = float(rng.uniform(-6, 6) * s)
    rain = A.Compose(
        [
            # Two layers of streaks: many short faint ones far away, fewer long bright ones near.
            A.RandomRain(
                slant_range=(slant, slant),
                drop_length=max(3, round(h / 16)),
                drop_width=1,
                drop_color=(120, 122, 130),
                blur_value=3,
                brightness_coefficient=0.95,
                rain_type="heavy",
                p=1.0,
            ),
            A.RandomRain(
                slant_range=(slant, slant),
                drop_length=max(5, round(h / 9)),
                drop_width=max(1, round(s * 0.7)),
                drop_color=(160, 162, 170),
                blur_value=3,
                brightness_coefficient=0.95,
                rain_type="drizzle",
                p=1.0,
            ),
        ],
        seed=seed,
    )
    return rain(image=_to_uint8(x))["image"]


def _snowy(image: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = _scale(image)
    x = _as_float(image)
    # Bright, low-contrast, cold: snow light is diffuse and bluish white.
    x = _grade(x, saturation=rng.uniform(0.45, 0.55), contrast=rng.uniform(0.65, 0.72), brightness=1.0, tint=(0.96, 1.0, 1.06))
    snow_white = np.array([0.93, 0.95, 0.99], np.float32)
    x = 0.8 * x + 0.2 * snow_white
    # Settled snow: patchy white on the lower part of the frame (ground, verges, road shoulders),
    # stronger on flat, untextured areas so vehicles and people stay visible.
    patches = _smooth_noise(h, w, 10, rng)
    patches = np.clip((patches - 0.25) / 0.5, 0, 1)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    edges = np.abs(cv2.Laplacian(cv2.GaussianBlur(grey, (3, 3), 0), cv2.CV_32F))
    flat = np.exp(-cv2.blur(edges, (3, 3)) / 12.0)[..., None]
    cover = _vertical_ramp(h, 0.45, 0.8) * (0.25 + 0.35 * patches) * (0.2 + 0.8 * flat)
    x = x * (1 - cover) + snow_white * cover
    # Falling flakes: a few-pixel soft white dots of varied size, some out of focus.
    flakes = np.zeros((h, w), np.float32)
    n = int(h * w / rng.uniform(80, 120))
    xs, ys = rng.integers(0, w, n), rng.integers(0, h, n)
    radius = np.round(rng.gamma(1.3, 0.4, n) * s).astype(int)
    alpha = rng.uniform(0.5, 1.0, n)
    for xi, yi, r, a in zip(xs.tolist(), ys.tolist(), radius.tolist(), alpha.tolist()):
        cv2.circle(flakes, (xi, yi), r, a, -1, cv2.LINE_AA)
    sigma = 0.5 * max(s, 1.0)
    flakes = np.clip(cv2.GaussianBlur(flakes, (0, 0), sigma) * 1.6, 0, 1)[..., None]
    x = x * (1 - flakes) + np.float32(1.0) * flakes
    return _to_uint8(x)


def _foggy(image: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    h, w = image.shape[:2]
    x = _as_float(image)
    x = _grade(x, saturation=0.6, contrast=0.8, brightness=1.0, tint=(1.0, 1.0, 1.0))
    # Koschmieder's model: I = J t + A (1 - t), t = exp(-beta d). In a road view the distance d
    # grows toward the horizon (around 40-50 % of the height) and the sky is at infinity.
    horizon = rng.uniform(0.4, 0.5)
    rows = np.arange(h, dtype=np.float32)[:, None, None] / max(h - 1, 1)
    depth = np.where(rows < horizon, 1.0, 1.0 - 0.7 * np.clip((rows - horizon) / (1 - horizon), 0, 1) ** 0.6).astype(np.float32)
    # Fog is not uniform: slow variations of density make it look like fog, not a grey filter.
    density = 0.75 + 0.5 * _smooth_noise(h, w, 4, rng)
    beta = rng.uniform(1.2, 1.6)
    t = np.exp(-beta * depth * density)
    t = np.maximum(t, 0.15)
    airlight = np.float32(rng.uniform(0.78, 0.86)) * np.array([0.98, 0.99, 1.0], np.float32)
    x = x * t + airlight * (1 - t)
    sigma = 0.8 * _scale(image)
    x = cv2.GaussianBlur(x, (0, 0), sigma)
    return _to_uint8(x)


def _night(image: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    h, w = image.shape[:2]
    x = _as_float(image)
    # Dark and blue: low light is mostly blue-green to the eye and the camera (Purkinje shift).
    x = _grade(x, saturation=0.55, contrast=1.0, brightness=1.0, tint=(0.7, 0.85, 1.25))
    x = np.clip(x, 0, 1) ** 1.5
    # Illumination: own headlights light the road near the viewer; the far scene and the sky are dark.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w * rng.uniform(0.4, 0.6)
    beam = np.exp(-(((xx - cx) / (0.45 * w)) ** 2) - ((yy - h) / (0.55 * h)) ** 2)[..., None]
    light = rng.uniform(0.22, 0.28) + 0.45 * beam * np.array([1.0, 0.95, 0.8], np.float32)
    x = x * light
    # A few street-lamp glows in the upper half: warm halos, the give-away of a night shot.
    glow = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        gx, gy = rng.uniform(0, w), rng.uniform(0.05, 0.5) * h
        r = rng.uniform(0.03, 0.06) * min(h, w)
        glow += np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * r * r)) * rng.uniform(0.5, 0.9)
    x = x + np.clip(glow, 0, 1)[..., None] * np.array([1.0, 0.8, 0.45], np.float32)
    noise = A.Compose([A.GaussNoise(std_range=(0.03, 0.045), per_channel=True, noise_scale_factor=1.0, p=1.0)], seed=seed)
    return noise(image=_to_uint8(x))["image"]


_EFFECTS = {"overcast": _overcast, "rainy": _rainy, "snowy": _snowy, "foggy": _foggy, "night": _night}


def apply_weather(image: np.ndarray, weather: str, seed: int) -> np.ndarray:
    """Turn a clear-weather road image into the given weather.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W, 3)`` RGB ``uint8`` image.
    weather : str
        One of :data:`WEATHERS`.
    seed : int
        Randomness of the effect (drop positions, fog density, lamp positions, ...).

    Returns
    -------
    np.ndarray
        A new ``(H, W, 3)`` RGB ``uint8`` image; the same ``(image, weather, seed)`` always gives
        the same bytes.

    Raises
    ------
    ValueError
        If ``weather`` is not one of :data:`WEATHERS` or the image is not ``(H, W, 3)`` ``uint8``.
    """
    if weather not in _EFFECTS:
        raise ValueError(f"unknown weather {weather!r}; expected one of {', '.join(WEATHERS)}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"apply_weather expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    # The weather's index enters the seed so that rain and snow with one seed are not correlated.
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, WEATHERS.index(weather)])
    album_seed = int(rng.integers(0, 2**31 - 1))
    y0, y1, x0, x1 = content_box(image)
    out = image.copy()
    out[y0:y1, x0:x1] = _EFFECTS[weather](np.ascontiguousarray(image[y0:y1, x0:x1]), rng, album_seed)
    return out


def apply_weather_to_file(src, dst, weather: str, seed: int) -> Path:
    """Read an image file, apply :func:`apply_weather` and write the result.

    Parameters
    ----------
    src : str or Path
        Input image (any format OpenCV reads).
    dst : str or Path
        Output image; its extension picks the format, parent folders are created.
    weather : str
        One of :data:`WEATHERS`.
    seed : int
        Randomness of the effect.

    Returns
    -------
    Path
        ``dst``.

    Raises
    ------
    FileNotFoundError
        If ``src`` cannot be read as an image.
    OSError
        If ``dst`` cannot be written.
    """
    bgr = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"apply_weather_to_file: cannot read image {src}")
    out = apply_weather(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), weather, seed)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(dst), cv2.cvtColor(out, cv2.COLOR_RGB2BGR)):
        raise OSError(f"apply_weather_to_file: could not write {dst}")
    return dst
