"""
Tests of train.py on CPU with tiny models and the toy corpus of toy_runs.py. Runs go through train.main() in this
process where that is enough, and through real subprocesses where the process boundary is the point: exact resume
in a new process, SIGTERM, torchrun (gloo). Finding the run to resume, the run lock and the metrics log are
tested in test_runs.py; damaged checkpoints in test_checkpoints.py.
"""

import fcntl
import functools
import glob
import json
import math
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import torch

import flags
import reference as R
import train
from loader import EvalBatches, LoaderSettings
from tokenizer import Tokenizer
from checkpoints import CHECKPOINT_FILE
from toy_runs import (CONSTANT_LR, MODELS, REPO, TRANSFORMER, VOCAB, args_for, assert_one_line_error, dat, evals,
                      load_ckpt, metrics, reference_checkpoint, run_main, run_script, step_losses, the_run_dir)


def train_tokens(data_dir):
    return sum(os.path.getsize(p) // 2 for p in sorted(glob.glob(os.path.join(data_dir, f"tok{VOCAB}", "*.bin")))[1:])


# -----------------------------------------------------------------------------
# the command line

# the reference's flags with their choices and defaults (required ones have none)
SEED_FLAGS = {
    "sa": None, "ra": None, "symbol_type": None, "pos_enc_type": None, "ra_type": None, "n_layers": None,
    "d_model": None, "activation": "swiglu", "dropout_rate": 0.1, "dff": None, "norm_first": 1, "symmetric_rels": 0,
    "trainable_symbols": 1, "max_seq_len": 512, "n_epochs": -1, "max_iters": 100_000, "batch_size": 64,
    "gradient_accumulation_steps": 1, "learning_rate": 5e-4, "use_cosine_sched": 1, "eval_interval": 2000,
    "eval_iters": 100, "eval_only": 0, "log_to_wandb": 1, "always_save_checkpoint": 0, "compile": 0,
    "init_from": "scratch", "wandb_project": "dual_attention--tiny_stories-LM",
}
SEED_CHOICES = {
    "symbol_type": {"position_relative", "symbolic_attention", "NA"}, "pos_enc_type": {"RoPE", "pos_emb"},
    "ra_type": {"relational_attention", "rca", "disrca", "NA"}, "init_from": {"scratch", "resume"},
}
REQUIRED = {"sa", "ra", "symbol_type", "pos_enc_type", "ra_type", "n_layers", "d_model"}  # (types: with --ra > 0)
SWITCHES = {"norm_first", "symmetric_rels", "trainable_symbols", "use_cosine_sched", "eval_only", "log_to_wandb",
            "always_save_checkpoint", "compile"}


def test_every_seed_flag_parses_with_the_seed_defaults():
    actions = {a.dest: a for a in flags.build_parser()._actions if a.dest != "help"}
    assert SEED_FLAGS.keys() <= actions.keys()
    assert all(actions[d].default is None for d in REQUIRED)  # required by parse_args, unless a run gives them
    minimal = ["--sa", "8", "--ra", "0", "--symbol_type", "NA", "--pos_enc_type", "RoPE", "--ra_type", "NA",
               "--n_layers", "4", "--d_model", "64"]
    args = vars(flags.build_parser().parse_args(minimal))
    for dest, default in SEED_FLAGS.items():
        if dest not in REQUIRED:
            assert args[dest] == default and type(args[dest]) is type(default), dest
        assert actions[dest].option_strings == [f"--{dest}"]
    for dest, choices in SEED_CHOICES.items():
        assert set(actions[dest].choices) == choices, dest
    for dest in SWITCHES:  # booleans are 0/1 integers, as in the reference
        assert flags.build_parser().parse_args(minimal + [f"--{dest}", "0"]).__dict__[dest] == 0
        assert flags.build_parser().parse_args(minimal + [f"--{dest}", "1"]).__dict__[dest] == 1
    assert flags.build_parser().parse_args(minimal + ["--dff", "96"]).dff == 96


def test_help_explains_every_flag():
    parser = flags.build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.dest
    text = parser.format_help()
    for action in parser._actions:
        assert action.option_strings[-1] in text


@pytest.mark.parametrize("argv,env,message", [
    (dat("rca", "NA"), {}, "--ra 2 needs --symbol_type symbolic_attention or position_relative"),
    (["--sa", "3", "--ra", "1", "--symbol_type", "symbolic_attention", "--pos_enc_type", "RoPE", "--ra_type", "rca",
      "--d_model", "18"], {}, "d_model=18 must be divisible by the number of heads (4)"),
    (TRANSFORMER + ["--gradient_accumulation_steps", "3"], {"WORLD_SIZE": "2"},
     "--gradient_accumulation_steps 3 must be divisible by the number of DDP processes (2)"),
], ids=["ra-with-NA-symbols", "width-not-divisible", "accumulation-vs-world-size"])
def test_contradictory_flags_give_a_one_line_error(tmp_path, capsys, monkeypatch, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_main(capsys, [*argv, "--n_layers", "1", *([] if "--d_model" in argv else ["--d_model", "32"]),
                                     "--data_dir", tmp_path / "no_data", "--out_dir", tmp_path / "out"])
    assert code == 2
    assert_one_line_error(err, message)
    assert not (tmp_path / "out").exists()


def test_the_transformer_needs_no_symbol_or_relational_attention_type(data_dir, tmp_path, capsys):
    """--symbol_type and --ra_type are NA with --ra 0, and required (one line, exit 2) with --ra > 0; the other model
    flags are required, unless a run gives them (--eval_only 1 --ckpt_path)."""
    transformer = ["--sa", "4", "--ra", "0", "--pos_enc_type", "RoPE"]
    args, config = flags.parse_args(transformer + ["--n_layers", "1", "--d_model", "32"])
    assert (args.symbol_type, args.ra_type, config.kind) == ("NA", "NA", "TransformerLM")
    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path, transformer, "--max_iters", 2, "--eval_interval", 2,
                                             "--warmup_iters", 1))
    assert code == 0 and "step 2: train loss" in out
    for argv, message in [
        (["--ra_type", "rca"], "--ra 2 needs --symbol_type symbolic_attention or position_relative"),
        (["--symbol_type", "position_relative"], "--ra 2 needs --ra_type relational_attention, rca or disrca"),
    ]:
        code, _, err = run_main(capsys, ["--sa", 2, "--ra", 2, "--pos_enc_type", "RoPE", "--n_layers", 1, "--d_model",
                                         32, *argv])
        assert code == 2
        assert_one_line_error(err, message)
    code, _, err = run_main(capsys, ["--ra", "0", "--n_layers", "1"])
    assert code == 2
    assert_one_line_error(err, "the following arguments are required: --sa, --pos_enc_type, --d_model (or evaluate "
                               "a run's checkpoint with --eval_only 1 --ckpt_path RUN)")


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or positive (got -1.0)"),
    (["--temperature", "nan"], "--temperature must be 0 (greedy) or positive (got nan)"),
    (["--top_k", "0"], "--top_k must be at least 1 (got 0)"),
    (["--top_k", "-3"], "--top_k must be at least 1 (got -3)"),
    (["--sample_tokens", "-1"], "--sample_tokens must not be negative (got -1)"),
    (["--learning_rate", "0"], "--learning_rate must be positive (got 0.0)"),
    (["--learning_rate", "-0.001"], "--learning_rate must be positive (got -0.001)"),
    (["--beta1", "1"], "--beta1 must be in [0, 1) (got 1.0)"),
    (["--beta2", "-0.1"], "--beta2 must be in [0, 1) (got -0.1)"),
    (["--dropout_rate", "1.5"], "--dropout_rate must be in [0, 1) (got 1.5)"),
    (["--weight_decay", "-1"], "--weight_decay must not be negative (got -1.0)"),
    (["--grad_clip", "-1"], "--grad_clip must not be negative (got -1.0)"),
    (["--dff", "0"], "--dff must be positive (got 0)"),
    (["--device", "mps"], "--device mps: Apple MPS is not available here"),
    (["--device", "cuda"], "--device cuda: CUDA is not available here"),
    (["--batch_size", "many"], "argument --batch_size: invalid int value: 'many'"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flag_values_stop_before_anything_runs(data_dir, tmp_path, capsys, flags, message):
    """Each value that used to fail after training (sampling flags) or deep inside it: exit 2, one line, nothing
    written."""
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path / "out", TRANSFORMER, *flags))
    assert code == 2
    assert_one_line_error(err, message)
    assert not (tmp_path / "out").exists()


def greedy(model, idx, n):
    """n tokens after idx, each the argmax of the model's next-token logits."""
    for _ in range(n):
        idx = torch.cat((idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


def test_temperature_zero_samples_greedily_and_sample_tokens_zero_skips(data_dir, tmp_path, capsys):
    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path / "greedy", TRANSFORMER, *CONSTANT_LR, "--max_iters",
                                             2, "--eval_interval", 2, "--temperature", 0, "--sample_tokens", 5))
    assert code == 0
    model = R.model_from_checkpoint(load_ckpt(the_run_dir(tmp_path / "greedy")))  # the final weights
    tokenizer = Tokenizer(os.path.join(data_dir, f"tok{VOCAB}.model"))
    with torch.no_grad():
        for prompt in train.PROMPTS[:4]:
            idx = torch.tensor([tokenizer.encode(prompt)])
            assert f"GENERATED TEXT:\n{tokenizer.decode(greedy(model, idx, 5)[0])}\n" in out
            assert torch.equal(model.generate(idx, 5, temperature=0, top_k=3), greedy(model, idx, 5))

    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path / "none", TRANSFORMER, "--max_iters", 2,
                                             "--eval_interval", 2, "--sample_tokens", 0))
    assert code == 0 and "GENERATED" not in out and "PROMPT" not in out


def test_learning_rate_schedule():
    args = flags.build_parser().parse_args(TRANSFORMER + ["--n_layers", "1", "--d_model", "32", "--warmup_iters",
                                                          "10", "--learning_rate", "1e-3"])
    assert train.get_lr(0, args, 110) == 0.0
    assert train.get_lr(5, args, 110) == pytest.approx(5e-4)
    assert train.get_lr(10, args, 110) == pytest.approx(1e-3)
    assert train.get_lr(60, args, 110) == pytest.approx(5e-4)
    assert train.get_lr(110, args, 110) == 0.0
    args.use_cosine_sched = 0
    assert {train.get_lr(i, args, 110) for i in (0, 5, 60, 110)} == {1e-3}


def test_epochs_or_max_iters_whichever_comes_first():
    args = flags.build_parser().parse_args(TRANSFORMER + ["--n_layers", "1", "--d_model", "32", "--n_epochs", "2",
                                                          "--max_iters", "1000"])
    assert train.training_steps(args, 10_000, 1024)[0] == 20  # ceil(2 * 10000 / 1024)
    args.max_iters = 7
    assert train.training_steps(args, 10_000, 1024)[0] == 7
    args.n_epochs = -1
    assert train.training_steps(args, 10_000, 1024)[0] == 7


def test_a_warm_up_longer_than_the_run_is_warned_about(data_dir, tmp_path, capsys):
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path / "a", TRANSFORMER, "--max_iters", 4,
                                             "--eval_interval", 4))  # the default warm-up: 1,000 steps
    assert code == 0
    assert err == ("warning: --warmup_iters 1000 >= the 4 training steps: the learning rate is still warming up at "
                   "the last step (1.50e-06, not --learning_rate 0.0005); lower --warmup_iters\n")
    for extra in (["--warmup_iters", 3], ["--use_cosine_sched", 0]):
        code, _, err = run_main(capsys, args_for(data_dir, tmp_path / "b", TRANSFORMER, "--max_iters", 4,
                                                 "--eval_interval", 4, *extra))
        assert code == 0 and err == ""


def on_a_terminal(argv):
    """train.py with stderr on a 24 x 120 pseudo-terminal and stdout piped: (exit code, stdout, what the terminal
    got)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=terminal, env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 1 << 16)
        except OSError:  # EIO: the process has closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(controller)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=60), out, shown.decode(errors="replace")


def test_progress_bars_show_on_a_terminal(data_dir, tmp_path):
    """Evaluations and training lasting over a second show a bar with a rate and an ETA on a terminal; the log lines
    on stdout stay whole. (With stderr not a terminal nothing is drawn: the other subprocess tests see no stderr.)"""
    code, out, shown = on_a_terminal(args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--max_iters", 400,
                                              "--eval_interval", 400, "--eval_iters", 2500, "--log_interval", 100,
                                              "--sample_tokens", 0))
    assert code == 0, shown
    for bar in ("evaluating train", "evaluating val", "training"):
        assert re.search(rf"{bar}: +\d+%.*\| \d+/\d+ \[\d+:\d+<\d+:\d+", shown), (bar, shown)
    assert re.search(r"^100 \| loss [\d.]+ \| lr", out, re.M) and "step 400: train loss" in out


# -----------------------------------------------------------------------------
# training

KINDS = dict(transformer="TransformerLM", paper="AbstractTransformerLM")  # else DualAttnTransformerLM


@pytest.mark.parametrize("name", MODELS)
def test_each_model_trains_and_its_loss_drops(data_dir, tmp_path, capsys, name):
    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path, MODELS[name], *CONSTANT_LR, "--max_iters", 20,
                                             "--eval_interval", 10))
    assert code == 0
    run_dir = the_run_dir(tmp_path)
    assert [e["iter"] for e in evals(run_dir)] == [0, 10, 20]
    first, last = evals(run_dir)[0], evals(run_dir)[-1]
    assert last["val/loss"] < first["val/loss"] - 1.0
    assert last["val/perplexity"] == pytest.approx(math.exp(last["val/loss"]))
    assert sorted(step_losses(run_dir)) == list(range(20))
    ckpt = load_ckpt(run_dir)
    assert ckpt["iter_num"] == 20 and ckpt["best_val_loss"] == last["val/loss"]
    assert ckpt["kind"] == KINDS.get(name.split("-")[0], "DualAttnTransformerLM")
    assert ckpt["arch"] == ("paper" if name.startswith("paper") else "current")
    assert out.count("PROMPT:") == 7 and "GENERATED SAMPLES" in out


def test_checkpoint_format(data_dir, tmp_path, capsys):
    code, _, _ = run_main(capsys, args_for(data_dir, tmp_path, MODELS["ra-symbolic"], "--max_iters", 2,
                                           "--eval_interval", 2))
    assert code == 0
    ckpt = load_ckpt(the_run_dir(tmp_path))  # loads with weights_only=True
    assert set(ckpt) == {"model", "optimizer", "model_args", "kind", "arch", "iter_num", "best_val_loss", "config",
                         "loader", "rng", "wandb_run_id"}
    assert (ckpt["kind"], ckpt["arch"], ckpt["iter_num"], ckpt["wandb_run_id"]) == \
        ("DualAttnTransformerLM", "current", 2, None)
    reference = R.from_reference(ckpt["kind"], ckpt["model_args"])  # reference keys, no _orig_mod./module. prefix
    assert list(ckpt["model"]) == list(reference.state_dict())
    assert ckpt["config"]["d_model"] == 32 and ckpt["config"]["run_name"] == os.path.basename(the_run_dir(tmp_path))
    assert len(ckpt["loader"]) == len(ckpt["rng"]) == 1
    assert not glob.glob(os.path.join(glob.escape(the_run_dir(tmp_path)), "*.tmp"))
    model = R.model_from_checkpoint(ckpt)
    assert sum(p.numel() for p in model.parameters()) == ckpt["config"]["n_params"]


def test_dff_sets_the_feed_forward_width(data_dir, tmp_path, capsys):
    assert int(2 / 3 * 4 * 32) != 24
    code, _, _ = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, "--dff", 24, "--max_iters", 2,
                                           "--eval_interval", 2))
    assert code == 0
    state = load_ckpt(the_run_dir(tmp_path))["model"]
    assert state["layers.blocks.0.ff_block.linear1.weight"].shape == (24, 32)
    assert state["layers.blocks.0.ff_block.linear3.weight"].shape == (24, 32)
    assert state["layers.blocks.0.ff_block.linear2.weight"].shape == (32, 24)


def test_n_epochs_stops_after_that_many_passes(data_dir, tmp_path, capsys):
    tokens_per_step = 16 * 32
    expected = math.ceil(train_tokens(data_dir) / tokens_per_step)
    assert 5 < expected < 100
    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, "--n_epochs", 1, "--batch_size", 16,
                                             "--max_iters", 1000, "--eval_interval", 1000, "--log_interval", 1000))
    assert code == 0
    assert f"training for {expected} steps (--n_epochs 1" in out
    assert [e["iter"] for e in evals(the_run_dir(tmp_path))] == [0, expected]
    assert load_ckpt(the_run_dir(tmp_path))["iter_num"] == expected


def test_paper_arch_decays_every_matrix_and_resumes(data_dir, tmp_path, capsys):
    """--arch paper: the untied output layer is a second >= 2-D tensor that decays; a frozen symbol library is left
    out of the optimizer; the checkpoint records the arch and evaluates to the numbers logged before it."""
    flags = dat("relational_attention", "symbolic_attention") + ["--arch", "paper", "--trainable_symbols", "0"]
    code, _, _ = run_main(capsys, args_for(data_dir, tmp_path, flags, *CONSTANT_LR, "--max_iters", 4,
                                           "--eval_interval", 4))
    assert code == 0
    run_dir = the_run_dir(tmp_path)
    ckpt = load_ckpt(run_dir)
    assert (ckpt["arch"], ckpt["kind"], ckpt["config"]["arch"]) == ("paper", "AbstractTransformerLM", "paper")
    model = R.model_from_checkpoint(ckpt)
    assert model.layers.final_out.weight is not model.layers.token_embedder.weight
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    assert len(decay["params"]) == sum(p.dim() >= 2 for p in trainable) and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == sum(p.dim() < 2 for p in trainable) and no_decay["weight_decay"] == 0.0
    assert len(trainable) == sum(1 for _ in model.parameters()) - 1  # the frozen symbol library

    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path, flags, *CONSTANT_LR, "--init_from", "resume",
                                             "--eval_only", 1))
    assert code == 0
    assert f"step 4: train loss {evals(run_dir)[-1]['train/loss']:.4f}" in out


def test_token_ids_outside_the_vocabulary_stop_before_training(data_dir, tmp_path, capsys):
    """Shards of Llama 2 ids under the directory of a 300-token vocabulary (an IndexError at the first evaluation)."""
    bad = tmp_path / "data"
    (bad / f"tok{VOCAB}").mkdir(parents=True)
    shutil.copy(Path(data_dir, f"tok{VOCAB}.model"), bad)
    np.arange(1000, dtype=np.uint16).__mod__(VOCAB).tofile(bad / f"tok{VOCAB}" / "data00.bin")
    np.arange(31000, 32000, dtype=np.uint16).tofile(bad / f"tok{VOCAB}" / "data01.bin")
    code, _, err = run_main(capsys, args_for(str(bad), tmp_path / "out", TRANSFORMER))
    assert code == 1
    assert_one_line_error(err, f"{bad / f'tok{VOCAB}' / 'data01.bin'} holds token id 31999, outside the 300 tokens "
                               f"of {bad / f'tok{VOCAB}.model'}", f"pretokenize --vocab_size {VOCAB} --data_dir {bad}")
    assert not (tmp_path / "out").exists()



def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys, trained_run):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    config = json.loads(Path(run_dir, "config.json").read_text())  # as if the run had been started at lr 1e9
    Path(run_dir, "config.json").write_text(json.dumps(dict(config, learning_rate=1e9)))
    good = Path(run_dir, CHECKPOINT_FILE).read_bytes()
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, "--init_from", "resume",
                                             "--ckpt_path", run_dir, "--use_cosine_sched", 0, "--learning_rate", 1e9,
                                             "--max_iters", 40, "--eval_interval", 100, "--always_save_checkpoint", 1))
    assert code == 1
    assert "error: the training loss is nan at step" in err
    assert f"the last good checkpoint stays in {run_dir}" in err
    assert Path(run_dir, CHECKPOINT_FILE).read_bytes() == good
    stopped_at = int(err.split("at step ")[1].split(":")[0])
    assert max(step_losses(run_dir)) == stopped_at - 1  # the NaN step is not logged


def test_a_non_finite_loss_is_caught_before_the_next_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    """A checkpoint at every step, and weights that turn NaN as step 6 is launched: the run stops at the next
    boundary, before evaluating or writing anything, and the checkpoint on disk is the one of step 6 (finite)."""
    step = train.Trainer.step

    def poisoned_step(self, *args):
        if self.iter_num == 6:
            with torch.no_grad():
                self.raw_model.layers.token_embedder.weight.fill_(math.nan)
        return step(self, *args)

    monkeypatch.setattr(train.Trainer, "step", poisoned_step)
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, "--max_iters", 10, "--eval_interval", 1,
                                             "--always_save_checkpoint", 1))
    assert code == 1
    assert "error: the training loss is nan at step 6: stopping (the last good checkpoint stays in" in err
    run_dir = the_run_dir(tmp_path)
    ckpt = load_ckpt(run_dir)
    assert ckpt["iter_num"] == 6
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [e["iter"] for e in evals(run_dir)] == list(range(7))
    assert max(step_losses(run_dir)) == 5


def test_statuses_are_read_one_step_late(data_dir, tmp_path, capsys, monkeypatch):
    """The host reads step k's status after launching step k + 1, except before an evaluation (every launched step
    is read there)."""
    launched, reads = [], []
    step, read = train.Trainer.step, train.StepStatus.read

    def recording_step(self, *args):
        launched.append(self.iter_num)
        return step(self, *args)

    def recording_read(self, *args):
        reads.append((self.iter_num, launched[-1]))
        return read(self, *args)

    monkeypatch.setattr(train.Trainer, "step", recording_step)
    monkeypatch.setattr(train.StepStatus, "read", recording_read)
    code, _, _ = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, "--max_iters", 12, "--eval_interval", 5))
    assert code == 0
    assert [k for k, _ in reads] == list(range(12))
    boundaries = {4, 9, 11}  # the steps before the evaluations at 5, 10 and 12
    assert all(last == (k if k in boundaries else k + 1) for k, last in reads), reads


def test_interval_timer():
    now = [0.0]
    timer = train.IntervalTimer(first_step=10, clock=lambda: now[0])
    assert timer.lap(13, finished=2.0) == (0.5, 4)  # steps 10..13 in 2 s
    now[0] = 3.0
    timer.pause()
    now[0] = 100.0  # an evaluation
    timer.resume()
    assert timer.lap(18, finished=104.0) == (1.0, 5)  # 1 s before the pause, 4 s after it


def test_the_logged_rate_is_an_interval_average_without_evaluation(data_dir, tmp_path, capsys, monkeypatch):
    """On a clock that advances 10 ms per step, 400 ms more in step 7 and 1 s in the evaluation at step 6, logged
    every 4 steps: the log of step 8 averages steps 5 to 8, the slow one included, (3 x 10 + 400) / 4 = 107.5
    ms/step, without the evaluation (which would add 250 ms); the time of one step would be 10 or 400 ms."""
    now = [0.0]
    step, evaluate = train.Trainer.step, train.Trainer.evaluate

    def timed_step(self, *args):
        now[0] += 0.4 if self.iter_num == 7 else 0.01
        return step(self, *args)

    def timed_evaluate(self, *args):
        now[0] += 1.0
        return evaluate(self, *args)

    monkeypatch.setattr(train.Trainer, "step", timed_step)
    monkeypatch.setattr(train.Trainer, "evaluate", timed_evaluate)
    monkeypatch.setattr(train, "IntervalTimer", functools.partial(train.IntervalTimer, clock=lambda: now[0]))
    code, out, _ = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, "--max_iters", 12, "--eval_interval",
                                             6, "--log_interval", 4))
    assert code == 0
    logs = {r["iter"]: r for r in metrics(the_run_dir(tmp_path)) if "step_ms" in r}
    assert sorted(logs) == [0, 4, 8]
    assert [logs[i]["interval_steps"] for i in (0, 4, 8)] == [1, 4, 4]
    assert logs[4]["step_ms"] == pytest.approx(10) and logs[8]["step_ms"] == pytest.approx(107.5)
    for r in logs.values():
        assert r["tokens_per_sec"] == pytest.approx(8 * 32 * 1000 / r["step_ms"])
    assert f"8 | loss {logs[8]['train/step_loss']:.4f} | lr {logs[8]['lr']:.3e} | 107.5 ms/step | 2,381 tok/s" in out


def test_a_reference_checkpoint_evaluates_and_resumes(data_dir, tmp_path, capsys):
    model_flags = dict(sa=2, ra=2, symbol_type="symbolic_attention", pos_enc_type="RoPE", ra_type="relational_attention",
                 n_layers=1, d_model=32, max_seq_len=32, vocab_size=VOCAB)
    run_dir = tmp_path / "reference_run"
    run_dir.mkdir()
    model = reference_checkpoint(run_dir / CHECKPOINT_FILE, model_flags)
    with torch.no_grad():
        val = [model(x, y)[1].item() for x, y in eval_windows(data_dir)]
    argv = args_for(data_dir, tmp_path, MODELS["ra-symbolic"], "--init_from", "resume", "--ckpt_path", run_dir,
                    "--device", "cpu")  # float32 on every host: the loss equals the float32 forward above
    code, out, _ = run_main(capsys, argv + ["--eval_only", "1"])  # (their settings where the flags give none)
    assert code == 0
    assert f"evaluating {run_dir}/{CHECKPOINT_FILE} (step 3)" in out and f"val loss {sum(val) / len(val):.4f}" in out

    code, _, err = run_main(capsys, argv + ["--max_iters", "5", "--eval_interval", "5"])  # their lr was 1e-3
    assert code == 2
    assert_one_line_error(err, "--learning_rate 0.001 (this command: 0.0005)")
    argv += ["--learning_rate", "1e-3"]
    code, out, _ = run_main(capsys, argv + ["--max_iters", "5", "--eval_interval", "5"])
    assert code == 0
    assert "resumed at step 3" in out
    assert "changed since the run's last leg: " in out and "--device cuda -> cpu" in out
    [note] = [line for line in out.splitlines() if line.startswith("note: the run does not record")]
    noted = note.removeprefix("note: the run does not record ").split(": ")[0].split(", ")
    assert {"--arch", "--dtype", "--seed", "--warmup_iters"} <= set(noted)  # their dtype is not compared
    assert "--batch_size" not in noted and "--learning_rate" not in noted
    assert set(noted) <= {a.option_strings[0] for a in flags.build_parser()._actions}  # every one a flag
    assert "batches and dropout start afresh from --seed" in out
    ckpt = load_ckpt(run_dir)
    assert (ckpt["iter_num"], ckpt["kind"], ckpt["arch"]) == (5, "DualAttnTransformerLM", "current")
    assert {s["step"].item() for s in ckpt["optimizer"]["state"].values()} == {5.0}  # 3 reference steps + 2


def eval_windows(data_dir):
    return EvalBatches("val", LoaderSettings(8, 32, vocab_size=VOCAB, data_dir=data_dir), 2)


# -----------------------------------------------------------------------------
# exact resume, signals, DDP, W&B (subprocesses)

def test_resume_extends_a_run_bit_identically(data_dir, tmp_path):
    """8 steps in one go == 4 steps, then a new process resumes to 8 (dropout, accumulation, constant LR)."""
    flags = args_for(data_dir, "OUT", dat("relational_attention", "position_relative"), *CONSTANT_LR,
                     "--eval_interval", 4, "--gradient_accumulation_steps", 2, "--always_save_checkpoint", 1)

    def run(out, *extra):
        result = run_script([str(out) if a == "OUT" else a for a in flags] + list(map(str, extra)))
        assert result.returncode == 0, result.stderr
        return result

    run(tmp_path / "whole", "--max_iters", 8)
    run(tmp_path / "parts", "--max_iters", 4)
    assert load_ckpt(the_run_dir(tmp_path / "parts"))["iter_num"] == 4
    resumed = run(tmp_path / "parts", "--max_iters", 8, "--init_from", "resume")
    assert "resumed at step 4" in resumed.stdout
    whole, parts = the_run_dir(tmp_path / "whole"), the_run_dir(tmp_path / "parts")
    assert step_losses(whole) == step_losses(parts) and len(step_losses(whole)) == 8
    assert evals(whole)[-1]["val/loss"] == evals(parts)[-1]["val/loss"]


def test_sigterm_mid_run_leaves_a_checkpoint_that_resumes_exactly(data_dir, tmp_path):
    """SIGTERM during a cosine-schedule run: a checkpoint at the next step boundary, exit 143; resuming it gives
    the losses of an uninterrupted run, step for step."""
    flags = args_for(data_dir, "OUT", dat("disrca", "symbolic_attention"), "--max_iters", 60, "--eval_interval", 25,
                     "--warmup_iters", 5, "--learning_rate", 1e-2)
    argv = lambda out: [str(out) if a == "OUT" else a for a in flags]  # noqa: E731
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train.py", *argv(tmp_path / "interrupted")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("2 | loss"):
            proc.send_signal(signal.SIGTERM)
            break
    out = line + proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
    assert "(stopped by SIGTERM)" in out and "GENERATED SAMPLES" not in out
    run_dir = the_run_dir(tmp_path / "interrupted")
    stopped_at = load_ckpt(run_dir)["iter_num"]
    assert 3 <= stopped_at < 60 and max(step_losses(run_dir)) == stopped_at - 1

    resumed = run_script(argv(tmp_path / "interrupted") + ["--init_from", "resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {stopped_at}" in resumed.stdout
    whole = run_script(argv(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert step_losses(run_dir) == step_losses(the_run_dir(tmp_path / "whole"))
    assert len(step_losses(run_dir)) == 60


def test_torchrun_two_cpu_processes(data_dir, tmp_path):
    result = run_script(args_for(data_dir, tmp_path, dat("rca", "symbolic_attention"), *CONSTANT_LR,
                                 "--max_iters", 4, "--eval_interval", 2, "--gradient_accumulation_steps", 2,
                                 "--device", "cpu"),
                        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                  "train.py"))
    assert result.returncode == 0, result.stderr
    assert "1 accumulation steps x 2 processes" in result.stdout
    assert result.stdout.count("GENERATED SAMPLES") == 1 and result.stdout.count("PROMPT:") == 7
    assert result.stdout.count("step 4: train loss") == 1
    run_dir = the_run_dir(tmp_path)
    assert sorted(os.listdir(run_dir)) == sorted([CHECKPOINT_FILE, "config.json", "metrics.jsonl", "train.lock"])
    ckpt = load_ckpt(run_dir)
    assert ckpt["iter_num"] == 4 and len(ckpt["loader"]) == 2
    assert ckpt["loader"][0]["rng"] != ckpt["loader"][1]["rng"]  # each rank draws its own batches
    assert evals(run_dir)[-1]["val/loss"] < evals(run_dir)[0]["val/loss"]


