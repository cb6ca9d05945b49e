"""FRAug's core (strategies.fraug_modules) and the toy feature-shift comparison (benchmarks.fraug_toy)."""

from __future__ import annotations

import copy
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from strategies.fraug_modules import (EmbeddingGenerator, FRAugSteps, RTNet, augmentation_loss, classification_loss,
                                      generator_loss, mmd, prediction_entropy, rtnet_loss)

ROOT = Path(__file__).resolve().parents[1]
C, D = 6, 16


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


@pytest.fixture
def parts():
    """Seeded generator, RTNet, a feature extractor and a classifier, and one batch through them."""
    torch.manual_seed(0)
    generator, rtnet = EmbeddingGenerator(C, D, noise_dim=8, hidden=32), RTNet(C, D, hidden=32)
    features, head = nn.Sequential(nn.Linear(10, D), nn.ReLU()), nn.Linear(D, C)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 4, 5])
    emb = features(torch.randn(labels.numel(), 10))  # still attached to the feature extractor's graph
    return generator, rtnet, features, head, emb, labels


def test_generator_and_rtnet_shapes():
    g, r = EmbeddingGenerator(C, D), RTNet(C, D)
    labels = torch.tensor([0, 3, 5, 5, 1])
    out = g(labels, torch.Generator().manual_seed(0))
    assert out.shape == (5, D)
    assert r(out, labels).shape == (5, D)
    empty = torch.zeros(0, dtype=torch.long)
    assert g(empty).shape == (0, D) and r(g(empty), empty).shape == (0, D)
    # The noise stream decides the sample: same seed, same embeddings; another seed, others.
    again = g(labels, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and not torch.equal(out, g(labels, torch.Generator().manual_seed(1)))


def test_rtnet_is_the_identity_at_init():
    r = RTNet(C, D)
    emb, labels = torch.randn(7, D), torch.randint(C, (7,))
    assert torch.equal(r(emb, labels), emb)


def test_rtnet_adds_its_residual_to_the_real_embedding():
    torch.manual_seed(0)
    r = RTNet(C, D)
    nn.init.normal_(r.net[-1].weight)  # a non-zero residual
    g, base, labels = torch.randn(5, D), torch.randn(5, D), torch.randint(C, (5,))
    assert torch.allclose(r(g, labels, base) - base, r(g, labels) - g)  # same residual, other base
    assert not torch.allclose(r(g, labels, base), r(g, labels))


def test_generator_loss_subtracts_the_mmd_to_the_real_embeddings(parts):
    generator, _, _, head, emb, labels = parts
    state = torch.Generator().manual_seed(5).get_state()
    noise = torch.Generator()
    noise.set_state(state)
    plain = generator_loss(head, generator, labels, False, noise)
    noise.set_state(state)
    fake = generator(labels, noise)
    noise.set_state(state)
    with_mmd = generator_loss(head, generator, labels, False, noise, real_embeddings=emb, mmd_weight=2.0)
    assert torch.allclose(with_mmd, plain - 2.0 * mmd(fake, emb.detach()))


def test_rtnet_loss_is_mmd_minus_entropy(parts):
    generator, rtnet, _, head, emb, labels = parts
    torch.manual_seed(1)
    nn.init.normal_(rtnet.net[-1].weight, std=0.1)
    state = torch.Generator().manual_seed(7).get_state()
    noise = torch.Generator()
    noise.set_state(state)
    loss = rtnet_loss(head, generator, rtnet, emb, labels, False, mmd_weight=3.0, noise=noise)
    noise.set_state(state)
    out = rtnet(generator(labels, noise), labels, emb.detach())
    expected = 3.0 * mmd(out, emb.detach()) - prediction_entropy(head(out), False)
    assert torch.allclose(loss, expected)
    # Entropy: log C for uniform logits, zero-ish for confident ones; multilabel sums Bernoulli entropies.
    assert torch.allclose(prediction_entropy(torch.zeros(3, C), False), torch.tensor(float(C)).log())
    assert prediction_entropy(torch.eye(C) * 50, False).item() < 1e-6
    assert torch.allclose(prediction_entropy(torch.zeros(3, C), True), C * torch.tensor(2.0).log())


def test_extra_loss_with_real_embeddings_uses_them_and_the_class_means(parts):
    generator, rtnet, features, head, emb, labels = parts
    steps = FRAugSteps(generator, rtnet, lambda_aug=1.0)
    loss = steps.extra_loss(head, labels, emb)
    # Before any class mean exists and with R the identity on its base: the classifier's loss on
    # the real embeddings themselves.
    assert torch.allclose(loss, F.cross_entropy(head(emb.detach()), labels))
    loss.backward()
    assert head.weight.grad is not None and all(p.grad is None for p in features.parameters())
    steps.update_class_means(emb, labels)
    present = sorted(set(labels.tolist()))
    assert steps.class_seen.nonzero().flatten().tolist() == present
    for c in present:
        assert torch.allclose(steps.class_means[c], emb.detach()[labels == c].mean(0))
    assert set(steps._sample_seen(100).tolist()) <= set(present)


def test_generator_step_changes_the_generator_only(parts):
    generator, rtnet, features, head, emb, labels = parts
    steps = FRAugSteps(generator, rtnet, lr=1e-2)
    g0, r0, h0 = _params(generator), _params(rtnet), _params(head)
    loss = generator_loss(head, generator, steps.sample_labels(labels), multilabel=False, noise=steps.noise)
    steps._step(loss, generator, steps.generator_optimizer)
    assert not _same(generator, g0)
    assert _same(rtnet, r0) and _same(head, h0)
    assert all(p.grad is None for p in head.parameters())


def test_rtnet_step_changes_the_rtnet_only(parts):
    generator, rtnet, features, head, emb, labels = parts
    steps = FRAugSteps(generator, rtnet, lr=1e-2)
    g0, r0, h0, f0 = _params(generator), _params(rtnet), _params(head), _params(features)
    loss = rtnet_loss(head, generator, rtnet, emb, labels, multilabel=False, noise=steps.noise)
    steps._step(loss, rtnet, steps.rtnet_optimizer)
    assert not _same(rtnet, r0)
    assert _same(generator, g0) and _same(head, h0) and _same(features, f0)
    assert all(p.grad is None for p in [*head.parameters(), *features.parameters(), *generator.parameters()])


@pytest.mark.parametrize("multilabel", [False, True])
def test_after_step_never_touches_the_model_or_its_optimiser(parts, multilabel):
    generator, rtnet, features, head, emb, labels = parts
    steps = FRAugSteps(generator, rtnet, lr=1e-2, multilabel=multilabel)
    model_opt = torch.optim.SGD([*features.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    g0, r0, h0, f0 = _params(generator), _params(rtnet), _params(head), _params(features)
    logs = steps.after_step(head, emb, labels)
    assert set(logs) == {"generator_loss", "rtnet_loss", "rtnet_mmd", "rtnet_cls"}
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert not _same(generator, g0) and not _same(rtnet, r0)
    assert _same(head, h0) and _same(features, f0)
    assert all(p.grad is None for p in [*head.parameters(), *features.parameters()])
    assert model_opt.state_dict()["state"] == {}  # the model's optimiser was never stepped

    # A gradient the model step left on the classifier survives steps 2 and 3 bit for bit.
    head.weight.grad = torch.ones_like(head.weight)
    steps.after_step(head, emb, labels)
    assert torch.equal(head.weight.grad, torch.ones_like(head.weight)) and head.bias.grad is None


def test_extra_loss_trains_the_classifier_only(parts):
    generator, rtnet, features, head, emb, labels = parts
    steps = FRAugSteps(generator, rtnet, lambda_aug=0.5)
    drawn = steps.sample_labels(labels, 200)
    assert set(drawn.tolist()) <= set(labels.tolist()) and len(set(drawn.tolist())) == len(set(labels.tolist()))
    loss = steps.extra_loss(head, labels)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*generator.parameters(), *rtnet.parameters()])
    # lambda_aug scales the unweighted term (same noise state -> same sample)
    state = steps.noise.get_state()
    y = steps.sample_labels(labels)
    plain = augmentation_loss(head, generator, rtnet, y, False, steps.noise)
    steps.noise.set_state(state)
    assert torch.allclose(steps.extra_loss(head, labels), 0.5 * plain)


def test_empty_batches_give_zero_and_skip(parts):
    generator, rtnet, _, head, _, _ = parts
    steps = FRAugSteps(generator, rtnet)
    empty, g0 = torch.zeros(0, dtype=torch.long), _params(generator)
    assert steps.extra_loss(head, empty).item() == 0.0
    assert steps.after_step(head, torch.zeros(0, D), empty) == {}
    assert _same(generator, g0)
    assert rtnet_loss(head, generator, rtnet, torch.zeros(0, D), empty, False).item() == 0.0
    for multilabel in (False, True):
        assert classification_loss(torch.zeros(0, C, requires_grad=True), empty, multilabel).item() == 0.0


def test_classification_losses():
    logits, labels = torch.randn(5, C), torch.tensor([0, 1, 5, 5, 2])
    assert torch.allclose(classification_loss(logits, labels, False), F.cross_entropy(logits, labels))
    bce = F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, C).float(), reduction="none").sum(1).mean()
    assert torch.allclose(classification_loss(logits, labels, True), bce)


def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift():
    torch.manual_seed(0)
    x = torch.randn(40, D)
    assert mmd(x, x).abs().item() < 1e-5
    assert mmd(x, x.clone(), relative=False).abs().item() < 1e-5
    values = [mmd(x, x + shift).item() for shift in (0.0, 0.5, 2.0)]
    assert values[0] < 1e-5 < values[1] < values[2]
    # Two draws of one distribution sit well below a shifted one.
    assert mmd(x, torch.randn(40, D)).item() < mmd(x, torch.randn(40, D) + 2.0).item()
    assert mmd(torch.zeros(0, D), x).item() == 0.0


def test_state_dict_round_trip(parts):
    generator, rtnet, _, head, emb, labels = parts
    emb = emb.detach()
    a = FRAugSteps(generator, rtnet, lr=1e-2, seed=3)
    for _ in range(3):
        a.after_step(head, emb, labels)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # must be serialisable as is (client checkpoints)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"rtnet", "rtnet_optimizer", "generator_optimizer", "noise", "class_means", "class_seen"}
    assert state["class_seen"].tolist() == [c in labels.tolist() for c in range(C)]

    b = FRAugSteps(copy.deepcopy(generator), RTNet(C, D, hidden=32), lr=1e-2, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(a.rtnet.parameters(), b.rtnet.parameters()))
    assert torch.equal(a.class_means, b.class_means) and torch.equal(a.class_seen, b.class_seen)
    # From here both must evolve identically: RTNet, both Adam moments and the noise were restored.
    la, lb = a.after_step(head, emb, labels), b.after_step(head, emb, labels)
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.generator.parameters(), b.generator.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.rtnet.parameters(), b.rtnet.parameters()))


def test_module_imports_no_flower():
    # Loaded from its file, so the strategies package's __init__ (which does use Flower) is not run.
    path = str(ROOT / "strategies" / "fraug_modules.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fraug_modules', {path!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules), 'flwr was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _toy():
    if str(ROOT) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repository root
        sys.path.insert(0, str(ROOT))
    from benchmarks import fraug_toy

    return fraug_toy


TINY = dict(num_clients=2, per_class=2, test_per_class=2, rounds=2, local_epochs=1, batch_size=8)


def test_run_toy_is_deterministic_and_shares_the_initialisation():
    toy = _toy()
    torch.set_num_threads(1)
    first = toy.run_toy(1, "fraug", **TINY)
    assert first["mean_accuracy"] == toy.run_toy(1, "fraug", **TINY)["mean_accuracy"]
    assert 0.0 <= first["mean_accuracy"] <= 1.0 and len(first["client_accuracy"]) == 2
    # With no augmentation and no rounds both methods hold the same initial model.
    none = dict(TINY, rounds=0)
    assert toy.run_toy(2, "fedavg", **none)["client_accuracy"] == toy.run_toy(2, "fraug", **none)["client_accuracy"]
    with pytest.raises(ValueError):
        toy.run_toy(1, "fedprox", **TINY)
    with pytest.raises(TypeError):
        toy.run_toy(1, "fedavg", wrong=1)


@pytest.mark.slow
def test_fraug_trains_as_well_as_fedavg_on_the_toy_feature_shift(record_measurement):
    """FRAug's core in the paper's own setting; the default schedule, a smaller test set (about 2 min).

    The paper's claim is a gain over FedAvg. On this toy there is none: measured (torch 2.14.1
    CPU, one thread, after FRAug was aligned with the reference code) FRAug 0.8743, FedAvg 0.8743,
    a tie (see benchmarks/fraug_toy.py for the other settings). So this test asserts what holds:
    both learn far above chance (0.1) and FRAug costs at most two points of accuracy; the margin
    is printed in the measurements.
    """
    toy = _toy()
    report = toy.compare([1, 2, 3], threads=1, test_per_class=20)
    s = report["summary"]
    record_measurement(f"fraug toy (test_per_class=20, seeds 1-3): FedAvg {s['fedavg']['mean']:.4f} "
                       f"FRAug {s['fraug']['mean']:.4f} (diff {s['fraug_minus_fedavg']:+.4f})")
    assert s["fedavg"]["mean"] > 0.6 and s["fraug"]["mean"] > 0.6, s
    assert s["fraug"]["mean"] >= s["fedavg"]["mean"] - 0.02, s
