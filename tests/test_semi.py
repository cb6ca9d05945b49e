"""train_unlabelled: frozen groups, EMA teacher reset and movement, minimum-box filter, diagnostics."""

import pytest
import torch

from detection.ema import EmaTeacher
from detection.manifest_reader import Federation
from detection.model import build_model, get_state, select_keys
from detection.semi import SemiConfig, train_unlabelled
from detection.train import TrainConfig

IMGSZ = 64


@pytest.fixture(scope="module")
def client_data(weather_federation):
    fed = Federation.load(weather_federation)
    return fed, fed.client_images(0)[:16], fed.client_hidden_records(0)[:16]


def semi_cfg(**train):
    # tau_low/nms_conf 0 so an untrained model still yields pseudo boxes to learn from
    return SemiConfig(train=TrainConfig(imgsz=IMGSZ, batch_size=8, max_steps=2, **train), nms_conf=0.0, tau_low=0.0,
                      tau_high=0.002)


def test_frozen_groups_bit_identical_and_bn_buffers_unchanged(client_data):
    fed, paths, _ = client_data
    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", len(fed.class_names))
    before = get_state(model)
    stats = train_unlabelled(model, paths, semi_cfg(trainable=("backbone",)))
    assert stats.steps == 2 and stats.extra["pseudo_reliable"] > 0
    after = get_state(model)
    frozen = select_keys(model, ["neck", "head"])
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # params and BN running stats alike
    backbone = select_keys(model, ["backbone"])
    assert any(not torch.equal(before[k], after[k]) for k in backbone)


def test_teacher_reset_from_model_and_moves_after_training(client_data):
    fed, paths, hidden = client_data
    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", len(fed.class_names))
    teacher = EmaTeacher(build_model("yolo11n.yaml", len(fed.class_names)), 0.5)  # unrelated weights
    start = get_state(model)
    stats = train_unlabelled(model, paths, semi_cfg(), teacher=teacher, hidden_records=hidden)
    t_state = teacher.model.state_dict()
    # after training the teacher left the round's starting weights, and is not the student either
    w = "model.0.conv.weight"
    assert not torch.equal(t_state[w], start[w])
    assert not torch.equal(t_state[w], model.state_dict()[w])
    # it was reset to the starting weights: one EMA step away from them, towards the student's path
    assert (t_state[w] - start[w]).abs().max() < (model.state_dict()[w] - start[w]).abs().max() + 1e-12
    assert 0.0 <= stats.extra["pseudo_reliable_precision"] <= 1.0
    assert "pseudo_uncertain_recall" in stats.extra


def test_teacher_updated_per_round_stays_the_rounds_starting_model(client_data):
    fed, paths, _ = client_data
    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", len(fed.class_names))
    teacher = EmaTeacher(build_model("yolo11n.yaml", len(fed.class_names)), 0.5)
    start = get_state(model)
    cfg = semi_cfg()
    cfg.ema_update = "round"
    train_unlabelled(model, paths, cfg, teacher=teacher)
    t_state = teacher.model.state_dict()
    assert all(torch.equal(t_state[k], start[k]) for k in start if start[k].is_floating_point())
    assert not torch.equal(model.state_dict()["model.0.conv.weight"], start["model.0.conv.weight"])
    with pytest.raises(ValueError, match="ema update"):
        SemiConfig(ema_update="epoch")


def test_minimum_box_filter_skips_images_without_reliable_boxes(client_data):
    fed, paths, _ = client_data
    model = build_model("yolo11n.yaml", len(fed.class_names))
    before = get_state(model)
    cfg = semi_cfg()
    cfg.min_reliable_boxes = 10_000
    stats = train_unlabelled(model, paths, cfg)
    assert stats.extra["images_skipped"] == 16 and stats.extra["steps_skipped"] == 2 and stats.steps == 0
    after = get_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before if before[k].dtype.is_floating_point)


def test_drop_mode_and_bad_arguments(client_data):
    fed, paths, hidden = client_data
    model = build_model("yolo11n.yaml", len(fed.class_names))
    cfg = semi_cfg()
    cfg.pseudo_mode = "drop"
    cfg.tau_high = 0.9  # nothing reliable from an untrained model: drop mode then has no boxes at all
    stats = train_unlabelled(model, paths, cfg)
    assert stats.extra["pseudo_uncertain"] > 0
    with pytest.raises(ValueError):
        SemiConfig(pseudo_mode="sometimes")
    with pytest.raises(ValueError):
        train_unlabelled(model, [], cfg)
    with pytest.raises(ValueError):
        train_unlabelled(model, paths, cfg, hidden_records=hidden[:3])


def test_labelled_images_mixed_in_train_even_when_every_pseudo_image_is_skipped(client_data):
    fed, paths, _ = client_data
    labelled = fed.server_records()[:8]
    model = build_model("yolo11n.yaml", len(fed.class_names))
    before = get_state(model)
    cfg = semi_cfg()
    cfg.min_reliable_boxes = 10_000  # no unlabelled image qualifies: only the labelled ones train
    stats = train_unlabelled(model, paths, cfg, labelled=labelled)
    assert stats.steps == 2 and stats.extra["images_skipped"] == 16 and stats.extra["labelled_images"] == 16
    after = get_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].dtype.is_floating_point)
