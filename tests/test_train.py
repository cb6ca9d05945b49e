"""The supervised training loop and ``fedsto train``: learning, freezing, optimiser state,
determinism, checkpoints and resuming, and the issue's acceptance run (slow)."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detection.images import LetterboxCache
from detection.model import build_model, get_state, select_keys
from detection.train import TrainConfig, train_labelled
from server.cli import main as fedsto_main

IMGSZ = 64


def fresh_model(class_names, seed: int = 0):
    torch.manual_seed(seed)  # initial weights come from torch's global generator
    return build_model("yolo11n.yaml", len(class_names), class_names)


@pytest.fixture(scope="module")
def tiny(synthetic_records):
    """16 labelled synthetic scenes and their class names."""
    records, class_names = synthetic_records
    return records[:16], class_names


def states_equal(a: dict, b: dict, keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys if keys is not None else a))


# ------------------------------------------------------------------------------------------
# train_labelled


def test_train_labelled_reports_what_it_did(tiny):
    records, names = tiny
    stats, opt_state = train_labelled(fresh_model(names), records, TrainConfig(imgsz=IMGSZ, batch_size=8, epochs=2))
    assert stats.steps == 4 and stats.images == 32 and stats.num_examples == 16
    assert set(stats.losses) == {"box_loss", "cls_loss", "dfl_loss"}
    assert all(v >= 0 and v == v for v in stats.losses.values())
    assert stats.extra["boxes"] > 0 and stats.seconds > 0
    assert opt_state["state"], "momentum buffers expected after SGD steps"


def test_loss_decreases_over_a_few_steps(tiny):
    records, names = tiny
    model, cache, opt_state, totals = fresh_model(names), LetterboxCache(IMGSZ), None, []
    # Six calls of four steps on the same 16 images without augmentation; the optimiser state
    # travels between calls, so this is one run of 24 steps observed in chunks.
    for chunk in range(6):
        cfg = TrainConfig(imgsz=IMGSZ, batch_size=8, max_steps=4, augment="none", seed=0)
        stats, opt_state = train_labelled(model, records, cfg, optimizer_state=opt_state, cache=cache, seed_parts=(chunk,))
        totals.append(sum(stats.losses.values()))
    assert totals[-1] < 0.8 * totals[0], totals


def test_frozen_groups_stay_bit_identical(tiny):
    records, names = tiny
    model = fresh_model(names)
    before = get_state(model)
    train_labelled(model, records, TrainConfig(imgsz=IMGSZ, batch_size=8, max_steps=2, trainable=("backbone",)))
    after = get_state(model)
    frozen = select_keys(model, ["neck", "head"])
    assert any(k.endswith("running_var") for k in frozen)
    assert states_equal(before, after, frozen)  # weights and BatchNorm statistics
    backbone = select_keys(model, ["backbone"])
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    assert any(k.endswith("conv.weight") for k in changed) and any(k.endswith("running_mean") for k in changed)


def test_optimizer_state_round_trip_continues_the_same_run(tiny):
    records, names = tiny
    one = records[:1]  # one image per batch: every step sees the same batch whatever the shuffle
    cfg = TrainConfig(imgsz=IMGSZ, batch_size=1, augment="none", lr=0.02, seed=0)

    straight = fresh_model(names)
    train_labelled(straight, one, cfg.replace(max_steps=4))

    resumed = fresh_model(names)
    _, opt_state = train_labelled(resumed, one, cfg.replace(max_steps=2))
    buffer = io.BytesIO()
    torch.save(opt_state, buffer)  # as a checkpoint does
    buffer.seek(0)
    train_labelled(resumed, one, cfg.replace(max_steps=2), optimizer_state=torch.load(buffer, weights_only=False))

    restarted = fresh_model(names)
    train_labelled(restarted, one, cfg.replace(max_steps=2))
    train_labelled(restarted, one, cfg.replace(max_steps=2))  # momentum lost

    assert states_equal(get_state(straight), get_state(resumed))
    assert not states_equal(get_state(straight), get_state(restarted))


def test_same_seed_same_weights_other_seed_other_weights(tiny):
    records, names = tiny
    cfg = TrainConfig(imgsz=IMGSZ, batch_size=8, max_steps=3, augment="strong", seed=7)
    runs = []
    for seed in (7, 7, 8):
        model = fresh_model(names)
        train_labelled(model, records, cfg.replace(seed=seed))
        runs.append(get_state(model))
    assert states_equal(runs[0], runs[1])
    assert not states_equal(runs[0], runs[2])


def test_prefetching_batches_in_a_thread_changes_nothing(tiny):
    records, names = tiny
    cfg = TrainConfig(imgsz=IMGSZ, batch_size=4, max_steps=6, augment="strong", seed=5)
    runs = []
    for prefetch in (False, True):
        model = fresh_model(names)
        stats, _ = train_labelled(model, records, cfg.replace(prefetch=prefetch))
        runs.append((get_state(model), stats.losses))
    assert states_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_mixed_precision_is_ignored_on_the_cpu(tiny):
    """AMP applies on CUDA only: on the CPU the same call gives bit-identical weights with it on or off."""
    records, names = tiny
    cfg = TrainConfig(imgsz=IMGSZ, batch_size=8, max_steps=2, seed=3, device="cpu")
    runs = []
    for amp in (False, True):
        model = fresh_model(names)
        train_labelled(model, records, cfg.replace(amp=amp))
        runs.append(get_state(model))
    assert states_equal(runs[0], runs[1])


def test_bad_inputs_are_refused(tiny):
    records, names = tiny
    with pytest.raises(ValueError, match="no labelled images"):
        train_labelled(fresh_model(names), [], TrainConfig(imgsz=IMGSZ))
    with pytest.raises(ValueError, match="augment='blur'"):
        train_labelled(fresh_model(names), records, TrainConfig(imgsz=IMGSZ, augment="blur", max_steps=1))


# ------------------------------------------------------------------------------------------
# fedsto train: checkpoints, resume, determinism


def train_args(federation: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["train", str(federation), "--epochs", str(epochs), "--imgsz", str(IMGSZ), "--batch", "8",
            "--warmup-steps", "2", "--eval-every", "0", "--device", "cpu", "--out", str(out), *extra]


def logged_epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fedsto_train_resumes_from_its_checkpoint(weather_federation, tmp_path, capsys):
    out = tmp_path / "run"
    assert fedsto_main(train_args(weather_federation, out, 1)) == 0
    first = capsys.readouterr().out
    assert "resuming" not in first
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["optimizer_state"]["state"]

    assert fedsto_main(train_args(weather_federation, out, 2)) == 0
    second = capsys.readouterr().out
    assert "resuming" in second and "after epoch 1" in second
    assert logged_epochs(out) == [1, 2]
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"clear", "rainy", "night", "Total"}
    assert (out / "model.pt").is_file()


def test_fedsto_train_refuses_to_resume_with_other_settings(weather_federation, tmp_path, capsys):
    out = tmp_path / "run"
    assert fedsto_main(train_args(weather_federation, out, 1)) == 0
    capsys.readouterr()
    assert fedsto_main(train_args(weather_federation, out, 2, "--lr", "0.02")) == 2
    assert "other settings" in capsys.readouterr().err
    assert logged_epochs(out) == [1]


def test_fedsto_train_same_seed_same_model(weather_federation, tmp_path):
    for name in ("a", "b"):
        assert fedsto_main(train_args(weather_federation, tmp_path / name, 1, "--seed", "3")) == 0
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", map_location="cpu", weights_only=False) for n in ("a", "b"))
    assert states_equal(a["model_state"], b["model_state"])
    assert json.loads((tmp_path / "a" / "results.json").read_text())["results"] == \
        json.loads((tmp_path / "b" / "results.json").read_text())["results"]


@pytest.mark.slow
def test_killed_fedsto_train_resumes_where_its_checkpoint_left_off(weather_federation, tmp_path, fedsto_cli):
    out = tmp_path / "run"
    script = Path(sys.executable).with_name("fedsto")
    child = subprocess.Popen([str(script), *train_args(weather_federation, out, 50)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert child.poll() is None, "fedsto train ended before it could be killed"
            assert time.monotonic() < deadline, "no epoch finished within 300 s"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    done = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["epoch"]
    assert 1 <= done < 50 and logged_epochs(out) == list(range(1, done + 1))

    resumed = fedsto_cli(*train_args(weather_federation, out, done + 1), timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"after epoch {done}" in resumed.stdout and "resuming" in resumed.stdout
    assert logged_epochs(out) == list(range(1, done + 2))
    assert (out / "model.pt").is_file()


# ------------------------------------------------------------------------------------------
# Acceptance: centralised training on the synthetic weather federation


@pytest.mark.slow
def test_fedsto_train_reaches_map50_on_clear_scenes_within_ten_minutes(tmp_path, fedsto_cli, record_measurement):
    """The issue's acceptance: >= 0.25 mAP50 on the clear test split, CPU only, <= 10 minutes in all."""
    start = time.perf_counter()
    steps = [
        ("data", "synth", tmp_path / "synthetic", "--num-images", "1100", "--imgsz", "160", "--seed", "1"),
        ("data", "federate", tmp_path / "synthetic", tmp_path / "federation", "--weathers", "rainy,night",
         "--server-fraction", "0.75", "--clients", "2", "--seed", "1"),
        ("train", tmp_path / "federation", "--epochs", "4", "--imgsz", "160", "--batch", "16", "--eval-every", "0",
         "--device", "cpu", "--seed", "1", "--out", tmp_path / "run"),
    ]
    for args in steps:
        done = fedsto_cli(*args, timeout=600)
        assert done.returncode == 0, f"fedsto {args[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    elapsed = time.perf_counter() - start
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    clear = report["results"]["clear"]
    record_measurement(f"fedsto train acceptance: clear mAP50 {clear['map50']:.3f} (mAP50-95 {clear['map50_95']:.3f}) on "
          f"{clear['images']} test images; training {report['train_seconds']:.0f}s, wall clock {elapsed:.0f}s; "
          f"per domain { {d: round(r['map50'], 3) for d, r in report['results'].items()} }")
    assert elapsed <= 600, f"took {elapsed:.0f}s"
    assert clear["map50"] >= 0.25
