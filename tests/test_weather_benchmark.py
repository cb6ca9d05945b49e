"""The weather benchmark's bookkeeping: rows, what makes a row stale, and RESULTS.md from recorded results only."""

from __future__ import annotations

import pytest

from benchmarks.weather.report import families, gap_share, seed_pairs, write_report
from benchmarks.weather.rows import ROWS, rows_named


def fake_record(name: str, seed: int, totals: dict[str, float]) -> dict:
    final = {d: {"map50": v, "map50_95": v / 2} for d, v in totals.items()}
    final["Total"] = {"map50": sum(totals.values()) / len(totals), "map50_95": sum(totals.values()) / len(totals) / 2}
    return {"row": name, "seed": seed, "final": final, "wall_seconds": 600.0, "command": f"fedsto run ... {name}",
            "finished": "2026-12-05 21:00", "hardware": {"cpu": "test cpu", "cores": 2},
            "versions": {"torch": "t", "flwr": "f", "ultralytics": "u"}, "ultralytics_val_map50": dict(totals),
            "curve": [{"step": 1, "round": 0, "kind": "warmup", "total_map50": 0.1},
                      {"step": 2, "round": 1, "kind": "round", "total_map50": final["Total"]["map50"]}],
            "teacher_check": None, "pseudo": [], "personal": None}


def test_rows_have_unique_names_and_groups_select_them():
    assert len({r.name for r in ROWS}) == len(ROWS)
    assert [r.name for r in rows_named("priority")] == ["partial", "full", "ssfl", "fedsto"]
    assert {r.seed for r in rows_named("seeds")} == {2, 3}
    with pytest.raises(SystemExit, match="unknown row"):
        rows_named("fedsto,nonsense")


def test_gap_share():
    assert gap_share(0.593, 0.511, 0.605) == pytest.approx(0.872, abs=1e-3)  # the paper's 87%
    assert gap_share(0.5, 0.5, 0.5) is None


def test_results_md_shows_recorded_rows_and_lists_the_rest_as_not_run(weather_federation, tmp_path):
    records = {"partial": fake_record("partial", 1, {"clear": 0.6, "rainy": 0.2, "night": 0.1}),
               "full": fake_record("full", 1, {"clear": 0.7, "rainy": 0.5, "night": 0.4}),
               "fedsto": fake_record("fedsto", 1, {"clear": 0.6, "rainy": 0.4, "night": 0.2}),
               "fedsto-seed2": fake_record("fedsto-seed2", 2, {"clear": 0.6, "rainy": 0.3, "night": 0.3})}
    out = write_report("cpu", records, weather_federation, folder=tmp_path)
    text = out.read_text()
    partial, full = 0.3, 1.6 / 3
    fedsto = (1.2 / 3 + 1.2 / 3) / 2
    fedsto_cells = text.split("| fedsto | 1,2 |")[1].splitlines()[0]
    assert f"{gap_share(fedsto, partial, full):.0%}" in fedsto_cells
    assert "| 0.600 0.350 0.250 |" in fedsto_cells  # val() per domain, mean of the two seeds
    assert "Not all four rows" in text  # ssfl is missing: no ordering verdict
    not_run = text.split("## Not yet run")[1].split("##")[0]
    assert "- ssfl\n" in not_run and "- partial\n" not in not_run and "- fedsto-seed3" in not_run
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "domains.png").stat().st_size > 0


def test_seeds_are_compared_within_a_seed_and_only_where_all_three_rows_ran(weather_federation, tmp_path):
    def rec(name, seed, total):
        return fake_record(name, seed, {"clear": total, "rainy": total, "night": total})

    records = {"partial": rec("partial", 1, 0.30), "ssfl": rec("ssfl", 1, 0.32), "fedsto": rec("fedsto", 1, 0.35),
               "full": rec("full", 1, 0.50),
               "partial-seed2": rec("partial-seed2", 2, 0.20), "ssfl-seed2": rec("ssfl-seed2", 2, 0.19),
               "fedsto-seed2": rec("fedsto-seed2", 2, 0.21),
               "fedsto-seed3": rec("fedsto-seed3", 3, 0.40),  # seed 3 has no partial yet: not paired
               "fedsto-st": rec("fedsto-st", 1, 0.40)}
    pairs = seed_pairs(families(records))
    assert list(pairs) == [1, 2]
    assert pairs[2] == pytest.approx({"partial": 0.20, "ssfl": 0.19, "fedsto": 0.21})
    text = write_report("cpu", records, weather_federation, folder=tmp_path).read_text()
    assert "- seed 1: partial 0.300, ssfl 0.320, fedsto 0.350" in text and "partial < ssfl < fedsto holds" in text
    assert "ssfl - partial -0.010, fedsto - partial +0.010; partial < ssfl < fedsto does not hold" in text
    # fedsto - partial: +0.05 and +0.01 -> mean +0.030, sample sd 0.028
    assert "- fedsto - partial over 2 seeds: +0.030 ± 0.028 (above partial in 2 of 2)" in text
    assert "- ssfl - partial over 2 seeds: +0.005 ± 0.021 (above partial in 1 of 2)" in text
    # a seed-1 row is set against partial's seed 1 (0.30), not the seed mean (0.25, which would give 60%)
    assert "| 50% |" in text.split("| fedsto-st | 1 |")[1].splitlines()[0]


def test_rows_of_an_older_configuration_are_reported_apart_and_never_mixed_with_current_ones(weather_federation, tmp_path):
    def rec(name, seed, total):
        return fake_record(name, seed, {"clear": total, "rainy": total, "night": total})

    records = {"partial": rec("partial", 1, 0.30), "full": rec("full", 1, 0.50),  # current
               "partial-seed2": rec("partial-seed2", 2, 0.10), "fedsto": rec("fedsto", 1, 0.45)}  # stale
    text = write_report("cpu", records, weather_federation, folder=tmp_path,
                        stale=frozenset({"partial-seed2", "fedsto"})).read_text()
    current, older = text.split("## Recorded with an older configuration")
    # partial's seed mean leaves out the stale seed 2 (0.20 with it)
    assert "| partial | 1 | 0.300 | 0.300 | 0.300 | 0.300 |" in current
    assert "| fedsto |" not in current and "Not all four rows" in current
    older = older.split("## Agreement")[0]
    # the stale fedsto has no partial or full of its own configuration: no gap share against current rows
    assert "| fedsto | 1 | 0.450 | 0.450 | 0.450 | 0.450 | 0.225 | n/a |" in older
    assert "| partial | 2 | 0.100 |" in older
    assert "- fedsto again: recorded with an older configuration" in text
    assert "- fedsto (older configuration): largest per-domain difference" in text


def test_teacher_sweeps_are_reported_warm_ups_first(weather_federation, tmp_path):
    def sweep(kind, recall):
        at = {"reliable_per_image": 0.5, "true_per_image": 2.0, "precision": 0.8, "recall": recall}
        return {"command": "python -m benchmarks.weather.teacher_sweep ...", "model": f"/m/{kind}.pt", "kind": kind,
                "about": f"the {kind}", "nms_conf": 0.1, "clients": {"foggy (client 0)": {"0.6": at, "0.3": at, "images": 7}}}

    text = write_report("cpu", {"partial": fake_record("partial", 1, {"clear": 0.3, "rainy": 0.2, "night": 0.1})},
                        weather_federation, folder=tmp_path,
                        sweeps={"teacher_sweep-a-model": sweep("model", 0.25), "teacher_sweep-z-warmup": sweep("warm-up", 0.125)}).read_text()
    assert text.index("Teacher sweep `z-warmup`: the warm-up.") < text.index("Teacher sweep `a-model`: the model.")
    assert "| foggy (client 0), 7 | 2.00 | 0.50: 0.80 / 0.125 | 0.50: 0.80 / 0.125 |" in text

    # a sweep measured with another recipe goes to the older section
    old = dict(sweep("warm-up", 0.125), recipe=2)
    text = write_report("cpu", {"partial": fake_record("partial", 1, {"clear": 0.3, "rainy": 0.2, "night": 0.1})},
                        weather_federation, folder=tmp_path, recipe=3,
                        sweeps={"teacher_sweep-new": dict(sweep("warm-up", 0.25), recipe=3),
                                "teacher_sweep-old": old}).read_text()
    current, older = text.split("## Recorded with an older configuration")
    assert "Teacher sweep `new`" in current and "Teacher sweep `old`" not in current
    assert "Teacher sweep `old`" in older.split("## Agreement")[0]


def test_row_commands_carry_the_piece_limit_and_resume(tmp_path):
    from benchmarks.weather.__main__ import fedsto_command
    from benchmarks.weather.rows import ROWS

    fedsto = next(r for r in ROWS if r.name == "fedsto+fedbn")
    fresh = fedsto_command("cpu", fedsto, tmp_path / "federation.json", tmp_path / "out", None, piece_minutes=45)
    assert fresh[fresh.index("--timeout") + 1] == "2700"
    assert fresh[fresh.index("--preset") + 1] == "weather" and fresh[fresh.index("--method") + 1] == "fedsto"
    assert "strategy=fedbn" in fresh and f"federation={tmp_path / 'federation.json'}" in fresh
    resumed = fedsto_command("cpu", fedsto, tmp_path / "federation.json", tmp_path / "out", tmp_path / "out" / "fedsto")
    assert resumed[-2:] == ["--resume", str(tmp_path / "out" / "fedsto")] and "--timeout" not in resumed
    paper = fedsto_command("paper", fedsto, tmp_path / "f.json", tmp_path / "out", None)
    assert paper[paper.index("--gpus-per-client") + 1] == "0.25"
