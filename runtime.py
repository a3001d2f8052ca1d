"""
What every script shares at run time: one-line errors, the command-line helpers, the device and its DDP processes,
RNG states, stop signals, progress bars and files replaced atomically.

    @one_line_errors(DataError, OSError)   a script's main(argv): RunError (and the given types) print one
    def main(argv=None): ...               `error: ...` line on stderr and return the error's exit code
    device, rank, world_size = setup_device(args)   --device (and torchrun's environment) -> torch.device
"""

import argparse
import functools
import os
import signal
import sys
import tempfile
from contextlib import contextmanager, suppress

import torch
import torch.distributed as dist
from tqdm import tqdm

PROGRESS_DELAY = 1.0  # seconds before a progress bar appears: quick evaluations print no bar


class RunError(Exception):
    """Stops a script with a one-line `error: ...` and exit code `code` (2: bad flags)."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def one_line_errors(*errors):
    """Decorator of a script's main(argv): RunError and the exception types `errors` end it with one `error: ...`
    line on stderr (the message's whitespace folded to single spaces, so no traceback either) and their exit code
    (the exception's `code`, else 1)."""
    def decorate(main):
        @functools.wraps(main)
        def guarded(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except (RunError, *errors) as e:
                print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
                return getattr(e, "code", 1)
        return guarded
    return decorate


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
    """Bad flags stop with a single `error: ...` line (no usage block) and exit code 2; flags are never
    abbreviated (--lr is not --learning_rate)."""

    def __init__(self, allow_abbrev=False, formatter_class=HelpFormatter, **kwargs):
        super().__init__(allow_abbrev=allow_abbrev, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists the flags)\n")


# -----------------------------------------------------------------------------
# devices and processes

def setup_device(args):
    """(device, rank, world_size) of args.device. Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) the process
    group starts here: nccl with one GPU per process, gloo on the CPU."""
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
        if distributed and local_rank >= torch.cuda.device_count():
            raise RunError(f"process {local_rank} of this node has no GPU: {torch.cuda.device_count()} CUDA devices here "
                           f"(torchrun --nproc_per_node at most that, or --device cpu)", code=2)
        if distributed or device.index is None:
            device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, rank, world_size


def resolve_dtype(args, device):
    """args.dtype; auto: bfloat16 on CUDA where supported, else float32."""
    if args.dtype != "auto":
        return args.dtype
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def synchronize(device):
    """Wait for the device's queued work (for wall-clock timings of sample.py and the benchmarks)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def all_gather(obj, world_size):
    """[obj of rank 0, obj of rank 1, ...] (collective: every rank must call it)."""
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


# -----------------------------------------------------------------------------
# RNG states and signals

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


@contextmanager
def stop_signals():
    """While the block runs, SIGINT/SIGTERM only append to the yielded list: the training loop writes a checkpoint
    at the next step boundary and exits. A second signal acts as usual (Ctrl-C twice quits at once)."""
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
# progress bars and files

def progress_bar(total, desc, enabled=True, **kwargs):
    """A tqdm bar with an ETA on stderr, drawn only on a terminal (and where `enabled`, e.g. on rank 0) once
    PROGRESS_DELAY seconds have passed; elsewhere (a log file) a bar that draws nothing. It disappears when closed."""
    return tqdm(total=total, desc=desc, disable=not enabled or not sys.stderr.isatty(), delay=PROGRESS_DELAY,
                leave=False, dynamic_ncols=True, **kwargs)


def print_above_bars(*parts, file=None):
    """print(..., flush=True) on stdout (or `file`), clearing and redrawing the progress bars on the terminal around
    it."""
    file = file or sys.stdout
    with tqdm.external_write_mode(file=file):
        print(*parts, file=file, flush=True)


def umask():
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def replacing_file(path, mode="wb"):
    """A new file (mode 0666 less the umask) that replaces `path` atomically when the block ends: created exclusively
    under a fresh name next to `path` (so never through a link planted there), flushed to disk, then renamed over
    `path` (a link at `path` is replaced, not followed). On an error it is removed and `path` stays as it was."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=directory or ".", prefix=name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
