"""
Tests of evaluation.py through train.py on the toy corpus (toy_runs.py): the evaluation of a checkpoint with its run's
settings (`--eval_only 1 --ckpt_path RUN`, also of the authors' checkpoints and of a run in training), the whole
validation split (--eval_iters 0), and a stop signal during an evaluation (real processes, real signals).
"""

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as R
from checkpoints import CHECKPOINT_FILE
from toy_runs import (CONSTANT_LR, REPO, TRANSFORMER, VOCAB, args_for, assert_one_line_error, evals, load_ckpt,
                      metrics, reference_checkpoint, run_main, run_script, the_run_dir)


def test_eval_only_of_a_fresh_model_writes_nothing(data_dir, tmp_path, capsys):
    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path / "fresh", TRANSFORMER, "--eval_only", 1))
    assert code == 0
    assert "step 0: train loss" in out and "val perplexity" in out
    assert not (tmp_path / "fresh").exists()


def test_eval_only_evaluates_a_checkpoint_with_its_run_s_settings_and_records_it(data_dir, tmp_path, capsys,
                                                                                 trained_run):
    """`--eval_only 1 --ckpt_path RUN` and nothing else: the run's model, data and eval_iters; the numbers of the
    evaluation the checkpoint was written after; one record appended to the run's metrics.jsonl (the checkpoint as
    it was). The resume form with the run's flags evaluates it alike."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    before, records = Path(run_dir, CHECKPOINT_FILE).read_bytes(), metrics(run_dir)
    code, out, err = run_main(capsys, ["--eval_only", 1, "--ckpt_path", run_dir])
    assert code == 0, err
    last = evals(run_dir)[-2]  # the evaluation the checkpoint was written after (step 4)
    assert f"evaluating {run_dir}/{CHECKPOINT_FILE} (step 4)" in out
    assert f"step 4: train loss {last['train/loss']:.4f}, val loss {last['val/loss']:.4f}" in out
    assert f"recorded in {run_dir}/metrics.jsonl" in out and "GENERATED" not in out
    assert metrics(run_dir)[:-1] == records
    record = metrics(run_dir)[-1]
    assert record == dict(iter=4, tokens=4 * 8 * 32, eval_only=True, eval_iters=2, **{
        k: pytest.approx(last[k], rel=1e-6) for k in ("train/loss", "val/loss", "train/perplexity", "val/perplexity")})
    assert Path(run_dir, CHECKPOINT_FILE).read_bytes() == before
    assert not (REPO / "out").exists()

    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path / "unused", TRANSFORMER, *CONSTANT_LR, "--eval_only",
                                             1, "--init_from", "resume", "--ckpt_path", run_dir))
    assert code == 0
    assert f"step 4: train loss {last['train/loss']:.4f}, val loss {last['val/loss']:.4f}" in out
    assert len(metrics(run_dir)) == len(records) + 2 and not (tmp_path / "unused").exists()


def whole_val_loss(model, data_dir, T=32):
    """(mean loss, number of windows) over the windows x = tokens[s:s + T], y = tokens[s + 1:s + T + 1] of the val
    shard for s = 0, T, 2T, ...: every token but the first is a target once."""
    tokens = torch.from_numpy(np.fromfile(Path(data_dir, f"tok{VOCAB}", "data00.bin"), dtype=np.uint16).astype(
        np.int64))
    starts = range(0, len(tokens) - T, T)
    x = torch.stack([tokens[s:s + T] for s in starts])
    y = torch.stack([tokens[s + 1:s + T + 1] for s in starts])
    with torch.no_grad():
        return model(x, y)[1].item(), len(starts)


def test_eval_iters_0_evaluates_every_window_of_the_validation_split_once(data_dir, tmp_path, capsys, trained_run):
    """On the checkpoint file itself (the checkpoint file, not its directory); --data_dir and --device may be given."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    loss, n_windows = whole_val_loss(R.model_from_checkpoint(load_ckpt(run_dir)), data_dir)
    assert n_windows > 8 * 2  # more than the 2 batches of 8 of a training-time evaluation
    code, out, err = run_main(capsys, ["--eval_only", 1, "--ckpt_path", Path(run_dir, CHECKPOINT_FILE),
                                       "--eval_iters", 0, "--data_dir", data_dir, "--device", "cpu"])
    assert code == 0, err
    assert (f"step 4: val loss {loss:.4f}, val perplexity {math.exp(loss):.2f} (the whole validation split: "
            f"{n_windows} windows of 32 tokens)") in out
    record = metrics(run_dir)[-1]
    assert record["val/loss"] == pytest.approx(loss, rel=1e-6) and "train/loss" not in record
    assert (record["iter"], record["eval_only"], record["eval_iters"], record["val/windows"]) == (4, True, 0,
                                                                                                  n_windows)

    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, "--eval_iters", 0))
    assert code == 2
    assert_one_line_error(err, "--eval_iters 0 (the whole validation split) is for --eval_only 1")


def test_eval_only_evaluates_an_authors_checkpoint_file(data_dir, tmp_path, capsys):
    """Their checkpoint records no --arch or --data_dir: the model comes from the checkpoint, the data from
    --data_dir; the record goes next to the file."""
    flags = dict(sa=2, ra=2, symbol_type="symbolic_attention", pos_enc_type="RoPE", ra_type="relational_attention",
                 n_layers=1, d_model=32, max_seq_len=32, vocab_size=VOCAB)
    model = reference_checkpoint(tmp_path / CHECKPOINT_FILE, flags)
    loss, n_windows = whole_val_loss(model, data_dir)
    code, out, err = run_main(capsys, ["--eval_only", 1, "--ckpt_path", tmp_path / CHECKPOINT_FILE, "--data_dir",
                                       data_dir, "--eval_iters", 0])
    assert code == 0, err
    assert f"step 3: val loss {loss:.4f}" in out and f"{n_windows} windows" in out
    assert metrics(tmp_path)[-1]["val/loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics(tmp_path)[-1]["tokens"] == 3 * 8 * 32


def test_eval_only_evaluates_a_hugging_face_directory_without_recording(data_dir, tmp_path, capsys, trained_run):
    """The model of a directory that export.py wrote (its flags from the model's config; the data flags given): the
    numbers of the run it came from; nothing is written there."""
    import export
    hf = tmp_path / "hf"
    assert export.main(["--ckpt_path", trained_run, "--out_dir", str(hf)]) == 0
    files = sorted(os.listdir(hf))
    last = evals(trained_run)[2]  # the evaluation the checkpoint was written after (step 4)
    code, out, err = run_main(capsys, ["--eval_only", 1, "--ckpt_path", hf, "--data_dir", data_dir, "--batch_size",
                                       8, "--eval_iters", 2])
    assert code == 0, err
    assert f"{hf}: train loss {last['train/loss']:.4f}, val loss {last['val/loss']:.4f}" in out
    assert f"(not recorded: {hf} is not a run directory)" in out and sorted(os.listdir(hf)) == files


def test_evaluating_a_run_in_training_appends_safely(data_dir, tmp_path, trained_run):
    """A real training process, and an evaluation of its checkpoint meanwhile: the evaluation takes no lock and
    exits 0; the training goes on undisturbed (its evaluations every 2 steps all arrive, then SIGTERM stops it as
    usual); every line of metrics.jsonl is a whole JSON record, the evaluation's among them."""
    run_dir = str(shutil.copytree(trained_run, tmp_path / "run"))
    argv = args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume", "--ckpt_path", run_dir,
                    "--max_iters", 100_000, "--eval_interval", 2, "--always_save_checkpoint", 1)
    training = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=dict(os.environ,
                                OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in training.stdout:
            if line.startswith("8 | loss"):
                break
        evaluation = run_script(["--eval_only", 1, "--ckpt_path", run_dir])
        assert training.poll() is None, training.stderr.read()
    finally:
        training.send_signal(signal.SIGTERM)
        out, err = training.communicate(timeout=120)
    assert training.returncode == 128 + signal.SIGTERM, err
    assert evaluation.returncode == 0 and "val loss" in evaluation.stdout, evaluation.stderr
    records = metrics(run_dir)  # (json.loads of every line)
    [evaluated] = [r for r in records if r.get("eval_only")]
    assert evaluated["iter"] >= 8 and records.index(evaluated) < len(records) - 1  # training records came after it
    steps = [r["iter"] for r in evals(run_dir) if not r.get("eval_only")]
    assert steps[3:] == list(range(4, steps[-1] + 1, 2)) and steps[-1] > evaluated["iter"]


def test_eval_only_under_torchrun_gives_the_numbers_of_one_process(data_dir, tmp_path, trained_run):
    """3 batches over 2 CPU processes (gloo), for a run trained with --gradient_accumulation_steps 1: the same losses
    as one process, recorded once."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    one = run_script(["--eval_only", 1, "--ckpt_path", run_dir, "--eval_iters", 3])
    assert one.returncode == 0, one.stderr
    two = run_script(["--eval_only", 1, "--ckpt_path", run_dir, "--eval_iters", 3],
                     launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"))
    assert two.returncode == 0, two.stderr
    first, second = [r for r in metrics(run_dir) if r.get("eval_only")]
    assert first == pytest.approx(second, rel=1e-9) and two.stdout.count("recorded in") == 1


# -----------------------------------------------------------------------------
# a stop signal during an evaluation

def stop_while_evaluating(argv, marker, signum):
    """A real train.py process signalled 2 s after it prints a line starting with `marker` (then in an evaluation
    of 2 x 20,000 batches, minutes long): (exit code, seconds from the signal to the exit, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, [*argv, "--eval_iters", 20_000])], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(marker):
                break
        time.sleep(2)
        proc.send_signal(signum)
        signalled = time.monotonic()
        out, err = proc.communicate(timeout=60)
        return proc.returncode, time.monotonic() - signalled, "".join(lines) + out, err
    finally:
        proc.kill()


def test_a_stop_during_an_evaluation_ends_it_within_a_batch(data_dir, tmp_path, trained_run):
    """SIGTERM in the step-0 evaluation of a run: it ends within seconds, as a stop during training does (a
    checkpoint of the state at step 0, exit 143), and logs no evaluation. SIGINT in an --eval_only 1 evaluation:
    exit 130, nothing recorded."""
    argv = args_for(data_dir, tmp_path / "out", TRANSFORMER, "--max_iters", 10, "--eval_interval", 5,
                    "--warmup_iters", 2)
    code, seconds, out, err = stop_while_evaluating(argv, "run directory", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert seconds < 20 and err == ""
    run_dir = the_run_dir(tmp_path / "out")
    assert f"saved checkpoint at step 0 (stopped by SIGTERM) to {run_dir}/{CHECKPOINT_FILE}\n" \
           "stopped at step 0: continue with --init_from resume\n" in out
    assert "train loss" not in out and evals(run_dir) == []
    assert load_ckpt(run_dir)["iter_num"] == 0 and load_ckpt(run_dir)["best_val_loss"] == math.inf

    before = Path(trained_run, "metrics.jsonl").read_bytes()
    code, seconds, out, err = stop_while_evaluating(["--eval_only", 1, "--ckpt_path", trained_run], "evaluating",
                                                    signal.SIGINT)
    assert code == 128 + signal.SIGINT, err
    assert seconds < 20 and err == ""
    assert out.endswith("stopped by SIGINT: the evaluation did not finish, nothing is recorded\n")
    assert Path(trained_run, "metrics.jsonl").read_bytes() == before
