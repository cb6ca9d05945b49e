"""Local EMA teacher arithmetic, reset and movement."""

import pytest
import torch

from detection.ema import EmaTeacher, auto_ema_decay, ema_update_, resolve_ema_decay


def test_ema_update_arithmetic_and_counters_copied():
    teacher = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    student = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)}
    ema_update_(teacher, student, 0.75)
    torch.testing.assert_close(teacher["w"], torch.tensor([1.5, 2.5]))
    assert int(teacher["n"]) == 7


def test_auto_decay_half_life_is_a_quarter_of_the_steps():
    d = auto_ema_decay(80)
    assert d ** 20 == pytest.approx(0.5, rel=1e-6)
    assert resolve_ema_decay("auto", 80) == d
    assert resolve_ema_decay(0.999, 10) == 0.999
    assert resolve_ema_decay("0.99", 10) == 0.99
    with pytest.raises(ValueError):
        resolve_ema_decay(1.5, 10)
    with pytest.raises(ValueError):
        resolve_ema_decay("fast", 10)


def test_reset_equals_given_weights_and_update_moves_towards_student():
    student = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    teacher = EmaTeacher(student, decay=0.5)
    other = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    teacher.reset(other)
    for k, v in other.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[k], v)
    teacher.update(student)
    w_t, w_s, w_o = teacher.model[0].weight, student[0].weight, other[0].weight
    torch.testing.assert_close(w_t, 0.5 * w_s + 0.5 * w_o)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_ramp_starts_fast():
    t = EmaTeacher(torch.nn.Linear(2, 2), decay=0.999, ramp=True)
    assert t.current_decay() == pytest.approx(0.1)
