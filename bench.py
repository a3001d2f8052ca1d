"""
Training-step throughput of our models, fast path against the plain formulation, side by side.

    python bench.py                       # CUDA if present (the issue's H200 configs), else small CPU configs
    python bench.py --configs dat_d64_L4_symattn,tf_d64_L4 --compile 1 --steps 20
    python bench.py --impls fast --json results.json

For each config and implementation it times full training steps (forward, backward, fused AdamW, bf16
autocast on CUDA) on random tokens and prints tokens/s, ms/step, peak memory and MFU (from the model's
own FLOP count, against the device's dense bf16 peak). 'plain' switches the relational heads to their
plain, materialised formulation (model.use_plain_attention: attention matrices, B.T.T.n_r relations, T.T.d
relative symbols) with the logits materialised for the loss; 'fast' is what train.py runs. Before timing,
the two implementations' final hidden states on the same weights and batch are compared (the relative
difference is printed).
"""

import argparse
import json
import time
from pathlib import Path

import torch

import model as M


def config(sa, ra, d_model, n_layers, batch, seq, symbol_type="symbolic_attention", ra_type="relational_attention"):
    flags = dict(sa=sa, ra=ra, d_model=d_model, n_layers=n_layers, max_seq_len=seq, symbol_type=symbol_type,
                 ra_type=ra_type, pos_enc_type="RoPE", vocab_size=32000)
    return dict(flags=flags, batch=batch)


CUDA_CONFIGS = {
    "tf_d64_L4": config(8, 0, 64, 4, 128, 512),
    "dat_d64_L4_symattn": config(4, 4, 64, 4, 128, 512),
    "dat_d64_L4_posrel": config(4, 4, 64, 4, 128, 512, "position_relative"),
    "tf_d128_L6": config(8, 0, 128, 6, 128, 512),
    "dat_d128_L6_symattn": config(4, 4, 128, 6, 128, 512),
    "dat_d128_L6_posrel": config(4, 4, 128, 6, 128, 512, "position_relative"),
    "tf_d768_L12": config(12, 0, 768, 12, 16, 1024),
    "dat_d768_L12_posrel": config(6, 6, 768, 12, 16, 1024, "position_relative"),
}
CPU_CONFIGS = {
    "tf_d64_L2": config(8, 0, 64, 2, 8, 256),
    "dat_d64_L2_symattn": config(4, 4, 64, 2, 8, 256),
    "dat_d64_L2_posrel": config(4, 4, 64, 2, 8, 256, "position_relative"),
    "dat_d64_L2_rca": config(4, 4, 64, 2, 8, 256, ra_type="rca"),
    "dat_d64_L2_disrca": config(4, 4, 64, 2, 8, 256, ra_type="disrca"),
}


def peak_flops(device):
    return M.peak_flops(device)[0]


def build(cfg, device, plain=False, seed=0):
    torch.manual_seed(seed)
    model = M.build_model(M.ModelConfig.from_flags(cfg["flags"])).use_plain_attention(plain)
    return model.to(device).train()


def step_fn(model, optimizer, device, compile_model, plain):
    """One training step: forward + backward under autocast, then AdamW."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model

    def step(x, y):
        with autocast:
            _, loss = forward(x, y) if plain else forward(x, y, return_logits=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name, cfg, impl, device, compile_model, steps, warmup):
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(cfg, device, plain=impl == "plain")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    B, T = cfg["batch"], cfg["flags"]["max_seq_len"]
    x = torch.randint(0, 32000, (B, T), device=device)
    y = torch.randint(0, 32000, (B, T), device=device)
    step = step_fn(model, optimizer, device, compile_model, impl == "plain")
    for _ in range(warmup):
        step(x, y)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(x, y)
    loss.item()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = B * T / seconds
    peak = peak_flops(device)
    mfu = model.estimate_mfu(tokens_per_s, peak, T) if peak else None
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(config=name, impl=impl, compile=compile_model, tokens_per_s=tokens_per_s, ms_per_step=1e3 * seconds,
                peak_gib=memory, mfu=mfu)


@torch.no_grad()
def relative_difference(cfg, device):
    """|fast - plain| / |plain| of the final hidden states on the same weights and batch (eval mode)."""
    model = build(cfg, device).eval()
    B, T = min(cfg["batch"], 4), cfg["flags"]["max_seq_len"]
    x = torch.randint(0, 32000, (B, T), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        fast = model.hidden_states(x).float()
        plain = model.use_plain_attention(True).hidden_states(x).float()
    return ((fast - plain).norm() / plain.norm()).item()


def run(name, cfg, impl, device, compile_model, steps, warmup):
    try:
        return measure(name, cfg, impl, device, compile_model, steps, warmup)
    except torch.OutOfMemoryError:
        return dict(config=name, impl=impl, compile=compile_model, error="out of memory")


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_row(r):
    if "error" in r:
        print(f"{r['config']:<22} {r['impl']:<6} {int(r['compile']):>3}  {r['error']}", flush=True)
        return
    mfu = None if r["mfu"] is None else 100 * r["mfu"]
    print(f"{r['config']:<22} {r['impl']:<6} {int(r['compile']):>3} {r['tokens_per_s']:>12,.0f} "
          f"{r['ms_per_step']:>9.2f} {fmt(r['peak_gib'], '>8.2f')} {fmt(mfu, '>6.1f')}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=None, help="comma-separated config names (default: all for the device)")
    parser.add_argument("--impls", default="fast,plain", help="comma-separated: fast, plain")
    parser.add_argument("--compile", type=int, default=None, help="1: torch.compile; default 1 on CUDA, 0 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CUDA, 1 CPU)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    configs = CUDA_CONFIGS if cuda else CPU_CONFIGS
    names = args.configs.split(",") if args.configs else list(configs)
    unknown = [n for n in names if n not in {**CUDA_CONFIGS, **CPU_CONFIGS}]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {sorted({**CUDA_CONFIGS, **CPU_CONFIGS})}")
    compile_model = bool(cuda if args.compile is None else args.compile)
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device)
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, "
          f"peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s bf16, compile {int(compile_model)}, {steps} steps")
    results = []
    for name in names:
        cfg = {**CUDA_CONFIGS, **CPU_CONFIGS}[name]
        print(f"{name}: fast vs plain hidden states, relative difference {relative_difference(cfg, device):.2e}",
              flush=True)
    print(f"{'config':<22} {'impl':<6} {'cmp':>3} {'tokens/s':>12} {'ms/step':>9} {'peakGiB':>8} {'MFU%':>6}")
    for name in names:
        cfg = {**CUDA_CONFIGS, **CPU_CONFIGS}[name]
        for impl in args.impls.split(","):
            results.append(run(name, cfg, impl, device, compile_model, steps, warmup))
            print_row(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
