"""
Tests of report.py: on a real sweep run made here (a paper row at context 32 on the toy vocabulary, CPU) with the
authors' logs from ../shared when present, the CSV's minimum equals the metrics.jsonl minimum and the run is set
beside the paper's row without a comparison (other vocabulary, context, batch, tokens); on run directories written
here without training (a checkpoint holding only a config), only a run trained as the paper's is compared, an ordinary
train.py run gets its table row and curve, a damaged run is named and left out, NaN evaluations are left out of the
minimum, and an unusable --out_dir is one line.
"""

import csv
import json
import math
import os

import pytest
import torch

import report
import train
from checkpoints import CHECKPOINT_FILE
from sweep import ABLATION_ROWS, PAPER_ROWS, PAPER_STEPS, row_flags
from test_sweep import PAPER_LOGS, TABLE, run_sweep

needs_logs = pytest.mark.skipif(not PAPER_LOGS.is_file(), reason=f"the authors' logs are not at {PAPER_LOGS}")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("report")
    done = run_sweep(root / "runs", data_dir, 4, only="^d64_L4_transformer$")
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "runs"


def metrics_val_losses(runs):
    (path,) = runs.glob("*/*/metrics.jsonl")
    return [r["val/loss"] for r in map(json.loads, path.read_text().splitlines()) if "val/loss" in r]


def read_summary(out):
    with open(out / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.SUMMARY_COLUMNS
        return {r["run"]: r for r in reader}


def make_run(run_dir, losses, eval_interval=PAPER_STEPS // 2, **changes):
    """A run directory as train.py leaves it, without training: metrics.jsonl with evaluations of these losses every
    eval_interval steps, and a checkpoint that holds no weights, only the config of the paper's row d=64, L=4,
    Transformer trained as sweep.py trains it (the paper's settings, 4,391,168 parameters), with `changes`."""
    run_dir.mkdir(parents=True)
    args, _ = train.parse_args(row_flags(PAPER_ROWS[0], PAPER_STEPS, 1))
    config = dict(vars(args), dtype="bfloat16", n_params=TABLE[0][5])
    config.update(changes)
    tokens_per_step = config["batch_size"] * config["gradient_accumulation_steps"] * config["max_seq_len"]
    torch.save({"model": {}, "model_args": {}, "config": config}, run_dir / CHECKPOINT_FILE)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses):
            step = i * eval_interval
            f.write(json.dumps({"iter": step, "tokens": step * tokens_per_step, "train/loss": loss, "val/loss": loss,
                                "val/perplexity": math.exp(loss)}) + "\n")
            f.write(json.dumps({"iter": step, "train/step_loss": loss}) + "\n")
    return run_dir


def make_paper_logs(path, loss):
    """The authors' run_histories.csv for one run of the row d=64, L=4, Transformer, at the paper's settings."""
    columns = ["name", "iter", "tokens", "val/loss", "val/perplexity", "max_seq_len", "learning_rate",
               "use_cosine_sched", "batch_size", "gradient_accumulation_steps", "d_model", "n_layers", "sa", "rca",
               "symbol_type", "rca_type", "symmetric_rels", "trainable_symbols", "n_params"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for step, value in ((0, 10.5), (PAPER_STEPS // 2, loss + 0.1), (PAPER_STEPS, loss)):
            w.writerow(["run1", step, step * 131072, value, math.exp(value), 512, 0.001, False, 128, 2, 64, 4, 8, 0,
                        "", "", False, "", TABLE[0][5]])
    return path


# -----------------------------------------------------------------------------
# a real sweep run

@pytest.mark.parametrize("with_logs", [False, pytest.param(True, marks=needs_logs)])
def test_summary_has_the_runs_minimum_and_sets_it_beside_the_paper_without_comparing(runs, tmp_path, with_logs):
    out = tmp_path / "report"
    argv = ["--runs", str(runs), "--out_dir", str(out)] + (["--paper_logs", str(PAPER_LOGS)] if with_logs else [])
    assert report.main(argv) == 0
    (row,) = read_summary(out).values()
    losses = metrics_val_losses(runs)
    assert float(row["min_val_loss"]) == min(losses) and float(row["last_val_loss"]) == losses[-1]
    assert float(row["min_val_perplexity"]) == pytest.approx(math.exp(min(losses)), rel=1e-12)
    assert (row["kind"], row["d_model"], row["n_layers"], row["sa"], row["ra"], row["arch"], row["steps"],
            row["tokens"], row["vocab_size"], row["max_seq_len"], row["batch_sequences"]) == \
        ("Transformer", "64", "4", "8", "0", "paper", "4", str(4 * 2 * 4 * 32), "300", "32", "8")
    why = ("vocabulary 300 (paper: 32,000); context 32 (paper: 512); batch 8 (paper: 256); tokens 1,024 (paper: "
           "13,107,200,000)")
    assert row["paper_comparison"].startswith("not comparable: " + why)
    assert row["paper_val_loss"] == row["paper_val_perplexity"] == ""  # the toy run is not compared
    md = (out / "summary.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith("| 64 | 4 | Transformer 8/0 |"))
    assert line.startswith(f"| 64 | 4 | Transformer 8/0 |  |  | 300 | 32 | 8 | 1,024 | {int(row['n_params']):,} | ")
    assert f"| {min(losses):.4f} |" in line and f"| no: {why}" in line
    # no curve of ours beside the paper's (trained otherwise), so the paper's figures only with its logs
    figures = ["runs.png"] + (["val_loss.png", "ablation_symbol_type.png", "ablation_symmetry.png",
                               "ablation_ra_type.png", "ablation_frozen_symbols.png"] if with_logs else [])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(figures)
    assert all((out / name).read_bytes()[:8] == PNG for name in figures)
    if with_logs:  # the paper's row d=64, L=4, Transformer: minimum over its logged evaluations, and no Δ
        assert line.count("| 4,391,168 | ") == 1 and line.count("| 1.7752 | — |") == 1 and line.count("5.903") == 1


@needs_logs
def test_the_papers_numbers_are_its_table():
    lines = report.lines_by_row([], report.read_paper_logs(PAPER_LOGS))
    assert [(round(lines[r].paper_loss, 4), round(lines[r].paper_perplexity, 3)) for r in PAPER_ROWS] == \
        [t[6:] for t in TABLE]
    assert [lines[r].paper_params for r in PAPER_ROWS] == [t[5] for t in TABLE]
    assert all(lines[r].paper_curve is not None for r in PAPER_ROWS + ABLATION_ROWS)


# -----------------------------------------------------------------------------
# runs written here

def test_only_a_run_trained_as_the_papers_runs_is_compared_with_them(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs / "paper_settings", [10.0, 2.0, 1.70])
    # sweep.py paper --only ... -- --vocab_size 512 --max_seq_len 64: a lower loss, on an easier task
    make_run(runs / "small_vocabulary", [6.0, 1.5, 1.00], vocab_size=512, max_seq_len=64, n_params=4_000_000)
    make_run(runs / "shorter", [10.0, 2.5], eval_interval=1000)  # 1,000 steps: plotted beside the paper's, no Δ
    logs = make_paper_logs(tmp_path / "logs.csv", 1.7752)
    out = tmp_path / "report"
    assert report.main(["--runs", str(runs), "--paper_logs", str(logs), "--out_dir", str(out)]) == 0
    summary = read_summary(out)
    paper = summary["paper_settings"]
    assert (paper["paper_comparison"], paper["paper_val_loss"], paper["paper_n_params"]) == \
        ("comparable", "1.7752", "4391168")
    small = summary["small_vocabulary"]
    assert (small["vocab_size"], small["max_seq_len"], small["paper_val_loss"]) == ("512", "64", "")
    assert small["paper_comparison"] == (
        "not comparable: vocabulary 512 (paper: 32,000); context 64 (paper: 512); tokens 1,638,400,000 (paper: "
        "13,107,200,000); parameters 4,000,000 (paper: 4,391,168)")
    assert summary["shorter"]["paper_comparison"] == \
        "not comparable: tokens 131,072,000 (paper: 13,107,200,000)"
    # the paper's table shows the comparable run, with Δ, although another run of the row has a lower loss
    md = (out / "summary.md").read_text()
    (line,) = [x for x in md.splitlines() if x.startswith("| 64 | 4 | Transformer 8/0 |")]
    assert line == ("| 64 | 4 | Transformer 8/0 |  |  | 32,000 | 512 | 256 | 13.1B | 4,391,168 | 4,391,168 | 1.7000 | "
                    f"1.7752 | -0.0752 | {math.exp(1.7):.3f} | {math.exp(1.7752):.3f} | yes |")
    lines = report.lines_by_row(report.find_runs(runs)[0], report.read_paper_logs(logs))
    assert lines[PAPER_ROWS[0]].plotted.val_loss == [10.0, 2.0, 1.70]
    # a row whose only run is shorter: its curve is drawn beside the paper's, its loss not compared
    os.rename(runs / "paper_settings", tmp_path / "aside")
    os.rename(runs / "small_vocabulary", tmp_path / "aside2")
    line = report.lines_by_row(report.find_runs(runs)[0], report.read_paper_logs(logs))[PAPER_ROWS[0]]
    assert line.plotted.val_loss == [10.0, 2.5] and not line.comparable


def test_ordinary_runs_get_their_table_and_loss_curves(trained_run, tmp_path):
    out = tmp_path / "report"
    assert report.main(["--runs", os.path.dirname(trained_run), "--out_dir", str(out)]) == 0
    name = os.path.basename(trained_run)
    (row,) = read_summary(out).values()
    assert (row["run"], row["arch"], row["vocab_size"], row["max_seq_len"], row["batch_sequences"], row["steps"],
            row["paper_comparison"]) == (name, "current", "300", "32", "8", "4",
                                         "not a row of the paper's grid trained with --arch paper")
    md = (out / "summary.md").read_text()
    assert f"| {name} | d=32; L=1; Transformer 4/0 | current | 300 | 32 | 8 |" in md
    assert "Beside the paper" not in md
    assert sorted(p.name for p in out.glob("*.png")) == ["runs.png"]
    assert (out / "runs.png").read_bytes()[:8] == PNG


def truncate(run_dir):
    path = run_dir / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def append(data):
    return lambda run_dir: open(run_dir / "metrics.jsonl", "ab").write(data)


@pytest.mark.parametrize("damage, reason", [
    (truncate, "is not a readable checkpoint"),
    (lambda run_dir: (run_dir / CHECKPOINT_FILE).write_bytes(b""), "is not a readable checkpoint"),
    (lambda run_dir: (run_dir / CHECKPOINT_FILE).write_text("not a checkpoint\n"), "is not a readable checkpoint"),
    (append(b'{"iter": 9, "val/loss": 1.0\xff}\n'), "line 7 of metrics.jsonl is not UTF-8 text"),
    (append(b"5\n"), "line 7 of metrics.jsonl is not a record: 5"),
    (append(b'{"iter": 9, "val/loss": 1.0, "val/perplexity": 2.7}\n'),
     "line 7 of metrics.jsonl is an evaluation without tokens"),
], ids=["truncated_checkpoint", "empty_checkpoint", "text_checkpoint", "non_utf8_metrics", "bare_number_line",
        "evaluation_without_tokens"])
def test_a_damaged_run_is_named_and_left_out_and_the_others_are_reported(tmp_path, capsys, damage, reason):
    runs = tmp_path / "runs"
    make_run(runs / "good", [10.0, 2.0, 1.7])
    damage(make_run(runs / "bad", [10.0, 2.0, 1.7]))
    out = tmp_path / "report"
    assert report.main(["--runs", str(runs), "--out_dir", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    (skipped,) = [x for x in printed.out.splitlines() if x.startswith("skipped")]
    assert skipped.startswith("skipped bad: ") and reason in skipped
    assert list(read_summary(out)) == ["good"]
    assert f"- bad: {skipped[len('skipped bad: '):]}" in (out / "summary.md").read_text()


@pytest.mark.parametrize("where", ["a_file", "under_a_file", "read_only"])
def test_an_unusable_out_dir_is_one_line(tmp_path, capsys, where):
    make_run(tmp_path / "runs" / "good", [10.0, 2.0])
    (tmp_path / "file").write_text("x")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere, but not in /sys
        read_only = "/sys"
    out = {"a_file": tmp_path / "file", "under_a_file": tmp_path / "file" / "report", "read_only": read_only}[where]
    assert report.main(["--runs", str(tmp_path / "runs"), "--out_dir", str(out)]) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out_dir {out}: ") and err.count("\n") == 1


def test_nan_evaluations_are_left_out_of_the_minimum_and_noted(tmp_path):
    make_run(tmp_path / "runs" / "nan_first", [math.nan, 3.0, 2.5, math.nan])
    out = tmp_path / "report"
    assert report.main(["--runs", str(tmp_path / "runs"), "--out_dir", str(out)]) == 0
    row = read_summary(out)["nan_first"]
    assert (row["min_val_loss"], row["min_val_perplexity"], row["last_val_loss"], row["nonfinite_evals"]) == \
        ("2.5", str(math.exp(2.5)), "nan", "2")
    md = (out / "summary.md").read_text()
    assert "| 2.5000 | nan | 12.182 | 2 of 4 evaluations NaN or infinite (left out of the minimum) |" in md


def test_a_resumed_run_replaces_the_evaluations_it_replays(tmp_path):
    # evaluations at 0, 3, 6 (killed after 6, checkpoint of 3), then the resumed run evaluates 3 and 6 again
    steps = [0, 3, 6, 3, 6, 9]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iter": s, "tokens": 8 * s, "val/loss": 10.0 - i, "val/perplexity": 1.0}) +
                            "\n" + json.dumps({"iter": s, "train/step_loss": 1.0}) + "\n"
                            for i, s in enumerate(steps)) + '{"iter": 10, "val/lo')  # a line cut short by a crash
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


def test_an_eval_only_record_does_not_cut_the_training_curve(tmp_path):
    """train.py --eval_only appends an evaluation at the checkpoint's step, which may be earlier than the last
    evaluation of the training: it is not taken for a resume."""
    path = tmp_path / "metrics.jsonl"
    records = [dict(iter=i, tokens=100 * i, **{"val/loss": 5.0 - i / 10, "val/perplexity": 1.0}) for i in (0, 10, 20)]
    records.append({"iter": 10, "tokens": 1000, "val/loss": 4.0, "val/perplexity": 1.0, "eval_only": True})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [r["iter"] for r in report.read_evals(path)] == [0, 10, 20]
