"""
Tiny train.py runs for the tests: a repetitive toy corpus of stories, tokenized by a 300-piece SentencePiece model
that tiny_stories_data.py trains in a second, the flags of small models, and readers of what a run writes. The
fixtures data_dir and trained_run (conftest.py) are built from these.
"""

import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

import reference as R
import tiny_stories_data as D
import train
from checkpoints import CHECKPOINT_FILE
from loader import SHARD_DIR

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
TRANSFORMER = ["--sa", "4", "--ra", "0", "--symbol_type", "NA", "--pos_enc_type", "RoPE", "--ra_type", "NA"]
SMALL = ["--n_layers", "1", "--d_model", "32", "--max_seq_len", "32", "--batch_size", "8", "--eval_iters", "2",
         "--log_interval", "1", "--sample_tokens", "3", "--log_to_wandb", "0", "--vocab_size", str(VOCAB)]
CONSTANT_LR = ["--use_cosine_sched", "0", "--learning_rate", "1e-2"]


def dat(ra_type, symbol_type, pos_enc_type="RoPE"):
    return ["--sa", "2", "--ra", "2", "--symbol_type", symbol_type, "--pos_enc_type", pos_enc_type,
            "--ra_type", ra_type]


MODELS = {
    "transformer": TRANSFORMER,
    "ra-symbolic": dat("relational_attention", "symbolic_attention"),
    "ra-posrel-symmetric": dat("relational_attention", "position_relative", "pos_emb") + ["--symmetric_rels", "1"],
    "rca-symbolic": dat("rca", "symbolic_attention", "pos_emb"),
    "rca-posrel": dat("rca", "position_relative"),
    "disrca-symbolic": dat("disrca", "symbolic_attention"),
    "disrca-posrel": dat("disrca", "position_relative", "pos_emb"),
    "paper-ra-symbolic": dat("relational_attention", "symbolic_attention") + ["--arch", "paper"],
}


def make_toy_data(root):
    """Three JSON shards of templated stories (shard 0 = val), a 300-piece BPE vocabulary, uint16 shards."""
    rng = random.Random(0)
    names, animals, places, verbs = ["Lily", "Tom", "Max", "Emma"], ["cat", "dog", "bird"], ["park", "garden"], \
        ["play", "run", "jump"]

    def story():
        n, a, p, v = rng.choice(names), rng.choice(animals), rng.choice(places), rng.choice(verbs)
        return (f"Once upon a time, there was a {a} named {n}. {n} liked to {v} in the {p}. "
                f"One day, {n} went to the {p} to {v}. It was fun. The end.")

    shards = Path(root) / SHARD_DIR
    shards.mkdir()
    for i in range(3):
        (shards / f"data{i:02d}.json").write_text(json.dumps([{"story": story()} for _ in range(100)]))
    D.train_vocab(VOCAB, str(root))
    D.pretokenize(VOCAB, str(root), workers=1)
    return str(root)


def args_for(data_dir, out_dir, model_flags, *extra):
    return [*model_flags, *SMALL, "--data_dir", data_dir, "--out_dir", str(out_dir), *map(str, extra)]


def run_main(capsys, argv):
    """train.main in this process: (exit code, stdout, stderr); argparse's exit is an exit code too."""
    try:
        code = train.main(list(map(str, argv)))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *messages):
    """stderr is exactly one `error: ...` line holding every message (so no traceback either)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for message in messages:
        assert message in lines[0], (message, lines[0])


def run_script(argv, env=None, launcher=("train.py",), **kwargs):
    """A script (train.py unless `launcher` says otherwise) in a subprocess, with one intra-op thread so that runs
    do not fight over the two cores."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *launcher, *map(str, argv)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240, **kwargs)


def the_run_dir(out_dir):
    dirs = [d for d in glob.glob(os.path.join(glob.escape(str(out_dir)), "*")) if os.path.isdir(d)]
    assert len(dirs) == 1, dirs
    return dirs[0]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(run_dir):
    """{step: training loss} (a resumed run appends to the same file)."""
    return {r["iter"]: r["train/step_loss"] for r in metrics(run_dir) if "train/step_loss" in r}


def evals(run_dir):
    return [r for r in metrics(run_dir) if "val/loss" in r]


def load_ckpt(run_dir):
    return torch.load(os.path.join(run_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def reference_checkpoint(path, flags):
    """A checkpoint as the authors' train.py writes it (no kind/arch/loader/rng; keys of a compiled model; the
    optimizer grouped as theirs: trainable tensors with >= 2 dims decay, in named_parameters order), 3 steps in."""
    kind, model_args = R.model_args_from_flags(flags)
    torch.manual_seed(0)
    model = R.from_reference(kind, model_args).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95))
    for _ in range(3):
        idx = torch.randint(VOCAB, (4, 17))
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    config = dict(flags, batch_size=8, learning_rate=1e-3, device="cuda", dtype="bfloat16", compile=True)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": 3,
                "best_val_loss": torch.tensor(9.5), "config": config}, path)
    return model.eval()
