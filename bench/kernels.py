"""
Checks and times the fused linear + cross-entropy of kernels/cross_entropy.py on a GPU: each kernel alone at
kernels.CONFIGS and at other tile settings, against float64; then forward + backward of the kernels at CONFIGS and
at the fastest passing tiles, the op (linear_cross_entropy), torch.compile of the plain formula and eager.

    python -m bench.kernels --out ce.json   # d = 64, 128 (N = 65536) and 768 (N = 16384), V = 32000, bf16
    python -m bench.kernels --quick         # no tile sweep: CONFIGS and the baselines only

Correctness: every setting runs first on fresh random inputs of N_CHECK tokens into outputs filled with nan, and is
compared with a float64 computation of the same formula on the same (bf16) values: the mean loss (relative error,
bar 1e-3), and the relative 2-norm errors of dx, dW, db (bar 1e-2). Only settings within the bars are candidates.
Timings: triton.testing.do_bench medians. Settings that fail to compile or run are reported and skipped. Before
timing, worker processes compile every kernel setting and torch.compile's graphs in parallel (Triton's and
inductor's on-disk caches), so that the run stays within --budget seconds; past the budget the remaining sweep
entries are skipped (and listed).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kernels
from bench.common import median_ms_and_peak_gib
from kernels import CONFIGS, linear_cross_entropy, linear_cross_entropy_eager

DEVICE = "cuda"
V = 32000
SHAPES = [(65536, 64), (65536, 128), (16384, 768)]  # (N, d)
N_CHECK = 8192
REPO = Path(__file__).resolve().parents[1]  # the compile workers run from there, as python -m bench.kernels
LOSS_TOL, GRAD_TOL = 1e-3, 1e-2


def tiles(bm, bn, warps, stages, k_bytes=256, split=None):
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, K_BYTES=k_bytes, num_warps=warps, num_stages=stages)
    return cfg if split is None else dict(cfg, SPLIT=split)


SWEEP = {  # per CONFIGS bucket: the tile settings tried besides CONFIGS
    128: dict(forward=[tiles(128, 128, 4, 3), tiles(128, 128, 8, 3), tiles(64, 128, 4, 3), tiles(64, 64, 4, 3),
                       tiles(128, 64, 8, 3), tiles(256, 128, 8, 2)],
              dw=[tiles(128, 128, 8, 3, split=1), tiles(64, 128, 4, 4, split=1), tiles(64, 64, 4, 3, split=1),
                  tiles(128, 64, 4, 3, split=1), tiles(64, 256, 8, 3, split=1), tiles(128, 128, 4, 3, split=1),
                  tiles(64, 128, 4, 3, split=2)]),
    256: dict(forward=[tiles(128, 64, 4, 3), tiles(128, 128, 8, 3), tiles(64, 64, 4, 3)],
              dw=[tiles(64, 128, 4, 3, split=1), tiles(128, 64, 4, 3, split=1), tiles(128, 128, 8, 3, split=1)]),
    math.inf: dict(forward=[tiles(64, 64, 4, 3, 512)], dw=[tiles(64, 128, 4, 3, 256, split=1)]),
}


def bucket(d):
    return min(key for key in CONFIGS if key >= 2 * d)  # bf16 rows


def settings(d, quick=False):
    """[(kernel, name, cfg)] for rows of width d: CONFIGS, then (unless quick) the sweep's tiles."""
    key = bucket(d)
    out = [(k, "CONFIGS", CONFIGS[key][k]) for k in ("forward", "dw")]
    if quick:
        return out
    for k in ("forward", "dw"):
        out += [(k, "sweep", cfg) for cfg in SWEEP[key][k]]
    unique = {}
    for k, name, cfg in out:
        unique.setdefault((k, json.dumps(cfg, sort_keys=True)), (k, name, cfg))
    return list(unique.values())


def describe(cfg):
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "SPLIT", "K_BYTES")
    return " ".join(f"{k.lower().replace('block_', '').replace('num_', '')}={cfg[k]}" for k in keys if k in cfg)


# -----------------------------------------------------------------------------
# problems, the float64 reference, one launch of each kernel

def problem(n, d, bias, seed):
    """bf16 x (n, d), W (V, d) giving logits of standard deviation ~2, bias (V,) or None, targets with 1 in 16
    ignored (-1)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, d, device=DEVICE, generator=g).bfloat16()
    weight = (2 / d ** 0.5 * torch.randn(V, d, device=DEVICE, generator=g)).bfloat16()
    b = (0.1 * torch.randn(V, device=DEVICE, generator=g)).bfloat16() if bias else None
    targets = torch.randint(0, V, (n,), device=DEVICE, generator=g)
    targets[::16] = -1
    return x, weight, b, targets


def reference(x, weight, bias, targets):
    """float64: per-token loss and lse, the mean loss, g = 1/n_kept on kept rows, and dx, dW, db of the mean."""
    z = x.double() @ weight.double().T
    if bias is not None:
        z += bias.double()
    keep = targets != -1
    t = targets.clamp(min=0)
    lse = z.logsumexp(1)
    loss = torch.where(keep, lse - z.gather(1, t[:, None]).squeeze(1), 0.0)
    g = keep.double() / keep.sum()
    dz = z.sub_(lse[:, None]).exp_()
    dz[keep.nonzero().squeeze(1), t[keep]] -= 1
    dz *= g[:, None]
    ref = dict(loss=loss, lse=lse, mean=loss[keep].mean(), g=g, dx=dz @ weight.double(), dw=dz.T @ x.double(),
               db=dz.sum(0) if bias is not None else None)
    del z, dz
    torch.cuda.empty_cache()
    return ref


def rel(a, r):
    return ((a.double() - r).norm() / r.norm()).item()


def check(kernel, cfg, prob, ref):
    """Errors of one kernel against float64 (outputs filled with nan first); {name: error}."""
    x, weight, bias, targets = prob
    n, d = x.shape
    if kernel == "forward":
        out = (torch.full((n,), math.nan, device=DEVICE), torch.full((n,), math.nan, device=DEVICE),
               torch.full((n, d), math.nan, device=DEVICE))
        loss, lse, dx = kernels.launch_forward(x, weight, bias, targets, -1, True, cfg, out=out)
        keep = targets != -1
        return {"loss": abs(loss[keep].double().mean().item() - ref["mean"].item()) / ref["mean"].item(),
                "lse max abs": (lse.double() - ref["lse"]).abs().max().item(),
                "dx": rel(dx * ref["g"][:, None], ref["dx"])}
    new = torch.zeros if cfg["SPLIT"] > 1 else (lambda *s, **kw: torch.full(s, math.nan, **kw))  # atomics: zeros
    out = (new(V, d, device=DEVICE), new(V if bias is not None else 0, device=DEVICE))
    dw, db = kernels.launch_dw(ref["g"].float(), x, weight, bias, targets, ref["lse"].float(), ref["loss"].float(),
                               -1, cfg, out=out)
    errors = {"dW": rel(dw, ref["dw"])}
    if bias is not None:
        errors["db"] = rel(db, ref["db"])
    return errors


def passes(errors):
    return all(v <= (LOSS_TOL if k == "loss" else GRAD_TOL) for k, v in errors.items() if k != "lse max abs")


def launcher(kernel, cfg, prob, stats):
    """A function launching one kernel on prob; the dW kernel takes stats = (loss, lse) of the forward."""
    x, weight, bias, targets = prob
    if kernel == "forward":
        return lambda: kernels.launch_forward(x, weight, bias, targets, -1, True, cfg)
    g = (targets != -1).float() / (targets != -1).sum()
    return lambda: kernels.launch_dw(g, x, weight, bias, targets, stats[1], stats[0], -1, cfg)


def triton_fwd_bwd(prob, configs):
    """Loss and dx, dW, db as the op's autograd makes them, with explicit launch settings."""
    x, weight, bias, targets = prob
    loss, lse, dx = kernels.launch_forward(x, weight, bias, targets, -1, True, configs["forward"])
    keep = targets != -1
    n = keep.sum()
    g = keep / n
    dw, db = kernels.launch_dw(g, x, weight, bias, targets, lse, loss, -1, configs["dw"])
    return loss.sum() / n, (dx * g[:, None]).to(x.dtype), dw.to(weight.dtype), db


def autograd_fwd_bwd(fn, prob):
    x, weight, bias, targets = prob
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, targets)
    return loss, *torch.autograd.grad(loss, leaves)


# -----------------------------------------------------------------------------
# timing

def timed(fn, rep=100):
    """Median ms of fn (do_bench, about rep ms of runs) and the peak memory of one call above what was allocated
    before, GiB."""
    return median_ms_and_peak_gib(fn, DEVICE, warmup_ms=rep // 4, rep_ms=rep)


def attempt(fn):
    """(result, None) or (None, a one-line error)."""
    try:
        return fn(), None
    except Exception as e:
        lines = str(e).strip().splitlines() or [""]
        return None, f"{type(e).__name__}: {lines[0][:200]}"


# -----------------------------------------------------------------------------
# parallel compilation

def compile_jobs(quick):
    """Everything the run compiles, in a fixed order: torch.compile's graphs first, then every kernel setting."""
    jobs = [("inductor", n, d, bias) for n, d in SHAPES for bias in ((False, True) if d == 64 else (False,))]
    for n, d in SHAPES:
        jobs += [("triton", d, False, kernel, cfg) for kernel, _, cfg in settings(d, quick)]
        if d == 64:
            jobs += [("triton", d, True, kernel, cfg) for kernel, _, cfg in settings(d, quick=True)]
    return jobs


def run_compile_worker(claims, quick):
    """Compile the jobs not yet claimed by another worker (a job is claimed by creating the file claims/<index>);
    errors are left to the main process to report."""
    compiled = torch.compile(linear_cross_entropy_eager, dynamic=False)
    for index, job in enumerate(compile_jobs(quick)):
        try:
            os.close(os.open(os.path.join(claims, str(index)), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        if job[0] == "inductor":
            _, n, d, bias = job
            attempt(lambda: autograd_fwd_bwd(compiled, problem(n, d, bias, 0)))
        else:
            _, d, bias, kernel, cfg = job
            prob = problem(256, d, bias, 0)  # the same specialisations as the full sizes (multiples of 16)
            stats = torch.zeros(256, device=DEVICE), torch.zeros(256, device=DEVICE)
            attempt(lambda: launcher(kernel, cfg, prob, stats)())
        torch.cuda.synchronize()


def precompile(quick, workers, timeout):
    """Run the compile workers (subprocesses) for at most timeout seconds."""
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")  # parallel already
    with tempfile.TemporaryDirectory() as claims:
        command = [sys.executable, "-m", "bench.kernels", *(["--quick"] if quick else []), "--compile-worker", claims]
        logs = [open(os.path.join(claims, f"worker{i}.log"), "w+") for i in range(workers)]
        procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log) for log in logs]
        deadline = time.time() + timeout
        for proc, log in zip(procs, logs):
            try:
                proc.wait(max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"  a compile worker ran past {timeout:.0f} s: stopped")
            if proc.returncode not in (0, -9):
                log.seek(0)
                print(f"  a compile worker failed: {log.read()[-300:]}")
            log.close()


# -----------------------------------------------------------------------------
# the study

def study_shape(n, d, quick, deadline, compiled):
    """The sweep and the end-to-end comparison for one shape; returns its record."""
    record = dict(N=n, d=d, V=V, kernels=[], end_to_end={}, skipped=[])
    prob, check_prob = problem(n, d, False, 0), problem(N_CHECK, d, False, 1)
    ref = reference(*check_prob)
    stats = kernels.launch_forward(*prob, -1, False)[:2]
    print(f"\nN {n}  V {V}  d {d}  bf16, no bias: each kernel alone (check on {N_CHECK} fresh tokens, float64)")
    essential = settings(d, quick=True)  # timed whatever the budget
    for kernel, name, cfg in settings(d, quick):
        if time.time() > deadline and (kernel, name, cfg) not in essential:
            record["skipped"].append(dict(kernel=kernel, name=name, cfg=cfg))
            continue
        entry = dict(kernel=kernel, name=name, cfg=cfg)
        entry["errors"], error = attempt(lambda: check(kernel, cfg, check_prob, ref))
        if error is None:
            entry["ok"] = passes(entry["errors"])
            timing, error = attempt(lambda: timed(launcher(kernel, cfg, prob, stats), rep=50))
            entry["ms"] = timing[0] if timing else None
        entry["error"] = error
        record["kernels"].append(entry)
        errors = " ".join(f"{k} {v:.1e}" for k, v in (entry["errors"] or {}).items())
        status = f"failed: {error}" if error else f"{entry['ms']:7.3f} ms  {'ok  ' if entry['ok'] else 'FAIL'} {errors}"
        print(f"  {kernel:7s} {name:8s} {describe(cfg):44s} {status}")
    if record["skipped"]:
        print(f"  past the time budget, skipped {len(record['skipped'])} sweep entries")

    best = {}
    for kernel in ("forward", "dw"):
        ok = [e for e in record["kernels"] if e["kernel"] == kernel and e.get("ok") and e.get("ms")]
        if ok:
            best[kernel] = min(ok, key=lambda e: e["ms"])
    record["best"] = {k: dict(name=e["name"], cfg=e["cfg"], ms=e["ms"]) for k, e in best.items()}
    for kernel, e in best.items():
        print(f"  best {kernel}: {e['name']} {describe(e['cfg'])}  {e['ms']:.3f} ms")

    print("  forward + backward:")
    runs = {"eager": lambda p: autograd_fwd_bwd(linear_cross_entropy_eager, p),
            "torch.compile": lambda p: autograd_fwd_bwd(compiled, p),
            "kernels (CONFIGS)": lambda p: triton_fwd_bwd(p, CONFIGS[bucket(d)])}
    if 2 * d <= kernels.MAX_ROW_BYTES:
        runs["op (CONFIGS)"] = lambda p: autograd_fwd_bwd(linear_cross_entropy, p)
    if len(best) == 2:
        runs["best"] = lambda p: triton_fwd_bwd(p, {k: e["cfg"] for k, e in best.items()})
    for bias in ((False, True) if d == 64 else (False,)):
        p = prob if not bias else problem(n, d, True, 0)
        for name, run in runs.items():
            if bias and name == "eager":
                continue
            label = name + (" (bias)" if bias else "")
            result, error = attempt(lambda: timed(lambda: run(p)))
            record["end_to_end"][label] = dict(ms=result[0], peak_gib=result[1]) if result else dict(error=error)
            print(f"    {label:22s} " + (f"{result[0]:7.3f} ms   peak {result[1]:6.2f} GiB" if result else f"failed: {error}"))
        if bias and "best" in runs:  # the best pair with a bias: check it too
            pb = problem(N_CHECK, d, True, 1)
            refb = reference(*pb)
            errs = {}
            for kernel, e in best.items():
                errs.update(attempt(lambda: check(kernel, e["cfg"], pb, refb))[0] or {"failed": math.inf})
            record["best_bias_errors"] = errs
            print("    best (bias) errors: " + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
                  + ("  ok" if passes(errs) else "  FAIL"))
    torch.cuda.empty_cache()
    return record


def summary(records):
    """The closing table: per shape, each kernel at CONFIGS and at its best tiles, and forward + backward."""
    print("\nsummary (ms)")
    print(f"{'N':>6} {'d':>4} | {'fwd CONFIGS':>11} {'fwd best':>8} | {'dW CONFIGS':>10} {'dW best':>8} | "
          f"{'e2e CONFIGS':>11} {'e2e best':>8} {'op':>7} {'compile':>7} {'eager':>7} | best tiles")
    for r in records:
        current = {e["kernel"]: e.get("ms") for e in r["kernels"] if e["name"] == "CONFIGS"}
        best = r["best"]
        e2e = {k: v.get("ms") for k, v in r["end_to_end"].items()}

        def f(v, w):
            return f"{v:{w}.3f}" if isinstance(v, float) else f"{'-':>{w}}"
        print(f"{r['N']:>6} {r['d']:>4} | {f(current.get('forward'), 11)} {f(best.get('forward', {}).get('ms'), 8)} | "
              f"{f(current.get('dw'), 10)} {f(best.get('dw', {}).get('ms'), 8)} | "
              f"{f(e2e.get('kernels (CONFIGS)'), 11)} {f(e2e.get('best'), 8)} {f(e2e.get('op (CONFIGS)'), 7)} "
              f"{f(e2e.get('torch.compile'), 7)} {f(e2e.get('eager'), 7)} | "
              f"fwd: {describe(best['forward']['cfg']) if 'forward' in best else '-'}, "
              f"dW: {describe(best['dw']['cfg']) if 'dw' in best else '-'}")
    print("\nsuggested CONFIGS (the best passing settings):")
    for r in records:
        if len(r["best"]) == 2:
            print(f"  {bucket(r['d'])}: " + json.dumps({k: v["cfg"] for k, v in r["best"].items()}))


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="no tile sweep: CONFIGS and the baselines")
    parser.add_argument("--budget", type=float, default=180, help="seconds; past them the sweep stops")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--compile-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (kernels.HAS_TRITON and torch.cuda.is_available() and not kernels.INTERPRET):
        sys.exit("bench.kernels needs triton and a CUDA GPU, without TRITON_INTERPRET")
    if args.compile_worker:
        return run_compile_worker(args.compile_worker, args.quick)

    started = time.time()
    env = dict(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
               torch=torch.__version__, triton=kernels.triton.__version__)
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"compiling in {args.workers} worker processes ...")
    precompile(args.quick, args.workers, timeout=0.5 * args.budget)
    print(f"  {time.time() - started:.0f} s")
    compiled = torch.compile(linear_cross_entropy_eager, dynamic=False)
    records = []
    for i, (n, d) in enumerate(SHAPES):  # the sweep of each shape gets its share of the time left
        deadline = time.time() + (started + args.budget - 20 - time.time()) * (0.7 if i == 0 else 0.6 if i == 1 else 1)
        records.append(study_shape(n, d, args.quick, deadline, compiled))
    summary(records)
    print(f"\n{time.time() - started:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, seconds=time.time() - started, shapes=records), f, indent=1, default=str)


if __name__ == "__main__":
    main()
