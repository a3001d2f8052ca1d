"""
Training-step throughput of the authors' implementation, in a process of its own: their model modules come from a
checkout of their repository (or ../shared/reference), put first on sys.path, because their attention.py has our
module's name. python -m bench.train --authors_code DIR runs this once per config; by hand, from the repository
root:

    python -m bench.authors --code ../shared/reference --spec spec.json --out result.json

spec.json: {"kind": "DualAttnTransformerLM", "model_args": {...}, "batch": 128, "seq": 512, "vocab_size": 32000},
with the constructor arguments their train.py builds from its flags (reference.model_args_from_flags). The step is
bench.train's: forward + backward under bf16 autocast on CUDA, their fused AdamW (configure_optimizers, as their
train.py), torch.compile when asked. result.json: tokens_per_s, ms_per_step, peak_gib, or an error (out of memory
included).
"""

import argparse
import contextlib
import importlib
import io
import json
import sys
from pathlib import Path

import torch

from bench.common import peak_memory_gib, reset_peak_memory, seconds_per_call, training_step

REPO = Path(__file__).resolve().parents[1]


def import_authors_models(code_dir):
    """Their language_models module, imported from code_dir alone (the repository root, which holds our modules,
    leaves sys.path). Their relational_attention.py uses model_utils without importing it."""
    sys.path[:] = [str(Path(code_dir).resolve())] + [p for p in sys.path if Path(p or ".").resolve() != REPO]
    model_utils = importlib.import_module("model_utils")
    importlib.import_module("relational_attention").model_utils = model_utils
    return importlib.import_module("language_models")


def measure(language_models, spec, device, compile_model, steps, warmup):
    """Their model and optimizer as their train.py builds them, timed on random tokens."""
    reset_peak_memory(device)
    torch.manual_seed(0)
    model = getattr(language_models, spec["kind"])(**spec["model_args"]).to(device).train()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter groups
        optimizer = language_models.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), device.type)
    step = training_step(model, optimizer, device, compile_model)
    B, T = spec["batch"], spec["seq"]
    x = torch.randint(0, spec["vocab_size"], (B, T), device=device)
    y = torch.randint(0, spec["vocab_size"], (B, T), device=device)
    seconds = seconds_per_call(lambda: step(x, y), steps, warmup, device)
    return dict(tokens_per_s=B * T / seconds, ms_per_step=1e3 * seconds, peak_gib=peak_memory_gib(device))


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.authors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", required=True, help="directory holding their language_models.py and its modules")
    parser.add_argument("--spec", required=True, help="JSON file: kind, model_args, batch, seq, vocab_size")
    parser.add_argument("--out", required=True, help="write the result (JSON) here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", type=int, default=1, choices=(0, 1), help="1: torch.compile their model")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = json.loads(Path(args.spec).read_text())
    try:
        result = measure(import_authors_models(args.code), spec, device, bool(args.compile), args.steps, args.warmup)
    except torch.OutOfMemoryError:
        result = dict(error="out of memory")
    except Exception as e:  # reported in bench.train's table, next to our numbers
        result = dict(error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
