"""
Timing helpers shared by the benchmarks: device synchronisation, timed calls (wall clock around synchronised runs,
alternating chunks, or Triton's do_bench medians on CUDA), peak memory, releasing memory, and fixed-width tables.
"""

import gc
import math
import time
from collections import namedtuple

import torch


def synchronize(device):
    """Wait for the work queued on a CUDA device (nothing to wait for elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, calls, warmup, device):
    """Seconds per call of fn over `calls` calls after `warmup` untimed ones. The device is waited for before the
    clock starts and after the last call only, so that queued launches overlap as they do in a training loop."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def best_of(fn, repeats, device="cpu"):
    """(the last call's result, the shortest wall time in seconds) over `repeats` synchronised calls of fn."""
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def alternate(fns, calls, rounds, warmup, device):
    """{name: [seconds per call, one per round]} for a dict name -> fn: after `warmup` untimed calls of each, every
    round times `calls` calls of each fn in turn, so that a drift of the device's clocks hits them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds_per_call(fn, calls, 0, device))
    return times


def reset_peak_memory(device):
    """Start counting peak memory afresh (CUDA), with the cached blocks given back first."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """GiB allocated at most since reset_peak_memory (CUDA), else None."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def peak_gib_of_call(fn):
    """Peak GiB allocated by one call of fn (CUDA) above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def median_ms_and_peak_gib(fn, device, warmup_ms=25, rep_ms=100):
    """(median ms per call, peak GiB of one call above the memory in use before it) on CUDA: Triton's do_bench over
    about rep_ms of calls after warmup_ms of them. Elsewhere (the Triton interpreter): the ms of one call and nan."""
    if torch.device(device).type != "cuda":
        return 1e3 * best_of(fn, 1)[1], math.nan
    from triton.testing import do_bench
    ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return ms, peak_gib_of_call(fn)


def release_memory(device):
    """Drop the compiled models (dynamo holds them) and give the cached GPU memory back to the driver."""
    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def training_step(model, optimizer, device, compile_model, **forward_kwargs):
    """step(x, y) -> loss: forward (torch.compile'd when asked) + backward under bf16 autocast on CUDA, then the
    optimizer's step; forward_kwargs go to the model with (x, y)."""
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model

    def step(x, y):
        with autocast:
            _, loss = forward(x, y, **forward_kwargs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


Column = namedtuple("Column", "title width spec align", defaults=("", ">"))


class Table:
    """Lines of fixed-width columns separated by a space: Column(title, width, format spec, alignment); a value
    None prints as '-', and a row may stop short of the last columns."""

    def __init__(self, *columns):
        self.columns = columns

    def header(self):
        return " ".join(format(c.title, f"{c.align}{c.width}") for c in self.columns)

    def row(self, *values):
        return " ".join(format("-" if v is None else format(v, c.spec), f"{c.align}{c.width}")
                        for c, v in zip(self.columns, values))
