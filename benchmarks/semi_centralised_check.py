"""Run with: python -m pytest -s benchmarks/semi_centralised_check.py (not in the suite until it is shown to pass).

Centralised semi-supervised check: do pseudo labels on shifted unlabelled images help on that domain?

Warm up yolo11n on clear labelled synthetic scenes (mAP50 >= 0.25 asserted), then, per seed:

* **pseudo**: alternate a FedSTO-style selective pass (backbone only, local EMA teacher, pseudo
  labels on the unlabelled shifted images) with a supervised pass on the clear labels;
* **control**: supervised passes on the clear labels only, for the same number of optimiser steps.

Over two seeds the pseudo run must beat the control on the shifted domain's test split by >= 0.02
mAP50 on average. Prints both, with pseudo-label precision/recall (true labels of the unlabelled
images are used for that diagnostic only).
"""

import time

import numpy as np
import pytest
import torch

from detection.datasets import read_yolo_dataset
from detection.federation import Federation, build_federation
from detection.metrics import evaluate_records
from detection.model import build_model, get_state, set_state
from detection.semi import SemiConfig, train_unlabelled
from detection.synthetic import write_synthetic_dataset
from detection.train import TrainConfig, train_labelled

IMGSZ = 128
WARMUP_EPOCHS = 8
CYCLES = 3  # pseudo pass + supervised pass, each STEPS long
STEPS = 20
SHIFT = "rainy"


@pytest.mark.slow
def test_pseudo_labels_beat_labelled_only_control_on_shifted_domain(tmp_path):
    torch.set_num_threads(2)
    start = time.perf_counter()
    data = write_synthetic_dataset(tmp_path / "synth", num_images=1000, imgsz=IMGSZ, seed=0, progress=False)
    records, names, _ = read_yolo_dataset(data)
    fed = Federation.load(build_federation(records, names, tmp_path / "fed", domain_rule="weather", weathers=[SHIFT],
                                           num_clients=1, server_fraction=0.4, test_fraction=0.2, seed=0, progress=False))
    server, unlabelled, hidden = fed.server_records(), fed.client_images(0), fed.client_hidden_records(0)
    tests = fed.test_records()

    model = build_model("yolo11n.yaml", len(names), names)
    cfg = TrainConfig(imgsz=IMGSZ, batch_size=16)
    opt = None
    for epoch in range(WARMUP_EPOCHS):
        _, opt = train_labelled(model, server, cfg.replace(warmup_steps=30 if epoch == 0 else 0), optimizer_state=opt,
                                seed_parts=(epoch,))
    warm = get_state(model)
    warm_clear = evaluate_records(model, tests["clear"], IMGSZ)["map50"]
    warm_shift = evaluate_records(model, tests[SHIFT], IMGSZ)["map50"]
    print(f"\nwarm-up: clear mAP50 {warm_clear:.3f}, {SHIFT} {warm_shift:.3f} ({time.perf_counter() - start:.0f}s)")
    assert warm_clear >= 0.25

    gains = []
    for seed in (0, 1):
        set_state(model, warm)
        diag = []
        for cycle in range(CYCLES):
            stats = train_unlabelled(model, unlabelled, SemiConfig(
                train=TrainConfig(imgsz=IMGSZ, max_steps=STEPS, trainable=("backbone",), seed=seed), ema_decay=0.999),
                hidden_records=hidden, seed_parts=(seed, cycle))
            diag.append(stats.extra)
            train_labelled(model, server, cfg.replace(max_steps=STEPS, seed=seed), seed_parts=(seed, cycle, 1))
        pseudo = evaluate_records(model, tests[SHIFT], IMGSZ)["map50"]

        set_state(model, warm)
        for cycle in range(CYCLES):
            for half in (0, 1):
                train_labelled(model, server, cfg.replace(max_steps=STEPS, seed=seed), seed_parts=(seed, cycle, half))
        control = evaluate_records(model, tests[SHIFT], IMGSZ)["map50"]
        gains.append(pseudo - control)
        p = np.mean([d["pseudo_reliable_precision"] for d in diag])
        r = np.mean([d["pseudo_reliable_recall"] for d in diag])
        print(f"seed {seed}: {SHIFT} mAP50 pseudo {pseudo:.3f} vs control {control:.3f} (gain {pseudo - control:+.3f}); "
              f"reliable pseudo boxes precision {p:.2f} recall {r:.2f}")
    print(f"mean gain {np.mean(gains):+.3f} mAP50 over 2 seeds; {time.perf_counter() - start:.0f}s")
    assert np.mean(gains) >= 0.02
