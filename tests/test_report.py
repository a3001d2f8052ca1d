"""
Tests of report.py on a real sweep run made here (a paper row at context 32 on a toy vocabulary, CPU), with the
authors' logs from ../shared when present: the CSV's minimum equals the metrics.jsonl minimum, the paper's number is
filled in as the paper's table computes it, and the figures are written.
"""

import csv
import json
import math

import pytest

import report
from sweep import ABLATION_ROWS, PAPER_ROWS
from test_sweep import PAPER_LOGS, TABLE, run_sweep

needs_logs = pytest.mark.skipif(not PAPER_LOGS.is_file(), reason=f"the authors' logs are not at {PAPER_LOGS}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("report")
    done = run_sweep(root / "runs", data_dir, 4, only="^d64_L4_transformer$")
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "runs"


def metrics_val_losses(runs):
    (path,) = runs.glob("*/*/metrics.jsonl")
    return [r["val/loss"] for r in map(json.loads, path.read_text().splitlines()) if "val/loss" in r]


@pytest.mark.parametrize("with_logs", [False, pytest.param(True, marks=needs_logs)])
def test_summary_has_the_runs_minimum_and_the_papers_number(runs, tmp_path, with_logs):
    out = tmp_path / "report"
    argv = ["--runs", str(runs), "--out_dir", str(out)] + (["--paper_logs", str(PAPER_LOGS)] if with_logs else [])
    assert report.main(argv) == 0
    with open(out / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.SUMMARY_COLUMNS
        (row,) = list(reader)
    losses = metrics_val_losses(runs)
    assert float(row["min_val_loss"]) == min(losses) and float(row["last_val_loss"]) == losses[-1]
    assert float(row["min_val_perplexity"]) == pytest.approx(math.exp(min(losses)), rel=1e-12)
    assert (row["kind"], row["d_model"], row["n_layers"], row["sa"], row["ra"], row["arch"], row["steps"],
            row["tokens"]) == ("Transformer", "64", "4", "8", "0", "paper", "4", str(4 * 2 * 4 * 32))
    md = (out / "summary.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith("| 64 | 4 | Transformer 8/0 |"))
    assert f"| {min(losses):.4f} |" in line
    figures = ["val_loss.png"] + (["ablation_symbol_type.png", "ablation_symmetry.png", "ablation_ra_type.png",
                                   "ablation_frozen_symbols.png"] if with_logs else [])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(figures)
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in figures)
    if with_logs:  # the paper's row d=64, L=4, Transformer: minimum over its logged evaluations
        assert (round(float(row["paper_val_loss"]), 4), round(float(row["paper_val_perplexity"]), 3)) == \
            TABLE[0][6:]
        assert line.count("1.7752") == 1 and line.count("5.903") == 1
    else:
        assert row["paper_val_loss"] == row["paper_val_perplexity"] == ""


@needs_logs
def test_the_papers_numbers_are_its_table():
    lines = report.lines_by_row([], report.read_paper_logs(PAPER_LOGS))
    assert [(round(lines[r].paper_loss, 4), round(lines[r].paper_perplexity, 3)) for r in PAPER_ROWS] == \
        [t[6:] for t in TABLE]
    assert all(lines[r].paper_curve is not None for r in PAPER_ROWS + ABLATION_ROWS)


def test_a_resumed_run_replaces_the_evaluations_it_replays(tmp_path):
    # evaluations at 0, 3, 6 (killed after 6, checkpoint of 3), then the resumed run evaluates 3 and 6 again
    steps = [0, 3, 6, 3, 6, 9]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iter": s, "val/loss": 10.0 - i}) + "\n" +
                            json.dumps({"iter": s, "train/step_loss": 1.0}) + "\n" for i, s in enumerate(steps)))
    assert [(r["iter"], r["val/loss"]) for r in report.read_evals(path)] == [(0, 10), (3, 7), (6, 6), (9, 5)]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert report.main(["--runs", str(tmp_path / "missing"), "--out_dir", str(tmp_path)]) == 1
    (tmp_path / "runs").mkdir()
    (tmp_path / "logs.csv").write_text("a,b\n1,2\n")
    assert report.main(["--runs", str(tmp_path / "runs"), "--out_dir", str(tmp_path),
                        "--paper_logs", str(tmp_path / "logs.csv")]) == 1
    assert report.main(["--runs", str(tmp_path / "runs"), "--out_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "not a directory" in err[0] and "not the authors' run_histories.csv" in err[1] and "no run" in err[2]
