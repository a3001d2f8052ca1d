"""
The run directories of train.py: their names, the settings that make a run and the run that --init_from resume
continues, the lock of one writer, config.json, the metrics log (metrics.jsonl and W&B), and the list of the runs in
a folder.

A run directory out_dir/<run name>/ holds config.json (the settings of the latest leg), the checkpoint
(checkpoints.CHECKPOINT_FILE), metrics.jsonl and train.lock. Files in it are never written through a symbolic link:
the lock and the metrics log refuse one, config.json and the checkpoint are replaced by renaming a fresh file.
"""

import errno
import fcntl
import glob
import json
import math
import os
import re
import shlex
from contextlib import contextmanager, suppress
from dataclasses import asdict, fields
from datetime import datetime

import model as M
import reference
from checkpoints import CHECKPOINT_FILE, DAMAGED_ADVICE, checkpoint_file, read_checkpoint
from runtime import RunError, print_above_bars, replacing_file

# the ModelConfig fields that are train.py flags (the others are derived, or options of the authors' published models)
MODEL_FLAGS = ("sa", "ra", "d_model", "n_layers", "pos_enc_type", "symbol_type", "ra_type", "vocab_size",
               "max_seq_len", "activation", "dropout_rate", "dff", "norm_first", "symmetric_rels",
               "trainable_symbols", "arch")
# the settings that make a run: --init_from resume continues the run whose recorded settings all equal the command's
# (every other flag may change from one leg of a run to the next, e.g. --max_iters, --eval_interval, --dropout_rate)
RUN_SETTINGS = tuple(f for f in MODEL_FLAGS if f != "dropout_rate") + (
    "data_dir", "dtype", "batch_size", "gradient_accumulation_steps", "learning_rate", "use_cosine_sched",
    "warmup_iters", "weight_decay", "beta1", "beta2", "grad_clip", "seed")
# what --eval_only 1 --ckpt_path takes from the run unless the command gives it (dtype is the device's)
EVAL_SETTINGS = tuple(f for f in RUN_SETTINGS if f != "dtype") + ("eval_iters",)
START_FLAGS = ("init_from", "ckpt_path", "out_dir", "eval_only", "run_name")  # how a leg starts, not what the run is
CONFIG_FILE, LOCK_FILE, METRICS_FILE = "config.json", "train.lock", "metrics.jsonl"
RESUME_ADVICE = f"{DAMAGED_ADVICE}, or start the run afresh without --init_from resume"
RUN_NAME = re.compile(r"[A-Za-z0-9_=,][A-Za-z0-9_.=,-]{0,99}")  # shell-safe; not an option, not hidden, not ..
SHORT_NAMES = {"relational_attention": "relattn", "rca": "rca", "disrca": "disrca", "symbolic_attention": "symattn",
               "position_relative": "posrel", "RoPE": "rope", "pos_emb": "posemb"}


# -----------------------------------------------------------------------------
# names and directories

def run_name(args):
    """A short, shell-safe name (letters, digits and -): the model's main flags, then the time, e.g.
    dat-sa4-ra4-d64-L4-relattn-symattn-rope-20261206-182010, or transformer-sa8-d64-L4-rope-20261206-182010 for
    --ra 0; -symrel marks symmetric relations, -paper --arch paper."""
    if args.ra > 0:
        parts = ["dat", f"sa{args.sa}", f"ra{args.ra}", f"d{args.d_model}", f"L{args.n_layers}",
                 SHORT_NAMES[args.ra_type], SHORT_NAMES[args.symbol_type], SHORT_NAMES[args.pos_enc_type]]
        if args.symmetric_rels and args.ra_type == "relational_attention":
            parts.append("symrel")
    else:
        parts = ["transformer", f"sa{args.sa}", f"d{args.d_model}", f"L{args.n_layers}",
                 SHORT_NAMES[args.pos_enc_type]]
    if args.arch != "current":
        parts.append(args.arch)
    return "-".join(parts + [datetime.now().strftime("%Y%m%d-%H%M%S")])


def check_run_name(name):
    """ValueError unless --run_name is a shell-safe directory name."""
    if not RUN_NAME.fullmatch(name):
        raise ValueError(f"--run_name {name!r}: use 1 to 100 letters, digits and -_.=, (not starting with - or .)")


def named_run(args):
    """The run a command names: --ckpt_path (a run directory or checkpoint file), or out_dir/--run_name; else None."""
    if args.ckpt_path:
        return args.ckpt_path
    return os.path.join(args.out_dir, args.run_name) if args.run_name else None


def check_new_run(args):
    """RunError (code 2) when --run_name names a run that exists: only --init_from resume continues it."""
    if args.run_name and os.path.lexists(path := os.path.join(args.out_dir, args.run_name)):
        raise RunError(f"--run_name {args.run_name}: the run {path} exists: continue it with --init_from resume, or "
                       f"choose another name", code=2)


def new_run_dir(args):
    """out_dir/--run_name, or out_dir/<run name> (with a suffix -2, -3, ... when two runs start within the same
    second), created here."""
    base = path = os.path.join(args.out_dir, args.run_name or run_name(args))
    n = 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            if args.run_name:
                check_new_run(args)
            n += 1
            path = f"{base}-{n}"
        except OSError as e:
            raise RunError(f"cannot create the run directory {path}: {e.strerror} (check --out_dir)") from None


def open_in_run(path, flags):
    """os.open of a file of a run directory that refuses a symbolic link there (a planted link would have us write
    to its target); RunError with one line."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunError(f"{path} is a symbolic link: not written through (remove it if it is not yours)") from None
        raise RunError(f"cannot write {path}: {e.strerror}") from None


@contextmanager
def run_lock(run_dir):
    """One writer per run directory: an exclusive lock on run_dir/train.lock (which holds the owner's pid), held
    while the block runs; the OS drops it when the process ends, kill -9 included. RunError if another process
    holds it."""
    with os.fdopen(open_in_run(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT), "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"the run directory {run_dir} is in use by another process (pid "
                           f"{f.read().strip() or 'unknown'}): wait for it to end, or stop it first") from None
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def write_config(run_dir, config):
    """The run's settings as run_dir/config.json (written anew at the start of every leg, atomically)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    try:
        with replacing_file(path, "w") as f:
            json.dump(config, f, indent=1)
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror}") from None


# -----------------------------------------------------------------------------
# the settings of a run, and the run to resume

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
    ckpt = read_checkpoint(ckpt_path, mmap=True, advice=RESUME_ADVICE)
    config = dict(ckpt.get("config") or {})
    if "kind" not in ckpt:  # the authors' train.py has no --dtype: their dtype was their GPU's, not a setting
        config.pop("dtype", None)
    return config


def model_flags(config):
    """A ModelConfig as train.py's model flags (--vocab_size 0 for the Llama 2 vocabulary, switches 0/1)."""
    flags = {name: getattr(config, name) for name in MODEL_FLAGS}
    flags["vocab_size"] = 0 if config.vocab_size == M.LLAMA2_VOCAB_SIZE else config.vocab_size
    return {name: int(value) if isinstance(value, bool) else value for name, value in flags.items()}


def run_flags(ckpt_path):
    """The run's train.py flags, for evaluating its checkpoint: its recorded config, with the model flags it lacks
    (the authors' runs record no --arch, say) read from the checkpoint's model. RunError if unreadable."""
    flags = recorded_config(ckpt_path)
    if any(name not in flags for name in MODEL_FLAGS):
        try:
            model = reference.config_from_checkpoint(read_checkpoint(ckpt_path, mmap=True))
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(f"{ckpt_path}: not a checkpoint of a model this code builds ({e})") from None
        flags = {**model_flags(model), **flags}
    return flags


def setting_differences(recorded, ours):
    """'--flag RECORDED (this command: OURS)' for each run setting that the run recorded with another value."""
    theirs, mine = run_settings(recorded), run_settings(ours)
    return [f"--{name} {recorded[name]} (this command: {ours[name]})" for name in RUN_SETTINGS
            if name in theirs and theirs[name] != mine[name]]


def find_run(args, dtype):
    """(checkpoint path, recorded config) of the run that --init_from resume continues: --ckpt_path (a file or a
    run directory) or out_dir/--run_name, else the one run under out_dir that recorded exactly this command's RUN_SETTINGS. RunError,
    never a guess: when --ckpt_path's run has other settings (code 2, naming the flags), when no run under out_dir
    matches (code 2, listing each run and its differing flags) or when several do (code 2, listing them)."""
    ours = dict(vars(args), dtype=dtype)
    if named := named_run(args):
        path = checkpoint_file(named)
        recorded = recorded_config(path)
        differ = setting_differences(recorded, ours)
        if differ:
            which = f"--ckpt_path {path}" if args.ckpt_path else f"--run_name {args.run_name}"
            raise RunError(f"{which}: the run was trained with other settings: {', '.join(differ)}; give "
                           f"the run's flags to continue it", code=2)
        return path, recorded
    found = sorted(glob.glob(os.path.join(glob.escape(args.out_dir), "*", CHECKPOINT_FILE)), key=os.path.getmtime,
                   reverse=True)
    if not found:
        raise RunError(f"--init_from resume: no run directory with a {CHECKPOINT_FILE} in {args.out_dir} "
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


def check_checkpoint_model(ckpt, config):
    """Refuse flags that describe another model than the checkpoint's (only the dropout rate may differ)."""
    try:
        theirs = reference.config_from_checkpoint(ckpt)
    except ValueError as e:
        raise RunError(f"the checkpoint's model: {e}") from None
    check_same_model(theirs, config, "the checkpoint")


def check_same_model(theirs, config, whose):
    """RunError (code 2) naming the flags in which `config` (the flags') differs from `whose` model config `theirs`,
    but for the dropout rate."""
    if theirs.arch != config.arch:
        raise RunError(f"{whose} is --arch {theirs.arch}, the flags say --arch {config.arch}: pass --arch "
                       f"{theirs.arch}", code=2)
    differ = [f"{'--' if name in MODEL_FLAGS else ''}{name} {getattr(theirs, name)!r} "
              f"(flags: {getattr(config, name)!r})" for name in (f.name for f in fields(config))
              if name != "dropout_rate" and getattr(theirs, name) != getattr(config, name)]
    if differ:
        raise RunError(f"the flags describe another model than {whose}'s: " + "; ".join(differ), code=2)


# -----------------------------------------------------------------------------
# the metrics log

class Logger:
    """Rank 0 prints, appends to <run dir>/metrics.jsonl (exact floats) and logs to W&B; other ranks stay silent.
    Each record is one write of one whole line to a file opened for appending, so that two processes (a training and
    an evaluation of its checkpoint) never interleave their lines."""

    def __init__(self, master):
        self.master, self.metrics, self.metrics_path, self.wandb = master, None, None, None

    def print(self, *parts):
        if self.master:
            print_above_bars(*parts)

    def open(self, run_dir):
        self.metrics_path = os.path.join(run_dir, METRICS_FILE)
        self.metrics = open_in_run(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def log(self, record):
        if self.metrics is not None:
            try:
                os.write(self.metrics, (json.dumps(record) + "\n").encode())
            except OSError as e:  # a full disk, say: stop with the checkpoints written so far
                metrics, self.metrics = self.metrics, None
                with suppress(OSError):
                    os.close(metrics)
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
        if self.metrics is not None:
            os.close(self.metrics)
            self.metrics = None
        if self.wandb:
            self.wandb.finish(exit_code=exit_code)


# -----------------------------------------------------------------------------
# the runs in a folder

def list_runs(folder):
    """'NAME  STEP  VAL LOSS' lines (a header first) of the run directories in `folder` that hold a checkpoint,
    newest first, each name quoted for the shell where it needs it; [] when there is none, or when `folder` is itself
    a run (or model) directory. The step and the best validation loss are the checkpoint's (read without its
    tensors)."""
    if any(os.path.exists(os.path.join(folder, f)) for f in (CHECKPOINT_FILE, CONFIG_FILE)):
        return []
    rows = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*", CHECKPOINT_FILE)), key=os.path.getmtime,
                       reverse=True):
        try:
            ckpt = read_checkpoint(path, mmap=True)
            step, loss = f"{int(ckpt.get('iter_num', 0)):,}", float(ckpt.get("best_val_loss", math.inf))
            loss = f"{loss:.4f}" if math.isfinite(loss) else "-"
        except (RunError, TypeError, ValueError):
            step, loss = "?", "unreadable"
        rows.append((shlex.quote(os.path.basename(os.path.dirname(path))), step, loss))
    if not rows:
        return []
    width = max(len(name) for name, _, _ in rows)
    return [f"{name:<{width}}  {step:>9}  {loss:>10}" for name, step, loss in [("NAME", "STEP", "VAL LOSS"), *rows]]
