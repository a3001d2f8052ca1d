"""
Tests of runs.py through train.py runs on the toy corpus (toy_runs.py): run names, the run that --init_from resume
continues (and the settings it refuses), one writer per run directory, and the metrics log (metrics.jsonl on a full
disk, W&B offline without credentials).
"""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import runs
import train
from checkpoints import CHECKPOINT_FILE
from toy_runs import (CONSTANT_LR, REPO, TRANSFORMER, args_for, assert_one_line_error, evals, load_ckpt, run_main,
                      run_script, step_losses, the_run_dir)


def test_run_names_are_the_reference_s():
    flags = dict(sa=4, ra=4, d_model=64, n_layers=4, ra_type="relational_attention", symmetric_rels=0,
                 symbol_type="symbolic_attention", pos_enc_type="RoPE", arch="current")
    name, stamp = runs.run_name(Namespace(**flags)).split("__")
    assert name == ("sa=4; ra=4; d=64; L=4; ra_type=relational_attention; sym_rel=False; "
                    "symbol_type=symbolic_attention; pos_enc_type=RoPE")
    assert len(stamp) == len("2024_05_01_12_00_00")
    name = runs.run_name(Namespace(**dict(flags, ra=0, sa=8, arch="paper"))).split("__")[0]
    assert name == "sa=8; d=64; L=4; pos_enc_type=RoPE; arch=paper"


@pytest.mark.parametrize("flags,message", [
    (["--arch", "paper"], "--arch current (this command: paper)"),
    (["--n_layers", "2"], "--n_layers 1 (this command: 2)"),
    (["--max_seq_len", "64"], "--max_seq_len 32 (this command: 64)"),
    (["--learning_rate", "1e-3", "--batch_size", "4"], "--batch_size 8 (this command: 4), --learning_rate 0.01 "
                                                       "(this command: 0.001)"),
], ids=["arch", "n_layers", "max_seq_len", "training"])
def test_resume_refuses_flags_of_another_run(data_dir, tmp_path, capsys, trained_run, flags, message):
    before = Path(trained_run, CHECKPOINT_FILE).read_bytes()
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume",
                                             "--ckpt_path", trained_run, *flags))
    assert code == 2
    assert_one_line_error(err, f"--ckpt_path {trained_run}/{CHECKPOINT_FILE}: the run was trained with other "
                               f"settings: {message}; give the run's flags")
    assert Path(trained_run, CHECKPOINT_FILE).read_bytes() == before


def test_resume_without_recorded_settings_names_model_flags(data_dir, tmp_path, capsys, trained_run):
    """A checkpoint that records no settings (no config.json, no config) is checked on its model: the error names
    the flag (--max_seq_len), not the constructor's argument (max_block_size)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(dict(load_ckpt(trained_run), config=None), run_dir / CHECKPOINT_FILE)
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume",
                                             "--ckpt_path", run_dir, "--max_seq_len", 64))
    assert code == 2
    assert_one_line_error(err, "the flags describe another model than the checkpoint's: --max_seq_len 32 (flags: 64)")
    assert "max_block_size" not in err


def run_dirs(out_dir):
    return {d for d in glob.glob(os.path.join(glob.escape(str(out_dir)), "*")) if os.path.isdir(d)}


def test_resume_continues_the_run_the_command_describes(data_dir, tmp_path, capsys):
    """The issue's reproduction: run A, then run B with other training settings in the same out_dir; A's command
    plus --init_from resume continues A, not the newer B, and says what changed. A command that matches no run, or
    two runs, stops with one line listing them; --ckpt_path picks one."""
    a = args_for(data_dir, tmp_path, TRANSFORMER, "--use_cosine_sched", 0, "--learning_rate", 1e-3, "--max_iters", 4,
                 "--eval_interval", 4)
    assert run_main(capsys, a)[0] == 0
    [run_a] = run_dirs(tmp_path)
    assert run_main(capsys, a + ["--learning_rate", 1e-4, "--batch_size", 4])[0] == 0
    [run_b] = run_dirs(tmp_path) - {run_a}
    b_ckpt = Path(run_b, CHECKPOINT_FILE).read_bytes()

    code, out, _ = run_main(capsys, a + ["--init_from", "resume", "--max_iters", 8, "--ra_type", "rca"])  # (unused)
    assert code == 0
    assert f"resuming from {run_a}/{CHECKPOINT_FILE}\nchanged since the run's last leg: --max_iters 4 -> 8\n" in out
    assert load_ckpt(run_a)["iter_num"] == 8 and Path(run_b, CHECKPOINT_FILE).read_bytes() == b_ckpt
    assert json.loads(Path(run_a, "config.json").read_text())["max_iters"] == 8  # the latest leg

    Path(run_b, "config.json").unlink()  # a run from before config.json: its checkpoint's config is read instead
    code, _, err = run_main(capsys, a + ["--init_from", "resume", "--learning_rate", 5e-4])
    assert code == 2
    assert_one_line_error(err, f"--init_from resume: no run in {tmp_path} has this command's settings: ",
                          f"{run_a} (--learning_rate 0.001 (this command: 0.0005))",
                          f"{run_b} (--batch_size 4 (this command: 8), --learning_rate 0.0001 (this command: 0.0005))",
                          "give the flags of the run to continue")

    assert run_main(capsys, a)[0] == 0  # a second run with A's settings
    code, _, err = run_main(capsys, a + ["--init_from", "resume"])
    assert code == 2
    assert_one_line_error(err, f"--init_from resume: 2 runs in {tmp_path} have this command's settings: ", run_a,
                          "choose one with --ckpt_path DIR")
    code, out, _ = run_main(capsys, a + ["--init_from", "resume", "--ckpt_path", run_a, "--max_iters", 10])
    assert code == 0 and "resumed at step 8" in out and load_ckpt(run_a)["iter_num"] == 10


def test_a_second_process_cannot_write_a_run_in_use(data_dir, tmp_path, trained_run):
    """Two processes resume one run: the second stops at once with one line naming the directory and the first
    one's pid; the first is not disturbed. After kill -9 of the first, the OS has dropped its lock, and the
    checkpoint and metrics it wrote are whole."""
    run_dir = str(shutil.copytree(trained_run, tmp_path / "out" / "run"))
    argv = args_for(data_dir, tmp_path / "out", TRANSFORMER, *CONSTANT_LR, "--init_from", "resume",
                    "--max_iters", 100_000, "--eval_interval", 2, "--always_save_checkpoint", 1)
    first = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("6 | loss"):  # training, with a checkpoint written at step 6
                break
        second = run_script(argv)
        assert first.poll() is None, first.stderr.read()
    finally:
        first.kill()
        first.wait(timeout=60)
    assert second.returncode == 1
    assert_one_line_error(second.stderr, f"the run directory {run_dir} is in use by another process (pid "
                                         f"{first.pid}): wait for it to end, or stop it first")
    assert load_ckpt(run_dir)["iter_num"] >= 6
    assert [r["iter"] for r in evals(run_dir)][:4] == [0, 2, 4, 4]  # whole JSON lines: the first run's, then ours
    with runs.run_lock(run_dir):
        pass


def test_an_unwritable_out_dir_is_one_line(data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path / "file" / "out", TRANSFORMER, "--max_iters", 2))
    assert code == 1
    assert_one_line_error(err, f"cannot create the run directory {tmp_path}/file/out/", "(check --out_dir)")


def test_a_full_disk_stops_with_one_line_and_keeps_the_checkpoint(data_dir, tmp_path, capsys, trained_run):
    """metrics.jsonl is a link to /dev/full: its writes really fail with ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    good = Path(run_dir, CHECKPOINT_FILE).read_bytes()
    Path(run_dir, "metrics.jsonl").unlink()
    os.symlink("/dev/full", Path(run_dir, "metrics.jsonl"))
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume",
                                             "--ckpt_path", run_dir, "--max_iters", 6, "--eval_interval", 2,
                                             "--always_save_checkpoint", 1))
    assert code == 1
    assert_one_line_error(err, f"writing {run_dir}/metrics.jsonl failed (No space left on device): stopped; the "
                               f"checkpoint written last is kept")
    assert Path(run_dir, CHECKPOINT_FILE).read_bytes() == good


def wandb_records(path):
    """The records of a .wandb file: W&B's protobuf Records in its LevelDB-style log (7-byte file header, 32 KiB
    blocks, each chunk: crc32 uint32, length uint16, type uint8 = full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2
    data, records, pending, pos = Path(path).read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_without_credentials_logs_offline(data_dir, tmp_path):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install wandb)")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / "no_netrc"), WANDB_CONFIG_DIR=str(home / "wandb_config"))
    result = subprocess.run([sys.executable, "train.py",
                             *args_for(data_dir, tmp_path / "out", TRANSFORMER, *CONSTANT_LR, "--max_iters", 4,
                                       "--eval_interval", 2, "--log_to_wandb", 1, "--wandb_project", "test-project")],
                            cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("W&B: no credentials")]
    assert len(notes) == 1 and "wandb sync" in notes[0]

    run_dir = the_run_dir(tmp_path / "out")
    [wandb_file] = glob.glob(os.path.join(glob.escape(run_dir), "wandb", "offline-run-*", "*.wandb"))
    records = wandb_records(wandb_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "test-project" and run.display_name == os.path.basename(run_dir)
    assert run.run_id == load_ckpt(run_dir)["wandb_run_id"]  # a resumed run continues this W&B run
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["arch"] == "current" and config["kind"] == "TransformerLM" and config["max_iters"] == 4
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    curves = [h for h in history if "val/loss" in h]
    assert [h["iter"] for h in curves] == [0, 2, 4]
    for key in ("train/loss", "val/loss", "train/perplexity", "val/perplexity", "lr", "tokens"):
        assert all(isinstance(h[key], float | int) for h in curves), key
    assert [h["train/step_loss"] for h in history if "train/step_loss" in h] == \
        [step_losses(run_dir)[i] for i in range(4)]

    [table] = [h for h in history if "Generated Samples/_type" in h]
    assert table["Generated Samples/_type"] == "table-file" and table["Generated Samples/nrows"] == 7
    files = os.path.join(os.path.dirname(wandb_file), "files")
    samples = json.loads(Path(files, table["Generated Samples/path"]).read_text())
    assert samples["columns"] == ["Prompt", "Generated Sample"]
    assert [row[0] for row in samples["data"]] == train.PROMPTS
    printed = result.stdout.split("GENERATED SAMPLES")[1]
    assert all(row[1] in printed for row in samples["data"])

