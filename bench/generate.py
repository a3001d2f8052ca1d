"""
Generation speed: new tokens/s with the KV cache against without it (model.generate), for the d=64, L=4 DAT
(4 + 4 heads, relational attention, symbolic attention) and the d=64, L=4 Transformer (8 heads), block 512,
Llama 2's 32k vocabulary, random weights (the initialisation of train.py: the speed does not depend on the values).

    python -m bench.generate --compile_batches 1  # CUDA if present (bfloat16 autocast), else the CPU (float32)
    python -m bench.generate --device cpu --threads 1 --batch_sizes 1,64 --new_tokens 512

Each sequence starts from one token (BOS) and gets --new_tokens new ones (512 fill the block exactly). Modes:
  no cache       the context (cropped to the block) runs again for every token; logits of the last position only
  cache          KV cache, eager one-token steps
  cache+graph    (CUDA) the one-token step captured once as a CUDA graph and replayed
  cache+compile  (CUDA, batch sizes in --compile_batches) torch.compile of the step, then captured as a CUDA graph
Each mode first generates 8 tokens untimed (warm-up: CUDA kernels, compilation), then is timed over --repeats runs
(the best is kept); the graph capture is part of every timed run, compilation is not.
"""

import argparse

import torch

import model as M
from bench.common import Column, Table, best_of

MODELS = {
    "dat_d64_L4_symattn": dict(sa=4, ra=4, symbol_type="symbolic_attention", ra_type="relational_attention"),
    "tf_d64_L4": dict(sa=8, ra=0),
}
MODES = {  # generate()'s keyword arguments
    "no cache": dict(use_cache=False),
    "cache": dict(use_cache=True),
    "cache+graph": dict(use_cache=True, cuda_graph=True),
    "cache+compile": dict(use_cache=True, cuda_graph=True, compile=True),
}


def build(name, device):
    torch.manual_seed(0)
    config = M.ModelConfig(d_model=64, n_layers=4, pos_enc_type="RoPE", max_seq_len=512, **MODELS[name])
    return M.build_model(config).to(device).eval()


TABLE = Table(Column("model", 20, align="<"), Column("batch", 5, "d"), Column("mode", 15, align="<"),
              Column("tokens/s", 11, ",.0f"), Column("ms/step", 9, ".3f"), Column("vs no cache", 12))


def time_generation(model, batch, new_tokens, mode, device, autocast, repeats):
    """Best seconds over `repeats` runs of generate (sampling at temperature 1), after a warm-up run of 8 tokens."""
    prompt = torch.ones(batch, 1, dtype=torch.long, device=device)  # BOS

    def generate(n):
        with autocast:
            out = model.generate(prompt, n, **MODES[mode])
        assert out.shape == (batch, 1 + n)

    torch.manual_seed(0)
    generate(min(8, new_tokens))
    return best_of(lambda: generate(new_tokens), repeats, device)[1]


def main():
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--batch_sizes", default="1,64")
    p.add_argument("--new_tokens", default=512, type=int)
    p.add_argument("--repeats", default=1, type=int, help="timed runs per mode (the best is reported)")
    p.add_argument("--threads", default=0, type=int, help="CPU threads (0: torch's default)")
    p.add_argument("--compile_batches", default="",
                   help="batch sizes that also run cache+compile (CUDA; each compiles once, ~tens of seconds)")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.set_float32_matmul_precision("high")
    compile_batches = {int(b) for b in args.compile_batches.split(",") if b}
    dtype = "bfloat16" if cuda else "float32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, {dtype}, torch {torch.__version__}; random weights; {args.new_tokens} new tokens after BOS")
    print(TABLE.header())
    for model_name in args.models.split(","):
        model = build(model_name, device)
        for batch in map(int, args.batch_sizes.split(",")):
            baseline = None
            modes = ["no cache", "cache"] + (["cache+graph"] if cuda else [])
            for mode in modes + (["cache+compile"] if cuda and batch in compile_batches else []):
                seconds = time_generation(model, batch, args.new_tokens, mode, device, autocast, args.repeats)
                tokens_per_s = batch * args.new_tokens / seconds
                baseline = baseline or tokens_per_s
                print(TABLE.row(model_name, batch, mode, tokens_per_s, 1000 * seconds / args.new_tokens,
                                f"{tokens_per_s / baseline:.1f}x"), flush=True)


if __name__ == "__main__":
    main()
