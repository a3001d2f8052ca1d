"""
Train a Dual Attention Transformer (DAT) or Transformer language model on TinyStories.

A 4-layer DAT (4 self-attention + 4 relational heads), on whatever device is there (CUDA, then MPS, then CPU):
$ python train.py --sa 4 --ra 4 --symbol_type symbolic_attention --pos_enc_type RoPE \\
      --ra_type relational_attention --n_layers 4 --d_model 64

The Transformer baseline: --ra 0 (symbol and relational-attention types are then ignored):
$ python train.py --sa 8 --ra 0 --symbol_type NA --pos_enc_type RoPE --ra_type NA --n_layers 4 --d_model 64

DDP on the 4 GPUs of one node (gradient_accumulation_steps is divided by the number of processes):
$ torchrun --standalone --nproc_per_node 4 train.py --sa 4 --ra 4 ... --gradient_accumulation_steps 4

Continue a run: the same command plus --init_from resume (it finds the run under out/ with these settings; or
--ckpt_path DIR_OR_FILE). Each run writes out/<run name>/config.json, ckpt.pt and metrics.jsonl; data come from
tiny_stories_data.py.
"""

import argparse
import fcntl
import glob
import json
import math
import os
import shlex
import signal
import sys
import time
import zipfile
from collections import deque
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import asdict, fields
from datetime import datetime

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
import reference
from loader import BatchLoader, LoaderSettings, check_token_ids, eval_batches
from tokenizer import DataError, Tokenizer, tokenizer_path

DERIVED_FIELDS = ("bias", "n_symbols", "symbol_heads", "max_rel_pos")  # ModelConfig fields that are not flags
MODEL_FLAGS = tuple(f.name for f in fields(M.ModelConfig) if f.name not in DERIVED_FIELDS)
# the settings that make a run: --init_from resume continues the run whose recorded settings all equal the command's
# (every other flag may change from one leg of a run to the next, e.g. --max_iters, --eval_interval, --dropout_rate)
RUN_SETTINGS = tuple(f for f in MODEL_FLAGS if f != "dropout_rate") + (
    "data_dir", "dtype", "batch_size", "gradient_accumulation_steps", "learning_rate", "use_cosine_sched",
    "warmup_iters", "weight_decay", "beta1", "beta2", "grad_clip", "seed")
START_FLAGS = ("init_from", "ckpt_path", "out_dir", "eval_only")  # how a leg starts, not what the run is
CONFIG_FILE, LOCK_FILE = "config.json", "train.lock"  # in each run directory, next to ckpt.pt
PROMPTS = ["Once upon a time,", "There once was a girl named ", "On a rainy day,", "Emma went to", "", "", ""]


class RunError(Exception):
    """Stops the run with a one-line `error: ...` and exit code `code` (2: bad flags)."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# -----------------------------------------------------------------------------
# command line

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds each flag's default to its help, unless there is none or the help already explains it."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default == argparse.SUPPRESS or \
                "default" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Bad flags stop with a single `error: ...` line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (python train.py --help lists the flags)\n")


def build_parser():
    p = Parser(
        description=__doc__, formatter_class=HelpFormatter,
        usage="%(prog)s --sa N --ra N --symbol_type TYPE --pos_enc_type TYPE --ra_type TYPE --n_layers N "
              "--d_model N [options]")
    switch = dict(type=int, choices=(0, 1))

    g = p.add_argument_group("model (--ra 0 builds the Transformer baseline with --sa heads)")
    g.add_argument("--sa", required=True, type=int, help="number of self-attention heads")
    g.add_argument("--ra", required=True, type=int, help="number of relational heads (0: Transformer baseline)")
    g.add_argument("--symbol_type", required=True, choices=("position_relative", "symbolic_attention", "NA"),
                   help="symbols of the relational heads (symbolic attention: max_seq_len symbols, 4 heads; "
                        "position-relative: offsets up to max_seq_len); NA only with --ra 0")
    g.add_argument("--pos_enc_type", required=True, choices=("RoPE", "pos_emb"),
                   help="rotary embeddings on every attention-selection query/key, or learned absolute positions")
    g.add_argument("--ra_type", required=True, choices=("relational_attention", "rca", "disrca", "NA"),
                   help="relational attention, relational cross-attention or disentangled RCA; NA only with --ra 0")
    g.add_argument("--n_layers", required=True, type=int, help="number of blocks")
    g.add_argument("--d_model", required=True, type=int, help="model width (divisible by sa + ra)")
    g.add_argument("--activation", default="swiglu", choices=M.ACTIVATION_CHOICES, help="feed-forward activation")
    g.add_argument("--dropout_rate", default=0.1, type=float, help="dropout rate (may differ when resuming)")
    g.add_argument("--dff", default=None, type=int,
                   help="feed-forward hidden width (default: int(2/3*4*d_model) for swiglu, else 4*d_model; "
                        "4*d_model for every activation with --arch paper)")
    g.add_argument("--norm_first", default=1, **switch, help="1: pre-norm blocks, 0: post-norm")
    g.add_argument("--symmetric_rels", default=0, **switch,
                   help="1: symmetric relations (tied relation query/key maps; relational_attention only)")
    g.add_argument("--trainable_symbols", default=1, **switch,
                   help="0: freeze the symbol library of symbolic attention (not its templates or query map)")
    g.add_argument("--max_seq_len", default=512, type=int, help="context length (block size) of training windows")
    g.add_argument("--arch", default="current", choices=sorted(M.ARCHS),
                   help="current: the authors' code as released; paper: the May 2024 code behind the paper's "
                        "Tiny Stories numbers (see model.ARCHS). A resumed checkpoint must have the same arch")

    g = p.add_argument_group("training")
    g.add_argument("--n_epochs", default=-1, type=int,
                   help="stop after this many passes over the training tokens (or at max_iters if sooner); "
                        "-1: no bound")
    g.add_argument("--max_iters", default=100_000, type=int, help="number of optimizer steps")
    g.add_argument("--batch_size", default=64, type=int, help="sequences per micro-batch and process")
    g.add_argument("--gradient_accumulation_steps", default=1, type=int,
                   help="micro-batches per optimizer step, in total over all DDP processes (a multiple of their "
                        "number)")
    g.add_argument("--learning_rate", default=5e-4, type=float, help="peak (or constant) learning rate")
    g.add_argument("--use_cosine_sched", default=1, **switch,
                   help="1: linear warm-up from 0 over warmup_iters, then cosine decay to 0 at the last step; "
                        "0: constant learning_rate")
    g.add_argument("--warmup_iters", default=1000, type=int, help="warm-up steps of the cosine schedule")
    g.add_argument("--weight_decay", default=0.1, type=float, help="AdamW weight decay of the >=2-D tensors")
    g.add_argument("--beta1", default=0.9, type=float, help="AdamW beta1")
    g.add_argument("--beta2", default=0.95, type=float, help="AdamW beta2")
    g.add_argument("--grad_clip", default=1.0, type=float, help="clip the gradient norm at this value (0: off)")
    g.add_argument("--seed", default=1337, type=int, help="seed of the weights, dropout and batch order (+ rank)")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval_interval", default=2_000, type=int,
                   help="evaluate every this many steps (and at step 0 and the last step)")
    g.add_argument("--eval_iters", default=100, type=int, help="batches of each split per evaluation (fixed windows)")
    g.add_argument("--eval_only", default=0, **switch,
                   help="1: evaluate the fresh model (or, with --init_from resume, the checkpoint), print, exit")
    g.add_argument("--always_save_checkpoint", default=0, **switch,
                   help="1: write ckpt.pt at every evaluation; 0: only when the val loss improves")
    g.add_argument("--init_from", default="scratch", choices=("scratch", "resume"),
                   help="resume: continue the run under out_dir whose model and training settings equal these flags "
                        "(README: Resuming)")
    g.add_argument("--ckpt_path", default=None,
                   help="checkpoint file or run directory that --init_from resume continues (its settings must "
                        "equal the flags too; default: the one matching run under out_dir)")
    g.add_argument("--out_dir", default="out", help="runs are written to out_dir/<run name>/")

    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data", help="directory of tiny_stories_data.py's output")
    g.add_argument("--vocab_size", default=0, type=int,
                   help="0: the Llama 2 tokenizer (32,000 tokens); N: the custom data_dir/tok{N}.model and "
                        "data_dir/tok{N}/")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast dtype; auto: bfloat16 on CUDA where supported, else float32 "
                        "(float16 uses a gradient scaler)")
    g.add_argument("--compile", default=0, **switch, help="1: torch.compile the model")

    g = p.add_argument_group("logging")
    g.add_argument("--log_interval", default=10, type=int, help="print (and log) the training loss every N steps")
    g.add_argument("--log_to_wandb", default=1, **switch,
                   help="1: log to Weights & Biases (offline, with a note, when no credentials are configured)")
    g.add_argument("--wandb_project", default="dual_attention--tiny_stories-LM", help="W&B project name")

    g = p.add_argument_group("samples (generated at the end of training)")
    g.add_argument("--sample_tokens", default=100, type=int, help="new tokens per sample (0: no samples)")
    g.add_argument("--temperature", default=1.0, type=float, help="sampling temperature (0: greedy, the most likely "
                                                                  "token each time)")
    g.add_argument("--top_k", default=None, type=int, help="sample among the k most likely tokens (default: all tokens)")
    return p


def parse_args(argv=None):
    """(flags, model config). Contradictory flags stop here with `error: ...` and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    positive = ["n_layers", "d_model", "max_seq_len", "batch_size", "gradient_accumulation_steps", "eval_interval",
                "eval_iters", "log_interval"]
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive (got {getattr(args, name)})")
    for name in ("sa", "ra", "max_iters", "warmup_iters", "vocab_size", "sample_tokens"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative (got {getattr(args, name)})")
    if args.n_epochs == 0 or args.n_epochs < -1:
        parser.error(f"--n_epochs must be positive, or -1 for no bound (got {args.n_epochs})")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.gradient_accumulation_steps % world_size:
        parser.error(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must be divisible by the "
                     f"number of DDP processes ({world_size})")
    try:
        check_ranges(args)
        config = M.ModelConfig.from_flags(args)
    except ValueError as e:
        parser.error(str(e))
    return args, config


def check_ranges(args):
    """ValueError for a flag outside its range that parse_args does not check by sign (NaN fails every test)."""
    if args.dff is not None and args.dff <= 0:
        raise ValueError(f"--dff must be positive (got {args.dff})")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be positive (got {args.learning_rate})")
    for name in ("beta1", "beta2", "dropout_rate"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1) (got {getattr(args, name)})")
    for name in ("weight_decay", "grad_clip"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name} must not be negative (got {getattr(args, name)})")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be 0 (greedy) or positive (got {args.temperature})")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be at least 1 (got {args.top_k})")


# -----------------------------------------------------------------------------
# model, optimizer, learning rate

def run_name(args):
    """The reference's run name: the model's main flags, then `__` and a timestamp."""
    if args.ra > 0:
        name = (f"sa={args.sa}; ra={args.ra}; d={args.d_model}; L={args.n_layers}; ra_type={args.ra_type}; "
                f"sym_rel={bool(args.symmetric_rels)}; symbol_type={args.symbol_type}; "
                f"pos_enc_type={args.pos_enc_type}")
    else:
        name = f"sa={args.sa}; d={args.d_model}; L={args.n_layers}; pos_enc_type={args.pos_enc_type}"
    if args.arch != "current":
        name += f"; arch={args.arch}"
    return f"{name}__{datetime.now().strftime('%Y_%m_%d_%H_%M_%S')}"


def configure_optimizer(model, args, device):
    """AdamW with weight decay on the trainable tensors of >= 2 dims and none on the rest (in named_parameters
    order, as the reference groups them, so its optimizer states load); fused on CUDA."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.beta1, args.beta2),
                             fused=device.type == "cuda")


def get_lr(it, args, total_steps):
    """Linear warm-up from 0 over warmup_iters steps, then cosine decay to 0 at total_steps (nanoGPT), or the
    constant learning_rate with --use_cosine_sched 0."""
    if not args.use_cosine_sched:
        return args.learning_rate
    if it < args.warmup_iters:
        return args.learning_rate * it / args.warmup_iters
    if it >= total_steps:
        return 0.0
    progress = (it - args.warmup_iters) / (total_steps - args.warmup_iters)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * args.learning_rate


def training_steps(args, train_tokens, tokens_per_step):
    """(steps, why): max_iters, or the steps of n_epochs passes over the training tokens when that is fewer."""
    if args.n_epochs < 0:
        return args.max_iters, f"--max_iters {args.max_iters}"
    epoch_steps = math.ceil(args.n_epochs * train_tokens / tokens_per_step)
    why = (f"--n_epochs {args.n_epochs}: {args.n_epochs} x {train_tokens:,} training tokens at {tokens_per_step:,} "
           f"tokens/step = {epoch_steps:,} steps")
    if epoch_steps < args.max_iters:
        return epoch_steps, why
    return args.max_iters, f"--max_iters {args.max_iters} (sooner than {why})"


# -----------------------------------------------------------------------------
# devices and processes

def setup_device(args):
    """(device, rank, world_size). Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) the process group starts here:
    nccl with one GPU per process, gloo on the CPU."""
    flag = args.device
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise RunError(f"--device {args.device}: not a device (auto, cpu, cuda, cuda:N, mps)", code=2) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {args.device}: CUDA is not available here", code=2)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RunError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices", code=2)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"--device {args.device}: Apple MPS is not available here", code=2)
    if device.type not in ("cpu", "cuda", "mps"):
        raise RunError(f"--device {args.device}: not supported (auto, cpu, cuda, cuda:N, mps)", code=2)
    distributed = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        if distributed or device.index is None:
            device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, rank, world_size


def synchronize(device):
    """Wait for the device's queued work (for wall-clock timings of sample.py and the benchmarks)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def resolve_dtype(args, device):
    if args.dtype != "auto":
        return args.dtype
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"




def all_gather(obj, world_size):
    """[obj of rank 0, obj of rank 1, ...] (collective: every rank must call it)."""
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def rng_state(device):
    """The RNG states this process draws from: dropout on the CPU, or on the accelerator."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


# -----------------------------------------------------------------------------
# checkpoints

def run_settings(flags):
    """The RUN_SETTINGS in a dict of flags (a command's or a run's record), for comparison: the model's as
    ModelConfig holds them where the record allows (it resets the flags a model does not use, e.g. a Transformer's
    --symbol_type), data_dir normalised."""
    values = {name: flags[name] for name in RUN_SETTINGS if name in flags}
    try:
        model = asdict(M.ModelConfig.from_flags(flags))
        values.update({name: model[name] for name in MODEL_FLAGS if name in values and name != "vocab_size"})
    except (ValueError, TypeError):  # a record that builds no model: compared as written
        pass
    if isinstance(values.get("data_dir"), str):
        values["data_dir"] = os.path.normpath(values["data_dir"])
    return values


def recorded_config(ckpt_path):
    """The config a run recorded: config.json next to its checkpoint, else (a run of the authors' train.py, or one
    of ours from before config.json) the config stored in the checkpoint, read without loading its tensors.
    RunError if neither can be read."""
    path = os.path.join(os.path.dirname(ckpt_path), CONFIG_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise RunError(f"{path} is unreadable ({e})") from None
        if not isinstance(config, dict):
            raise RunError(f"{path} is not a JSON object of settings")
        return config
    ckpt = load_checkpoint(ckpt_path, mmap=zipfile.is_zipfile(ckpt_path))  # (the legacy format cannot be mapped)
    config = dict(ckpt.get("config") or {})
    if "kind" not in ckpt:  # the authors' train.py has no --dtype: their dtype was their GPU's, not a setting
        config.pop("dtype", None)
    return config


def setting_differences(recorded, ours):
    """'--flag RECORDED (this command: OURS)' for each run setting that the run recorded with another value."""
    theirs, mine = run_settings(recorded), run_settings(ours)
    return [f"--{name} {recorded[name]} (this command: {ours[name]})" for name in RUN_SETTINGS
            if name in theirs and theirs[name] != mine[name]]


def find_run(args, dtype):
    """(ckpt_path, recorded config) of the run that --init_from resume continues: --ckpt_path (a file or a run
    directory), else the one run under out_dir that recorded exactly this command's RUN_SETTINGS. RunError, never
    a guess: when --ckpt_path's run has other settings (code 2, naming the flags), when no run under out_dir
    matches (code 2, listing each run and its differing flags) or when several do (code 2, listing them)."""
    ours = dict(vars(args), dtype=dtype)
    if args.ckpt_path:
        path = os.path.join(args.ckpt_path, "ckpt.pt") if os.path.isdir(args.ckpt_path) else args.ckpt_path
        if not os.path.isfile(path):
            raise RunError(f"no checkpoint at {path}")
        recorded = recorded_config(path)
        differ = setting_differences(recorded, ours)
        if differ:
            raise RunError(f"--ckpt_path {path}: the run was trained with other settings: {', '.join(differ)}; give "
                           f"the run's flags to continue it", code=2)
        return path, recorded
    found = sorted(glob.glob(os.path.join(glob.escape(args.out_dir), "*", "ckpt.pt")), key=os.path.getmtime,
                   reverse=True)
    if not found:
        raise RunError(f"--init_from resume: no run directory with a ckpt.pt in {args.out_dir} "
                       "(give --out_dir or --ckpt_path)")
    matches, others = [], []
    for path in found:
        try:
            recorded = recorded_config(path)
            differ = setting_differences(recorded, ours)
        except RunError as e:
            recorded, differ = None, [str(e)]
        if differ:
            others.append(f"{os.path.dirname(path)} ({', '.join(differ)})")
        else:
            matches.append((path, recorded))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise RunError(f"--init_from resume: {len(matches)} runs in {args.out_dir} have this command's settings: "
                       f"{', '.join(os.path.dirname(p) for p, _ in matches)}; choose one with --ckpt_path DIR", code=2)
    raise RunError(f"--init_from resume: no run in {args.out_dir} has this command's settings: {'; '.join(others)}; "
                   f"give the flags of the run to continue (with --ckpt_path DIR to name it)", code=2)


def changed_settings(recorded, args, device):
    """'--flag OLD -> NEW' for the flags outside RUN_SETTINGS that this leg of the run changes (e.g. --max_iters)."""
    current = dict(vars(args), device=str(device))
    return [f"--{name} {recorded[name]} -> {value}" for name, value in current.items()
            if name not in RUN_SETTINGS and name not in START_FLAGS and name in recorded and recorded[name] != value]


@contextmanager
def run_lock(run_dir):
    """One writer per run directory: an exclusive lock on run_dir/train.lock (which holds the owner's pid), held
    while the block runs; the OS drops it when the process ends, kill -9 included. RunError if another process
    holds it."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise RunError(f"cannot write to the run directory {run_dir}: {e.strerror}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunError(f"the run directory {run_dir} is in use by another process (pid "
                           f"{f.read().strip() or 'unknown'}): wait for it to end, or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def load_checkpoint(path, mmap=False):
    """torch.load of a checkpoint, after a CRC check of every record of its zip archive (torch.load checks none: a
    flipped bit in a tensor would load silently). RunError naming the file when it is damaged or not ours."""
    advice = "use another copy of the checkpoint, or start the run afresh without --init_from resume"
    try:
        if not mmap and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad:
                raise RunError(f"{path} is corrupted (checksum mismatch in its record {bad}): {advice}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RunError:
        raise
    except Exception as e:  # truncated, empty, text...: torch raises all kinds
        why = " ".join(str(e).split())[:120] or type(e).__name__
        raise RunError(f"{path} is not a readable checkpoint (truncated or corrupted: {why}): {advice}") from None
    missing = [k for k in ("model", "model_args", "iter_num") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"{path} is not a checkpoint of train.py (no {', '.join(missing)}): {advice}")
    return ckpt


def write_config(run_dir, config):
    """The run's settings as run_dir/config.json (written anew at the start of every leg, atomically)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(config, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror}") from None


def check_checkpoint_model(ckpt, config):
    """Refuse flags that describe another model than the checkpoint's (only the dropout rate may differ)."""
    try:
        theirs = reference.config_from_checkpoint(ckpt)
    except ValueError as e:
        raise RunError(f"the checkpoint's model: {e}") from None
    if theirs.arch != config.arch:
        raise RunError(f"the checkpoint is --arch {theirs.arch}, the flags say --arch {config.arch}: pass --arch "
                       f"{theirs.arch}", code=2)
    differ = [f"{'' if name in DERIVED_FIELDS else '--'}{name} {getattr(theirs, name)!r} "
              f"(flags: {getattr(config, name)!r})" for name in (f.name for f in fields(config))
              if name != "dropout_rate" and getattr(theirs, name) != getattr(config, name)]
    if differ:
        raise RunError("the flags describe another model than the checkpoint's: " + "; ".join(differ), code=2)


def load_optimizer_state(optimizer, ckpt):
    """Adam moments and step counts from the checkpoint; the hyperparameters stay those of the flags."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)
    for group in optimizer.param_groups:
        for p in group["params"]:
            moment = optimizer.state.get(p, {}).get("exp_avg")
            if moment is not None and moment.shape != p.shape:
                raise RunError(f"the checkpoint's optimizer state does not fit the model's parameters "
                               f"({tuple(moment.shape)} for a {tuple(p.shape)} tensor)")


def save_checkpoint(path, ckpt):
    """torch.save to a temporary file, then an atomic rename: a crash or a full disk never leaves a half-written
    ckpt.pt (RunError; the previous checkpoint stays)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports some write errors as RuntimeError
        if os.path.lexists(tmp):
            os.unlink(tmp)
        why = e.strerror if isinstance(e, OSError) else " ".join(str(e).split())
        kept = "the previous checkpoint is kept" if os.path.exists(path) else "no checkpoint was written"
        raise RunError(f"writing the checkpoint {path} failed ({why}): stopped, {kept}") from None


@contextmanager
def stop_signals():
    """While training, SIGINT/SIGTERM only set a flag: the loop writes a checkpoint at the next step boundary and
    exits. A second signal acts as usual (Ctrl-C twice quits at once)."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -----------------------------------------------------------------------------
# evaluation, logging, samples

def perplexity(loss):
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate(model, args, device, autocast, rank, world_size):
    """Mean loss over eval_iters fixed batches of each split (the same windows in every run, shared out over the
    DDP ranks), and perplexity = exp(mean loss). Eval mode: no dropout, no RNG drawn."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of batch losses, number of batches
        settings = LoaderSettings(args.batch_size, args.max_seq_len, vocab_size=args.vocab_size,
                                  data_dir=args.data_dir, device=device, rank=rank, world_size=world_size)
        for x, y in eval_batches(split, settings, args.eval_iters):
            with autocast:
                _, loss = model(x, y, return_logits=False)
            total[0] += loss.double()
            total[1] += 1
        if world_size > 1:
            dist.all_reduce(total)
        mean = (total[0] / total[1]).item()
        out[f"{split}/loss"], out[f"{split}/perplexity"] = mean, perplexity(mean)
    model.train()
    return out


class Logger:
    """Rank 0 prints, appends to <run dir>/metrics.jsonl (exact floats) and logs to W&B; other ranks stay silent."""

    def __init__(self, master):
        self.master, self.metrics, self.metrics_path, self.wandb = master, None, None, None

    def print(self, *parts):
        if self.master:
            print(*parts, flush=True)

    def open(self, run_dir):
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        try:
            self.metrics = open(self.metrics_path, "a")
        except OSError as e:
            raise RunError(f"cannot write {self.metrics_path}: {e.strerror}") from None

    def log(self, record):
        if self.metrics:
            try:
                self.metrics.write(json.dumps(record) + "\n")
                self.metrics.flush()
            except OSError as e:  # a full disk, say: stop with the checkpoints written so far
                metrics, self.metrics = self.metrics, None
                with suppress(OSError):
                    metrics.close()
                raise RunError(f"writing {self.metrics_path} failed ({e.strerror}): stopped; the checkpoint written "
                               f"last is kept: make room, then continue with --init_from resume") from None
        if self.wandb:
            self.wandb.log(record)

    def start_wandb(self, args, name, run_dir, config, run_id):
        """A W&B run in run_dir (run run_id continued, when given) and its id (run_id with --log_to_wandb 0).
        Without credentials it logs offline with a one-line note: it never prompts."""
        if not args.log_to_wandb:
            return run_id
        import wandb
        offline = (os.environ.get("WANDB_MODE") not in ("offline", "dryrun", "disabled")
                   and not wandb.login(prompt=False, verify=False))
        self.wandb = wandb.init(project=args.wandb_project, name=name, config=config, id=run_id, resume="allow",
                                dir=run_dir, mode="offline" if offline else None)
        self.wandb.define_metric("*", step_metric="iter")
        if offline:
            local = os.path.dirname(self.wandb.dir)
            print(f"W&B: no credentials (WANDB_API_KEY or `wandb login`): logging offline to {local}; "
                  f"upload it later with `wandb sync {shlex.quote(local)}`", flush=True)
        return self.wandb.id

    def log_samples(self, prompts, samples):
        if self.wandb:
            import wandb
            table = wandb.Table(columns=["Prompt", "Generated Sample"], data=[list(r) for r in zip(prompts, samples)])
            self.wandb.log({"Generated Samples": table})

    def close(self, exit_code=0):
        if self.metrics:
            self.metrics.close()
        if self.wandb:
            self.wandb.finish(exit_code=exit_code)


def generate_samples(model, tokenizer, args, device):
    """The reference's prompts (three empty ones: BOS only), each continued by sample_tokens tokens (in float32,
    eval mode)."""
    samples = []
    for prompt in PROMPTS:
        idx = torch.tensor([tokenizer.encode(prompt, bos=True, eos=False)], dtype=torch.long, device=device)
        out = model.generate(idx, args.sample_tokens, temperature=args.temperature, top_k=args.top_k)
        samples.append(tokenizer.decode(out[0].tolist()))
    return samples


# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    args, config = parse_args(argv)
    try:
        with ExitStack() as held:  # the lock of the run directory, released however the run ends
            return train(args, config, held)
    except (RunError, DataError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return getattr(e, "code", 1)


def train(args, config, held):
    """Set up (device, checkpoint, model, data, optimizer), then evaluate only, or train and sample. The run
    directory's lock joins the ExitStack `held`."""
    kind, model_args = reference.reference_args(config)  # what checkpoints record, in the authors' names
    device, rank, world_size = setup_device(args)
    log = Logger(master=rank == 0)
    dtype = resolve_dtype(args, device)
    log.print(f"device {device}, dtype {dtype}")
    ckpt = ckpt_path = None
    if args.init_from == "resume":
        ckpt_path, recorded = find_run(args, dtype)
        log.print(f"resuming from {ckpt_path}")
        if changed := changed_settings(recorded, args, device):
            log.print(f"changed since the run's last leg: {', '.join(changed)}")
        if unrecorded := [f"--{name}" for name in RUN_SETTINGS if name not in recorded]:
            log.print(f"note: the run does not record {', '.join(unrecorded)}: this command's values are used")
        if log.master and not args.eval_only:
            held.enter_context(run_lock(os.path.dirname(ckpt_path)))
        ckpt = load_checkpoint(ckpt_path)
        check_checkpoint_model(ckpt, config)
    torch.manual_seed(args.seed + rank)
    if ckpt is None:
        raw_model = M.build_model(config)
    else:  # the checkpoint's weights, with this run's dropout rate
        raw_model = reference.model_from_checkpoint(ckpt, dropout_rate=config.dropout_rate)
    raw_model.to(device).train()
    log.print(f"{kind} ({args.arch}): {raw_model.num_params():,} parameters")
    tokenizer = Tokenizer(tokenizer_path(args.vocab_size, args.data_dir))
    if tokenizer.n_words != config.vocab_size:
        raise RunError(f"{tokenizer.model_path} has {tokenizer.n_words} tokens, the model {config.vocab_size}")
    loader = BatchLoader("train", LoaderSettings(args.batch_size, args.max_seq_len, vocab_size=args.vocab_size,
                                                 data_dir=args.data_dir, device=device, seed=args.seed, rank=rank,
                                                 world_size=world_size))
    check_token_ids(tokenizer, args.vocab_size, args.data_dir)

    trainer = Trainer(args, raw_model, kind, model_args, loader, device, dtype, rank, world_size, log)
    if ckpt is not None:
        trainer.restore(ckpt)
        ckpt = None  # free the memory
    if args.eval_only:
        trainer.evaluate()
        trainer.finish()
        return 0

    total_steps, bound = training_steps(args, loader.n_tokens, trainer.tokens_per_step)
    log.print(f"training for {total_steps:,} steps ({bound})")
    run_dir = None
    if log.master:
        run_dir = os.path.dirname(ckpt_path) if ckpt_path else new_run_dir(args)
        if not ckpt_path:
            held.enter_context(run_lock(run_dir))
        n_params, n_embedding = raw_model.num_params(), raw_model.layers.token_embedder.weight.numel()
        run_config = dict(vars(args), device=str(device), dtype=dtype, kind=kind, arch=args.arch,
                          model_args=model_args, model_config=asdict(config), world_size=world_size,
                          tokens_per_iter=trainer.tokens_per_step, total_steps=total_steps, n_params=n_params,
                          n_params_wo_embedding=n_params - n_embedding, run_name=os.path.basename(run_dir),
                          run_dir=run_dir)
        log.print(f"run directory {run_dir}")
        write_config(run_dir, run_config)
        log.open(run_dir)
        trainer.config = run_config
        trainer.wandb_run_id = log.start_wandb(args, run_config["run_name"], run_dir, run_config,
                                               trainer.wandb_run_id)
    exit_code = trainer.run(total_steps, run_dir)
    trainer.finish()
    if exit_code == 0 and log.master and args.sample_tokens:
        samples = generate_samples(raw_model, tokenizer, args, device)
        log.print("\n" + "=" * 100 + "\nGENERATED SAMPLES")
        for prompt, sample in zip(PROMPTS, samples):
            log.print(f"PROMPT: {prompt}\nGENERATED TEXT:\n{sample}\n" + "-" * 100)
        log.log_samples(PROMPTS, samples)
    log.close(exit_code)
    return exit_code


def new_run_dir(args):
    """out_dir/<run name>, created here (with a suffix when two runs start within the same second)."""
    base = path = os.path.join(args.out_dir, run_name(args))
    n = 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}_{n}"
        except OSError as e:
            raise RunError(f"cannot create the run directory {path}: {e.strerror} (check --out_dir)") from None


class StepStatus:
    """The status of a step launched on the device: (mean loss, stop-signal flag) in a device tensor, copied into
    pinned host memory behind an event on CUDA, so that the host reads it later (one step later, while the device
    runs the next step) without stalling the device. `finished` is the clock's time when the step was seen done."""

    def __init__(self, iter_num, lr, status, clock):
        self.iter_num, self.lr, self.clock, self.event = iter_num, lr, clock, None
        if status.device.type == "cuda":
            self.host = torch.empty(status.shape, dtype=status.dtype, pin_memory=True).copy_(status, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:  # the step has run already
            self.host, self.finished = status.cpu(), clock()

    def read(self, world_size):
        """(loss, whether any rank received a stop signal), once the step has finished."""
        if self.event is not None:
            self.event.synchronize()
            self.finished = self.clock()
        loss_sum, signalled = self.host.tolist()
        return loss_sum / world_size, signalled > 0


class IntervalTimer:
    """Wall time per training step from the end of one logged step to the end of the next (as the host sees them),
    with the pauses for evaluation and checkpoints left out."""

    def __init__(self, first_step, clock=time.perf_counter):
        self.clock, self.last_step = clock, first_step - 1  # the steps up to last_step are done
        self.elapsed, self.started = 0.0, clock()

    def pause(self):
        self.elapsed += self.clock() - self.started
        self.started = None

    def resume(self):
        self.started = self.clock()

    def lap(self, step, finished):
        """(seconds per step, number of steps) over the steps done since the last lap, up to `step`, which finished
        at the clock's time `finished`."""
        steps, seconds = step - self.last_step, self.elapsed + finished - self.started
        self.last_step, self.elapsed, self.started = step, 0.0, finished
        return seconds / steps, steps


class Trainer:
    """The training state of one process (model, optimizer, data position, step, best val loss) and its loop."""

    def __init__(self, args, raw_model, kind, model_args, loader, device, dtype, rank, world_size, log):
        self.args, self.raw_model, self.kind, self.model_args = args, raw_model, kind, model_args
        self.loader, self.device, self.rank, self.world_size, self.log = loader, device, rank, world_size, log
        self.autocast = (nullcontext() if dtype == "float32" else
                         torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)))
        self.accumulation = args.gradient_accumulation_steps // world_size
        self.tokens_per_step = self.accumulation * world_size * args.batch_size * args.max_seq_len
        log.print(f"tokens per step {self.tokens_per_step:,} = {self.accumulation} accumulation steps x {world_size} "
                  f"processes x {args.batch_size} sequences x {args.max_seq_len} tokens")
        self.optimizer = configure_optimizer(raw_model, args, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
        self.eval_model = raw_model
        if args.compile:
            log.print("compiling the model (the first steps and evaluations take longer)")
            self.eval_model = torch.compile(raw_model)
        self.model = self.eval_model
        if world_size > 1:
            self.model = DDP(self.eval_model, device_ids=[device.index] if device.type == "cuda" else None)
        self.peak, peak_note = M.peak_flops(device)
        log.print(peak_note)
        self.iter_num, self.best_val_loss, self.running_mfu = 0, math.inf, None
        self.config, self.wandb_run_id, self.ckpt_path = None, None, None
        self.loader_state = loader.state_dict()  # the loader before it draws the next step's first batch
        self.pending = deque()  # StepStatus of the steps launched on the device and not yet read, oldest first
        self.timer = None

    def restore(self, ckpt):
        """Continue a checkpoint: step, best val loss, optimizer, and (ours) data position, RNG, W&B run."""
        self.iter_num, self.best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        self.wandb_run_id = ckpt.get("wandb_run_id")
        if "kind" in ckpt or self.args.arch == "current":
            load_optimizer_state(self.optimizer, ckpt)
        else:
            self.log.print("note: a paper-era reference checkpoint orders its optimizer state differently: AdamW "
                           "starts afresh")
        if "scaler" in ckpt and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt.get("loader", [])) == self.world_size:
            self.loader.load_state_dict(ckpt["loader"][self.rank])
            self.loader_state = self.loader.state_dict()
            set_rng_state(ckpt["rng"][self.rank], self.device)
        else:
            self.log.print("note: the checkpoint holds no data position and RNG state for this number of processes: "
                           "batches and dropout start afresh from --seed")
        self.log.print(f"resumed at step {self.iter_num:,} (best val loss {self.best_val_loss:.4f})")

    def evaluate(self):
        losses = evaluate(self.eval_model, self.args, self.device, self.autocast, self.rank, self.world_size)
        self.log.print(f"step {self.iter_num}: train loss {losses['train/loss']:.4f}, val loss "
                       f"{losses['val/loss']:.4f}, train perplexity {losses['train/perplexity']:.2f}, "
                       f"val perplexity {losses['val/perplexity']:.2f}")
        return losses

    def save_checkpoint(self, why):
        """Collective under DDP (every rank's data position and RNG state are gathered); rank 0 writes."""
        per_rank = all_gather({"loader": self.loader_state, "rng": rng_state(self.device)}, self.world_size)
        if not self.log.master:
            return
        ckpt = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "model_args": self.model_args, "kind": self.kind, "arch": self.args.arch, "iter_num": self.iter_num,
                "best_val_loss": self.best_val_loss, "config": self.config,
                "loader": [r["loader"] for r in per_rank], "rng": [r["rng"] for r in per_rank],
                "wandb_run_id": self.wandb_run_id}
        if self.scaler.is_enabled():
            ckpt["scaler"] = self.scaler.state_dict()
        save_checkpoint(self.ckpt_path, ckpt)
        self.log.print(f"saved checkpoint at step {self.iter_num} ({why}) to {self.ckpt_path}")

    def run(self, total_steps, run_dir):
        """Evaluate (every eval_interval steps, at the first and at the last step) and train up to total_steps.
        Returns 0; 128 + the signal after SIGINT/SIGTERM (a checkpoint is written first); 1 on a non-finite loss
        (nothing is written). A checkpoint of step k holds the state before step k: resuming it replays k, k+1, ...
        exactly as an uninterrupted run does.

        The host never waits for the step it has just launched: it reads the status of the step before (loss,
        stop signal) while the device runs this one, and waits for every launched step only before an evaluation
        or a checkpoint, so none is written after a non-finite loss."""
        self.total_steps = total_steps
        self.ckpt_path = os.path.join(run_dir, "ckpt.pt") if run_dir else None
        self.timer = IntervalTimer(self.iter_num)
        x, y = self.loader.next_batch()
        with stop_signals() as received:
            while True:
                evaluating = self.iter_num % self.args.eval_interval == 0 or self.iter_num == total_steps
                done = self.iter_num >= total_steps
                exit_code = self.read_statuses(0 if evaluating or done else 1, received)
                if exit_code is not None:
                    return exit_code
                if evaluating:
                    self.timer.pause()
                    losses = self.evaluate()
                    if not all(math.isfinite(v) for v in losses.values()):
                        return self.stop_non_finite(f"the evaluation loss is {losses['val/loss']}", self.iter_num)
                    self.log_and_save(losses)
                    self.timer.resume()
                if done:
                    return 0
                x, y = self.step(x, y, received)
                self.iter_num += 1

    def read_statuses(self, keep, received):
        """Read the statuses of launched steps, oldest first, until `keep` are left unread (0: wait for them all);
        log the training loss every log_interval steps. Returns the exit code when the run must stop: 1 on a
        non-finite loss; 128 + the signal when a rank received one, after every launched step has finished and a
        checkpoint of the state after them (data position and RNG included) is written."""
        stop = None
        while len(self.pending) > keep:
            status = self.pending.popleft()
            loss, signalled = status.read(self.world_size)
            if not math.isfinite(loss):
                return self.stop_non_finite(f"the training loss is {loss}", status.iter_num)
            if status.iter_num % self.args.log_interval == 0:
                self.log_step(status.iter_num, loss, status.lr, *self.timer.lap(status.iter_num, status.finished))
            if signalled and stop is None:
                stop, keep = (received[0] if received else signal.SIGTERM), 0
        if stop is None:
            return None
        self.save_checkpoint(f"stopped by {signal.Signals(stop).name}")
        self.log.print(f"stopped at step {self.iter_num}: continue with --init_from resume")
        return 128 + stop

    def log_and_save(self, losses):
        """Log an evaluation; write a checkpoint when the val loss improves (not at step 0), or always."""
        self.log.log({"iter": self.iter_num, "tokens": self.iter_num * self.tokens_per_step, **losses,
                      "lr": get_lr(self.iter_num, self.args, self.total_steps),
                      **({} if self.running_mfu is None else {"mfu": self.running_mfu * 100})})
        improved = losses["val/loss"] < self.best_val_loss
        if self.iter_num > 0 and (improved or self.args.always_save_checkpoint):
            self.best_val_loss = min(self.best_val_loss, losses["val/loss"])
            self.save_checkpoint("val loss improved" if improved else "--always_save_checkpoint")

    def step(self, x, y, received):
        """Launch one optimizer step over `accumulation` micro-batches (gradients all-reduced on the last one only)
        without waiting for it, and queue its StepStatus: the mean loss over micro-batches, summed over ranks, and
        whether any rank received a stop signal (all-reduced on the device). Returns the next step's first batch."""
        args, optimizer, scaler = self.args, self.optimizer, self.scaler
        lr = get_lr(self.iter_num, args, self.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(self.accumulation):
            last = micro_step == self.accumulation - 1
            with self.model.no_sync() if self.world_size > 1 and not last else nullcontext():
                with self.autocast:
                    _, loss = self.model(x, y, return_logits=False)
                if last:
                    self.loader_state = self.loader.state_dict()
                x, y = self.loader.next_batch()  # prefetched on the host; its copy queued behind the forward pass
                scaler.scale(loss / self.accumulation).backward()
            loss_sum += loss.detach()
        status = torch.stack([loss_sum / self.accumulation, loss_sum.new_full((), float(bool(received)))])
        if self.world_size > 1:
            dist.all_reduce(status)
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.pending.append(StepStatus(self.iter_num, lr, status, self.timer.clock))
        return x, y

    def log_step(self, iter_num, loss, lr, step_seconds, steps):
        """The training loss of step iter_num, and the rate over the `steps` steps since the last log (wall time,
        evaluations excluded)."""
        tokens_per_sec = self.tokens_per_step / step_seconds
        mfu = None
        if self.peak:
            mfu = self.raw_model.estimate_mfu(tokens_per_sec, self.peak * self.world_size, self.args.max_seq_len)
            self.running_mfu = mfu if self.running_mfu is None else 0.9 * self.running_mfu + 0.1 * mfu
        self.log.print(f"{iter_num} | loss {loss:.4f} | lr {lr:.3e} | {step_seconds * 1000:.1f} ms/step | "
                       f"{tokens_per_sec:,.0f} tok/s | mfu " + ("n/a" if mfu is None else f"{mfu * 100:.2f}%"))
        self.log.log({"iter": iter_num, "train/step_loss": loss, "lr": lr, "step_ms": step_seconds * 1000,
                      "tokens_per_sec": tokens_per_sec, "interval_steps": steps,
                      **({} if mfu is None else {"step_mfu": mfu * 100})})

    def stop_non_finite(self, what, iter_num):
        """Exit code 1, with the checkpoint on disk (if any) left as it was."""
        if self.log.master:
            kept = (f"the last good checkpoint stays in {self.ckpt_path}" if os.path.exists(self.ckpt_path)
                    else "no checkpoint was written")
            print(f"error: {what} at step {iter_num}: stopping ({kept}); try a lower --learning_rate",
                  file=sys.stderr, flush=True)
        return 1

    def finish(self):
        self.loader.close()
        if self.world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
