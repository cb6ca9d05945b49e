"""Orthogonality regulariser: value, gradient, power iteration, conv handling."""

import pytest
import torch

from detection.model import build_model
from detection.orthogonality import (OrthogonalityRegulariser, gram_deviations, spectral_norm_power,
                                     weight_matrices)


def exact_penalty(model, form="srip"):
    return OrthogonalityRegulariser(model, form=form, coefficient=1.0, power_iterations=200).penalty().item()


def test_regulariser_on_yolo11n_neck_and_head_is_finite_has_gradient_and_decreases():
    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", 5)
    reg = OrthogonalityRegulariser(model, groups=("neck", "head"), coefficient=1.0)
    value = reg()
    assert torch.isfinite(value)
    value.backward()
    grads = [c.weight.grad for c in reg.convs if weight_matrices(c)]  # depthwise convs are skipped
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # only neck and head receive gradient
    backbone_grads = [p.grad for n, p in model.named_parameters() if int(n.split(".")[1]) < len(model.yaml["backbone"])]
    assert all(g is None for g in backbone_grads)

    before = exact_penalty(model)
    opt = torch.optim.SGD([c.weight for c in reg.convs], lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        reg().backward()
        opt.step()
    after = exact_penalty(model)
    assert after < before - 0.1, (before, after)


def test_orthogonal_square_matrix_has_zero_penalty_in_both_forms():
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    for form in ("srip", "symmetric"):
        for dev in gram_deviations(q, form):
            assert torch.linalg.matrix_norm(dev, ord=2) < 1e-4


def test_symmetric_form_has_a_constant_term_for_non_square_weights():
    # The larger Gram matrix of a 16 x 72 W has rank <= 16: sigma(large Gram - I) >= 1 whatever W is.
    w = torch.randn(16, 72) * 0.01
    small, large = gram_deviations(w, "symmetric")
    assert torch.linalg.matrix_norm(large, ord=2) >= 1.0 - 1e-5
    assert gram_deviations(w, "srip")[0].shape == (16, 16)


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (64, 64)])
def test_power_iteration_matches_matrix_norm(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    dev = gram_deviations(w)[0]
    v = torch.nn.functional.normalize(torch.randn(dev.shape[0], generator=torch.Generator().manual_seed(3)), dim=0)
    sigma, _ = spectral_norm_power(dev, v, iterations=100)
    exact = torch.linalg.matrix_norm(dev, ord=2)
    assert abs(sigma - exact) / exact < 0.01


def test_persistent_vector_converges_across_calls():
    model = build_model("yolo11n.yaml", 5)
    reg = OrthogonalityRegulariser(model, coefficient=1.0, power_iterations=1)
    values = [reg.penalty().item() for _ in range(30)]
    assert abs(values[-1] - exact_penalty(model)) / exact_penalty(model) < 0.01


def test_grouped_conv_per_group_and_depthwise_skipped():
    grouped = torch.nn.Conv2d(8, 16, 3, groups=2)
    mats = weight_matrices(grouped)
    assert len(mats) == 2 and mats[0].shape == (8, 4 * 9)
    depthwise = torch.nn.Conv2d(8, 8, 3, groups=8)
    assert weight_matrices(depthwise) == []


def test_fixed_dfl_conv_is_not_regularised_and_bad_form_refused():
    model = build_model("yolo11n.yaml", 5)
    reg = OrthogonalityRegulariser(model)
    assert all(c.weight.requires_grad for c in reg.convs)
    with pytest.raises(ValueError, match="form"):
        OrthogonalityRegulariser(model, form="frobenius")


def _update_norms(batch_images: int) -> tuple[float, float]:
    """Norms of one SGD step's parameter change from the detection loss alone and from the regulariser
    alone, as the training loop weighs them (lr 1, no clipping: the first Nesterov step is 1.5x the gradient)."""
    import copy

    import numpy as np
    from ultralytics.utils.loss import v8DetectionLoss

    from detection.images import to_model_batch
    from detection.train import TrainConfig, run_steps

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(16)]
    classes = [np.array([0.0, 1.0]) for _ in images]
    # Large boxes: at initialisation they overlap the predictions enough that Ultralytics' target-score
    # sum exceeds 1; below 1 it is clamped and the "per-image mean" loss becomes a sum over images.
    boxes = [np.array([[0.5, 0.5, 0.8, 0.8], [0.4, 0.5, 0.6, 0.7]], np.float32) for _ in images]
    repeat = batch_images // len(images)  # the same 16 images k times: the per-image loss is unchanged
    torch.manual_seed(0)
    base = build_model("yolo11n.yaml", 2)
    cfg = TrainConfig(imgsz=64, batch_size=batch_images, lr=1.0, momentum=0.5, weight_decay=0.0, max_steps=1,
                      grad_clip=0.0, augment="none")

    def step(regulariser, detection: bool):
        model = copy.deepcopy(base)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss_fn = v8DetectionLoss(model)
        if not detection:  # the regulariser's share alone: a detection loss with no gradient
            loss_fn = (lambda fn: lambda preds, batch: (fn(preds, batch)[0].detach() * 0, {}))(loss_fn)
        make_batch = lambda indices, s: (to_model_batch(images * repeat, classes * repeat, boxes * repeat), {})
        reg = OrthogonalityRegulariser(model, coefficient=1e-3, seed=0) if regulariser else None
        run_steps(model, batch_images, cfg, make_batch, loss_fn, reg)
        return torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters()]).norm().item()

    return step(False, True), step(True, False)


def test_regulariser_weighs_the_same_against_the_detection_loss_at_batch_16_and_64():
    det16, reg16 = _update_norms(16)
    det64, reg64 = _update_norms(64)
    assert det64 == pytest.approx(4 * det16, rel=1e-3)  # Ultralytics' loss is a sum over images
    assert reg16 > 0 and reg64 > 0
    assert reg64 / det64 == pytest.approx(reg16 / det16, rel=1e-3)
