"""Weather shifts: shape and type kept, determinism, and per-weather statistics that say 'it worked'."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from detection.synthetic import generate_scene
from detection.weather import WEATHERS, apply_weather, apply_weather_to_file, content_box

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return generate_scene(5, seed=0, imgsz=128)[0]


def _saturation(image: np.ndarray) -> float:
    return float(cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1].mean())


def _detail_contrast(image: np.ndarray) -> float:
    """Mean local (high-pass) contrast. Not the global std: fog adds a bright-sky/dark-foreground
    gradient that can raise global contrast while it washes out every detail."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.abs(grey - cv2.GaussianBlur(grey, (0, 0), 2)).mean())


@pytest.mark.parametrize("weather", WEATHERS)
def test_shape_dtype_kept_and_image_changed(scene, weather):
    out = apply_weather(scene, weather, seed=0)
    assert out.shape == scene.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - scene.astype(int)).mean() > 10
    assert scene.flags.writeable and out is not scene


@pytest.mark.parametrize("weather", WEATHERS)
def test_deterministic_per_seed(scene, weather):
    a = apply_weather(scene, weather, seed=3)
    np.random.seed(123)  # global numpy state must not leak in
    b = apply_weather(scene, weather, seed=3)
    c = apply_weather(scene, weather, seed=4)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def _check_statistics(clear: np.ndarray, seed: int = 0) -> None:
    out = {w: apply_weather(clear, w, seed) for w in WEATHERS}
    mean = float(clear.mean())
    assert out["night"].mean() < 0.45 * mean
    assert _detail_contrast(out["foggy"]) < 0.5 * _detail_contrast(clear)
    assert out["foggy"].mean() > mean  # fog is bright: the air scatters light toward the camera
    assert _saturation(out["overcast"]) < 0.6 * _saturation(clear)
    assert out["overcast"].mean() < mean
    assert out["rainy"].mean() < mean and _saturation(out["rainy"]) < 0.8 * _saturation(clear)
    assert out["snowy"].mean() > mean and _saturation(out["snowy"]) < 0.7 * _saturation(clear)
    # Snow lies on the ground: the bottom of the frame brightens more than the top.
    h = clear.shape[0]
    gain_bottom = out["snowy"][-h // 4 :].mean() - clear[-h // 4 :].mean()
    gain_top = out["snowy"][: h // 4].mean() - clear[: h // 4].mean()
    assert gain_bottom > gain_top


def test_weather_statistics_on_synthetic_scenes():
    for index in range(3):
        _check_statistics(generate_scene(index, seed=1, imgsz=128)[0], seed=index)


def test_weather_statistics_on_real_road_photos():
    folder = SHARED_DATA / "highway" / "train" / "images"
    if not folder.is_dir():
        pytest.skip(f"real road photos not available at {folder}")
    for path in sorted(folder.glob("*.jpg"))[:3]:
        image = cv2.cvtColor(cv2.resize(cv2.imread(str(path)), (160, 160), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        y0, y1, x0, x1 = content_box(image)
        _check_statistics(np.ascontiguousarray(image[y0:y1, x0:x1]))


def test_letterbox_bars_stay_black(scene):
    padded = np.zeros((160, 128, 3), np.uint8)
    padded[16:144] = scene
    assert content_box(padded) == (16, 144, 0, 128)
    for weather in WEATHERS:
        out = apply_weather(padded, weather, seed=1)
        assert not out[:16].any() and not out[144:].any(), weather
        assert out[16:144].any()


def test_unknown_weather_names_allowed_values(scene):
    with pytest.raises(ValueError) as err:
        apply_weather(scene, "sandstorm", seed=0)
    assert "sandstorm" in str(err.value)
    assert all(w in str(err.value) for w in WEATHERS)


def test_non_rgb_uint8_is_refused(scene):
    with pytest.raises(ValueError, match="uint8"):
        apply_weather(scene.astype(np.float32), "rainy", seed=0)
    with pytest.raises(ValueError, match="uint8"):
        apply_weather(scene[..., 0], "rainy", seed=0)


def test_apply_weather_to_file_round_trip(tmp_path, scene):
    src = tmp_path / "clear.png"
    cv2.imwrite(str(src), cv2.cvtColor(scene, cv2.COLOR_RGB2BGR))
    dst = apply_weather_to_file(src, tmp_path / "a" / "b" / "night.png", "night", seed=2)
    written = cv2.cvtColor(cv2.imread(str(dst)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(written, apply_weather(scene, "night", seed=2))  # PNG is lossless, RGB kept

    jpg = apply_weather_to_file(src, tmp_path / "c" / "fog.jpg", "foggy", seed=2)
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"  # the extension picks the format
    assert cv2.imread(str(jpg)).shape == scene.shape


def test_apply_weather_to_file_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        apply_weather_to_file(tmp_path / "nothing.png", tmp_path / "out.png", "rainy", seed=0)
