"""
The evaluation of a language model on the fixed windows of the splits: the losses train.py logs during training,
and `train.py --eval_only 1`, which evaluates a checkpoint with its run's settings and records the result (or any
model source that checkpoints.load_model reads: a Hugging Face directory or hub id is evaluated, not recorded).

    losses = evaluate(model, args, device, autocast, rank, world_size)   {'train/loss', 'val/loss', ...perplexity}
    flags = source_flags(path)                                           the settings --eval_only 1 takes from it
    evaluate_only(args, config, device, dtype, rank, world_size, log)    --eval_only 1: print, record, exit code

Every evaluation stops within a batch at SIGINT/SIGTERM (it returns None): nothing half-evaluated is logged.
"""

import math
import os
import signal
import sys
from collections import deque
from contextlib import nullcontext

import torch
import torch.distributed as dist

import model as M
from checkpoints import CHECKPOINT_FILE, checkpoint_file, load_model
from loader import EvalBatches, LoaderSettings, check_tokenizer
from runs import (check_checkpoint_model, check_same_model, find_run, model_flags, named_run, recorded_config,
                  run_flags)
from runtime import RunError, progress_bar, stop_signals


def perplexity(loss):
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate(model, args, device, autocast, rank, world_size, received=(), progress=False):
    """Mean loss over the evaluation windows of each split, and perplexity = exp(mean loss): eval_iters fixed batches
    of train and val (the same windows in every run), or with eval_iters 0 every non-overlapping window of val once
    (and 'val/windows', their number); the batches are shared out over the DDP ranks. Eval mode: no dropout, no RNG
    drawn. None when a stop signal arrives (`received`, on any rank): the evaluation ends after the batch at hand.
    `progress`: a bar on a terminal."""
    model.eval()
    try:
        out = {}
        for split in ("train", "val") if args.eval_iters else ("val",):
            settings = LoaderSettings(args.batch_size, args.max_seq_len, vocab_size=args.vocab_size,
                                      data_dir=args.data_dir, device=device, rank=rank, world_size=world_size)
            batches = EvalBatches(split, settings, args.eval_iters)
            rounds = math.ceil(len(batches) / world_size)  # the same on every rank, for the collectives
            total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of window losses, number of windows
            stop_flags, mine = deque(), iter(batches)
            with progress_bar(rounds, f"evaluating {split}", enabled=progress, unit="batch") as bar:
                for _ in range(rounds):
                    if (batch := next(mine, None)) is not None:
                        x, y = batch  # (B, T)
                        with autocast:
                            _, loss = model(x, y, return_logits=False)
                        total[0] += loss.double() * len(x)
                        total[1] += len(x)
                    bar.update()
                    if stop_requested(received, stop_flags, device, world_size):
                        return None
            if world_size > 1:
                dist.all_reduce(total)
            mean = (total[0] / total[1]).item()
            out[f"{split}/loss"], out[f"{split}/perplexity"] = mean, perplexity(mean)
            if not args.eval_iters:
                out["val/windows"] = int(total[1].item())
        return out
    finally:
        model.train()


def stop_requested(received, flags, device, world_size):
    """Whether a stop signal has arrived: in this process (`received`), or under DDP on any rank, as the all-reduced
    flag of the batch before this one (every rank decides alike, and the host waits for no batch it just queued)."""
    if world_size == 1:
        return bool(received)
    flag = torch.tensor(float(bool(received)), device=device)
    dist.all_reduce(flag)
    flags.append(flag)
    return len(flags) > 1 and flags.popleft().item() > 0


def describe_losses(what, losses, max_seq_len):
    """'WHAT: train loss ..., val loss ..., train perplexity ..., val perplexity ...' (the splits evaluated); WHAT is
    e.g. 'step 2000'."""
    splits = [s for s in ("train", "val") if f"{s}/loss" in losses]
    text = f"{what}: " + ", ".join([f"{s} loss {losses[f'{s}/loss']:.4f}" for s in splits] +
                                        [f"{s} perplexity {losses[f'{s}/perplexity']:.2f}" for s in splits])
    if "val/windows" in losses:
        text += f" (the whole validation split: {losses['val/windows']:,} windows of {max_seq_len} tokens)"
    return text


def is_checkpoint(path):
    """Whether path is a checkpoint file or a directory holding one (a run directory), not a Hugging Face model."""
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, CHECKPOINT_FILE))


def source_flags(path):
    """The settings --eval_only 1 takes from a model source: a run's recorded flags (run_flags), or the model flags of
    a Hugging Face directory or hub id (read with its weights, as checkpoints.load_model reads it)."""
    if is_checkpoint(path) or not os.path.exists(path) and path.endswith(".pt"):
        return run_flags(checkpoint_file(path))
    model, _ = load_model(path)
    return model_flags(model.config)


def evaluate_only(args, config, device, dtype, rank, world_size, log):
    """--eval_only 1: evaluate the model of --ckpt_path or --run_name (or the checkpoint --init_from resume finds, or
    a fresh model) and print the losses; a checkpoint's evaluation is appended to its run's metrics.jsonl. No lock
    is taken, so a run in training can be evaluated: its checkpoint is read whole (it is replaced by a rename), and
    the record is one appended line. A stop signal ends it with nothing recorded: exit code 128 + the signal."""
    source = named_run(args)
    ckpt_path = checkpoint_file(source) if source and is_checkpoint(source) else None
    if source is None and args.init_from == "resume":
        ckpt_path, _ = find_run(args, dtype)
    torch.manual_seed(args.seed + rank)
    what, model = "step 0", None
    if ckpt_path is not None:
        model, ckpt = load_model(ckpt_path)
        check_checkpoint_model(ckpt, config)
        step = int(ckpt.get("iter_num", 0))
        what = f"step {step}"
        log.print(f"evaluating {ckpt_path} ({what})")
    elif source is not None:  # a Hugging Face directory or hub id
        model, _ = load_model(source)
        check_same_model(model.config, config, source)
        what = source
    model = (model or M.build_model(config)).to(device)
    log.print(f"{config.kind} ({config.arch}): {model.num_params():,} parameters")
    check_tokenizer(config.vocab_size, args.vocab_size, args.data_dir)
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    with stop_signals() as received:
        losses = evaluate(model, args, device, autocast, rank, world_size, received, progress=log.master)
    if world_size > 1:
        dist.destroy_process_group()
    if losses is None:
        signum = received[0] if received else signal.SIGTERM  # (another rank's signal)
        log.print(f"stopped by {signal.Signals(signum).name}: the evaluation did not finish, nothing is recorded")
        return 128 + signum
    log.print(describe_losses(what, losses, args.max_seq_len))
    if ckpt_path is not None and log.master:
        record_evaluation(args, ckpt_path, step, losses, log)
    elif source is not None:
        log.print(f"(not recorded: {source} is not a run directory)")
    return 0


def record_evaluation(args, ckpt_path, step, losses, log):
    """Append the evaluation to the metrics.jsonl next to the checkpoint: a record like training's evaluations
    (iter, tokens, losses, perplexities) marked eval_only, with its eval_iters (0: the whole validation split). A note
    on stderr instead when it cannot be written there (a read-only copy of a checkpoint, say)."""
    tokens_per_step = (recorded_config(ckpt_path).get("tokens_per_iter") or
                       args.gradient_accumulation_steps * args.batch_size * args.max_seq_len)
    try:
        log.open(os.path.dirname(ckpt_path))
        log.log({"iter": step, "tokens": step * tokens_per_step, **losses, "eval_only": True,
                 "eval_iters": args.eval_iters})
        log.close()
    except RunError as e:
        print(f"note: the evaluation is not recorded: {e}", file=sys.stderr, flush=True)
        return
    log.print(f"recorded in {log.metrics_path}")
