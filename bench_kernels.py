"""
Checks and times kernels.py's fused linear + cross-entropy on a GPU, and sweeps its launch settings.

    python bench_kernels.py              # d = 64, 128 (N = 65536) and 768 (N = 16384), V = 32000, bf16
    python bench_kernels.py --no-sweep   # only the check and the timings with kernels.CONFIGS

For each shape: the relative errors of the op against the fp32 formula, then forward + backward times of the eager
formula, the torch.compile'd formula and the Triton op; then (the sweep) each kernel alone over a set of launch
settings, passed explicitly to the launches (kernels.CONFIGS is never changed), and the op with the best of them.
"""

import statistics
import sys
import time

import torch

import kernels
from kernels import CONFIGS, linear_cross_entropy, linear_cross_entropy_reference

SWEEP_TILES = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages, K_BYTES) tried for each kernel on rows <= 256 bytes
    (64, 128, 4, 3, 256), (64, 128, 4, 4, 256), (128, 128, 4, 3, 256), (128, 128, 8, 3, 256), (128, 64, 4, 3, 256),
    (64, 64, 4, 3, 256), (64, 64, 4, 4, 256), (64, 256, 8, 3, 256),
]
SWEEP_TILES_WIDE = [  # the same for wider rows
    (128, 64, 8, 2, 512), (64, 64, 4, 3, 512), (64, 64, 8, 2, 512), (64, 128, 4, 2, 512), (128, 128, 8, 3, 256),
    (64, 128, 4, 3, 256), (64, 64, 4, 3, 256), (128, 64, 4, 3, 256),
]
SWEEP_SPLITS = (1, 2, 4)


def _fwd_bwd(fn, x, weight, bias, targets):
    loss = fn(x, weight, bias, targets)
    return (loss, *torch.autograd.grad(loss, (x, weight, bias)))


def _triton_fwd_bwd(x, weight, bias, targets, configs, ignore_index=-1):
    """Loss, dx, dW, db of the op's kernels launched with the given settings {"forward": ..., "dw": ...}."""
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    loss, lse, dx = kernels._forward(x, weight, bias, targets, ignore_index, True, configs["forward"])
    keep = targets != ignore_index
    grad = keep / keep.sum()
    dw, db = kernels._backward_dw(grad, x, weight, bias, targets, lse, ignore_index, configs["dw"])
    return (loss.sum() / keep.sum(), (dx * grad[:, None]).to(x.dtype), dw.to(weight.dtype), db.to(bias.dtype))


def _time(fn, reps=20, warmup=3):
    """Median ms of fn() over reps (CUDA events) after warmup calls, and the peak memory above the start, GiB."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_mem = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - start_mem) / 2**30


def _bench_inputs(n, d, V, dtype=torch.bfloat16):
    """Unit-variance tokens, weights giving logits of standard deviation 2, a small bias, 1 in 16 targets ignored."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (2 / d ** 0.5 * torch.randn(V, d, device="cuda", generator=g)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(V, device="cuda", generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (n,), device="cuda", generator=g)
    targets[::16] = -1
    return x, weight, bias, targets


def _check(x, weight, bias, targets):
    """Relative errors (2-norm) of loss, dx, dW, db of the Triton op and of the eager bf16 formula, against the
    fp32 formula on the same (bf16-rounded) inputs."""
    inputs32 = [t.detach().float().requires_grad_() for t in (x, weight, bias)]
    ref = _fwd_bwd(linear_cross_entropy_reference, *inputs32, targets)
    del inputs32
    for name, fn in (("triton", linear_cross_entropy), ("eager bf16", linear_cross_entropy_reference)):
        try:
            out = _fwd_bwd(fn, x, weight, bias, targets)
        except Exception as e:  # report and carry on
            print(f"  check {name}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        errors = [((o.float() - r).norm() / r.norm()).item() for o, r in zip(out, ref)]
        print(f"  check {name:10s} rel. error  loss {errors[0]:.1e}  dx {errors[1]:.1e}  dW {errors[2]:.1e}"
              f"  db {errors[3]:.1e}")


def _sweep(x, weight, bias, targets, ignore_index=-1):
    """Time each kernel alone over the tiles (then the splits for dW); returns the best settings of each."""
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    _, lse, _ = kernels._forward(x, weight, bias, targets, ignore_index, False)
    grad = torch.full_like(lse, 1 / (targets != ignore_index).sum().item())
    launches = {
        "forward": lambda cfg: kernels._forward(x, weight, bias, targets, ignore_index, True, cfg),
        "dw": lambda cfg: kernels._backward_dw(grad, x, weight, bias, targets, lse, ignore_index, cfg),
    }
    tiles = SWEEP_TILES if kernels._bucket(x) <= 256 else SWEEP_TILES_WIDE
    tiles = [dict(BLOCK_M=m, BLOCK_N=n, K_BYTES=k, num_warps=w, num_stages=s) for m, n, w, s, k in tiles]
    best = {}
    for kernel, launch in launches.items():
        variants = [dict(t, SPLIT=1) for t in tiles] if kernel == "dw" else tiles
        results = _time_variants(kernel, launch, variants)
        if kernel == "dw" and results:  # then the split, with the best tiles
            splits = [dict(results[0][1], SPLIT=s) for s in SWEEP_SPLITS if s > 1]
            results = sorted(results + _time_variants(kernel, launch, splits), key=lambda r: r[0])
        if results:
            best[kernel] = results[0][1]
            print(f"  best {kernel:7s} {results[0][0]:6.3f} ms  {results[0][1]}")
    return best


def _time_variants(kernel, launch, variants):
    """[(ms, variant)] sorted by time; variants that fail to compile or run are reported and skipped."""
    results = []
    for variant in variants:
        try:
            ms, _ = _time(lambda: launch(variant), reps=10, warmup=1)
            results.append((ms, variant))
        except Exception as e:
            print(f"    {kernel} {variant}: failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
    return sorted(results, key=lambda r: r[0])


def benchmark(shapes=((65536, 64), (65536, 128), (16384, 768)), V=32000, sweep=True):
    """On a GPU, for each (N, d), bf16: check the Triton op, then time forward + backward of the eager formula, the
    torch.compile'd formula and the Triton op (with CONFIGS, then with the best settings of the sweep)."""
    if not (kernels.HAS_TRITON and torch.cuda.is_available() and not kernels.INTERPRET):
        sys.exit("bench_kernels.py needs triton and a GPU, without TRITON_INTERPRET")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {kernels.triton.__version__}")
    started = time.time()
    compiled = torch.compile(linear_cross_entropy_reference, dynamic=False)
    for n, d in shapes:
        print(f"N {n}  V {V}  d {d}  bf16")
        x, weight, bias, targets = _bench_inputs(n, d, V)
        _check(x, weight, bias, targets)
        for name, fn in (("eager", linear_cross_entropy_reference), ("compiled", compiled),
                         ("triton", linear_cross_entropy)):
            _report(name, lambda: _fwd_bwd(fn, x, weight, bias, targets))
        if sweep:
            key = kernels._bucket(x)
            best = {**CONFIGS[key], **_sweep(x, weight, bias, targets)}
            _report("triton (best)", lambda: _triton_fwd_bwd(x, weight, bias, targets, best))
            print(f"  CONFIGS[{key!r}] = {best}")
        torch.cuda.empty_cache()
    print(f"{time.time() - started:.0f} s")


def _report(name, fn):
    try:
        ms, gib = _time(fn)
        print(f"  {name:14s} fwd+bwd {ms:7.2f} ms   peak {gib:6.2f} GiB above the inputs")
    except Exception as e:
        print(f"  {name:14s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    torch.cuda.empty_cache()


if __name__ == "__main__":
    benchmark(sweep="--no-sweep" not in sys.argv)
