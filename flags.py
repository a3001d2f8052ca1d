"""
The command line of train.py: every flag with its default and help (build_parser), and the checks that a command's
flags make sense together (parse_args -> the flags and the model config, or one `error: ...` line and exit code 2).
sweep.py builds train.py's commands from the same parser.
"""

import argparse
import os

import model as M
from checkpoints import CHECKPOINT_FILE
from evaluation import source_flags
from runs import EVAL_SETTINGS, check_run_name, named_run
from runtime import Parser
from sample import sampling_flag_problems


def build_parser(description=None):
    """train.py's parser: every flag, its default and its help (description: the text --help shows first)."""
    p = Parser(
        description=description,
        usage="%(prog)s --sa N --ra N [--symbol_type TYPE --ra_type TYPE] --pos_enc_type TYPE --n_layers N "
              "--d_model N [options]\n       %(prog)s --eval_only 1 --ckpt_path RUN [--eval_iters N] [options]")
    switch = dict(type=int, choices=(0, 1))

    g = p.add_argument_group("model (required, but for --eval_only 1 --ckpt_path; --ra 0 builds the Transformer "
                             "baseline with --sa heads)")
    g.add_argument("--sa", type=int, help="number of self-attention heads")
    g.add_argument("--ra", type=int, help="number of relational heads (0: Transformer baseline)")
    g.add_argument("--symbol_type", choices=("position_relative", "symbolic_attention", "NA"),
                   help="symbols of the relational heads (symbolic attention: max_seq_len symbols, 4 heads; "
                        "position-relative: offsets up to max_seq_len); required with --ra > 0, NA with --ra 0")
    g.add_argument("--pos_enc_type", choices=("RoPE", "pos_emb"),
                   help="rotary embeddings on every attention-selection query/key, or learned absolute positions")
    g.add_argument("--ra_type", choices=("relational_attention", "rca", "disrca", "NA"),
                   help="relational attention, relational cross-attention or disentangled RCA; required with "
                        "--ra > 0, NA with --ra 0")
    g.add_argument("--n_layers", type=int, help="number of blocks")
    g.add_argument("--d_model", type=int, help="model width (divisible by sa + ra)")
    g.add_argument("--activation", default="swiglu", choices=M.ACTIVATION_CHOICES, help="feed-forward activation")
    g.add_argument("--dropout_rate", default=0.1, type=float, help="dropout rate (may differ when resuming)")
    g.add_argument("--dff", default=None, type=int,
                   help="feed-forward hidden width (default: int(2/3*4*d_model) for swiglu, else 4*d_model; "
                        "4*d_model for every activation with --arch paper)")
    g.add_argument("--norm_first", default=1, **switch, help="1: pre-norm blocks, 0: post-norm")
    g.add_argument("--symmetric_rels", default=0, **switch,
                   help="1: symmetric relations (tied relation query/key maps; relational_attention only)")
    g.add_argument("--trainable_symbols", default=1, **switch,
                   help="0: freeze the symbol library of symbolic attention (not its templates or query map)")
    g.add_argument("--max_seq_len", default=512, type=int, help="context length (block size) of training windows")
    g.add_argument("--arch", default="current", choices=sorted(M.ARCHS),
                   help="current: the authors' code as released; paper: the May 2024 code behind the paper's "
                        "Tiny Stories numbers (see model.ARCHS). A resumed checkpoint must have the same arch")

    g = p.add_argument_group("training")
    g.add_argument("--n_epochs", default=-1, type=int,
                   help="stop after this many passes over the training tokens (or at max_iters if sooner); "
                        "-1: no bound")
    g.add_argument("--max_iters", default=100_000, type=int, help="number of optimizer steps")
    g.add_argument("--batch_size", default=64, type=int, help="sequences per micro-batch and process")
    g.add_argument("--gradient_accumulation_steps", default=1, type=int,
                   help="micro-batches per optimizer step, in total over all DDP processes (a multiple of their "
                        "number)")
    g.add_argument("--learning_rate", default=5e-4, type=float, help="peak (or constant) learning rate")
    g.add_argument("--use_cosine_sched", default=1, **switch,
                   help="1: linear warm-up from 0 over warmup_iters, then cosine decay to 0 at the last step; "
                        "0: constant learning_rate")
    g.add_argument("--warmup_iters", default=1000, type=int, help="warm-up steps of the cosine schedule")
    g.add_argument("--weight_decay", default=0.1, type=float, help="AdamW weight decay of the >=2-D tensors")
    g.add_argument("--beta1", default=0.9, type=float, help="AdamW beta1")
    g.add_argument("--beta2", default=0.95, type=float, help="AdamW beta2")
    g.add_argument("--grad_clip", default=1.0, type=float, help="clip the gradient norm at this value (0: off)")
    g.add_argument("--seed", default=1337, type=int, help="seed of the weights, dropout and batch order (+ rank)")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval_interval", default=2_000, type=int,
                   help="evaluate every this many steps (and at step 0 and the last step)")
    g.add_argument("--eval_iters", default=100, type=int,
                   help="batches of each split per evaluation (fixed windows); with --eval_only 1, 0: every "
                        "non-overlapping window of the validation split once (default with --ckpt_path: the run's)")
    g.add_argument("--eval_only", default=0, **switch,
                   help="1: evaluate, print the losses and exit: the checkpoint of --ckpt_path or --run_name (with "
                        "its run's settings; appended to its metrics.jsonl), the run --init_from resume finds, or "
                        "a fresh model")
    g.add_argument("--always_save_checkpoint", default=0, **switch,
                   help=f"1: write {CHECKPOINT_FILE} at every evaluation; 0: only when the val loss improves")
    g.add_argument("--init_from", default="scratch", choices=("scratch", "resume"),
                   help="resume: continue the run under out_dir whose model and training settings equal these flags "
                        "(README: Resuming)")
    g.add_argument("--ckpt_path", default=None,
                   help="checkpoint file or run directory that --init_from resume continues (its settings must "
                        "equal the flags too; default: the one matching run under out_dir) or --eval_only 1 "
                        "evaluates")
    g.add_argument("--out_dir", default="out", help="runs are written to out_dir/<run name>/")
    g.add_argument("--run_name", default=None,
                   help="the run directory's name (letters, digits and -_.=,; default: the model's flags and the "
                        "time, e.g. dat-sa4-ra4-d64-L4-relattn-symattn-rope-20261206-182010); an existing run is "
                        "only continued, with --init_from resume")

    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data", help="directory of tiny_stories_data.py's output")
    g.add_argument("--vocab_size", default=0, type=int,
                   help="0: the Llama 2 tokenizer (32,000 tokens); N: the custom data_dir/tok{N}.model and "
                        "data_dir/tok{N}/")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast dtype; auto: bfloat16 on CUDA where supported, else float32 "
                        "(float16 uses a gradient scaler)")
    g.add_argument("--compile", default=0, **switch, help="1: torch.compile the model")

    g = p.add_argument_group("logging")
    g.add_argument("--log_interval", default=10, type=int, help="print (and log) the training loss every N steps")
    g.add_argument("--log_to_wandb", default=1, **switch,
                   help="1: log to Weights & Biases (offline, with a note, when no credentials are configured)")
    g.add_argument("--wandb_project", default="dual_attention--tiny_stories-LM", help="W&B project name")

    g = p.add_argument_group("samples (generated at the end of training)")
    g.add_argument("--sample_tokens", default=100, type=int, help="new tokens per sample (0: no samples)")
    g.add_argument("--temperature", default=1.0, type=float, help="sampling temperature (0: greedy, the most likely "
                                                                  "token each time)")
    g.add_argument("--top_k", default=None, type=int, help="sample among the k most likely tokens (default: all tokens)")
    return p


def parse_args(argv=None, description=None):
    """(flags, model config). Contradictory flags stop here with `error: ...` and exit code 2. With --eval_only 1
    and a named run (--ckpt_path or --run_name), the settings the command does not give are the run's."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    try:
        if args.run_name is not None:
            check_run_name(args.run_name)
        if args.run_name and args.ckpt_path:
            raise ValueError("--run_name and --ckpt_path both name a run: give one")
    except ValueError as e:
        parser.error(str(e))
    if args.eval_only and named_run(args):
        given = given_flags(argv)
        recorded = source_flags(named_run(args))
        for name in EVAL_SETTINGS:
            if name not in given and name in recorded:
                setattr(args, name, recorded[name])
    check_required(parser, args)
    positive = ["n_layers", "d_model", "max_seq_len", "batch_size", "gradient_accumulation_steps", "eval_interval",
                "log_interval"]
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive (got {getattr(args, name)})")
    for name in ("sa", "ra", "max_iters", "warmup_iters", "vocab_size", "sample_tokens", "eval_iters"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative (got {getattr(args, name)})")
    if args.n_epochs == 0 or args.n_epochs < -1:
        parser.error(f"--n_epochs must be positive, or -1 for no bound (got {args.n_epochs})")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.gradient_accumulation_steps % world_size and not args.eval_only:
        parser.error(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must be divisible by the "
                     f"number of DDP processes ({world_size})")
    try:
        check_ranges(args)
        config = M.ModelConfig.from_flags(args)
    except ValueError as e:
        parser.error(str(e))
    return args, config


def given_flags(argv):
    """The flags (their dests) that the command line sets."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def check_required(parser, args):
    """The model flags a command must give; --symbol_type and --ra_type only with --ra > 0 (NA with --ra 0)."""
    missing = [f"--{name}" for name in ("sa", "ra", "pos_enc_type", "n_layers", "d_model")
               if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or evaluate a run's checkpoint "
                     f"with --eval_only 1 --ckpt_path RUN)")
    for name, choices in (("symbol_type", "symbolic_attention or position_relative"),
                          ("ra_type", "relational_attention, rca or disrca")):
        if getattr(args, name) is None:
            if args.ra > 0:
                parser.error(f"--ra {args.ra} needs --{name} {choices}")
            setattr(args, name, "NA")


def check_ranges(args):
    """ValueError for a flag outside its range that parse_args does not check by sign (NaN fails every test)."""
    if args.dff is not None and args.dff <= 0:
        raise ValueError(f"--dff must be positive (got {args.dff})")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be positive (got {args.learning_rate})")
    for name in ("beta1", "beta2", "dropout_rate"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1) (got {getattr(args, name)})")
    for name in ("weight_decay", "grad_clip"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name} must not be negative (got {getattr(args, name)})")
    problems = sampling_flag_problems(args)  # --temperature, --top_k
    if problems:
        raise ValueError("; ".join(problems))
    if args.eval_iters == 0 and not args.eval_only:
        raise ValueError("--eval_iters 0 (the whole validation split) is for --eval_only 1")
