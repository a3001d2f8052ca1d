"""
Training-step throughput, side by side in one run: our fast path ('fast', what train.py runs), the plain
formulation ('plain'), train.py's own training loop ('train.py') and the authors' implementation ('authors').

    python -m bench.train                    # CUDA: the H200 configs (CUDA_CONFIGS); else small CPU configs
    python -m bench.train --configs dat_d64_L4_symattn,tf_d64_L4 --impls fast --steps 30
    python -m bench.train --authors_code ../shared/reference --json results.json
    python -m bench.train --train_py 0       # model steps only, no data needed
    python -m bench.train --baseline d0bbca5 # the fast path of this code against a commit's (or a directory's)

fast / plain: full training steps (forward, backward, fused AdamW, bf16 autocast on CUDA, torch.compile on CUDA)
on random tokens, in this process: tokens/s, ms/step, peak memory and MFU (from the model's own FLOP count, against
the device's dense bf16 peak). 'plain' switches the relational heads to their plain formulation
(model.use_plain_attention: attention matrices, B.T.T.n_r relations, T.T.d relative symbols) with the logits
materialised for the loss; before timing it, the two implementations' final hidden states on the same weights and
batch are compared.

train.py: the real loop, `train.py` in a subprocess on real stories (--compile as here, --log_to_wandb 0, one
evaluation batch at the first and the last step only, gradient clipping and the other defaults as a user runs it).
Its rate is what it logs: tokens over wall time across each log interval, evaluation excluded. Steps: 5 log
intervals of about 1 s at the 'fast' rate (--train_log_interval), the first left out as warm-up; the figure is the
tokens over the time of the other four. The stories are pretokenized once into --data_dir, with the Llama 2
tokenizer taken as a 32,000-token custom vocabulary (data_dir/tok32000.model), so that nothing is written outside
it; `--prepare_data` only builds it (e.g. to carry it to a machine without ../shared/data).

authors: their model modules from --authors_code DIR (a checkout of their repository, or ../shared/reference),
built from the same flags the way their train.py builds them, timed like 'fast' (compiled unless
--authors_compile 0, bf16, their fused AdamW) by bench.authors in a process of its own; out of memory and other
failures are reported per config.

--baseline REF (a commit of this repository, or a directory holding another checkout) times, instead of all the
above, the 'fast' steps of REF's code and of the current code per config, in this process (bench.baseline keeps
their modules apart), on the same random batch: warm-up steps of each, then --baseline_rounds rounds of --steps
steps of REF, then --steps of the current code, so that a drift of the GPU's clocks hits both alike. It prints the
median tokens/s of each side and current / REF (below 1: the current code is slower).

The summary gives, per config: fast tokens/s, train.py tokens/s and train.py / fast (the target: at least 0.95),
authors tokens/s and fast / authors. --json writes everything; it is rewritten after each measurement, so an
interrupted run keeps what it measured.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import model as M
import reference
import tiny_stories_data as D
from bench import baseline
from bench.common import (Column, Table, alternate, peak_memory_gib, release_memory, reset_peak_memory,
                          seconds_per_call, training_step)
from loader import bin_dir
from tokenizer import DataError, tokenizer_path



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


def resized(cfg, batch_size=None, max_seq_len=None):
    """The config with another batch size and/or context length."""
    flags = dict(cfg["flags"], max_seq_len=max_seq_len or cfg["flags"]["max_seq_len"])
    return dict(flags=flags, batch=batch_size or cfg["batch"])


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = [REPO.parent / "shared" / "data", REPO / "shared" / "data"]  # the first that exists is the default
STORIES, TOKENIZER = "TinyStories-train.head-2MiB.txt", "tokenizer.model"
BENCH_VOCAB = 32000  # the Llama 2 tokenizer, as data_dir/tok32000.model
STORIES_PER_SHARD = 500  # 2 MiB of stories: 5 shards, shard 0 the validation split


def peak_flops(device):
    return M.peak_flops(device)[0]


def model_spec(cfg):
    """(kind, constructor arguments) of the reference for a config, as the authors' train.py builds them."""
    return reference.model_args_from_flags(cfg["flags"])


def build(cfg, device, plain=False, seed=0):
    torch.manual_seed(seed)
    model = M.build_model(M.ModelConfig.from_flags(cfg["flags"])).use_plain_attention(plain)
    return model.to(device).train()


def step_fn(model, device, compile_model, plain=False):
    """One training step of the model, as 'fast' (the logit-free loss) or 'plain' (logits materialised) times it:
    forward + backward under autocast, then AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return training_step(model, optimizer, device, compile_model, **({} if plain else dict(return_logits=False)))


def random_batch(cfg, device):
    """x, y: (B, T) random token ids."""
    B, T = cfg["batch"], cfg["flags"]["max_seq_len"]
    return (torch.randint(0, 32000, (B, T), device=device), torch.randint(0, 32000, (B, T), device=device))


def measure(name, cfg, impl, device, compile_model, steps, warmup):
    torch._dynamo.reset()
    reset_peak_memory(device)
    model = build(cfg, device, plain=impl == "plain")
    x, y = random_batch(cfg, device)
    step = step_fn(model, device, compile_model, impl == "plain")
    seconds = seconds_per_call(lambda: step(x, y), steps, warmup, device)
    B, T = x.shape
    tokens_per_s = B * T / seconds
    peak = peak_flops(device)
    mfu = model.estimate_mfu(tokens_per_s, peak, T) if peak else None
    return dict(config=name, impl=impl, compile=compile_model, tokens_per_s=tokens_per_s, ms_per_step=1e3 * seconds,
                peak_gib=peak_memory_gib(device), mfu=mfu)


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


# -----------------------------------------------------------------------------
# train.py's loop

def prepare_stories(data_dir, stories, tokenizer):
    """data_dir/tok32000/*.bin: the stories pretokenized with the Llama 2 tokenizer, for train.py --vocab_size
    32000 --data_dir data_dir. Built once (nothing is done when the shards are there)."""
    if glob.glob(os.path.join(bin_dir(BENCH_VOCAB, data_dir), "*.bin")):
        return
    for path, flag in ((stories, "--stories"), (tokenizer, "--tokenizer")):
        if not path or not os.path.isfile(path):
            raise SystemExit(f"error: {flag} {path}: no such file (train.py's rate needs real stories and the Llama 2 "
                             f"tokenizer; give {flag}, or --train_py 0)")
    os.makedirs(data_dir, exist_ok=True)
    shutil.copyfile(tokenizer, tokenizer_path(BENCH_VOCAB, data_dir))
    try:
        D.download(data_dir, source=stories, tokenizer_model=tokenizer_path(BENCH_VOCAB, data_dir),
                   stories_per_shard=STORIES_PER_SHARD)
        D.pretokenize(BENCH_VOCAB, data_dir)
    except DataError as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None


def train_py_command(cfg, data_dir, out_dir, device, compile_model, log_interval):
    """train.py on the config's model and batch, 5 log intervals long, evaluating (one batch) at the first and last
    step only, without W&B or samples worth the name."""
    f = cfg["flags"]
    flags = dict(sa=f["sa"], ra=f["ra"], symbol_type=f["symbol_type"], ra_type=f["ra_type"],
                 pos_enc_type=f["pos_enc_type"], n_layers=f["n_layers"], d_model=f["d_model"],
                 max_seq_len=f["max_seq_len"], batch_size=cfg["batch"], vocab_size=BENCH_VOCAB, data_dir=data_dir,
                 out_dir=out_dir, device=device, compile=int(compile_model), log_to_wandb=0,
                 log_interval=log_interval, max_iters=5 * log_interval + 1, eval_interval=10**9, eval_iters=1,
                 sample_tokens=1)
    return [sys.executable, str(REPO / "train.py")] + [str(a) for k, v in flags.items() for a in (f"--{k}", v)]


def steady_state(records, log_interval):
    """Tokens/s over the logged intervals after the first (tokens over their summed wall time), from train.py's
    metrics.jsonl records."""
    intervals = [r for r in records if "interval_steps" in r and r["iter"] >= 2 * log_interval]
    if not intervals:
        return None
    seconds = sum(r["interval_steps"] * r["step_ms"] / 1e3 for r in intervals)
    tokens = sum(r["interval_steps"] * r["tokens_per_sec"] * r["step_ms"] / 1e3 for r in intervals)
    return dict(tokens_per_s=tokens / seconds, ms_per_step=1e3 * seconds / sum(r["interval_steps"] for r in intervals),
                intervals_tokens_per_s=[r["tokens_per_sec"] for r in intervals])


def run_train_py(name, cfg, args, device, compile_model, fast_ms):
    """train.py's steady-state rate for a config (fast_ms: the fast path's ms/step, which sizes the intervals)."""
    log_interval = args.train_log_interval or max(5, round(1000 / fast_ms) if fast_ms else 20)
    row = dict(config=name, impl="train.py", compile=compile_model, log_interval=log_interval)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as out_dir:
        command = train_py_command(cfg, args.data_dir, out_dir, str(device), compile_model, log_interval)
        row["command"] = " ".join(command[1:])
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return dict(row, error=f"timed out after {args.timeout} s")
        metrics = glob.glob(os.path.join(out_dir, "*", "metrics.jsonl"))
        records = [json.loads(line) for line in Path(metrics[0]).read_text().splitlines()] if metrics else []
    rate = steady_state(records, log_interval)
    if done.returncode != 0 or rate is None:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        why = "out of memory" if "OutOfMemoryError" in done.stderr else f"exit {done.returncode}: {tail[0][:300]}"
        return dict(row, error=why)
    peak = peak_flops(device)
    mfu = build(cfg, "cpu").estimate_mfu(rate["tokens_per_s"], peak, cfg["flags"]["max_seq_len"]) if peak else None
    return dict(row, **rate, mfu=mfu)


# -----------------------------------------------------------------------------
# the authors' implementation

def run_authors(name, cfg, args, device, compile_model):
    """The authors' model for a config, timed by bench.authors in its own process."""
    kind, model_args = model_spec(cfg)
    spec = dict(kind=kind, model_args=model_args, batch=cfg["batch"], seq=cfg["flags"]["max_seq_len"],
                vocab_size=cfg["flags"]["vocab_size"])
    row = dict(config=name, impl="authors", compile=compile_model)
    with tempfile.TemporaryDirectory(prefix="bench_authors_") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "bench.authors", "--code", str(Path(args.authors_code).resolve()),
                   "--spec", str(spec_path), "--out", str(out_path), "--device", str(device),
                   "--compile", str(int(compile_model)), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        try:
            done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return dict(row, error=f"timed out after {args.timeout} s")
        if not out_path.exists():
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
            return dict(row, error=f"exit {done.returncode}: {tail[0][:300]}")
        return dict(row, **json.loads(out_path.read_text()))


# -----------------------------------------------------------------------------
# --baseline: the same steps with the code of another commit

def one_line(error):
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def run_baseline(name, cfg, code, device, compile_model, args):
    """Median tokens/s of the baseline's model and of the current one for a config, on the same batch, in
    alternating chunks of args.steps steps (the baseline's first in each round), and current / baseline."""
    row = dict(config=name, compile=compile_model)
    try:
        torch.manual_seed(0)
        theirs = code.build(cfg["flags"]).to(device)
    except Exception as e:  # a config that commit does not know, say: reported in its row
        return dict(row, error=f"baseline: {one_line(e)}")
    x, y = random_batch(cfg, device)
    try:
        steps = {side: step_fn(model, device, compile_model) for side, model in
                 (("baseline", theirs), ("current", build(cfg, device)))}
        times = alternate({side: lambda step=step: step(x, y) for side, step in steps.items()}, args.steps,
                          args.baseline_rounds, args.warmup, device)
    except torch.OutOfMemoryError:
        return dict(row, error="out of memory")
    except Exception as e:  # an older forward's signature, say: reported in its row
        return dict(row, error=one_line(e))
    rates = {side: [x.numel() / t for t in seconds] for side, seconds in times.items()}  # B * T tokens a step
    baseline_rate, current_rate = (statistics.median(rates[side]) for side in ("baseline", "current"))
    return dict(row, baseline=baseline_rate, current=current_rate, current_over_baseline=current_rate / baseline_rate,
                rounds_tokens_per_s=rates)


BASELINE = Table(Column("config", 22, align="<"), Column("baseline tok/s", 15, ",.0f"),
                 Column("current tok/s", 15, ",.0f"), Column("current/baseline", 16, ".3f"))


def print_baseline_row(r):
    if "error" in r:
        print(f"{BASELINE.row(r['config'])}  {r['error']}", flush=True)
    else:
        print(BASELINE.row(r["config"], r["baseline"], r["current"], r["current_over_baseline"]), flush=True)


def guard(ref, names, chosen, args, device, compile_model, meta):
    """--baseline: the rows of run_baseline for every config, printed and kept in --json."""
    meta = dict(meta, baseline=baseline.describe(ref), rounds=args.baseline_rounds)
    print(f"baseline {meta['baseline']}: {args.baseline_rounds} rounds of {args.steps} steps per side, "
          f"alternating; median tokens/s\n{BASELINE.header()}")
    rows = []
    with baseline.checkout(ref) as directory:
        code = baseline.Code(directory)
        for name in names:
            rows.append(run_baseline(name, chosen[name], code, device, compile_model, args))
            print_baseline_row(rows[-1])
            release_memory(device)
            if args.json:
                Path(args.json).write_text(json.dumps(dict(meta=meta, baseline=rows), indent=2))


# -----------------------------------------------------------------------------
# report

ROWS = Table(Column("config", 22, align="<"), Column("impl", 8, align="<"), Column("cmp", 3, "d"),
             Column("tokens/s", 12, ",.0f"), Column("ms/step", 9, ".2f"), Column("peakGiB", 8, ".2f"),
             Column("MFU%", 6, ".1f"))
SUMMARY = Table(Column("config", 22, align="<"), Column("fast tok/s", 12, ",.0f"), Column("train.py", 12, ",.0f"),
                Column("train/fast", 10, ".3f"), Column("authors", 12, ",.0f"), Column("fast/authors", 12))


def print_row(r):
    if "error" in r:
        print(f"{ROWS.row(r['config'], r['impl'], int(r['compile']))}  {r['error']}", flush=True)
        return
    mfu = None if r.get("mfu") is None else 100 * r["mfu"]
    print(ROWS.row(r["config"], r["impl"], int(r["compile"]), r["tokens_per_s"], r["ms_per_step"], r.get("peak_gib"),
                   mfu), flush=True)


def summarize(names, rows):
    """Per config: fast, train.py and authors tokens/s, train.py / fast and fast / authors."""
    rate = {(r["config"], r["impl"]): r.get("tokens_per_s") for r in rows}
    summary = []
    for name in names:
        fast, loop, theirs = (rate.get((name, impl)) for impl in ("fast", "train.py", "authors"))
        summary.append(dict(config=name, fast=fast, train_py=loop, authors=theirs,
                            train_py_over_fast=loop / fast if loop and fast else None,
                            fast_over_authors=fast / theirs if fast and theirs else None))
    return summary


def print_summary(summary):
    print(f"\n{SUMMARY.header()}")
    for s in summary:
        ratio = None if s["fast_over_authors"] is None else f"{s['fast_over_authors']:.2f}x"
        print(SUMMARY.row(s["config"], s["fast"], s["train_py"], s["train_py_over_fast"], s["authors"], ratio),
              flush=True)


def default_shared(name):
    return next((str(d / name) for d in SHARED_DATA if (d / name).is_file()), None)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=None, help="comma-separated config names (default: all for the device)")
    parser.add_argument("--impls", default="fast,plain", help="comma-separated: fast, plain (may be empty)")
    parser.add_argument("--compile", type=int, default=None, help="1: torch.compile; default 1 on CUDA, 0 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CUDA, 1 CPU)")
    parser.add_argument("--batch_size", type=int, default=None, help="override every config's batch size")
    parser.add_argument("--max_seq_len", type=int, default=None, help="override every config's context length")
    parser.add_argument("--train_py", type=int, default=1, choices=(0, 1),
                        help="1: also train.py's steady-state rate per config (needs the stories, see --data_dir)")
    parser.add_argument("--train_log_interval", type=int, default=None,
                        help="train.py's --log_interval (default: about 1 s of steps at the fast rate, at least 5)")
    parser.add_argument("--data_dir", default="data/bench_stories",
                        help="pretokenized stories for train.py, built here from --stories once")
    parser.add_argument("--stories", default=default_shared(STORIES),
                        help=f"TinyStories .txt for --data_dir (default: {STORIES} of ../shared/data or shared/data)")
    parser.add_argument("--tokenizer", default=default_shared(TOKENIZER),
                        help="the Llama 2 tokenizer.model (default: the one in ../shared/data or shared/data)")
    parser.add_argument("--prepare_data", action="store_true", help="only build --data_dir, then exit")
    parser.add_argument("--authors_code", default=None,
                        help="also time the authors' implementation from this directory (their repository, or "
                             "../shared/reference)")
    parser.add_argument("--authors_compile", type=int, default=None, choices=(0, 1),
                        help="torch.compile the authors' model (default: as --compile)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed to each train.py / authors process")
    parser.add_argument("--baseline", default=None,
                        help="a commit (or a directory with another checkout): time only the fast steps of its code "
                             "and of the current code, alternating (--impls, --train_py are then left out)")
    parser.add_argument("--baseline_rounds", type=int, default=None,
                        help="--baseline's rounds of --steps steps per side (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.baseline and (args.authors_code or args.prepare_data):
        parser.error("--baseline runs alone: no --authors_code or --prepare_data with it")
    if (args.train_py and not args.baseline) or args.prepare_data:
        prepare_stories(args.data_dir, args.stories, args.tokenizer)
        if args.prepare_data:
            return
    if args.authors_code and not Path(args.authors_code, "language_models.py").is_file():
        parser.error(f"--authors_code {args.authors_code}: no language_models.py there")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    configs = CUDA_CONFIGS if cuda else CPU_CONFIGS
    names = args.configs.split(",") if args.configs else list(configs)
    unknown = [n for n in names if n not in {**CUDA_CONFIGS, **CPU_CONFIGS}]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {sorted({**CUDA_CONFIGS, **CPU_CONFIGS})}")
    chosen = {name: resized({**CUDA_CONFIGS, **CPU_CONFIGS}[name], args.batch_size, args.max_seq_len)
              for name in names}
    impls = [i for i in args.impls.split(",") if i]
    if set(impls) - {"fast", "plain"}:
        parser.error(f"--impls: fast and/or plain, not {args.impls}")
    compile_model = bool(cuda if args.compile is None else args.compile)
    authors_compile = compile_model if args.authors_compile is None else bool(args.authors_compile)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.baseline_rounds = args.baseline_rounds or (10 if cuda else 3)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device)
    meta = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
                compile=compile_model, authors_compile=authors_compile, steps=args.steps, warmup=args.warmup,
                command=" ".join(sys.argv))
    print(f"device {meta['device']}, torch {torch.__version__}, peak {f'{peak / 1e12:.0f}' if peak else '-'} TFLOP/s "
          f"bf16, compile {int(compile_model)}, {args.steps} steps")
    if args.baseline:
        try:
            return guard(args.baseline, names, chosen, args, device, compile_model, meta)
        except baseline.BaselineError as e:
            parser.error(f"--baseline {e}")
    if "plain" in impls:
        for name in names:
            print(f"{name}: fast vs plain hidden states, relative difference "
                  f"{relative_difference(chosen[name], device):.2e}", flush=True)
    print(ROWS.header())
    rows = []

    def record(row):
        rows.append(row)
        print_row(row)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows, summary=summarize(names, rows)),
                                                  indent=2))

    for name in names:
        cfg = chosen[name]
        for impl in impls:
            record(run(name, cfg, impl, device, compile_model, args.steps, args.warmup))
        release_memory(device)  # the GPU to the processes below
        if args.train_py:
            fast_ms = next((r.get("ms_per_step") for r in rows if r["config"] == name and r["impl"] == "fast"), None)
            record(run_train_py(name, cfg, args, device, compile_model, fast_ms))
        if args.authors_code:
            record(run_authors(name, cfg, args, device, authors_compile))
    print_summary(summarize(names, rows))


if __name__ == "__main__":
    main()
