"""
Run the paper's Tiny Stories grid with train.py: one `train.py --arch paper` run per row of the table, queued over
the GPUs of this machine, resumable, with a live status table.

The 33 rows of the table (d in {64, 128}, L in {4, 5, 6}, Transformer 8/0, DAT 6/2 and 4/4, symbol type, symmetry),
one run per GPU:
$ python sweep.py paper --gpus 0,1,2,3,4,5,6,7 -- --compile 1
Then the table and figures beside the authors' logs:
$ python report.py --runs out/paper --paper_logs run_histories.csv --out_dir report

paper_ablations adds the ablation runs of the authors' logs: RCA instead of relational attention (d=64, L 4-6, 6/2
and 4/4) and frozen symbols (d=64, L=5, 6/2, symmetric). Each run writes out_dir/<row>/ (train.py's run directory
inside, plus train.log). Running the same command again skips the finished runs and resumes the others from their
checkpoints (--init_from resume); a command whose settings differ from those a run of out_dir was trained with
(other flags after `--`) is refused. Ctrl-C or SIGTERM sends SIGTERM to every running train.py, which writes a
checkpoint and exits; a second Ctrl-C stops them at once; on Linux the runs get that SIGTERM too when sweep.py itself
is killed (kill -9 included). Flags after `--` go to every train.py (not those that each row or the sweep sets, nor
their prefixes).
"""

import argparse
import ctypes
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime

import flags
from checkpoints import CHECKPOINT_FILE
from runs import recorded_config, setting_differences
from runtime import RunError, one_line_errors

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN_PY = os.path.join(REPO, "train.py")
SYMBOLIC, RELATIVE = "symbolic_attention", "position_relative"
RA, RCA = "relational_attention", "rca"

PAPER_STEPS = 100_000
SEQUENCES_PER_STEP = 256  # 128 sequences x 2 accumulation steps of 512 tokens: 131,072 tokens per step
# the paper's training settings (the authors' logs; the batch: batch_flags), and a checkpoint at every evaluation so
# that a resume repeats at most one evaluation interval
PAPER_SETTINGS = dict(arch="paper", pos_enc_type="RoPE", max_seq_len=512, learning_rate=1e-3, use_cosine_sched=0,
                      dropout_rate=0.1, eval_interval=2000, eval_iters=100, always_save_checkpoint=1)
# flags each row sets (or the sweep itself): they cannot be passed through after `--`
ROW_FLAGS = {"arch", "sa", "ra", "symbol_type", "ra_type", "symmetric_rels", "trainable_symbols", "d_model",
             "n_layers", "pos_enc_type"}
SWEEP_FLAGS = {"out_dir", "init_from", "ckpt_path", "max_iters"}


@dataclass(frozen=True)
class Row:
    """One model configuration of the grid: the flags that differ between the paper's runs."""
    d_model: int
    n_layers: int
    sa: int
    ra: int
    symbol_type: str = "NA"
    ra_type: str = "NA"
    symmetric_rels: int = 0
    trainable_symbols: int = 1

    @classmethod
    def from_flags(cls, f):
        """The row of a run's flags (train.py's names), with the flags its model ignores set to their defaults."""
        ra = int(f["ra"])
        if ra == 0:
            return cls(int(f["d_model"]), int(f["n_layers"]), int(f["sa"]), 0)
        symmetric = int(f.get("symmetric_rels", 0)) if f["ra_type"] == RA else 0
        trainable = int(f.get("trainable_symbols", 1)) if f["symbol_type"] == SYMBOLIC else 1
        return cls(int(f["d_model"]), int(f["n_layers"]), int(f["sa"]), ra, f["symbol_type"], f["ra_type"],
                   symmetric, trainable)

    @property
    def name(self):
        """Directory name, e.g. d64_L4_transformer, d64_L4_dat6-2_symattn_asym, d64_L5_dat6-2_symattn_rca."""
        name = f"d{self.d_model}_L{self.n_layers}_"
        if self.ra == 0:
            return name + "transformer"
        name += f"dat{self.sa}-{self.ra}_" + {SYMBOLIC: "symattn", RELATIVE: "posrel"}.get(self.symbol_type,
                                                                                           self.symbol_type)
        name += "_" + (("sym" if self.symmetric_rels else "asym") if self.ra_type == RA else self.ra_type)
        return name + ("" if self.trainable_symbols else "_frozen")

    @property
    def columns(self):
        """(model, symbols, relations) as the paper's table names them."""
        if self.ra == 0:
            return f"Transformer {self.sa}/0", "", ""
        symbols = {SYMBOLIC: "symbolic attention", RELATIVE: "position-relative"}.get(self.symbol_type,
                                                                                      self.symbol_type)
        if not self.trainable_symbols:
            symbols += ", frozen"
        relations = ("symmetric" if self.symmetric_rels else "asymmetric") if self.ra_type == RA else \
            self.ra_type.upper()
        return f"DAT {self.sa}/{self.ra}", symbols, relations

    @property
    def label(self):
        """e.g. `d=64; L=4; DAT 6/2; symbolic attention; asymmetric` (what --only matches, besides the name)."""
        return "; ".join([f"d={self.d_model}", f"L={self.n_layers}", *filter(None, self.columns)])

    def flags(self):
        f = dict(sa=self.sa, ra=self.ra, symbol_type=self.symbol_type, ra_type=self.ra_type,
                 d_model=self.d_model, n_layers=self.n_layers)
        if self.ra_type == RA:
            f["symmetric_rels"] = self.symmetric_rels
        if not self.trainable_symbols:
            f["trainable_symbols"] = 0
        return f


# (d_model, n_layers): the DAT rows of the paper's table as (sa, ra, symbol type, symmetric relations)
PAPER_DAT = {
    (64, 4): [(6, 2, SYMBOLIC, 0), (6, 2, SYMBOLIC, 1), (6, 2, RELATIVE, 0), (6, 2, RELATIVE, 1),
              (4, 4, SYMBOLIC, 0), (4, 4, SYMBOLIC, 1), (4, 4, RELATIVE, 0), (4, 4, RELATIVE, 1)],
    (64, 5): [(6, 2, SYMBOLIC, 0), (6, 2, SYMBOLIC, 1), (6, 2, RELATIVE, 1), (4, 4, SYMBOLIC, 0),
              (4, 4, SYMBOLIC, 1)],
    (64, 6): [(6, 2, SYMBOLIC, 0), (6, 2, SYMBOLIC, 1), (6, 2, RELATIVE, 1), (4, 4, SYMBOLIC, 0),
              (4, 4, SYMBOLIC, 1), (4, 4, RELATIVE, 0), (4, 4, RELATIVE, 1)],
    (128, 4): [(6, 2, SYMBOLIC, 0), (6, 2, SYMBOLIC, 1), (4, 4, SYMBOLIC, 0), (4, 4, SYMBOLIC, 1)],
    (128, 6): [(6, 2, SYMBOLIC, 0), (6, 2, SYMBOLIC, 1), (4, 4, SYMBOLIC, 0), (4, 4, SYMBOLIC, 1)],
}
PAPER_ROWS = [row for (d, L), dats in PAPER_DAT.items()
              for row in [Row(d, L, 8, 0)] + [Row(d, L, sa, ra, sym, RA, s) for sa, ra, sym, s in dats]]
ABLATION_ROWS = ([Row(64, L, sa, ra, SYMBOLIC, RCA) for L in (4, 5, 6) for sa, ra in ((6, 2), (4, 4))]
                 + [replace(Row(64, 5, 6, 2, SYMBOLIC, RA, 1), trainable_symbols=0)])
GRIDS = {"paper": PAPER_ROWS, "paper_ablations": PAPER_ROWS + ABLATION_ROWS}


# -----------------------------------------------------------------------------
# commands

class SweepError(RunError):
    """Bad input: a one-line `error: ...` and exit code 2."""

    def __init__(self, message):
        super().__init__(message, code=2)


def batch_flags(gpus_per_run):
    """Batch size and accumulation steps that keep 256 sequences per step over `gpus_per_run` DDP processes
    (train.py divides the accumulation steps by the number of processes)."""
    if gpus_per_run <= 2:
        return dict(batch_size=128, gradient_accumulation_steps=2)
    return dict(batch_size=SEQUENCES_PER_STEP // gpus_per_run, gradient_accumulation_steps=gpus_per_run)


def row_flags(row, max_iters, gpus_per_run):
    """train.py's flags for a row: its model, the paper's training settings, max_iters."""
    flags = dict(row.flags(), **PAPER_SETTINGS, **batch_flags(gpus_per_run), max_iters=max_iters)
    return [s for k, v in flags.items() for s in (f"--{k}", str(v))]


def launcher(gpus_per_run, python="python", train_py=None):
    """python train.py, or torchrun's module with gpus_per_run processes."""
    train_py = train_py or os.path.relpath(TRAIN_PY)
    if gpus_per_run == 1:
        return [python, train_py]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus_per_run}", train_py]


def train_command(row, row_dir, resume, max_iters, gpus_per_run, extra, python="python"):
    """The argv of one run: train.py (torchrun with gpus_per_run > 1) with the paper's settings, writing into
    row_dir, from its checkpoint when `resume`; then the pass-through flags `extra`."""
    return (launcher(gpus_per_run, python) + row_flags(row, max_iters, gpus_per_run)
            + ["--out_dir", row_dir, "--init_from", "resume" if resume else "scratch"] + list(extra))


def check_extra(extra):
    """Refuse pass-through flags that each row or the sweep sets, and any prefix of them (--max_it: an
    argparse that expands prefixes would read it as --max_iters)."""
    for arg in extra:
        typed = arg[2:].split("=")[0] if arg.startswith("--") else ""
        for name in sorted(ROW_FLAGS | SWEEP_FLAGS):
            if typed and name.startswith(typed):
                given = f"--{typed}" + ("" if typed == name else f" (a prefix of --{name})")
                if name in ROW_FLAGS:
                    raise SweepError(f"{given}: --{name} is set by each row of the grid: it cannot be passed to "
                                     "train.py")
                raise SweepError(f"{given}: --{name} is set by sweep.py for each run (give sweep.py's own "
                                 "--max_iters or --out_dir before the --)")


def train_flags(argv):
    """train.py's flags (a Namespace, defaults filled in) for argv; SweepError where its parser refuses them."""
    parser = flags.build_parser()

    def refuse(message):
        raise SweepError(f"train.py refuses the flags after --: {message}")

    parser.error = refuse
    return parser.parse_args(argv)


def check_run_dirs(args, rows, extra):
    """Refuse to reuse out_dir/<row> when a run in it was trained with other settings (train.py's RUN_SETTINGS)
    than this command gives: it would count as finished, or fail to resume. A run whose record cannot be read is
    left to train.py, which names the damage when it resumes."""
    clashes = []
    for row in rows:
        ours = vars(train_flags(row_flags(row, args.max_iters, args.gpus_per_run) + list(extra)))
        for run_dir in run_dirs(os.path.join(args.out_dir, row.name)):
            try:
                recorded = recorded_config(os.path.join(run_dir, CHECKPOINT_FILE))
            except RunError:
                continue
            if ours["dtype"] == "auto":  # resolved on the run's device: any recorded dtype is what auto gave
                recorded = dict(recorded, dtype="auto")
            differ = setting_differences(recorded, ours)
            if differ:
                clashes.append(f"{row.name} ({', '.join(differ)})")
                break
    if clashes:
        raise SweepError(f"--out_dir {args.out_dir}: {len(clashes)} of its runs were trained with other settings than "
                         f"this command's: {'; '.join(clashes)}. Give the flags they were trained with after --, or "
                         "another --out_dir")


def writable_dir(path, flag="--out_dir"):
    """Create the directory `path` if needed and check that files can be written in it; SweepError naming `flag`
    otherwise (a file, a read-only place)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SweepError(f"{flag} {path}: not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SweepError(f"{flag} {path}: cannot write there ({e.strerror})") from None


def select_rows(grid, only):
    rows = GRIDS[grid]
    if only is None:
        return rows
    try:
        pattern = re.compile(only)
    except re.error as e:
        raise SweepError(f"--only {only!r}: not a regular expression ({e})") from None
    chosen = [r for r in rows if pattern.search(r.name) or pattern.search(r.label)]
    if not chosen:
        raise SweepError(f"--only {only!r} matches no run of {grid} (names look like {rows[1].name}, labels like "
                         f"'{rows[1].label}')")
    return chosen


def gpu_slots(gpus, gpus_per_run):
    """CUDA_VISIBLE_DEVICES of each slot ([None]: one run at a time, the environment left as it is)."""
    if gpus is None:
        return [None]
    ids = [g.strip() for g in gpus.split(",")]
    if not all(g.isdigit() for g in ids):
        raise SweepError(f"--gpus {gpus}: give GPU indices separated by commas, e.g. 0,1,2,3")
    if len(ids) % gpus_per_run:
        raise SweepError(f"--gpus {gpus}: {len(ids)} GPUs do not split into runs of --gpus_per_run {gpus_per_run}")
    slots = [ids[i:i + gpus_per_run] for i in range(0, len(ids), gpus_per_run)]
    if gpus_per_run > 1 and any(len(set(s)) < len(s) for s in slots):
        raise SweepError(f"--gpus {gpus}: a run over {gpus_per_run} GPUs needs {gpus_per_run} different ones")
    return [",".join(s) for s in slots]


# -----------------------------------------------------------------------------
# the state of a run, from its directory

def run_dirs(row_dir):
    """train.py's run directories under out_dir/<row> (normally one)."""
    if not os.path.isdir(row_dir):
        return []
    return sorted(p for p in (os.path.join(row_dir, d) for d in os.listdir(row_dir))
                  if any(os.path.isfile(os.path.join(p, f)) for f in ("metrics.jsonl", CHECKPOINT_FILE)))


def has_checkpoint(row_dir):
    return any(os.path.isfile(os.path.join(d, CHECKPOINT_FILE)) for d in run_dirs(row_dir))


def evaluated_steps(row_dir):
    """The last step evaluated by any run under out_dir/<row> (-1: none). A run is finished when its last step is."""
    last = -1
    for d in run_dirs(row_dir):
        path = os.path.join(d, "metrics.jsonl")
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                last = max([last] + [record["iter"] for record in map(parse_record, f)
                                     if record and "val/loss" in record and isinstance(record.get("iter"), int)])
    return last


def parse_record(line):
    """One metrics.jsonl line as a dict (None for a line cut short by a crash, or any other line that is not a
    record)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class Progress:
    """Follows a running run's metrics.jsonl: step, last val loss and the step time logged lately."""

    def __init__(self, row_dir):
        self.row_dir, self.path, self.offset = row_dir, None, 0
        self.step, self.val_loss, self.step_ms = None, None, deque(maxlen=20)

    def update(self):
        if self.path is None:
            found = [os.path.join(d, "metrics.jsonl") for d in run_dirs(self.row_dir)]
            found = [p for p in found if os.path.isfile(p)]
            if not found:
                return
            self.path = max(found, key=os.path.getmtime)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line being written: read it next time
                self.offset += len(line)
                record = parse_record(line.decode(errors="replace"))
                if record is None:
                    continue
                self.step = record.get("iter", self.step)
                if "val/loss" in record:
                    self.val_loss = record["val/loss"]
                if "step_ms" in record:
                    self.step_ms.append(record["step_ms"])

    def eta(self, total_steps):
        """Seconds left at the median logged step time (evaluations not counted), or None."""
        if self.step is None or not self.step_ms:
            return None
        return max(total_steps - self.step, 0) * statistics.median(self.step_ms) / 1000


# -----------------------------------------------------------------------------
# running the queue

@dataclass
class Job:
    row: Row
    state: str = "queued"  # queued, running, done, stopped, failed
    slot: str = None
    proc: subprocess.Popen = None
    progress: Progress = None
    signalled: int = 0  # SIGTERMs sent to it
    note: str = ""


class Sweep:
    """Runs the queued rows over the GPU slots, one train.py per slot; forwards SIGINT/SIGTERM to them."""

    def __init__(self, args, rows, slots, extra):
        self.args, self.slots, self.extra = args, slots, extra
        self.jobs = [Job(row) for row in rows]
        self.signals = []  # received by sweep.py
        self.tty = sys.stdout.isatty()
        self.drawn_lines, self.last_table = 0, -math.inf
        self.die_with_sweep = parent_death_signal()
        for job in self.jobs:
            if evaluated_steps(self.row_dir(job.row)) >= args.max_iters:
                job.state, job.note, job.progress = "done", "finished earlier", Progress(self.row_dir(job.row))

    def row_dir(self, row):
        return os.path.join(self.args.out_dir, row.name)

    def run(self):
        """Exit code: 0 when every run finished, 128 + the signal when stopped, 1 when a run failed."""
        previous = {s: signal.signal(s, lambda signum, frame: self.signals.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            queue = deque(job for job in self.jobs if job.state == "queued")
            running = {}  # slot index -> job
            self.event(f"{len(self.jobs) - len(queue)} of {len(self.jobs)} runs finished earlier; {len(queue)} to "
                       f"run, {len(self.slots)} at a time, in {self.args.out_dir}")
            announced = 0
            while queue or running:
                if len(self.signals) > announced:
                    announced = len(self.signals)
                    what = "stopping every run at once" if announced > 1 else \
                        "every run writes a checkpoint and exits (a second Ctrl-C: at once)"
                    self.event(f"{signal.Signals(self.signals[-1]).name}: {what}; rerun the command to resume")
                for i in range(len(self.slots)):
                    while i not in running and queue and not self.signals:
                        job = self.start(queue.popleft(), self.slots[i])
                        if job:
                            running[i] = job
                for i, job in list(running.items()):
                    if job.proc.poll() is not None:
                        self.finish(job)
                        del running[i]
                    elif job.signalled < len(self.signals):  # train.py: the first SIGTERM checkpoints, a second quits
                        job.proc.send_signal(signal.SIGTERM)
                        job.signalled += 1
                if self.signals and not running:
                    break
                self.draw()
                time.sleep(0.2)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        self.draw(final=True)
        if self.signals:
            return 128 + self.signals[0]
        return 1 if any(j.state == "failed" for j in self.jobs) else 0

    def start(self, job, slot):
        """Launch the job's train.py on `slot`; the job is failed instead when its row directory cannot be
        written."""
        row_dir = self.row_dir(job.row)
        resume = has_checkpoint(row_dir)
        argv = train_command(job.row, row_dir, resume, self.args.max_iters, self.args.gpus_per_run, self.extra,
                             python=sys.executable)
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        try:
            os.makedirs(row_dir, exist_ok=True)
            with open(os.path.join(row_dir, "train.log"), "a") as log:
                log.write(f"\n=== {datetime.now():%Y-%m-%d %H:%M:%S} sweep.py"
                          f"{'' if slot is None else ' CUDA_VISIBLE_DEVICES=' + slot}: {shlex.join(argv)}\n")
                log.flush()
                # a session of its own: a Ctrl-C on the terminal reaches sweep.py only, which forwards one SIGTERM
                job.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=self.die_with_sweep)
        except OSError as e:
            job.state, job.note = "failed", f"cannot write {row_dir}: {e.strerror}"
            self.event(f"failed {job.row.name} ({job.note})")
            return None
        job.state, job.slot, job.progress = "running", slot, Progress(row_dir)
        self.event(f"start {job.row.name}" + ("" if slot is None else f" on GPU {slot}") +
                   (" (resuming)" if resume else "") + f": log in {os.path.join(row_dir, 'train.log')}")
        return job

    def finish(self, job):
        code = job.proc.returncode
        job.progress.update()
        if code == 0 or evaluated_steps(self.row_dir(job.row)) >= self.args.max_iters:
            job.state = "done"
            if code:  # e.g. stopped while sampling, after its last evaluation
                job.note = f"exit {code} after its last evaluation"
        elif code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            job.state, job.note = "stopped", "checkpointed: rerun to resume"
        else:
            job.state = "failed"
            job.note = (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}") + \
                f": {failure_line(os.path.join(self.row_dir(job.row), 'train.log'))}"
        self.event(f"{job.state} {job.row.name}" + (f" ({job.note})" if job.note else ""))

    def event(self, text):
        """One line on the terminal (above the live table on a tty)."""
        self.clear()
        print(f"{datetime.now():%H:%M:%S} {text}", flush=True)

    def clear(self):
        if self.tty and self.drawn_lines:
            sys.stdout.write(f"\x1b[{self.drawn_lines}F\x1b[J")
            self.drawn_lines = 0

    def draw(self, final=False):
        """The status table: redrawn in place every second on a tty; printed every --status_every seconds (and at
        the end) otherwise."""
        now = time.monotonic()
        if not final and now - self.last_table < (1 if self.tty else self.args.status_every):
            return
        self.last_table = now
        for job in self.jobs:
            if job.progress is not None and job.state in ("running", "done"):
                job.progress.update()
        self.clear()
        lines = self.table()
        print("\n".join(lines), flush=True)
        self.drawn_lines = len(lines) if self.tty and not final else 0

    def table(self):
        width = max(len(j.row.name) for j in self.jobs)
        counts = {s: sum(j.state == s for j in self.jobs) for s in ("done", "running", "queued", "stopped", "failed")}
        lines = [f"{self.args.grid}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
                 f"{'run':<{width}}  {'state':<8} {'gpu':<5} {'step':>9}  {'val loss':>8}  {'ETA':>8}  note"]
        for job in self.jobs:
            p = job.progress
            step = "" if p is None or p.step is None else f"{p.step:,}"
            val = "" if p is None or p.val_loss is None else f"{p.val_loss:.4f}"
            eta = p.eta(self.args.max_iters) if job.state == "running" else None
            lines.append(f"{job.row.name:<{width}}  {job.state:<8} {job.slot or '':<5} {step:>9}  {val:>8}  "
                         f"{duration(eta):>8}  {job.note}".rstrip())
        return lines


PR_SET_PDEATHSIG = 1  # prctl option of <linux/prctl.h>


def parent_death_signal():
    """A preexec_fn for train.py: on Linux the kernel sends the child SIGTERM (train.py writes a checkpoint and
    exits) when sweep.py ends, kill -9 included. None elsewhere: there the runs outlive a killed sweep (their run
    lock keeps a rerun from writing into them)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    sweep_pid = os.getpid()

    def set_signal():
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM))
        if os.getppid() != sweep_pid:  # sweep.py died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return set_signal


def duration(seconds):
    if seconds is None:
        return ""
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


def failure_line(path):
    """What the last attempt logged in train.log: its last `error: ...` line, else its last line."""
    with open(path, errors="replace") as f:
        text = f.read()
    lines = [line.strip() for line in text[text.rfind("\n=== "):].splitlines()[2:] if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1]


# -----------------------------------------------------------------------------
# Slurm

SLURM_TASK = """\
dir={out_dir}/$name
mkdir -p "$dir"
init=scratch
if compgen -G "$dir/*/{checkpoint}" > /dev/null; then init=resume; fi
requeue=0
trap 'requeue=1; kill -TERM $pid' USR1  # --signal: the time limit is near
trap ':' TERM  # preemption: Slurm signals train.py itself, which checkpoints; wait for it
{launch} "${{flags[@]}}" --out_dir "$dir" --init_from $init {extra} >> "$dir/train.log" 2>&1 &
pid=$!
while kill -0 $pid 2> /dev/null; do wait $pid; done
wait $pid
code=$?
if [ $requeue = 1 ]; then scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"; fi
exit $code
"""


def sbatch_escape(path):
    """path inside a double-quoted argument of an #SBATCH line: sbatch reads a backslash as an escape (so `"` is
    written `\\"`) and expands %A, %a, ... in file names (so `%` is written `%%`). SweepError for what such a line
    cannot name: a line break, or a backslash (in a file name it turns sbatch's expansion off)."""
    if "\\" in path or "\n" in path:
        raise SweepError(f"--out_dir {path!r}: an sbatch --output path cannot hold a backslash or a line break; "
                         "choose another --out_dir")
    return path.replace("%", "%%").replace('"', '\\"')


def slurm_script(args, rows, extra, path):
    """One sbatch job-array script: task i trains rows[i] in out_dir/<row>, from its checkpoint if there is one. A
    requeued task (preemption, or its own requeue when the time limit is near) resumes."""
    out_dir = os.path.abspath(args.out_dir)
    k = args.gpus_per_run
    cases = [f"  {i}) name={row.name}; flags=({shlex.join(row_flags(row, args.max_iters, k))}) ;;"
             for i, row in enumerate(rows)]
    header = [
        "#!/bin/bash",
        f"# sweep.py {args.grid}: {len(rows)} runs of train.py, one per array task. Submit with",
        f"#   sbatch [--partition P] [--time T] [--account A] {shlex.quote(os.path.abspath(path))}",
        "# A task requeued (by preemption, or by itself before its time limit) resumes from its checkpoint.",
        f"#SBATCH --job-name=dat-{args.grid}",
        f"#SBATCH --array=0-{len(rows) - 1}",
        f"#SBATCH --gres=gpu:{k}",
        f"#SBATCH --cpus-per-task={4 * k}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@300",
        f'#SBATCH --output="{sbatch_escape(out_dir)}/slurm-%A_%a.log"',
        "",
        f"cd {shlex.quote(os.getcwd())}",
        'case "$SLURM_ARRAY_TASK_ID" in',
        *cases,
        '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
    ]
    return "\n".join(header) + "\n" + SLURM_TASK.format(out_dir=shlex.quote(out_dir),
                                                        launch=shlex.join(launcher(k, train_py=TRAIN_PY)),
                                                        extra=shlex.join(extra), checkpoint=CHECKPOINT_FILE)


# -----------------------------------------------------------------------------
# the command line

def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        usage="%(prog)s {paper,paper_ablations} [options] [-- train.py flags]")
    p.add_argument("grid", choices=sorted(GRIDS),
                   help="paper: the 33 rows of the paper's table; paper_ablations: those and the RCA and "
                        "frozen-symbol ablations of the authors' logs (40 runs)")
    p.add_argument("--out_dir", default="out/paper", help="each run writes out_dir/<row>/ (default: out/paper)")
    p.add_argument("--max_iters", type=int, default=PAPER_STEPS,
                   help=f"steps per run (default: the paper's {PAPER_STEPS:,}); fewer for a shortened replication. "
                        "A run is finished once it has evaluated this step; a larger value later extends the runs")
    p.add_argument("--only", metavar="REGEX",
                   help="only the rows whose name (e.g. d64_L4_dat6-2_symattn_asym) or label (e.g. 'd=64; L=4; "
                        "DAT 6/2; symbolic attention; asymmetric') matches this regular expression")
    p.add_argument("--gpus", metavar="IDS",
                   help="GPU indices to queue the runs over, one run per GPU at a time (CUDA_VISIBLE_DEVICES), "
                        "e.g. 0,1,2,3. Repeat an index to run several small runs on one GPU at once, e.g. 0,0,1,1 "
                        "(default: one run at a time, CUDA_VISIBLE_DEVICES as it is)")
    p.add_argument("--gpus_per_run", type=int, default=1,
                   help="GPUs per run (DDP through torchrun --standalone); the global batch stays 256 sequences of "
                        "512 tokens (default: 1)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the train.py command of every run still to do, one per line, and exit")
    p.add_argument("--slurm", action="store_true",
                   help="write out_dir/<grid>.sbatch, a Slurm job-array script with one task per run (each resuming "
                        "when requeued), instead of running anything")
    p.add_argument("--status_every", type=float, default=300,
                   help="seconds between status tables when the output is not a terminal (default: 300)")
    return p


def parse_args(argv):
    """(args, train.py flags after `--`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(own)
    if args.max_iters <= 0:
        parser.error(f"--max_iters must be positive (got {args.max_iters})")
    if args.gpus_per_run <= 0 or SEQUENCES_PER_STEP % args.gpus_per_run:
        parser.error(f"--gpus_per_run must divide {SEQUENCES_PER_STEP} (1, 2, 4, 8, ...; got {args.gpus_per_run})")
    return args, extra


@one_line_errors()
def main(argv=None):
    args, extra = parse_args(argv)
    check_extra(extra)
    rows = select_rows(args.grid, args.only)
    slots = gpu_slots(args.gpus, args.gpus_per_run)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise SweepError(f"--out_dir {args.out_dir}: not a directory")
    check_run_dirs(args, rows, extra)
    if args.slurm:
        path = os.path.join(args.out_dir, f"{args.grid}.sbatch")
        script = slurm_script(args, rows, extra, path)
        writable_dir(args.out_dir)
        with open(path, "w") as f:
            f.write(script)
        print(f"wrote {path}: {len(rows)} array tasks; submit it with: sbatch {shlex.quote(path)}")
        return 0
    if args.dry_run:
        todo = [r for r in rows if evaluated_steps(os.path.join(args.out_dir, r.name)) < args.max_iters]
        for row in todo:
            row_dir = os.path.join(args.out_dir, row.name)
            print(shlex.join(train_command(row, row_dir, has_checkpoint(row_dir), args.max_iters,
                                           args.gpus_per_run, extra)))
        print(f"# {len(todo)} of {len(rows)} runs to do", file=sys.stderr)
        return 0
    writable_dir(args.out_dir)
    return Sweep(args, rows, slots, extra).run()


if __name__ == "__main__":
    sys.exit(main())
