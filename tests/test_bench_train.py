"""
Tests of bench/train.py and bench/authors.py on CPU, through real processes: train.py's steady-state rate from its
metrics, the authors' implementation from ../shared/reference (skipped without it or without einops), failures
reported in their row.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flags
from bench import train as bench

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
TINY = ["--impls", "fast", "--batch_size", "2", "--max_seq_len", "32", "--steps", "1", "--warmup", "1"]


def run_bench(*argv):
    result = subprocess.run([sys.executable, "-m", "bench.train", *map(str, argv)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    return result


def test_steady_state_is_tokens_over_time_after_the_first_interval():
    records = [dict(iter=0, interval_steps=1, step_ms=5000.0, tokens_per_sec=200.0),  # compilation
               dict(iter=4, interval_steps=4, step_ms=20.0, tokens_per_sec=50_000.0),  # warm-up interval
               dict(iter=8, interval_steps=4, step_ms=10.0, tokens_per_sec=100_000.0),
               {"iter": 9, "val/loss": 1.0},
               dict(iter=12, interval_steps=4, step_ms=30.0, tokens_per_sec=100_000 / 3)]
    rate = bench.steady_state(records, log_interval=4)
    assert rate["tokens_per_s"] == pytest.approx(2 * 4 * 1000 / (4 * 0.010 + 4 * 0.030))  # 1,000 tokens a step
    assert rate["ms_per_step"] == pytest.approx(20.0)
    assert rate["intervals_tokens_per_s"] == [100_000.0, 100_000 / 3]
    assert bench.steady_state(records[:2], log_interval=4) is None


def test_train_py_command_is_train_py_flags_for_the_same_model():
    cfg = bench.resized(bench.CUDA_CONFIGS["dat_d64_L4_posrel"], batch_size=16)
    command = bench.train_py_command(cfg, "DATA", "OUT", "cuda", True, 25)
    args = flags.build_parser().parse_args(command[2:])
    assert (args.sa, args.ra, args.symbol_type, args.d_model, args.n_layers, args.max_seq_len, args.batch_size) == \
        (4, 4, "position_relative", 64, 4, 512, 16)
    assert (args.compile, args.log_to_wandb, args.log_interval, args.max_iters, args.eval_iters) == (1, 0, 25, 126, 1)
    assert args.eval_interval > args.max_iters and args.vocab_size == 32000 and args.gradient_accumulation_steps == 1


def shared_data():
    data = REPO.parent / "shared" / "data"
    if not (data / bench.STORIES).is_file() or not (data / bench.TOKENIZER).is_file():
        pytest.skip(f"needs the real stories and tokenizer in {data}")
    return data


def out_of_memory_authors_code(directory):
    """Modules as bench.authors imports them, whose TransformerLM runs out of memory when built."""
    directory.mkdir()
    (directory / "model_utils.py").write_text("")
    (directory / "relational_attention.py").write_text("")
    (directory / "language_models.py").write_text(
        "import torch\n\n\nclass TransformerLM(torch.nn.Module):\n    def __init__(self, **kwargs):\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 64.00 GiB')\n")
    return directory


def test_bench_reports_train_py_and_the_authors_beside_the_fast_path(tmp_path):
    """One run: our steps, train.py's steady-state rate on the real stories (data built once), and authors' code
    that runs out of memory, reported in its row while the run goes on."""
    shared_data()
    out = tmp_path / "results.json"
    result = run_bench("--configs", "tf_d64_L2", *TINY, "--train_log_interval", 1, "--data_dir", tmp_path / "data",
                       "--authors_code", out_of_memory_authors_code(tmp_path / "theirs"), "--json", out)
    report = json.loads(out.read_text())
    [fast, loop, theirs] = report["rows"]
    assert (fast["impl"], loop["impl"], theirs["impl"]) == ("fast", "train.py", "authors") and "error" not in loop
    assert loop["log_interval"] == 1 and len(loop["intervals_tokens_per_s"]) == 4  # logs at 2..5 of steps 0..5
    assert "--batch_size 2 --vocab_size 32000" in loop["command"] and "--max_seq_len 32" in loop["command"]
    assert theirs["error"] == "out of memory"
    [summary] = report["summary"]
    assert summary["train_py_over_fast"] == pytest.approx(loop["tokens_per_s"] / fast["tokens_per_s"])
    assert summary["fast_over_authors"] is None
    assert "train/fast" in result.stdout and "out of memory" in result.stdout
    assert len(list((tmp_path / "data" / "tok32000").glob("*.bin"))) == 5
    again = run_bench("--prepare_data", "--data_dir", tmp_path / "data")  # built once: nothing to do
    assert "Pretokenized" not in again.stdout


def test_bench_times_the_authors_code(tmp_path):
    if not (REFERENCE / "language_models.py").is_file():
        pytest.skip(f"needs the authors' modules in {REFERENCE}")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("the authors' code needs einops (pip install einops), which this environment lacks")
    out = tmp_path / "results.json"
    run_bench("--configs", "dat_d64_L2_posrel", *TINY, "--train_py", 0, "--authors_code",
              os.path.relpath(REFERENCE, REPO), "--json", out)  # relative to the working directory, as documented
    report = json.loads(out.read_text())
    [ours, theirs] = report["rows"]
    assert theirs["impl"] == "authors" and "error" not in theirs, theirs
    assert theirs["tokens_per_s"] == pytest.approx(2 * 32 * 1000 / theirs["ms_per_step"])
    assert report["summary"][0]["fast_over_authors"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])


def test_authors_code_must_hold_their_modules(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.train", "--train_py", "0", "--authors_code", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and "no language_models.py there" in capsys.readouterr().err.splitlines()[-1]
