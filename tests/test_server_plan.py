"""The phase plan as data: which steps each method runs, compute matching, evaluation schedule."""

from __future__ import annotations

import pytest

from server.plan import ALL_GROUPS, build_plan, method_phases


def rounds_by_phase(plan):
    out = {}
    for s in plan.steps:
        if s.kind == "round":
            out[s.phase_name] = out.get(s.phase_name, 0) + 1
    return out


def test_fedsto_is_warmup_then_phase1_then_phase2():
    plan = build_plan("fedsto", warmup_epochs=3, phase1_rounds=4, phase2_rounds=5)
    kinds = [s.phase_name for s in plan.steps]
    assert kinds == ["warmup"] * 3 + ["phase1"] * 4 + ["phase2"] * 5
    assert [s.index for s in plan.steps] == list(range(1, 13))
    assert [s.round for s in plan.steps] == [0, 0, 0] + list(range(1, 10))
    p1 = plan.steps[3].phase
    assert p1.client_groups == ("backbone",) and p1.upload_groups == ("backbone",) and not p1.orthogonality
    p2 = plan.steps[-1].phase
    assert p2.client_groups == ALL_GROUPS and p2.upload_groups == ALL_GROUPS and p2.orthogonality


def test_baselines_are_compute_matched_server_epochs():
    fedsto = build_plan("fedsto", 10, 4, 6)
    for method, labels in (("partial", "server"), ("full", "all")):
        plan = build_plan(method, 10, 4, 6)
        assert plan.labels == labels
        assert not any(s.clients for s in plan.steps)
        # warm-up + one server epoch per FedSTO round, exactly as many as FedSTO's server epochs
        assert sum(s.server_epochs for s in plan.steps) == sum(s.server_epochs for s in fedsto.steps) == 10 + 10
        assert len(plan.steps) == len(fedsto.steps)


def test_ssfl_and_fedsto_st():
    ssfl = build_plan("ssfl", 2, 3, 4)
    assert rounds_by_phase(ssfl) == {"ssfl": 7}
    assert all(not s.orthogonality for s in ssfl.steps)
    assert ssfl.steps[-1].phase.upload_groups == ALL_GROUPS
    st = build_plan("fedsto-st", 2, 3, 4)
    assert rounds_by_phase(st) == {"phase1": 3}


def test_evaluation_schedule_and_resume_position():
    plan = build_plan("fedsto", warmup_epochs=2, phase1_rounds=3, phase2_rounds=2, eval_every=2)
    evaluated = [s.label for s in plan.steps if s.evaluate]
    # end of warm-up (the teacher check needs it), every 2nd round, and the last step
    assert evaluated == ["warm-up epoch 2", "round 2 (phase1 2)", "round 4 (phase2 1)", "round 5 (phase2 2)"]
    assert [s.index for s in plan.remaining(4)] == [5, 6, 7]
    assert plan.remaining(len(plan.steps)) == ()
    assert next(s for s in plan.steps if s.clients).index == 3


def test_zero_length_stages_and_bad_input():
    plan = build_plan("fedsto", 0, 0, 2)
    assert [s.phase_name for s in plan.steps] == ["phase2", "phase2"]
    assert method_phases("fedsto", 0, 0) == []
    with pytest.raises(ValueError, match="unknown method"):
        build_plan("fedprox", 1, 1, 1)
    with pytest.raises(ValueError, match="eval_every"):
        build_plan("fedsto", 1, 1, 1, eval_every=0)


def test_describe_reads_like_the_paper():
    rows = build_plan("fedsto", 50, 100, 150).describe()
    assert [(r[0], r[1]) for r in rows] == [("warmup", 50), ("phase1", 100), ("phase2", 150)]
    assert "backbone" in rows[1][2] and "orthogonality" in rows[2][2]
