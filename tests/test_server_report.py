"""``results.md``, plots and ``fedsto report`` from run directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main
from server.report import load_run, write_run_report
from server.rundir import RunDir


def fake_run(path: Path, method: str, rainy: float, night: float) -> Path:
    run = RunDir.create(path, {"run_config": {"method": method, "seed": 0, "imgsz": 64}, "server_domain": "clear",
                               "federation": "/x/federation.json", "federation_sizes": {"server": 10}})
    def ev(scale):
        per = {"clear": {"map50": 0.5 * scale, "map50_95": 0.3 * scale}, "rainy": {"map50": rainy * scale, "map50_95": 0.1},
               "night": {"map50": night * scale, "map50_95": 0.1}}
        per["Total"] = {"map50": sum(v["map50"] for v in per.values()) / 3, "map50_95": 0.1}
        return per
    run.append_metrics({"step": 1, "kind": "warmup", "phase": "warmup", "round": 0, "server": {"loss_box_loss": 2.0},
                        "eval": ev(0.5), "elapsed": 10.0})
    row = {"step": 2, "kind": "round", "phase": "phase1", "round": 1, "server": {"loss_box_loss": 1.5}, "eval": ev(1.0),
           "elapsed": 20.0}
    if method != "partial":
        row.update({"bytes_up": 5_000_000, "bytes_down": 10_000_000, "client_losses": {"loss_cls_loss": 1.0},
                    "pseudo": {"reliable_per_image": 2.0, "uncertain_per_image": 1.0, "reliable_precision": 0.8},
                    "personal": {"rainy": {"map50": 0.4, "map50_95": 0.2}, "Total": {"map50": 0.4, "map50_95": 0.2}}})
    run.append_metrics(row)
    run.write_json("teacher_check.json", {"summary": {"server_domain_map50": 0.5, "server_boxes_per_image": 4.0,
                                                      "weak_teacher": False, "clients": {"0": {
                                                          "domain": "rainy", "reliable_per_image": 2.0, "uncertain_per_image": 1.0,
                                                          "true_per_image": 4.0, "reliable_precision": 0.8}}}})
    run.write_result("completed", failures=0)
    return path


def test_run_report_has_table_and_plots(tmp_path):
    path = fake_run(tmp_path / "fedsto", "fedsto", 0.3, 0.2)
    out = write_run_report(path)
    text = out.read_text()
    assert "| method | clear | rainy | night | Total |" in text
    assert "| fedsto | 0.500 / 0.300 | 0.300 / 0.100 | 0.200 / 0.100 |" in text
    assert "mean mAP50 over the shifted (client) domains: fedsto 0.250" in text
    assert "Warm-up quality check" in text and "personalised" in text
    for name in ("map_per_domain", "losses", "pseudo_labels", "communication"):
        assert (path / "plots" / f"{name}.png").stat().st_size > 1000
    assert load_run(path).shifted_mean == pytest.approx(0.25)


def test_report_command_compares_runs(tmp_path, capsys):
    a = fake_run(tmp_path / "a", "partial", 0.1, 0.1)
    b = fake_run(tmp_path / "b", "fedsto", 0.3, 0.2)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp"), "--rebuild"]) == 0
    text = (tmp_path / "cmp" / "results.md").read_text()
    assert "| partial |" in text and "| fedsto |" in text
    assert "partial 0.100, fedsto 0.250" in text
    assert (tmp_path / "cmp" / "comparison_map50.png").exists()
    assert (a / "results.md").exists()
    printed = capsys.readouterr().out
    assert "partial" in printed and "fedsto" in printed
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_tables_keep_their_natural_width_when_stdout_is_not_a_terminal():
    import io

    from rich.console import Console

    from detection.tables import domain_table, print_table

    cell = {"map50": 0.828, "map50_95": 0.557}
    rows = {"fedsto (personalised)": {d: cell for d in ("clear", "rainy", "snowy", "foggy", "night", "Total")}}
    out = io.StringIO()
    console = Console(file=out, highlight=False)  # a pipe: 80 columns
    assert not console.is_terminal and console.width == 80
    print_table(console, domain_table(rows))
    body = [line for line in out.getvalue().splitlines() if "fedsto" in line]
    assert len(body) == 1 and body[0].count("0.828 / 0.557") == 6 and "(personalised)" in body[0]


def test_a_deployed_run_reports_each_sites_hold_out_not_a_personalised_domain_table(tmp_path):
    """A real server has no client test sets: the sites' own hold-out mAP is its own table, and no
    'personalised' row pretends to be per-domain; with no hidden labels there is no quality panel."""
    import json

    from server import rundir as rd
    from server.report import load_run, run_markdown, write_run_report

    run = rd.RunDir(tmp_path / "deployed")
    run.path.mkdir()
    run.write_json(rd.CONFIG, {"run_config": {"method": "fedsto"}, "server_domain": "clear", "deployed": True})
    rows = [{"step": 1, "kind": "warmup", "eval": {"clear": {"map50": 0.5, "map50_95": 0.3}, "Total": {"map50": 0.5, "map50_95": 0.3}}},
            {"step": 2, "kind": "round", "pseudo": {"reliable_per_image": 1.0, "uncertain_per_image": 0.5},
             "personal": {"rainy": {"map50": 0.4, "map50_95": 0.2}, "Total": {"map50": 0.4, "map50_95": 0.2}},
             "eval": {"clear": {"map50": 0.6, "map50_95": 0.3}, "Total": {"map50": 0.6, "map50_95": 0.3}}}]
    (run.path / rd.METRICS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
    sites = {"client-0": {"broadcast_map50": 0.41, "broadcast_map50_95": 0.2, "personal_map50": 0.45, "personal_map50_95": 0.21}}
    run.write_json(rd.RESULT, {"status": "completed", "sites": sites})
    text = run_markdown(load_run(run.path))
    assert "Personalised client models" not in text
    assert "| client-0 | 0.410 / 0.200 | 0.450 / 0.210 |" in text
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty quality panel used to warn "No artists with labels"
        write_run_report(run.path)
