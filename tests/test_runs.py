"""
Tests of runs.py through train.py runs on the toy corpus (toy_runs.py): run names, the run that --init_from resume
continues (and the settings it refuses), one writer per run directory, and the metrics log (metrics.jsonl on a full
disk, W&B offline without credentials).
"""

import errno
import glob
import json
import os
import re
import shlex
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


def test_run_names_are_short_and_shell_safe():
    flags = dict(sa=4, ra=4, d_model=64, n_layers=4, ra_type="relational_attention", symmetric_rels=0,
                 symbol_type="symbolic_attention", pos_enc_type="RoPE", arch="current")
    name = runs.run_name(Namespace(**flags))
    assert re.fullmatch(r"dat-sa4-ra4-d64-L4-relattn-symattn-rope-\d{8}-\d{6}", name)
    assert shlex.quote(name) == name and len(name) < 60
    name = runs.run_name(Namespace(**dict(flags, ra_type="disrca", symbol_type="position_relative",
                                          pos_enc_type="pos_emb", symmetric_rels=1, arch="paper")))
    assert name.startswith("dat-sa4-ra4-d64-L4-disrca-posrel-posemb-paper-")  # (symmetric only for relattn)
    name = runs.run_name(Namespace(**dict(flags, symmetric_rels=1)))
    assert name.startswith("dat-sa4-ra4-d64-L4-relattn-symattn-rope-symrel-")
    name = runs.run_name(Namespace(**dict(flags, ra=0, sa=8, symbol_type="NA", ra_type="NA")))
    assert name.startswith("transformer-sa8-d64-L4-rope-")


@pytest.mark.parametrize("name", ["a b", "x;rm", "-rf", ".hidden", "..", "", "é", "a/b", "a" * 101])
def test_run_name_takes_only_shell_safe_names(tmp_path, capsys, name):
    code, _, err = run_main(capsys, [*TRANSFORMER, "--n_layers", 1, "--d_model", 32, "--out_dir", tmp_path,
                                     f"--run_name={name}"])
    assert code == 2
    assert_one_line_error(err, f"--run_name {name!r}: use 1 to 100 letters, digits and -_.=, (not starting with - "
                               f"or .)")
    assert list(tmp_path.iterdir()) == []


def test_run_name_names_a_new_run_and_only_resume_continues_it(data_dir, tmp_path, capsys):
    argv = args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--max_iters", 2, "--eval_interval", 2,
                    "--run_name", "lr1e-2,seed=1337.a_b")
    code, out, _ = run_main(capsys, argv)
    assert code == 0 and f"run directory {tmp_path}/lr1e-2,seed=1337.a_b\n" in out
    run_dir = tmp_path / "lr1e-2,seed=1337.a_b"
    before = Path(run_dir, CHECKPOINT_FILE).read_bytes()
    code, _, err = run_main(capsys, argv)
    assert code == 2
    assert_one_line_error(err, f"--run_name lr1e-2,seed=1337.a_b: the run {run_dir} exists: continue it with "
                               f"--init_from resume, or choose another name")
    assert Path(run_dir, CHECKPOINT_FILE).read_bytes() == before and run_dirs(tmp_path) == {str(run_dir)}
    code, out, _ = run_main(capsys, argv + ["--init_from", "resume", "--max_iters", 4])
    assert code == 0 and "resumed at step 2" in out and load_ckpt(run_dir)["iter_num"] == 4
    code, _, err = run_main(capsys, argv + ["--init_from", "resume", "--ckpt_path", run_dir])
    assert code == 2
    assert_one_line_error(err, "--run_name and --ckpt_path both name a run: give one")


def test_runs_with_the_old_names_still_resume(data_dir, tmp_path, capsys, trained_run):
    """A run directory named as before (spaces, semicolons) is found by its settings and by --ckpt_path."""
    old = tmp_path / "sa=4; d=32; L=1; pos_enc_type=RoPE__2026_12_06_18_20_10"
    shutil.copytree(trained_run, old)
    argv = args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume", "--eval_interval", 2)
    code, out, _ = run_main(capsys, argv + ["--max_iters", 6])
    assert code == 0 and f"resuming from {old}/{CHECKPOINT_FILE}" in out and load_ckpt(old)["iter_num"] == 6
    code, out, _ = run_main(capsys, argv + ["--max_iters", 8, "--ckpt_path", old])
    assert code == 0 and load_ckpt(old)["iter_num"] == 8 and run_dirs(tmp_path) == {str(old)}


def test_sample_lists_the_runs_of_a_folder(data_dir, tmp_path, capsys, trained_run):
    """`sample.py --ckpt_path out` (a folder of runs): their names (quoted where the shell needs it), steps and
    best validation losses, newest first, and exit status 2, instead of 'no checkpoint'."""
    import sample
    new, old = tmp_path / "out" / "new-run", tmp_path / "out" / "sa=4; d=32__2026_12_06_18_20_10"
    shutil.copytree(trained_run, old)
    shutil.copytree(trained_run, new)
    os.utime(Path(old, CHECKPOINT_FILE), (0, 0))
    loss = load_ckpt(trained_run)["best_val_loss"]
    code = sample.main(["--ckpt_path", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and err == ""
    quoted = shlex.quote(old.name)
    assert quoted == f"'{old.name}'"
    assert out.splitlines() == [
        f"{tmp_path / 'out'} holds 2 runs: sample one with --ckpt_path {tmp_path / 'out'}/NAME",
        f"{'NAME':<{len(quoted)}}       STEP    VAL LOSS",
        f"{'new-run':<{len(quoted)}}          4  {loss:10.4f}",
        f"{quoted}          4  {loss:10.4f}"]


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


def test_resuming_a_run_of_ours_prints_no_note_of_unrecorded_flags(data_dir, tmp_path, capsys, trained_run):
    """Our runs record every setting: no `note: the run does not record ...` (which used to list ModelConfig fields
    that are no flags, such as --n_kv_heads_sa), and no change of --run_name."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume",
                                             "--ckpt_path", run_dir, "--max_iters", 6, "--eval_interval", 2))
    assert code == 0 and "resumed at step 4" in out
    assert "does not record" not in out and "n_kv_heads" not in out and "--run_name" not in out
    assert "changed since the run's last leg: --max_iters 4 -> 6, --always_save_checkpoint 1 -> 0\n" in out


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
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path / "file" / "out", TRANSFORMER, *CONSTANT_LR,
                                             "--max_iters", 2))
    assert code == 1
    assert_one_line_error(err, f"cannot create the run directory {tmp_path}/file/out/", "(check --out_dir)")


def test_a_full_disk_stops_with_one_line_and_keeps_the_checkpoint(data_dir, tmp_path, capsys, trained_run,
                                                                   monkeypatch):
    """Every write to metrics.jsonl fails with ENOSPC (as the file system says when the disk is full)."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    good = Path(run_dir, CHECKPOINT_FILE).read_bytes()
    write = os.write

    def full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume",
                                             "--ckpt_path", run_dir, "--max_iters", 6, "--eval_interval", 2,
                                             "--always_save_checkpoint", 1))
    assert code == 1
    assert_one_line_error(err, f"writing {run_dir}/metrics.jsonl failed (No space left on device): stopped; the "
                               f"checkpoint written last is kept")
    assert Path(run_dir, CHECKPOINT_FILE).read_bytes() == good


@pytest.mark.parametrize("planted", [f"{CHECKPOINT_FILE}.tmp", "config.json.tmp", "train.lock", "metrics.jsonl"])
def test_symlinks_planted_in_a_run_directory_are_not_followed(data_dir, tmp_path, capsys, trained_run, planted):
    """`ln -s VICTIM RUN/FILE`, then resume: the victim is untouched. Temporary files are created under fresh names
    (a planted one is left alone and the run goes on); the lock and metrics.jsonl refuse a link with one line."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = Path(run_dir, planted)
    if link.exists():
        link.unlink()
    os.symlink(victim, link)
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume",
                                             "--ckpt_path", run_dir, "--max_iters", 6, "--eval_interval", 2,
                                             "--always_save_checkpoint", 1))
    assert victim.read_text() == "precious\n" and link.is_symlink()
    if planted.endswith(".tmp"):
        assert code == 0, err
        assert load_ckpt(run_dir)["iter_num"] == 6 and evals(run_dir)[-1]["iter"] == 6
        assert glob.glob(os.path.join(glob.escape(str(run_dir)), "*.tmp")) == [str(link)]
    else:
        assert code == 1
        assert_one_line_error(err, f"{link} is a symbolic link: not written through (remove it if it is not yours)")


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

