"""
Train a Dual Attention Transformer (DAT) or Transformer language model on TinyStories.

A 4-layer DAT (4 self-attention + 4 relational heads), on whatever device is there (CUDA, then MPS, then CPU):
$ python train.py --sa 4 --ra 4 --symbol_type symbolic_attention --pos_enc_type RoPE \\
      --ra_type relational_attention --n_layers 4 --d_model 64

The Transformer baseline: --ra 0 (no symbol or relational-attention type):
$ python train.py --sa 8 --ra 0 --pos_enc_type RoPE --n_layers 4 --d_model 64

DDP on the 4 GPUs of one node (gradient_accumulation_steps is divided by the number of processes):
$ torchrun --standalone --nproc_per_node 4 train.py --sa 4 --ra 4 ... --gradient_accumulation_steps 4

Continue a run: the same command plus --init_from resume (it finds the run under out/ with these settings; or
--ckpt_path DIR_OR_FILE, or --run_name NAME). Each run writes its settings, checkpoint and metrics to out/<run name>/
(runs.py); data come from tiny_stories_data.py.

Evaluate a checkpoint with the settings of its run (--eval_iters 0: every window of the validation split once); the
result is appended to the run's metrics.jsonl:
$ python train.py --eval_only 1 --ckpt_path out/RUN --eval_iters 0
"""

import math
import os
import signal
import sys
import time
from collections import deque
from contextlib import ExitStack, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
import reference
from checkpoints import CHECKPOINT_FILE, load_model, write_checkpoint
from evaluation import describe_losses, evaluate, evaluate_only
from flags import parse_args
from loader import BatchLoader, LoaderSettings, check_tokenizer
from runs import (RUN_SETTINGS, RESUME_ADVICE, Logger, changed_settings, check_checkpoint_model, check_new_run,
                  find_run, new_run_dir, run_lock, write_config)
from runtime import (RunError, all_gather, one_line_errors, print_above_bars, progress_bar, resolve_dtype,
                     rng_state, set_rng_state, setup_device, stop_signals)
from tokenizer import DataError

PROMPTS = ["Once upon a time,", "There once was a girl named ", "On a rainy day,", "Emma went to", "", "", ""]


# -----------------------------------------------------------------------------
# model, optimizer, learning rate

def configure_optimizer(model, args, device):
    """AdamW with weight decay on the trainable tensors of >= 2 dims and none on the rest (in named_parameters
    order, as the reference groups them, so its optimizer states load); fused on CUDA."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.beta1, args.beta2),
                             fused=device.type == "cuda")


def load_optimizer_state(optimizer, ckpt):
    """Adam moments and step counts from the checkpoint; the hyperparameters stay those of the flags."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)
    for group in optimizer.param_groups:
        for p in group["params"]:
            moment = optimizer.state.get(p, {}).get("exp_avg")
            if moment is not None and moment.shape != p.shape:
                raise RunError(f"the checkpoint's optimizer state does not fit the model's parameters "
                               f"({tuple(moment.shape)} for a {tuple(p.shape)} tensor)")


def get_lr(it, args, total_steps):
    """Linear warm-up from 0 over warmup_iters steps, then cosine decay to 0 at total_steps (nanoGPT), or the
    constant learning_rate with --use_cosine_sched 0."""
    if not args.use_cosine_sched:
        return args.learning_rate
    if it < args.warmup_iters:
        return args.learning_rate * it / args.warmup_iters
    if it >= total_steps:
        return 0.0
    progress = (it - args.warmup_iters) / (total_steps - args.warmup_iters)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * args.learning_rate


def training_steps(args, train_tokens, tokens_per_step):
    """(steps, why): max_iters, or the steps of n_epochs passes over the training tokens when that is fewer."""
    if args.n_epochs < 0:
        return args.max_iters, f"--max_iters {args.max_iters}"
    epoch_steps = math.ceil(args.n_epochs * train_tokens / tokens_per_step)
    why = (f"--n_epochs {args.n_epochs}: {args.n_epochs} x {train_tokens:,} training tokens at {tokens_per_step:,} "
           f"tokens/step = {epoch_steps:,} steps")
    if epoch_steps < args.max_iters:
        return epoch_steps, why
    return args.max_iters, f"--max_iters {args.max_iters} (sooner than {why})"


# -----------------------------------------------------------------------------
# evaluation and samples

def generate_samples(model, tokenizer, args, device):
    """The reference's prompts (three empty ones: BOS only), each continued by sample_tokens tokens (in float32,
    eval mode)."""
    samples = []
    for prompt in PROMPTS:
        idx = torch.tensor([tokenizer.encode(prompt, bos=True, eos=False)], dtype=torch.long, device=device)
        out = model.generate(idx, args.sample_tokens, temperature=args.temperature, top_k=args.top_k)
        samples.append(tokenizer.decode(out[0].tolist()))
    return samples


# -----------------------------------------------------------------------------
# the run

@one_line_errors(DataError, OSError)
def main(argv=None):
    args, config = parse_args(argv, description=__doc__)
    with ExitStack() as held:  # the lock of the run directory, released however the run ends
        return train(args, config, held)


def train(args, config, held):
    """Set up (device, checkpoint, model, data, optimizer), then train and sample, or (--eval_only 1) evaluate. The
    run directory's lock joins the ExitStack `held`."""
    kind, model_args = reference.reference_args(config)  # what checkpoints record, in the authors' names
    if args.init_from == "scratch" and not args.eval_only:
        check_new_run(args)
    device, rank, world_size = setup_device(args)
    log = Logger(master=rank == 0)
    dtype = resolve_dtype(args, device)
    log.print(f"device {device}, dtype {dtype}")
    if args.eval_only:
        return evaluate_only(args, config, device, dtype, rank, world_size, log)
    ckpt = ckpt_path = None
    if args.init_from == "resume":
        ckpt_path, recorded = find_run(args, dtype)
        log.print(f"resuming from {ckpt_path}")
        if changed := changed_settings(recorded, args, device):
            log.print(f"changed since the run's last leg: {', '.join(changed)}")
        if unrecorded := [f"--{name}" for name in RUN_SETTINGS if name not in recorded]:
            log.print(f"note: the run does not record {', '.join(unrecorded)}: this command's values are used")
        if log.master:
            held.enter_context(run_lock(os.path.dirname(ckpt_path)))
    torch.manual_seed(args.seed + rank)
    if ckpt_path is None:
        raw_model = M.build_model(config)
    else:  # the checkpoint's weights, with this run's dropout rate
        raw_model, ckpt = load_model(ckpt_path, advice=RESUME_ADVICE, dropout_rate=config.dropout_rate)
        if "iter_num" not in ckpt:
            raise RunError(f"{ckpt_path} is not a checkpoint of train.py (no iter_num): {RESUME_ADVICE}")
        check_checkpoint_model(ckpt, config)
    raw_model.to(device).train()
    log.print(f"{kind} ({args.arch}): {raw_model.num_params():,} parameters")
    tokenizer = check_tokenizer(config.vocab_size, args.vocab_size, args.data_dir)
    loader = BatchLoader("train", LoaderSettings(args.batch_size, args.max_seq_len, vocab_size=args.vocab_size,
                                                 data_dir=args.data_dir, device=device, seed=args.seed, rank=rank,
                                                 world_size=world_size))

    trainer = Trainer(args, raw_model, kind, model_args, loader, device, dtype, rank, world_size, log)
    if ckpt is not None:
        trainer.restore(ckpt)
        ckpt = None  # free the memory
    total_steps, bound = training_steps(args, loader.n_tokens, trainer.tokens_per_step)
    log.print(f"training for {total_steps:,} steps ({bound})")
    if args.use_cosine_sched and 0 < total_steps <= args.warmup_iters and log.master:
        print(f"warning: --warmup_iters {args.warmup_iters} >= the {total_steps:,} training steps: the learning rate "
              f"is still warming up at the last step ({get_lr(total_steps - 1, args, total_steps):.2e}, not "
              f"--learning_rate {args.learning_rate:g}); lower --warmup_iters", file=sys.stderr, flush=True)
    run_dir = None
    if log.master:
        run_dir = os.path.dirname(ckpt_path) if ckpt_path else new_run_dir(args)
        if not ckpt_path:
            held.enter_context(run_lock(run_dir))
        n_params, n_embedding = raw_model.num_params(), raw_model.layers.token_embedder.weight.numel()
        run_config = dict(vars(args), device=str(device), dtype=dtype, kind=kind, arch=args.arch,
                          model_args=model_args, model_config=asdict(config), world_size=world_size,
                          tokens_per_iter=trainer.tokens_per_step, total_steps=total_steps, n_params=n_params,
                          n_params_wo_embedding=n_params - n_embedding, run_name=os.path.basename(run_dir),
                          run_dir=run_dir)
        log.print(f"run directory {run_dir}")
        write_config(run_dir, run_config)
        log.open(run_dir)
        trainer.config = run_config
        trainer.wandb_run_id = log.start_wandb(args, run_config["run_name"], run_dir, run_config,
                                               trainer.wandb_run_id)
    exit_code = trainer.run(total_steps, run_dir)
    trainer.finish()
    if exit_code == 0 and log.master and args.sample_tokens:
        samples = generate_samples(raw_model, tokenizer, args, device)
        log.print("\n" + "=" * 100 + "\nGENERATED SAMPLES")
        for prompt, sample in zip(PROMPTS, samples):
            log.print(f"PROMPT: {prompt}\nGENERATED TEXT:\n{sample}\n" + "-" * 100)
        log.log_samples(PROMPTS, samples)
    log.close(exit_code)
    return exit_code


class StepStatus:
    """The status of a step launched on the device: (mean loss, stop-signal flag) in a device tensor, copied into
    pinned host memory behind an event on CUDA, so that the host reads it later (one step later, while the device
    runs the next step) without stalling the device. `finished` is the clock's time when the step was seen done."""

    def __init__(self, iter_num, lr, status, clock):
        self.iter_num, self.lr, self.clock, self.event = iter_num, lr, clock, None
        if status.device.type == "cuda":
            self.host = torch.empty(status.shape, dtype=status.dtype, pin_memory=True).copy_(status, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:  # the step has run already
            self.host, self.finished = status.cpu(), clock()

    def read(self, world_size):
        """(loss, whether any rank received a stop signal), once the step has finished."""
        if self.event is not None:
            self.event.synchronize()
            self.finished = self.clock()
        loss_sum, signalled = self.host.tolist()
        return loss_sum / world_size, signalled > 0


class IntervalTimer:
    """Wall time per training step from the end of one logged step to the end of the next (as the host sees them),
    with the pauses for evaluation and checkpoints left out."""

    def __init__(self, first_step, clock=time.perf_counter):
        self.clock, self.last_step = clock, first_step - 1  # the steps up to last_step are done
        self.elapsed, self.started = 0.0, clock()

    def pause(self):
        self.elapsed += self.clock() - self.started
        self.started = None

    def resume(self):
        self.started = self.clock()

    def lap(self, step, finished):
        """(seconds per step, number of steps) over the steps done since the last lap, up to `step`, which finished
        at the clock's time `finished`."""
        steps, seconds = step - self.last_step, self.elapsed + finished - self.started
        self.last_step, self.elapsed, self.started = step, 0.0, finished
        return seconds / steps, steps


class Trainer:
    """The training state of one process (model, optimizer, data position, step, best val loss) and its loop."""

    def __init__(self, args, raw_model, kind, model_args, loader, device, dtype, rank, world_size, log):
        self.args, self.raw_model, self.kind, self.model_args = args, raw_model, kind, model_args
        self.loader, self.device, self.rank, self.world_size, self.log = loader, device, rank, world_size, log
        self.autocast = (nullcontext() if dtype == "float32" else
                         torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)))
        self.accumulation = args.gradient_accumulation_steps // world_size
        self.tokens_per_step = self.accumulation * world_size * args.batch_size * args.max_seq_len
        log.print(f"tokens per step {self.tokens_per_step:,} = {self.accumulation} accumulation steps x {world_size} "
                  f"processes x {args.batch_size} sequences x {args.max_seq_len} tokens")
        self.optimizer = configure_optimizer(raw_model, args, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
        self.eval_model = raw_model
        if args.compile:
            log.print("compiling the model (the first steps and evaluations take longer)")
            self.eval_model = torch.compile(raw_model)
        self.model = self.eval_model
        if world_size > 1:
            self.model = DDP(self.eval_model, device_ids=[device.index] if device.type == "cuda" else None)
        self.peak, peak_note = M.peak_flops(device)
        log.print(peak_note)
        self.iter_num, self.best_val_loss, self.running_mfu = 0, math.inf, None
        self.config, self.wandb_run_id, self.ckpt_path = None, None, None
        self.loader_state = loader.state_dict()  # the loader before it draws the next step's first batch
        self.pending = deque()  # StepStatus of the steps launched on the device and not yet read, oldest first
        self.timer = self.bar = None

    def restore(self, ckpt):
        """Continue a checkpoint: step, best val loss, optimizer, and (ours) data position, RNG, W&B run."""
        self.iter_num, self.best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        self.wandb_run_id = ckpt.get("wandb_run_id")
        if "kind" in ckpt or self.args.arch == "current":
            load_optimizer_state(self.optimizer, ckpt)
        else:
            self.log.print("note: a paper-era reference checkpoint orders its optimizer state differently: AdamW "
                           "starts afresh")
        if "scaler" in ckpt and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt.get("loader", [])) == self.world_size:
            self.loader.load_state_dict(ckpt["loader"][self.rank])
            self.loader_state = self.loader.state_dict()
            set_rng_state(ckpt["rng"][self.rank], self.device)
        else:
            self.log.print("note: the checkpoint holds no data position and RNG state for this number of processes: "
                           "batches and dropout start afresh from --seed")
        self.log.print(f"resumed at step {self.iter_num:,} (best val loss {self.best_val_loss:.4f})")

    def evaluate(self, received=()):
        """The losses of an evaluation, printed; None when a stop signal ended it (nothing printed)."""
        losses = evaluate(self.eval_model, self.args, self.device, self.autocast, self.rank, self.world_size,
                          received, progress=self.log.master)
        if losses is not None:
            self.log.print(describe_losses(f"step {self.iter_num}", losses, self.args.max_seq_len))
        return losses

    def save_checkpoint(self, why):
        """Collective under DDP (every rank's data position and RNG state are gathered); rank 0 writes."""
        per_rank = all_gather({"loader": self.loader_state, "rng": rng_state(self.device)}, self.world_size)
        if not self.log.master:
            return
        ckpt = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "model_args": self.model_args, "kind": self.kind, "arch": self.args.arch, "iter_num": self.iter_num,
                "best_val_loss": self.best_val_loss, "config": self.config,
                "loader": [r["loader"] for r in per_rank], "rng": [r["rng"] for r in per_rank],
                "wandb_run_id": self.wandb_run_id}
        if self.scaler.is_enabled():
            ckpt["scaler"] = self.scaler.state_dict()
        write_checkpoint(self.ckpt_path, ckpt)
        self.log.print(f"saved checkpoint at step {self.iter_num} ({why}) to {self.ckpt_path}")

    def run(self, total_steps, run_dir):
        """Evaluate (every eval_interval steps, at the first and at the last step) and train up to total_steps.
        Returns 0; 128 + the signal after SIGINT/SIGTERM (a checkpoint is written first; a signal during an
        evaluation ends it within a batch, and it is not logged); 1 on a non-finite loss (nothing is written). A
        checkpoint of step k holds the state before step k: resuming it replays k, k+1, ... (and the evaluation at
        k) exactly as an uninterrupted run does.

        The host never waits for the step it has just launched: it reads the status of the step before (loss,
        stop signal) while the device runs this one, and waits for every launched step only before an evaluation
        or a checkpoint, so none is written after a non-finite loss."""
        self.total_steps = total_steps
        self.ckpt_path = os.path.join(run_dir, CHECKPOINT_FILE) if run_dir else None
        self.timer = IntervalTimer(self.iter_num)
        x, y = self.loader.next_batch()
        with stop_signals() as received, progress_bar(total_steps, "training", enabled=self.log.master,
                                                      initial=self.iter_num, unit="step") as self.bar:
            while True:
                evaluating = self.iter_num % self.args.eval_interval == 0 or self.iter_num == total_steps
                done = self.iter_num >= total_steps
                exit_code = self.read_statuses(0 if evaluating or done else 1, received)
                if exit_code is not None:
                    return exit_code
                if evaluating:
                    self.timer.pause()
                    losses = self.evaluate(received)
                    if losses is None:
                        return self.stop(received[0] if received else signal.SIGTERM)
                    if not all(math.isfinite(v) for v in losses.values()):
                        return self.stop_non_finite(f"the evaluation loss is {losses['val/loss']}", self.iter_num)
                    self.log_and_save(losses)
                    self.timer.resume()
                if done:
                    return 0
                x, y = self.step(x, y, received)
                self.iter_num += 1

    def read_statuses(self, keep, received):
        """Read the statuses of launched steps, oldest first, until `keep` are left unread (0: wait for them all);
        log the training loss every log_interval steps. Returns the exit code when the run must stop: 1 on a
        non-finite loss; 128 + the signal when a rank received one, after every launched step has finished and a
        checkpoint of the state after them (data position and RNG included) is written."""
        stop = None
        while len(self.pending) > keep:
            status = self.pending.popleft()
            loss, signalled = status.read(self.world_size)
            if not math.isfinite(loss):
                return self.stop_non_finite(f"the training loss is {loss}", status.iter_num)
            if status.iter_num % self.args.log_interval == 0:
                self.log_step(status.iter_num, loss, status.lr, *self.timer.lap(status.iter_num, status.finished))
            self.bar.update()
            if signalled and stop is None:
                stop, keep = (received[0] if received else signal.SIGTERM), 0
        return None if stop is None else self.stop(stop)

    def stop(self, signum):
        """After a stop signal: a checkpoint of the state before step iter_num, and the exit code 128 + signum."""
        self.save_checkpoint(f"stopped by {signal.Signals(signum).name}")
        self.log.print(f"stopped at step {self.iter_num}: continue with --init_from resume")
        return 128 + signum

    def log_and_save(self, losses):
        """Log an evaluation; write a checkpoint when the val loss improves (not at step 0), or always."""
        self.log.log({"iter": self.iter_num, "tokens": self.iter_num * self.tokens_per_step, **losses,
                      "lr": get_lr(self.iter_num, self.args, self.total_steps),
                      **({} if self.running_mfu is None else {"mfu": self.running_mfu * 100})})
        improved = losses["val/loss"] < self.best_val_loss
        if self.iter_num > 0 and (improved or self.args.always_save_checkpoint):
            self.best_val_loss = min(self.best_val_loss, losses["val/loss"])
            self.save_checkpoint("val loss improved" if improved else "--always_save_checkpoint")

    def step(self, x, y, received):
        """Launch one optimizer step over `accumulation` micro-batches (gradients all-reduced on the last one only)
        without waiting for it, and queue its StepStatus: the mean loss over micro-batches, summed over ranks, and
        whether any rank received a stop signal (all-reduced on the device). Returns the next step's first batch."""
        args, optimizer, scaler = self.args, self.optimizer, self.scaler
        lr = get_lr(self.iter_num, args, self.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(self.accumulation):
            last = micro_step == self.accumulation - 1
            with self.model.no_sync() if self.world_size > 1 and not last else nullcontext():
                with self.autocast:
                    _, loss = self.model(x, y, return_logits=False)
                if last:
                    self.loader_state = self.loader.state_dict()
                x, y = self.loader.next_batch()  # prefetched on the host; its copy queued behind the forward pass
                scaler.scale(loss / self.accumulation).backward()
            loss_sum += loss.detach()
        status = torch.stack([loss_sum / self.accumulation, loss_sum.new_full((), float(bool(received)))])
        if self.world_size > 1:
            dist.all_reduce(status)
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.pending.append(StepStatus(self.iter_num, lr, status, self.timer.clock))
        return x, y

    def log_step(self, iter_num, loss, lr, step_seconds, steps):
        """The training loss of step iter_num, and the rate over the `steps` steps since the last log (wall time,
        evaluations excluded)."""
        tokens_per_sec = self.tokens_per_step / step_seconds
        mfu = None
        if self.peak:
            mfu = self.raw_model.estimate_mfu(tokens_per_sec, self.peak * self.world_size, self.args.max_seq_len)
            self.running_mfu = mfu if self.running_mfu is None else 0.9 * self.running_mfu + 0.1 * mfu
        self.log.print(f"{iter_num} | loss {loss:.4f} | lr {lr:.3e} | {step_seconds * 1000:.1f} ms/step | "
                       f"{tokens_per_sec:,.0f} tok/s | mfu " + ("n/a" if mfu is None else f"{mfu * 100:.2f}%"))
        self.log.log({"iter": iter_num, "train/step_loss": loss, "lr": lr, "step_ms": step_seconds * 1000,
                      "tokens_per_sec": tokens_per_sec, "interval_steps": steps,
                      **({} if mfu is None else {"step_mfu": mfu * 100})})

    def stop_non_finite(self, what, iter_num):
        """Exit code 1, with the checkpoint on disk (if any) left as it was."""
        if self.log.master:
            kept = (f"the last good checkpoint stays in {self.ckpt_path}" if os.path.exists(self.ckpt_path)
                    else "no checkpoint was written")
            print_above_bars(f"error: {what} at step {iter_num}: stopping ({kept}); try a lower --learning_rate",
                             file=sys.stderr)
        return 1

    def finish(self):
        self.loader.close()
        if self.world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
