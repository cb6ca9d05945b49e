"""The letterbox cache keeps pixels within a byte budget, least recently used out first, and reads back the same image."""

import cv2
import numpy as np

from detection.images import LetterboxCache, canvas_shape, evaluation_cache


def write_images(folder, n: int, size=(48, 64)) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"im{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


def test_budget_bounds_memory_and_evicts_least_recently_used(tmp_path):
    paths = write_images(tmp_path, 10)
    one = 64 * 64 * 3
    cache = LetterboxCache(64, max_bytes=3 * one)
    first = cache.get(paths[0]).copy()
    for p in paths[1:]:
        cache.get(p)
        assert cache.nbytes <= 3 * one and cache.count <= 3
    assert cache.reads == 10
    cache.get(paths[9])  # recent: from memory
    assert cache.reads == 10
    again = cache.get(paths[0])  # evicted long ago: read again, same pixels
    assert cache.reads == 11 and np.array_equal(again, first)


def test_unbounded_cache_reads_each_file_once(tmp_path):
    paths = write_images(tmp_path, 5)
    cache = LetterboxCache(64)
    for _ in range(3):
        for p in paths:
            cache.get(p)
    assert cache.reads == 5 and cache.count == 5


def test_evaluation_canvas_is_ultralytics_rect_shape(tmp_path):
    # val(): ceil(side / long * imgsz / 32 + 0.5) * 32
    assert canvas_shape(640, 640, 160, 0.5) == (192, 192)
    assert canvas_shape(720, 1280, 320, 0.5) == (224, 352)
    assert canvas_shape(720, 1280, 320) == (320, 320)
    path = write_images(tmp_path, 1, size=(48, 64))[0]
    cache = evaluation_cache(64)
    assert cache.get(path).shape == (*canvas_shape(48, 64, 64, 0.5), 3) == (64, 96, 3)
    boxes = cache.boxes(path, np.array([[0.5, 0.5, 1.0, 1.0]], np.float32))
    # the whole image, 64 x 48 px, centred in a 96 x 64 canvas
    assert np.allclose(boxes, [[0.5, 0.5, 64 / 96, 48 / 64]])
