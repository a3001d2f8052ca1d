"""
The fused position-relative attention of kernels/relational.py on a GPU: check it, then time it against what it
replaces.

    python -m bench.relational                      # checks, then timings at the model shapes (4-7 min, H200)
    python -m bench.relational --shapes d64 --variants 64x64w4
    TRITON_INTERPRET=1 python -m bench.relational --quick   # tiny shapes, on a CPU through the Triton interpreter

Checks: the kernel's outputs and gradients (o^v, o^R, dq, dk, dv, dR) against the materialised formula computed in
float64 on the same values, for float64, float32 and bfloat16 inputs, with clipped offsets (M < T - 1), RA (relation
keys shared by the heads as values) and RCA (no values); dropout against the kernel's own mask (identity values
reveal it) and its rate. Memory is poisoned with NaN before each checked call, so unwritten outputs show.

Timings at the shapes of the d=64, d=128 and d=768 models of bench.train (SHAPES: B, T, n heads of width h, n_r
relations of width d_r; table M = T), bfloat16, forward + backward, median of triton's do_bench, and peak memory
above the inputs, for dropout 0 and 0.1:
  sdpa       causal SDPA over the same n heads with h-wide values: what n self-attention heads cost
  skew       the current path, torch.compile'd: weights (B, n, T, T) materialised, softmax, dropout, skew, matmuls
  fused      the kernel with kernels.RELPOS_CONFIGS; at dropout 0.1 also each variant of launch settings (fused/X),
             and the best variant per shape, printed as a RELPOS_CONFIGS entry.
At dropout 0.1 also RA with per-position symbols (values [symbols || relation keys], h + n_r d_r wide per head):
SDPA, as attention.py runs it (its memory-efficient kernel), against the kernel without a table.
A variant that fails to compile or run is reported and skipped; past --budget seconds (most of it Triton compiling
the variants' kernels) the remaining variants are skipped, not the other rows.
"""

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

import kernels
from attention import attend_symbols, causal_softmax
from bench.common import median_ms_and_peak_gib

SHAPES = {  # B, T, n heads of width h, n_r relations of width d_r (the value width of RA is n_r d_r): the RA layers
    # of the DAT configs d64 L4 and d128 L6 (batch 128 x 512) and d768 L12 (batch 16 x 1024)
    "d64": dict(B=128, T=512, n=4, h=8, n_r=4, d_r=8),
    "d768": dict(B=16, T=1024, n=6, h=64, n_r=6, d_r=64),
    "d128": dict(B=128, T=512, n=4, h=16, n_r=4, d_r=16),
}
QUICK_SHAPES = {"tiny": dict(B=2, T=40, n=2, h=8, n_r=2, d_r=8)}


def tiles(m, n, warps, stages, block_v=128, dtable=64, dtable_warps=4, dkdv=None):
    """Launch settings of the four kernels: (BLOCK_M, BLOCK_N) for the forward and dq, dkdv's (default the same),
    the value chunk width, the block of the table gradient."""
    def cfg(bm, bn):
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_V=block_v, num_warps=warps, num_stages=stages)
    return {"forward": cfg(m, n), "dq": cfg(m, n), "dkdv": cfg(*(dkdv or (m, n))),
            "dtable": dict(BLOCK=dtable, num_warps=dtable_warps, num_stages=stages)}


VARIANTS = {
    "64x64w4": tiles(64, 64, 4, 2),
    "64x64w8": tiles(64, 64, 8, 2, dtable_warps=8),
    "128x64w8": tiles(128, 64, 8, 2, dkdv=(64, 128)),
    "64x32w4s3": tiles(64, 32, 4, 3, block_v=64, dtable=32),
    "64x64w8v256": tiles(64, 64, 8, 2, block_v=256, dtable_warps=8),  # d768: 2 value chunks instead of 3
}
QUICK_VARIANTS = {"16x16": tiles(16, 16, 4, 1, block_v=16, dtable=16)}


# -----------------------------------------------------------------------------
# inputs and the implementations

def make_inputs(shape, dtype, device, max_rel_pos, rca=False, seed=0):
    """q, k (B, n, T, h); v (B, 1, T, n_r d_r) (None for RCA); the projected table (2M+1, n h); the gradients of
    the outputs. Leaves require grad."""
    B, T, n, h, width = shape["B"], shape["T"], shape["n"], shape["h"], shape["n_r"] * shape["d_r"]
    g = torch.Generator(device=device).manual_seed(seed)
    def rand(*size):
        return torch.randn(*size, device=device, generator=g).to(dtype).requires_grad_()
    q, k = rand(B, n, T, h), rand(B, n, T, h)
    v = None if rca else rand(B, 1, T, width)
    table = rand(2 * max_rel_pos + 1, n * h)
    grads = [torch.randn(B, n, T, w, device=device, generator=g).to(dtype) for w in ((h,) if rca else (width, h))]
    return q, k, v, table, grads


def heads(table, n):
    return table.unflatten(-1, (n, -1)).transpose(0, 1)  # (n, 2M+1, h)


def fused(q, k, v, table, max_rel_pos, p):
    o_v, o_r = kernels.relative_position_attention(q, k, v, heads(table, q.shape[1]), max_rel_pos, p)
    return [o_r] if v is None else [o_v, o_r]


def skew(q, k, v, table, max_rel_pos, p):
    """attention.py's position-relative path: materialised weights, dropout, the skew, matmuls."""
    alpha = F.dropout(causal_softmax(q, k, q.shape[-1] ** -0.5), p, p > 0)
    o_r = attend_symbols(alpha, table, q.shape[1], max_rel_pos)
    return [o_r] if v is None else [alpha @ v.expand(-1, q.shape[1], -1, -1), o_r]


def plain(q, k, v, table, max_rel_pos, keep=None, p=0.0):
    """The definition, everything materialised: P (B, n, T, T) and the gathered table (n, T, T, h)."""
    T, h = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) * h ** -0.5
    P = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf")).softmax(-1)
    if keep is not None:
        P = P * keep / (1 - p)
    offsets = torch.arange(T, device=q.device)[None, :] - torch.arange(T, device=q.device)[:, None]
    gathered = heads(table, q.shape[1])[:, offsets.clamp(-max_rel_pos, max_rel_pos) + max_rel_pos]
    o_r = torch.einsum("bnij,nije->bnie", P, gathered)
    return [o_r] if v is None else [P @ v.expand(-1, q.shape[1], -1, -1), o_r]


def sdpa(q, k, v, p):
    return [F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)]


def forward_backward(fn, leaves, grads):
    outputs = fn()
    return outputs + list(torch.autograd.grad(outputs, leaves, grads))


# -----------------------------------------------------------------------------
# checks

def poison(device):
    """Fill the caching allocator's free blocks, large and small, with NaN bytes (0xFF), then free them."""
    if device.type != "cuda":
        return
    blocks = [torch.empty(2**30, dtype=torch.uint8, device=device).fill_(255)]
    blocks += [torch.empty(2**19, dtype=torch.uint8, device=device).fill_(255) for _ in range(64)]
    del blocks


def relative_errors(got, ref):
    return [((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item() if torch.isfinite(a).all() else math.inf
            for a, r in zip(got, ref)]


def check(shape, dtype, max_rel_pos, device, rca=False):
    """Relative errors (2-norm) of the outputs and gradients against the float64 formula on the same values."""
    q, k, v, table, grads = make_inputs(shape, dtype, device, max_rel_pos, rca)
    leaves = [t for t in (q, k, v, table) if t is not None]
    poison(device)
    got = forward_backward(lambda: fused(q, k, v, table, max_rel_pos, 0.0), leaves, grads)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    q64, k64, v64, t64 = leaves64 if not rca else (leaves64[0], leaves64[1], None, leaves64[2])
    ref = forward_backward(lambda: plain(q64, k64, v64, t64, max_rel_pos), leaves64, [g.double() for g in grads])
    names = (["o^R"] if rca else ["o^v", "o^R"]) + ["dq", "dk"] + ([] if rca else ["dv"]) + ["dtable"]
    errors = relative_errors(got, ref)
    return " ".join(f"{name} {e:.1e}" for name, e in zip(names, errors)), max(errors)


def check_dropout(shape, device, p=0.25):
    """The kernel's mask (from identity values appended to v) against the formula with that mask, float32, and the
    fraction kept; the same generator state gives the same mask."""
    T = shape["T"]
    q, k, v, table, _ = make_inputs(shape, torch.float32, device, T // 2)
    B, n = q.shape[:2]
    eye = torch.eye(T, device=device).expand(B, n, T, T)
    values = torch.cat((v.detach().expand(B, n, T, -1), eye), -1).requires_grad_()
    state = torch.cuda.get_rng_state() if device.type == "cuda" else torch.get_rng_state()
    poison(device)
    o_v, o_r = kernels.relative_position_attention(q, k, values, heads(table, n), T // 2, p)
    keep = (o_v[..., -T:] != 0).double()
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    kept = keep[..., causal].mean().item()
    (torch.cuda.set_rng_state if device.type == "cuda" else torch.set_rng_state)(state)
    again, _ = kernels.relative_position_attention(q, k, values, heads(table, n), T // 2, p)
    g = [torch.randn_like(o_v), torch.randn_like(o_r)]
    leaves = [q, k, values, table]
    got = [o_v, o_r] + list(torch.autograd.grad([o_v, o_r], leaves, g))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = forward_backward(lambda: plain(*leaves64, T // 2, keep, p), leaves64, [x.double() for x in g])
    errors = relative_errors(got, ref)
    names = ["o^v", "o^R", "dq", "dk", "dv", "dtable"]
    print(f"  dropout {p} float32 T {T}: kept {kept:.4f} (expected {1 - p}), same state same mask "
          f"{torch.equal(again, o_v)}, " + " ".join(f"{name} {e:.1e}" for name, e in zip(names, errors)))


def check_cases(shapes):
    """(shape name, shape, dtype, RCA, M) to check: every shape in float32 with clipped offsets and in bfloat16 at the
    timed widths (T a multiple of 16 like the timed lengths: the same compiled kernels); the first shape also in
    float64 and as RCA."""
    cases = []
    for index, (name, shape) in enumerate(shapes.items()):
        shape = dict(shape, B=2, T=min(shape["T"], 256))
        if index == 0:
            cases += [(name, dict(shape, T=min(shape["T"], 64)), torch.float64, False, 20),
                      (name, shape, torch.float32, True, shape["T"] // 3)]
        cases += [(name, shape, torch.float32, False, shape["T"] // 3),
                  (name, shape, torch.bfloat16, False, shape["T"])]
    return cases


def run_checks(shapes, device):
    print("checks: relative error (2-norm) against float64, memory poisoned with NaN first")
    for name, shape, dtype, rca, max_rel_pos in check_cases(shapes):
        label = f"  {name} {str(dtype)[6:]:8s} {'RCA' if rca else 'RA '} T {shape['T']} M {max_rel_pos}:"
        try:
            text, worst = check(shape, dtype, max_rel_pos, device, rca)
            tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
            print(f"{label} {text}  {'ok' if worst <= tol else 'FAILED (tolerance %.0e)' % tol}", flush=True)
        except Exception as e:  # report and carry on
            print(f"{label} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    name, shape = next(iter(shapes.items()))
    try:
        check_dropout(dict(shape, B=2, T=min(shape["T"], 128)), device)
    except Exception as e:
        print(f"  dropout check failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


# -----------------------------------------------------------------------------
# timings

def report(label, fn, device):
    """Print the median ms and peak GiB of fn() (forward + backward; on the CPU one run, no memory figure)."""
    try:
        ms, gib = median_ms_and_peak_gib(fn, device, warmup_ms=10, rep_ms=50)
        print(f"    {label:22s} {ms:8.3f} ms  {gib:6.2f} GiB", flush=True)
        return ms
    except Exception as e:  # a variant that fails to compile or run: report and go on
        print(f"    {label:22s} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        return math.inf
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def time_shape(name, shape, variants, device, skew_compiled, budget_s, started):
    """Print the timings of one shape; returns (RELPOS_CONFIGS bucket, best variant) or None."""
    print(f"{name}: B {shape['B']} T {shape['T']} n {shape['n']} h {shape['h']} n_r {shape['n_r']} d_r {shape['d_r']} "
          f"(RA: values {shape['n_r'] * shape['d_r']} wide, table h wide, M = T), bf16, forward + backward", flush=True)
    M = shape["T"]
    q, k, v, table, grads = make_inputs(shape, torch.bfloat16, device, M)
    leaves = [q, k, v, table]
    v_h = torch.randn_like(q).requires_grad_()
    bucket = min(key for key in kernels.RELPOS_CONFIGS if key >= shape["h"])
    default = kernels.RELPOS_CONFIGS[bucket]
    best = None
    for p in (0.0, 0.1):
        print(f"  dropout {p}  ({time.time() - started:.0f} s)")
        report("sdpa (n heads)", lambda: forward_backward(lambda: sdpa(q, k, v_h, p), [q, k, v_h], grads[1:]), device)
        report("skew (compiled)", lambda: forward_backward(lambda: skew_compiled(q, k, v, table, M, p), leaves, grads),
               device)
        report("fused", lambda: forward_backward(lambda: fused(q, k, v, table, M, p), leaves, grads), device)
        if p == 0.0:
            continue
        symbols = torch.cat((v_h.detach(), v.detach().expand(-1, shape["n"], -1, -1)), -1).requires_grad_()
        grad_symbols = torch.randn_like(symbols)
        print("  symbolic-attention RA (per-position values [symbols || relation keys] per head, no table)")
        report("sdpa wide values", lambda: forward_backward(lambda: sdpa(q, k, symbols, p), [q, k, symbols],
                                                             [grad_symbols]), device)
        report("fused, no table", lambda: forward_backward(lambda: [kernels.relative_position_attention(
            q, k, symbols, None, dropout_p=p)[0]], [q, k, symbols], [grad_symbols]), device)
        print("  position-relative RA, launch settings")
        times = {}
        for label, cfg in variants.items():
            if time.time() - started > budget_s:
                print(f"    fused/{label}: skipped (past the {budget_s:.0f} s budget)")
                continue
            kernels.RELPOS_CONFIGS[bucket] = cfg
            try:
                times[label] = report(f"fused/{label}", lambda: forward_backward(
                    lambda: fused(q, k, v, table, M, p), leaves, grads), device)
            finally:
                kernels.RELPOS_CONFIGS[bucket] = default
        if times and min(times.values()) < math.inf:
            best = (bucket, min(times, key=times.get))
            print(f"    best {best[1]}: RELPOS_CONFIGS[{bucket}] = {variants[best[1]]}", flush=True)
    return best


def run_timings(shapes, variants, device, budget_s, started):
    """{shape name: (bucket, best variant)} after printing every shape's timings."""
    skew_compiled = torch.compile(skew, dynamic=False) if device.type == "cuda" else skew
    best = {}
    for name, shape in shapes.items():
        result = time_shape(name, shape, variants, device, skew_compiled, budget_s, started)
        if result:
            best[name] = result
    return best


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.relational", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {sorted(SHAPES)} (default: all)")
    parser.add_argument("--variants", default=None, help=f"comma-separated, of {sorted(VARIANTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and tiles (a CPU with TRITON_INTERPRET=1; "
                        "its tl.dot mishandles bfloat16, so the bfloat16 check fails there)")
    parser.add_argument("--budget", type=float, default=400, help="seconds after which variants are skipped")
    args = parser.parse_args()
    shapes, variants = (QUICK_SHAPES, QUICK_VARIANTS) if args.quick else (SHAPES, VARIANTS)
    try:
        shapes = {k: shapes[k] for k in (args.shapes.split(",") if args.shapes else shapes)}
        variants = {k: variants[k] for k in (args.variants.split(",") if args.variants else variants)}
    except KeyError as e:
        parser.error(f"unknown shape or variant {e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.INTERPRET)):
        sys.exit("needs triton and a GPU (or TRITON_INTERPRET=1 with --quick)")
    if args.quick:
        for bucket in kernels.RELPOS_CONFIGS:
            kernels.RELPOS_CONFIGS[bucket] = QUICK_VARIANTS["16x16"]
        kernels.relational.RELPOS_CONFIGS_WIDE_DTYPES = QUICK_VARIANTS["16x16"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"{name}, torch {torch.__version__}, triton {kernels.triton.__version__}")
    started = time.time()
    run_checks(shapes, device)
    best = run_timings(shapes, variants, device, args.budget, started)
    print("best variants:", {name: label for name, (_, label) in best.items()})
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
