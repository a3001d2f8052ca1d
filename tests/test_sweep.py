"""
Tests of sweep.py: the grid against the paper's table (parameter counts of models built on the meta device, and the
authors' logged counts when ../shared holds their logs), the flags it refuses (its own and their prefixes after `--`,
an out_dir that is a file, run directories trained with other settings), and real train.py runs queued over fake
GPUs on the CPU: each run once, a rerun skips the finished ones, a SIGKILLed run and a SIGTERMed sweep resume, a
SIGKILLed sweep takes its train.py with it, and a task of the Slurm script runs under bash in a path with spaces.
Tiny runs: the toy corpus of toy_runs.py, its 300-piece vocabulary, context 32.
"""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flags
import model as M
import reference as R
import sweep
from toy_runs import VOCAB

REPO = Path(__file__).resolve().parents[1]
PAPER_LOGS = REPO.parent / "shared" / "data" / "paper_logs" / "tiny_stories_run_histories.csv"
TWO_ROWS = "^d64_L4_(transformer|dat4-4_symattn_asym)$"
TRANSFORMER_ROW = "^d64_L4_transformer$"

# the paper's table (README): d, L, model, symbols, relations, parameters, val loss, val perplexity
TABLE = [
    (64, 4, "Transformer 8/0", "", "", 4391168, 1.7752, 5.903),
    (64, 4, "DAT 6/2", "symbolic attention", "asymmetric", 4489920, 1.7398, 5.697),
    (64, 4, "DAT 6/2", "symbolic attention", "symmetric", 4473536, 1.7450, 5.727),
    (64, 4, "DAT 6/2", "position-relative", "asymmetric", 4485824, 1.7677, 5.859),
    (64, 4, "DAT 6/2", "position-relative", "symmetric", 4469440, 1.7771, 5.914),
    (64, 4, "DAT 4/4", "symbolic attention", "asymmetric", 4488256, 1.7294, 5.639),
    (64, 4, "DAT 4/4", "symbolic attention", "symmetric", 4471872, 1.7440, 5.722),
    (64, 4, "DAT 4/4", "position-relative", "asymmetric", 4484160, 1.7644, 5.840),
    (64, 4, "DAT 4/4", "position-relative", "symmetric", 4467776, 1.7854, 5.963),
    (64, 5, "Transformer 8/0", "", "", 4456960, 1.7296, 5.640),
    (64, 5, "DAT 6/2", "symbolic attention", "asymmetric", 4562976, 1.6922, 5.432),
    (64, 5, "DAT 6/2", "symbolic attention", "symmetric", 4542496, 1.7035, 5.495),
    (64, 5, "DAT 6/2", "position-relative", "symmetric", 4538400, 1.7297, 5.640),
    (64, 5, "DAT 4/4", "symbolic attention", "asymmetric", 4560896, 1.6918, 5.431),
    (64, 5, "DAT 4/4", "symbolic attention", "symmetric", 4540416, 1.6985, 5.467),
    (64, 6, "Transformer 8/0", "", "", 4522752, 1.6919, 5.431),
    (64, 6, "DAT 6/2", "symbolic attention", "asymmetric", 4636032, 1.6631, 5.277),
    (64, 6, "DAT 6/2", "symbolic attention", "symmetric", 4611456, 1.6690, 5.308),
    (64, 6, "DAT 6/2", "position-relative", "symmetric", 4607360, 1.6906, 5.424),
    (64, 6, "DAT 4/4", "symbolic attention", "asymmetric", 4633536, 1.6559, 5.239),
    (64, 6, "DAT 4/4", "symbolic attention", "symmetric", 4608960, 1.6681, 5.303),
    (64, 6, "DAT 4/4", "position-relative", "asymmetric", 4629440, 1.6853, 5.395),
    (64, 6, "DAT 4/4", "position-relative", "symmetric", 4604864, 1.7042, 5.498),
    (128, 4, "Transformer 8/0", "", "", 9274624, 1.4308, 4.183),
    (128, 4, "DAT 6/2", "symbolic attention", "asymmetric", 9533568, 1.4120, 4.105),
    (128, 4, "DAT 6/2", "symbolic attention", "symmetric", 9468032, 1.4152, 4.118),
    (128, 4, "DAT 4/4", "symbolic attention", "asymmetric", 9526144, 1.4113, 4.102),
    (128, 4, "DAT 4/4", "symbolic attention", "symmetric", 9460608, 1.4173, 4.127),
    (128, 6, "Transformer 8/0", "", "", 9799936, 1.3529, 3.870),
    (128, 6, "DAT 6/2", "symbolic attention", "asymmetric", 10114560, 1.3396, 3.818),
    (128, 6, "DAT 6/2", "symbolic attention", "symmetric", 10016256, 1.3462, 3.843),
    (128, 6, "DAT 4/4", "symbolic attention", "asymmetric", 10103424, 1.3373, 3.811),
    (128, 6, "DAT 4/4", "symbolic attention", "symmetric", 10005120, 1.3457, 3.843),
]


# -----------------------------------------------------------------------------
# helpers

def tiny_flags(data_dir):
    """train.py flags after `--`: a CPU run of a paper row at context 32 on the toy vocabulary."""
    return ["--device", "cpu", "--max_seq_len", "32", "--batch_size", "4", "--eval_interval", "3", "--eval_iters", "2",
            "--log_interval", "1", "--sample_tokens", "2", "--log_to_wandb", "0", "--vocab_size", str(VOCAB),
            "--data_dir", data_dir]


def sweep_argv(out_dir, data_dir, max_iters, *options, only=TWO_ROWS):
    return [sys.executable, "sweep.py", "paper", "--only", only, "--max_iters", str(max_iters), "--out_dir",
            str(out_dir), *options, "--", *tiny_flags(data_dir)]


def env():
    """One intra-op thread per process (the runs share two cores); `python` on PATH is this interpreter."""
    return dict(os.environ, OMP_NUM_THREADS="1",
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def run_sweep(out_dir, data_dir, max_iters, *options, only=TWO_ROWS):
    return subprocess.run(sweep_argv(out_dir, data_dir, max_iters, *options, only=only), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=240)


def evals(row_dir):
    """[(run directory, [eval records])] of each train.py run under out_dir/<row>."""
    return [(d, [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if '"val/loss"' in line])
            for d in sweep.run_dirs(str(row_dir))]


def last_eval(row_dir):
    """The last step evaluated under out_dir/<row> (-1: none yet)."""
    return max([records[-1]["iter"] for _, records in evals(row_dir) if records], default=-1)


def train_pid(row_dir):
    """The pid of the train.py process writing into row_dir (from /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"train.py") for a in argv) and str(row_dir).encode() in argv:
            return int(pid)
    return None


def alive(pid):
    """Whether the process runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_one_line_error(capsys, *messages):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for message in messages:
        assert message in err, (message, err)


# -----------------------------------------------------------------------------
# the grid

def dry_run(capsys, *argv):
    assert sweep.main(["--dry_run", *argv]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def n_params(argv):
    """Parameters of the model train.py builds for these flags (on the meta device: nothing is allocated)."""
    _, config = flags.parse_args(argv)
    with torch.device("meta"):
        return M.build_model(config).num_params()


def logged_n_params():
    """{Row: n_params} of the authors' logged runs with the paper's settings."""
    counts = {}
    with open(PAPER_LOGS, newline="") as f:
        for r in csv.DictReader(f):
            if r["max_seq_len"] == "512" and float(r["learning_rate"]) == 1e-3 and int(r["d_model"]) <= 128:
                row = sweep.Row.from_flags(dict(
                    d_model=r["d_model"], n_layers=r["n_layers"], sa=r["sa"], ra=r["rca"],
                    symbol_type=R.PAPER_SYMBOL_TYPES.get(r["symbol_type"], r["symbol_type"]),
                    ra_type=R.PAPER_RA_TYPES.get(r["rca_type"], r["rca_type"]),
                    symmetric_rels=int(r["symmetric_rels"] == "True"),
                    trainable_symbols=int(r["trainable_symbols"] != "False")))
                counts.setdefault(row, set()).add(int(r["n_params"]))
    return counts


def test_dry_run_is_the_papers_table_with_its_settings_and_parameter_counts(capsys):
    commands = dry_run(capsys, "paper", "--out_dir", "runs")
    assert len(commands) == 33
    rows = []
    for argv, expected in zip(commands, TABLE):
        assert argv[:2] == ["python", "train.py"]
        args, _ = flags.parse_args(argv[2:])
        row = sweep.Row.from_flags(vars(args))
        assert (row.d_model, row.n_layers, *row.columns) == expected[:5]
        assert n_params(argv[2:]) == expected[5]
        assert (args.arch, args.pos_enc_type, args.max_seq_len, args.batch_size, args.gradient_accumulation_steps,
                args.learning_rate, args.use_cosine_sched, args.max_iters, args.dropout_rate, args.eval_interval,
                args.eval_iters, args.init_from, args.activation) == \
            ("paper", "RoPE", 512, 128, 2, 1e-3, 0, 100_000, 0.1, 2000, 100, "scratch", "swiglu")
        assert args.out_dir == os.path.join("runs", row.name)
        rows.append(row)
    assert len(set(rows)) == 33 and len({r.name for r in rows}) == 33


def test_the_ablations_are_those_of_the_authors_logs(capsys):
    commands = dry_run(capsys, "paper_ablations")
    assert len(commands) == 40
    assert [sweep.Row.from_flags(vars(flags.parse_args(a[2:])[0])) for a in commands[:33]] == sweep.PAPER_ROWS
    ablations = {sweep.Row.from_flags(vars(flags.parse_args(a[2:])[0])): a[2:] for a in commands[33:]}
    assert {(r.ra_type, r.trainable_symbols) for r in ablations} == {("rca", 1), ("relational_attention", 0)}
    if not PAPER_LOGS.is_file():
        pytest.skip(f"the authors' logs are not at {PAPER_LOGS}")
    logged = logged_n_params()
    for row, row_flags in ablations.items():
        assert logged[row] == {n_params(row_flags)}, row.label
    assert {logged[r].pop() for r in sweep.PAPER_ROWS} == {row[5] for row in TABLE}  # the table's counts are logged


def test_options_shape_the_commands(capsys):
    argv = dry_run(capsys, "paper", "--only", "d=128; L=6; DAT 4/4", "--max_iters", "300", "--gpus_per_run", "4",
                   "--", "--compile", "1", "--data_dir", "D")
    assert len(argv) == 2 and all(a[:6] == ["python", "-m", "torch.distributed.run", "--standalone",
                                            "--nproc_per_node=4", "train.py"] for a in argv)
    args, _ = flags.parse_args(argv[0][6:])
    assert (args.d_model, args.n_layers, args.sa, args.ra, args.max_iters, args.compile, args.data_dir) == \
        (128, 6, 4, 4, 300, 1, "D")
    assert args.batch_size * args.gradient_accumulation_steps == 256 and args.gradient_accumulation_steps % 4 == 0


@pytest.mark.parametrize("argv, message", [
    (["paper", "--", "--d_model", "32"], "--d_model is set by each row"),
    (["paper", "--", "--max_iters=5"], "--max_iters is set by sweep.py"),
    (["paper", "--only", "nothing like this"], "matches no run of paper"),
    (["paper", "--only", "("], "not a regular expression"),
    (["paper", "--gpus", "0,a"], "GPU indices"),
    (["paper", "--gpus", "0,1,2", "--gpus_per_run", "2"], "do not split into runs"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert sweep.main(argv) == 2
    assert_one_line_error(capsys, message)


@pytest.mark.parametrize("extra, flag", [(["--max_it", "5"], "--max_iters"), (["--out_d", "X"], "--out_dir"),
                                         (["--d_mod", "64"], "--d_model"), (["--max_it=5"], "--max_iters")])
def test_abbreviations_of_flags_the_sweep_sets_are_refused_after_the_double_dash(capsys, tmp_path, extra, flag):
    assert sweep.main(["paper", "--dry_run", "--out_dir", str(tmp_path), "--", *extra]) == 2
    assert_one_line_error(capsys, f"a prefix of {flag}")


def test_every_other_train_flag_passes_the_double_dash():
    controlled = {f"--{name}" for name in sweep.ROW_FLAGS | sweep.SWEEP_FLAGS}
    for action in flags.build_parser()._actions:
        for flag in set(action.option_strings) - controlled:
            sweep.check_extra([flag, "1"])


def test_train_flags_that_train_py_refuses_are_one_line(capsys, tmp_path):
    assert sweep.main(["paper", "--dry_run", "--out_dir", str(tmp_path), "--", "--no_such_flag", "1"]) == 2
    assert_one_line_error(capsys, "train.py refuses the flags after --", "--no_such_flag")


@pytest.mark.parametrize("mode", [[], ["--slurm"], ["--dry_run"]])
def test_an_out_dir_that_is_a_file_is_one_line_not_a_traceback(capsys, tmp_path, mode):
    (tmp_path / "file").write_text("x")
    assert sweep.main(["paper", "--only", TRANSFORMER_ROW, "--out_dir", str(tmp_path / "file"), *mode]) == 2
    assert_one_line_error(capsys, f"--out_dir {tmp_path / 'file'}: not a directory")


def test_a_rerun_with_other_train_flags_is_refused_instead_of_reported_finished(capsys, tmp_path):
    # out/d64_L4_transformer holds a finished run of `sweep.py paper --max_iters 5 -- --vocab_size 512 --max_seq_len
    # 64`; the same sweep without those flags must not count it as its own
    row = sweep.PAPER_ROWS[0]
    run_dir = tmp_path / "runs" / row.name / "run"
    run_dir.mkdir(parents=True)
    args, _ = flags.parse_args(sweep.row_flags(row, 5, 1) + ["--vocab_size", "512", "--max_seq_len", "64"])
    (run_dir / "config.json").write_text(json.dumps(dict(vars(args), dtype="float32")))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iter": 5, "tokens": 5 * 256 * 64, "val/loss": 5.0}) + "\n")
    argv = ["paper", "--only", TRANSFORMER_ROW, "--max_iters", "5", "--out_dir", str(tmp_path / "runs")]
    for mode in ([], ["--dry_run"], ["--slurm"]):
        assert sweep.main(argv + mode + ["--", "--vocab_size", "300"]) == 2
        assert_one_line_error(capsys, "d64_L4_transformer (--vocab_size 512 (this command: 300), --max_seq_len 64 "
                                      "(this command: 512))")
    assert sweep.main(argv + ["--", "--vocab_size", "512", "--max_seq_len", "64"]) == 0
    assert "1 of 1 runs finished earlier; 0 to run" in capsys.readouterr().out


def test_the_slurm_log_path_with_spaces_is_one_sbatch_argument(tmp_path):
    out = tmp_path / "sweep runs" / "100%"
    assert sweep.main(["paper", "--slurm", "--only", TRANSFORMER_ROW, "--out_dir", str(out)]) == 0
    (line,) = [x for x in (out / "paper.sbatch").read_text().splitlines() if x.startswith("#SBATCH --output")]
    # sbatch splits an #SBATCH line at spaces outside quotes, a backslash escaping the next character (as a POSIX
    # shell does inside double quotes for those that sweep.py escapes), and reads %% in a file name as %
    (argument,) = shlex.split(line[len("#SBATCH"):])
    assert argument == f"--output={str(out).replace('%', '%%')}/slurm-%A_%a.log"


# -----------------------------------------------------------------------------
# real runs

def test_queue_runs_each_once_resumes_killed_and_stopped_runs_and_skips_finished(tmp_path, data_dir):
    out = tmp_path / "sweep runs"
    rows = [out / "d64_L4_transformer", out / "d64_L4_dat4-4_symattn_asym"]

    # two fake GPUs, both runs at once; mid-run, SIGKILL one train.py, then SIGTERM the sweep, which forwards it
    proc = subprocess.Popen(sweep_argv(out, data_dir, 30, "--gpus", "0,1"), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for row in rows:  # each as soon as it has evaluated step 9 (of 30)
            deadline = time.monotonic() + 120
            while last_eval(row) < 9:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.05)
            if row == rows[0]:
                os.kill(train_pid(row), signal.SIGKILL)
    finally:
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert re.search(r"start d64_L4_transformer on GPU 0\b", text)
    assert re.search(r"start d64_L4_dat4-4_symattn_asym on GPU 1\b", text)
    assert "failed d64_L4_transformer (killed by SIGKILL" in text
    assert "stopped d64_L4_dat4-4_symattn_asym (checkpointed" in text
    stopped_at = int(re.findall(r"stopped at step (\d+)", (rows[1] / "train.log").read_text())[-1])
    assert 9 <= stopped_at < 30

    # the rerun (both on one fake GPU) resumes both from their checkpoints and finishes them, in the same directories
    rerun = run_sweep(out, data_dir, 30, "--gpus", "0,0")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "0 of 2 runs finished earlier; 2 to run, 2 at a time" in rerun.stdout
    assert rerun.stdout.count("on GPU 0 (resuming)") == 2
    for row in rows:
        (run_dir, records), = evals(row)
        assert records[-1]["iter"] == 30
        log = (row / "train.log").read_text()
        assert log.count("=== ") == 2 and log.count("resuming from") == 1
        assert int(re.findall(r"resumed at step (\d+)", log)[-1]) >= 6  # the checkpoint of step 6 or later
    assert re.findall(r"resumed at step (\d+)", (rows[1] / "train.log").read_text())[-1] == str(stopped_at)

    # a rerun starts nothing
    finished = {row: (row / "train.log").read_text() for row in rows}
    again = run_sweep(out, data_dir, 30, "--gpus", "0,1")
    assert again.returncode == 0 and "2 of 2 runs finished earlier; 0 to run" in again.stdout
    assert {row: (row / "train.log").read_text() for row in rows} == finished

    # the Slurm script: one array task per run; task 1, run by bash, resumes its row's checkpoint
    wrote = run_sweep(out, data_dir, 30, "--slurm")
    assert wrote.returncode == 0, wrote.stderr
    script = out / "paper.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and "#SBATCH --requeue" in text
    task = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(env(), SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="7"))
    assert task.returncode == 0, task.stdout + task.stderr
    log = (rows[1] / "train.log").read_text()
    assert log.count("resuming from") == 2 and re.findall(r"resumed at step (\d+)", log)[-1] == "30"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigkill_of_the_sweep_stops_its_train_py_which_checkpoints(tmp_path, data_dir):
    row = tmp_path / "runs" / "d64_L4_transformer"
    proc = subprocess.Popen(sweep_argv(tmp_path / "runs", data_dir, 100_000, only=TRANSFORMER_ROW), cwd=REPO,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    try:
        deadline = time.monotonic() + 120
        while last_eval(row) < 0:  # step 0 evaluated: train.py is in its training loop
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pid = train_pid(row)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "train.py outlived the sweep"
    finally:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert re.search(r"stopped at step \d+: continue with --init_from resume", (row / "train.log").read_text())
