"""
Sample from a trained model: continue prompts with the KV cache (model.generate) and print the texts and the speed.

$ python sample.py --ckpt_path "out/<run name>" --prompt "Once upon a time," --num_samples 3 --temperature 0.8 --top_p 0.9

--ckpt_path takes anything checkpoints.load_model reads: a run directory or checkpoint file of ours (either --arch)
or of the authors' train.py, a Hugging Face directory or hub id. The tokenizer is the one the run trained with (its
vocab_size and data_dir, as train.py finds it; a Hugging Face directory's own tokenizer.model), or --tokenizer.
Each prompt is continued num_samples times in one batch; the prompt's text is printed with its continuation. A folder
of runs (such as out/) is listed instead: each run's name, step and best validation loss (exit status 2).
"""

import math
import sys
import time
from contextlib import nullcontext

import torch

from checkpoints import PATH_HELP, find_tokenizer, load_model
from runs import list_runs
from runtime import Parser, RunError, one_line_errors, resolve_dtype, setup_device, synchronize
from tokenizer import DataError, text_from_argv

SEPARATOR = "-" * 100


def build_parser():
    p = Parser(description=__doc__)
    p.add_argument("--ckpt_path", required=True, help=PATH_HELP)
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable; default: one empty prompt, BOS only)")
    prompts.add_argument("--prompt_file", help="a text file whose whole content is one prompt")
    p.add_argument("--num_samples", default=1, type=int, help="samples per prompt (one batch)")
    p.add_argument("--max_new_tokens", default=200, type=int, help="new tokens per sample")
    p.add_argument("--temperature", default=1.0, type=float, help="0: greedy (the most likely token)")
    p.add_argument("--top_k", default=None, type=int, help="sample among the k most likely tokens")
    p.add_argument("--top_p", default=None, type=float,
                   help="nucleus sampling: the most likely tokens whose probabilities first sum to top_p")
    p.add_argument("--seed", default=1337, type=int)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (auto: bfloat16 on CUDA, else float32)")
    p.add_argument("--kv_cache", default=1, type=int, choices=[0, 1], help="1: generate with the KV cache")
    p.add_argument("--cuda_graph", default=1, type=int, choices=[0, 1],
                   help="1: on CUDA with the cache, replay the one-token step as a CUDA graph")
    p.add_argument("--tokenizer", default=None, help="a SentencePiece .model (default: the run's tokenizer)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = sampling_flag_problems(args)
    if problems:
        parser.error("; ".join(problems))
    return args


def sampling_flag_problems(args):
    """What is wrong with the sampling flags that `args` has (sample.py's, and train.py's --temperature and --top_k),
    checked in this one place: a list of messages, empty when all are in range (NaN and infinity are in none)."""
    checks = [
        ("temperature", lambda t: math.isfinite(t) and t >= 0, "must be 0 (greedy) or positive"),
        ("top_k", lambda k: k is None or k >= 1, "must be at least 1"),
        ("top_p", lambda p: p is None or 0 < p <= 1, "must be in (0, 1]"),
        ("num_samples", lambda n: n >= 1, "must be at least 1"),
        ("max_new_tokens", lambda n: n >= 1, "must be at least 1"),
    ]
    return [f"--{name} {message} (got {getattr(args, name)})" for name, valid, message in checks
            if hasattr(args, name) and not valid(getattr(args, name))]


def read_prompts(args):
    """The --prompt texts (bytes that are not UTF-8 replaced by U+FFFD), or the --prompt_file's text."""
    if args.prompt_file is None:
        return [text_from_argv(prompt) for prompt in args.prompt] if args.prompt else [""]
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return [f.read()]
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"--prompt_file {args.prompt_file}: {e}") from None


def sample(args):
    if runs := list_runs(args.ckpt_path):  # a folder of runs, such as out/
        print(f"{args.ckpt_path} holds {len(runs) - 1} runs: sample one with --ckpt_path {args.ckpt_path}/NAME")
        print("\n".join(runs))
        return 2
    device, _, _ = setup_device(args)
    dtype = resolve_dtype(args, device)
    model, ckpt = load_model(args.ckpt_path)
    tokenizer = find_tokenizer(args.ckpt_path, ckpt, model.config.vocab_size, args.tokenizer)
    prompts = read_prompts(args)
    model.to(device)
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    torch.manual_seed(args.seed)
    cuda_graph = bool(args.cuda_graph) and device.type == "cuda"
    new_tokens, seconds = 0, 0.0
    for prompt in prompts:
        ids = tokenizer.encode(prompt, bos=True, eos=False)
        idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, use_cache=bool(args.kv_cache), cuda_graph=cuda_graph)
        synchronize(device)
        seconds += time.perf_counter() - start
        new_tokens += args.num_samples * args.max_new_tokens
        for row in out.tolist():
            print(tokenizer.decode(row))
            print(SEPARATOR)
    cache = "with the KV cache" if args.kv_cache else "without the KV cache"
    print(f"{new_tokens:,} new tokens in {seconds:.2f} s: {new_tokens / max(seconds, 1e-9):,.1f} tokens/s "
          f"({cache}, {device}, {dtype}, batch {args.num_samples})")
    return 0


@one_line_errors(DataError)
def main(argv=None):
    return sample(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
