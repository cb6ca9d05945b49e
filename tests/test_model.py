"""The model bridge: groups from the yaml, full state in and out, freezing, and the exported file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from detection.model import (
    GROUPS,
    ModelError,
    build_model,
    export_ultralytics,
    get_state,
    layer_groups,
    select_keys,
    set_state,
    set_trainable_groups,
)

NC = 3
NAMES = ["car", "person", "sign"]
# One of each family the design names, plus a larger scale (widths and depths change, the
# structure must not).
DETECTION_YAMLS = ["yolo11n.yaml", "yolov8n.yaml", "yolov5nu.yaml", "yolov8s.yaml"]


def layer_index(key: str) -> int:
    """``model.12.cv1.conv.weight`` -> 12."""
    return int(key.split(".")[1])


def is_batchnorm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def seeded_model(seed: int, yaml: str = "yolo11n.yaml"):
    torch.manual_seed(seed)
    return build_model(yaml, NC, NAMES)


def run_train_steps(model, steps: int = 2) -> None:
    """A few SGD steps on random images so weights and BatchNorm statistics leave their defaults."""
    from ultralytics.utils.loss import v8DetectionLoss

    generator = torch.Generator().manual_seed(0)
    batch = {"img": torch.rand(2, 3, 64, 64, generator=generator), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [1.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.3, 0.5]])}
    loss_fn = v8DetectionLoss(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(steps):
        loss, _ = loss_fn(model(batch["img"]), batch)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()


# ------------------------------------------------------------------------------------------
# Groups


@pytest.mark.parametrize("yaml", DETECTION_YAMLS)
def test_every_tensor_is_in_exactly_one_group(yaml):
    model = build_model(yaml, NC, NAMES)
    keys = list(model.state_dict())
    per_group = {g: select_keys(model, [g]) for g in GROUPS}
    assert all(per_group.values()), f"{yaml}: an empty group in {[(g, len(k)) for g, k in per_group.items()]}"
    flat = [k for g in GROUPS for k in per_group[g]]
    assert sorted(flat) == sorted(keys)  # covers everything, and no key twice
    assert select_keys(model, GROUPS) == keys  # state_dict order kept


@pytest.mark.parametrize("yaml", DETECTION_YAMLS)
def test_groups_follow_the_yaml_structure(yaml):
    model = build_model(yaml, NC, NAMES)
    n_backbone = len(model.yaml["backbone"])
    n_layers = len(model.model)
    groups = layer_groups(model)
    assert groups[:n_backbone] == ["backbone"] * n_backbone
    assert groups[-1] == "head" and groups.count("head") == 1
    assert groups[n_backbone:-1] == ["neck"] * (n_layers - n_backbone - 1) and n_layers - n_backbone - 1 > 0
    # The last backbone layer is the module the yaml's backbone ends with (SPPF / C2PSA), and the head
    # is the Detect module the yaml's head section ends with.
    assert type(model.model[n_backbone - 1]).__name__ == model.yaml["backbone"][-1][2]
    assert type(model.model[-1]).__name__ == model.yaml["head"][-1][2] == "Detect"
    assert {layer_index(k) for k in select_keys(model, ["head"])} == {n_layers - 1}
    assert {layer_index(k) for k in select_keys(model, ["backbone"])} == set(range(n_backbone)) - _parameterless(model)


def _parameterless(model) -> set[int]:
    """Layers without tensors (Upsample, Concat) never appear in a state_dict."""
    return {i for i, layer in enumerate(model.model) if not layer.state_dict()}


def test_backbone_keys_include_batchnorm_buffers():
    model = build_model("yolo11n.yaml", NC, NAMES)
    keys = select_keys(model, ["backbone"])
    n_backbone = len(model.yaml["backbone"])
    assert keys == [k for k in model.state_dict() if layer_index(k) < n_backbone]
    assert any(k.endswith("running_mean") for k in keys) and any(k.endswith("num_batches_tracked") for k in keys)
    trainable = {n for n, _ in model.named_parameters()}
    assert {k for k in keys if k in trainable} == {n for n in trainable if layer_index(n) < n_backbone}


def test_unknown_group_is_refused():
    model = build_model("yolo11n.yaml", NC, NAMES)
    with pytest.raises(ValueError, match="unknown parameter groups"):
        select_keys(model, ["backbone", "neck2"])
    with pytest.raises(ValueError, match="unknown parameter groups"):
        set_trainable_groups(model, ["encoder"])


# ------------------------------------------------------------------------------------------
# Building


@pytest.mark.parametrize("yaml", ["yolov10n.yaml", "yolo26n.yaml"])
def test_end_to_end_yamls_are_refused_with_a_clear_message(yaml):
    with pytest.raises(ModelError, match=r"end-to-end.*v5u/v8/11"):
        build_model(yaml, NC, NAMES)


@pytest.mark.parametrize("family", ["v10/yolov10n.yaml", "26/yolo26.yaml"])
def test_end_to_end_heads_are_refused_by_structure_not_only_by_name(tmp_path, family):
    """A user's copy of an end-to-end yaml under another name must be refused too."""
    from ultralytics.utils import ROOT

    custom = tmp_path / "my_detector.yaml"
    custom.write_text((ROOT / "cfg" / "models" / family).read_text())
    with pytest.raises(ModelError, match="end-to-end"):
        build_model(custom, NC, NAMES)


def test_unknown_yaml_and_non_detection_heads_are_model_errors():
    with pytest.raises(ModelError, match="no_such_model.yaml"):
        build_model("no_such_model.yaml", NC, NAMES)
    with pytest.raises(ModelError, match="Segment"):
        build_model("yolov8n-seg.yaml", NC, NAMES)
    with pytest.raises(ModelError, match="2 class names given for 3 classes"):
        build_model("yolo11n.yaml", NC, ["car", "person"])


def test_built_model_is_fp32_unfused_in_train_mode_with_names():
    model = build_model("yolov8n.yaml", NC, NAMES)
    assert model.training and model.names == dict(enumerate(NAMES)) and model.model[-1].nc == NC
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32, torch.int64}
    assert any(is_batchnorm(m) for m in model.modules())  # fusing would have removed them


def test_user_weights_load_matching_tensors(tmp_path):
    trained = seeded_model(1)
    torch.save(get_state(trained), tmp_path / "weights.pt")
    model = build_model("yolo11n.yaml", NC, NAMES, weights=tmp_path / "weights.pt")
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="no tensor matches"):
        build_model("yolo11n.yaml", NC, NAMES, weights=tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------
# Full state in and out


def test_state_round_trip_gives_identical_outputs():
    source = seeded_model(0)
    run_train_steps(source)
    target = seeded_model(1)
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    source.eval(), target.eval()
    with torch.no_grad():
        assert not torch.allclose(source(image)[0], target(image)[0])  # the check below can fail
        set_state(target, get_state(source))
        assert torch.equal(source(image)[0], target(image)[0])
    moved = [k for k in source.state_dict() if k.endswith("running_mean") and source.state_dict()[k].abs().sum() > 0]
    assert moved, "training should have moved BatchNorm statistics"
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_state_is_a_detached_copy():
    model = seeded_model(0)
    state = get_state(model)
    key = next(k for k in state if k.endswith("conv.weight"))
    state[key].add_(1.0)
    assert not torch.equal(state[key], model.state_dict()[key])
    assert all(not v.requires_grad and v.device.type == "cpu" for v in state.values())


def test_averaged_float_counters_cast_back_to_int64():
    model = seeded_model(0)
    run_train_steps(model, steps=3)
    a, b = get_state(model), get_state(seeded_model(1))
    # What weighted averaging produces: every tensor (num_batches_tracked included) as a float.
    averaged = {k: 0.75 * a[k].double() + 0.25 * b[k].double() for k in a}
    set_state(model, averaged)
    counters = [k for k in a if k.endswith("num_batches_tracked")]
    assert counters
    for key in counters:
        assert model.state_dict()[key].dtype == torch.int64
        assert int(model.state_dict()[key]) == int(0.75 * 3)
    weight = next(k for k in a if k.endswith("conv.weight"))
    assert model.state_dict()[weight].dtype == torch.float32
    assert torch.allclose(model.state_dict()[weight], averaged[weight].float())


def test_set_state_refuses_missing_unknown_and_misshaped_tensors():
    model = seeded_model(0)
    state = get_state(model)
    missing = dict(state)
    key = next(iter(missing))
    del missing[key]
    with pytest.raises(KeyError, match="1 missing keys"):
        set_state(model, missing)
    set_state(model, missing, strict=False)  # partial updates (e.g. the backbone only) are allowed
    with pytest.raises(KeyError, match="1 unknown keys"):
        set_state(model, {**state, "model.99.weight": torch.zeros(1)})
    wrong = dict(state)
    head_key = next(k for k in state if k.startswith(f"model.{len(model.model) - 1}.") and k.endswith("weight"))
    wrong[head_key] = torch.zeros(3, 3)
    with pytest.raises(KeyError, match=head_key.replace(".", r"\.")):
        set_state(model, wrong)


def test_backbone_only_update_touches_the_backbone_only():
    model, other = seeded_model(0), seeded_model(1)
    before = get_state(model)
    backbone = select_keys(model, ["backbone"])
    set_state(model, get_state(other, backbone), strict=False)
    after = model.state_dict()
    for key, value in before.items():
        expected = other.state_dict()[key] if key in backbone else value
        assert torch.equal(after[key], expected), key


# ------------------------------------------------------------------------------------------
# Freezing


def test_set_trainable_groups_freezes_the_rest_and_their_batchnorm():
    model = build_model("yolo11n.yaml", NC, NAMES).train()
    trainable = set_trainable_groups(model, ["backbone"])
    groups = layer_groups(model)
    assert trainable and all(groups[layer_index(n)] == "backbone" for n in trainable)
    for name, p in model.named_parameters():
        assert p.requires_grad == (groups[layer_index(name)] == "backbone"), name
    for layer, group in zip(model.model, groups):
        for module in filter(is_batchnorm, layer.modules()):
            assert module.training == (group == "backbone")
    # Unfreezing everything again (the next phase) makes every parameter trainable.
    model.train()
    # The DFL projection is a fixed integral, frozen in every phase (as in Ultralytics' trainer).
    everything = set_trainable_groups(model, GROUPS)
    assert everything == [n for n, _ in model.named_parameters() if ".dfl." not in n]


def test_frozen_groups_do_not_change_while_training():
    model = build_model("yolo11n.yaml", NC, NAMES).train()
    set_trainable_groups(model, ["backbone"])
    before = get_state(model)
    run_train_steps(model, steps=2)
    after = get_state(model)
    frozen = select_keys(model, ["neck", "head"])
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # parameters and BatchNorm buffers
    assert any(not torch.equal(before[k], after[k]) for k in select_keys(model, ["backbone"]))


# ------------------------------------------------------------------------------------------
# Export


CHILD = textwrap.dedent(
    """
    import json, sys
    # The exported file must not need this project: make its packages unimportable.
    for name in ("detection", "server", "client", "strategies"):
        sys.modules[name] = None
    from ultralytics import YOLO

    model_path, image_path, imgsz = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = YOLO(model_path)
    result = model.predict(image_path, imgsz=imgsz, conf=0.05, iou=0.7, device="cpu", verbose=False)[0]
    print(json.dumps({"names": {str(k): v for k, v in result.names.items()},
                      "boxes": result.boxes.xyxy.tolist(), "conf": result.boxes.conf.tolist(),
                      "cls": result.boxes.cls.tolist()}))
    """
)


def test_exported_model_predicts_in_a_process_without_the_project(tmp_path, trained_detector):
    from detection.images import LetterboxCache
    from detection.metrics import NmsConfig, predict_records

    model = trained_detector.model()
    path = export_ultralytics(model, tmp_path / "out" / "model.pt", {"imgsz": trained_detector.imgsz})
    record = max(trained_detector.test, key=lambda r: len(r.classes))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": os.environ["YOLO_CONFIG_DIR"],
           "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), record.path, str(trained_detector.imgsz)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["names"] == {str(i): n for i, n in enumerate(trained_detector.class_names)}

    # Same detections as our own pipeline on the training canvas (a square image at imgsz: no resize,
    # no padding, as Ultralytics' predictor letterboxes it) with its one label per box.
    ours = predict_records(model, [record], trained_detector.imgsz, nms=NmsConfig(conf=0.02, iou=0.7, multi_label=False),
                           cache=LetterboxCache(trained_detector.imgsz))[0]
    ours[:, :4] = ours[:, :4].clip(0, trained_detector.imgsz)  # Ultralytics' predictor clips boxes to the image
    confident = [i for i, c in enumerate(child["conf"]) if c > 0.1]
    assert confident, f"the trained detector should find something in {record.path}: {child}"
    for i in confident:
        distance = np.abs(ours[:, :4] - np.asarray(child["boxes"][i])).max(axis=1)
        j = int(distance.argmin())
        assert distance[j] < 0.5 and ours[j, 5] == child["cls"][i] and abs(ours[j, 4] - child["conf"][i]) < 1e-3, (
            f"child detection {child['boxes'][i]} conf {child['conf'][i]:.3f} cls {child['cls'][i]} has no twin in ours:\n"
            f"{np.array2string(ours, precision=2, suppress_small=True)}")


def test_export_does_not_touch_the_trained_model(tmp_path):
    model = seeded_model(0).train()
    before, flags = get_state(model), [p.requires_grad for p in model.parameters()]
    export_ultralytics(model, tmp_path / "model.pt", {"imgsz": 96})
    assert model.training and [p.requires_grad for p in model.parameters()] == flags and any(flags)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    checkpoint = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)
    assert checkpoint["model"].args["imgsz"] == 96 and checkpoint["fedsto"] == {"imgsz": 96}
    assert not (tmp_path / "model.pt.tmp").exists()
