"""Centralised semi-supervised check: do pseudo labels on unlabelled shifted images help there?

Warm up yolo11n on clear labelled synthetic scenes (128 px, strong augmentation with a milder
zoom, scale 0.25, than Ultralytics' 0.5, and 20 epochs: with 0.5 and 10 epochs the warm-up reached
clear mAP50 0.074 on val()'s canvas; with these, 0.757 and a mean gain of +0.076 over the four
seeds, 2026-12-05; mAP50 >= 0.25 asserted). Then, per seed, from the same warm-up:

* **pseudo**: ``train_unlabelled`` on the unlabelled foggy images with a local EMA teacher
  (decay 0.999) and ``ignore`` mode, each step's pseudo-labelled batch joined by a batch of the
  server's labelled images (one loss);
* **control**: ``train_labelled`` on the server's labels alone, for the same number of steps, the
  same labelled batch size and the same learning rate.

Over four seeds the pseudo run must beat the control on the foggy test split by >= 0.02 mAP50 on
average. Why four: the figures repeat exactly on one machine, but a 90-step run turns the
last-bit differences between CPUs' kernels into different endpoints. With the same code the
warm-up scored clear/foggy 0.563/0.190, 0.619/0.117 and 0.575/0.203 on three machines, and two
seeds gave a mean gain of +0.064 on the first and +0.018 on the second (-0.034 and +0.070: one
control run drew lucky). On the third, eight seeds gave +0.010 +0.093 +0.007 +0.077 +0.166
+0.057 +0.068 +0.068 (mean +0.068, none negative; 2026-12-02): the pseudo arm is steady
(0.23-0.30), the labelled-only control is what swings (0.10-0.24), so the test takes the mean
of four rather than hang on one control run. Settings, and why (measured on this data, 2026-11-30):

* lr 0.002 for both arms (a fine-tuning rate; the warm-up uses 0.01): at 0.01 the endpoint of a
  90-step run swings so much that the control alone scored foggy 0.105 and 0.393 for two seeds,
  drowning any effect either way;
* ``tau_high`` 0.4, not the paper's 0.6: the anchor-free head's scores are IoU-aware class scores
  (no objectness factor) and after a short warm-up they rarely pass 0.6 on fog (reliable-box
  recall 0.01 at 0.6);
* no minimum-box filter: every foggy image passes through the student, so its BatchNorm
  statistics see fog (with the filter, 80% of the images were skipped).

True labels of the unlabelled images serve only the printed precision/recall.
"""

import time

import numpy as np
import pytest
import torch

from detection.federation import build_federation
from detection.manifest_reader import Federation
from detection.metrics import evaluate_records
from detection.model import build_model, get_state, set_state
from detection.semi import SemiConfig, train_unlabelled
from detection.synthetic import write_synthetic_dataset
from detection.train import TrainConfig, train_labelled
from detection.yolo import read_yolo_dataset

IMGSZ = 128
WARMUP_EPOCHS = 20
STEPS = 90
LR = 0.002
SHIFT = "foggy"
SEEDS = (1, 2, 3, 4)


@pytest.mark.slow
def test_pseudo_labels_beat_labelled_only_control_on_shifted_domain(tmp_path, record_measurement):
    torch.set_num_threads(2)
    torch.manual_seed(0)  # the model's initial weights: the same warm-up wherever the test runs in the suite
    start = time.perf_counter()
    data = write_synthetic_dataset(tmp_path / "synth", num_images=1600, imgsz=IMGSZ, seed=0, progress=False)
    records, names, _ = read_yolo_dataset(data)
    fed = Federation.load(build_federation(records, names, tmp_path / "fed", domain_rule="weather",
                                           weathers=["rainy", "snowy", SHIFT], num_clients=3, server_fraction=0.3,
                                           test_fraction=0.25, seed=0, progress=False))
    client = next(c for c in range(fed.num_clients) if fed.client_domain(c) == SHIFT)
    server, unlabelled, hidden = fed.server_records(), fed.client_images(client), fed.client_hidden_records(client)
    tests = fed.test_records()

    model = build_model("yolo11n.yaml", len(names), names)
    train = TrainConfig(imgsz=IMGSZ, batch_size=16, augment="strong", scale=0.25)
    opt = None
    for epoch in range(WARMUP_EPOCHS):
        _, opt = train_labelled(model, server, train.replace(warmup_steps=30 if epoch == 0 else 0),
                                optimizer_state=opt, seed_parts=(epoch,))
    warm = get_state(model)
    warm_clear = evaluate_records(model, tests["clear"], IMGSZ)["map50"]
    warm_shift = evaluate_records(model, tests[SHIFT], IMGSZ)["map50"]
    print(f"\nwarm-up: clear mAP50 {warm_clear:.3f}, {SHIFT} {warm_shift:.3f} ({time.perf_counter() - start:.0f}s); "
          f"{len(server)} labelled, {len(unlabelled)} unlabelled {SHIFT}, {len(tests[SHIFT])} {SHIFT} test images")
    assert warm_clear >= 0.25

    gains, lines = [], []
    semi = SemiConfig(train=TrainConfig(imgsz=IMGSZ, batch_size=16, max_steps=STEPS, lr=LR), ema_decay=0.999,
                      tau_high=0.4, pseudo_mode="ignore")
    for seed in SEEDS:
        set_state(model, warm)
        semi.train.seed = seed
        stats = train_unlabelled(model, unlabelled, semi, hidden_records=hidden, labelled=server, seed_parts=(seed,))
        pseudo = evaluate_records(model, tests[SHIFT], IMGSZ)["map50"]

        set_state(model, warm)
        train_labelled(model, server, train.replace(max_steps=STEPS, seed=seed, lr=LR), seed_parts=(seed,))
        control = evaluate_records(model, tests[SHIFT], IMGSZ)["map50"]
        gains.append(pseudo - control)
        x = stats.extra
        lines.append(f"seed {seed}: {SHIFT} mAP50 pseudo {pseudo:.3f} vs control {control:.3f} ({pseudo - control:+.3f}); "
                     f"reliable pseudo boxes {x['pseudo_reliable']:.0f} precision {x['pseudo_reliable_precision']:.2f} "
                     f"recall {x['pseudo_reliable_recall']:.2f}, uncertain precision {x['pseudo_uncertain_precision']:.2f}, "
                     f"{x['images_skipped']:.0f} unlabelled images skipped")
        print(lines[-1])
    summary = (f"centralised semi-supervised check: mean {SHIFT} mAP50 gain {np.mean(gains):+.3f} over {len(SEEDS)} seeds "
               f"(warm-up clear {warm_clear:.3f}, {SHIFT} {warm_shift:.3f}; {time.perf_counter() - start:.0f}s)")
    print(summary)
    for line in [summary, *lines]:
        record_measurement(line)
    assert np.mean(gains) >= 0.02
