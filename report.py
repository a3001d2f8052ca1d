"""
Summarise train.py runs: a table and the validation-loss curves of every run, and for sweep.py's runs of the paper's
grid the paper's Tiny Stories table with our numbers beside the authors' where the runs are comparable.

$ python report.py --runs out --out_dir report
$ python report.py --runs out/paper --paper_logs run_histories.csv --out_dir report

--runs: a directory searched for train.py run directories (metrics.jsonl and the checkpoint, whose config gives
the model and the training settings): out/, or sweep.py's out_dir. --paper_logs: the authors' exported W&B histories
(run_histories.csv from github.com/Awni00/abstract_transformer, branch paper,
figure_generation/figure_data/tiny_stories/). Writes out_dir/summary.csv (one line per run), out_dir/summary.md,
runs.png (every run's validation loss against tokens and steps) and, for the paper's grid, val_loss.png,
ablation_symbol_type.png, ablation_symmetry.png, ablation_ra_type.png, ablation_frozen_symbols.png. A run that cannot
be read (a damaged checkpoint or metrics.jsonl) is named with the reason on one line and left out.

Numbers are computed as the paper's table computes them: the minimum validation loss over the evaluations of a run
(non-finite ones left out) and over the runs of one model configuration (the authors' frozen-symbol runs count for the
trainable configuration, as in their notebook; a frozen-symbol run of ours is compared with their frozen-symbol runs
only). A run of ours is compared with the paper's number only when it was trained as the paper's runs were: the
same vocabulary, context, batch, tokens, learning rate and schedule (and parameter count, where the logs give it);
otherwise the table says where it differs.
"""

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

from checkpoints import CHECKPOINT_FILE, read_checkpoint  # noqa: E402
from model import LLAMA2_VOCAB_SIZE  # noqa: E402
from reference import PAPER_RA_TYPES, PAPER_SYMBOL_TYPES  # noqa: E402
from runtime import RunError, one_line_errors  # noqa: E402
from sweep import (ABLATION_ROWS, PAPER_DAT, PAPER_ROWS, PAPER_SETTINGS, PAPER_STEPS, RA, RCA,  # noqa: E402
                   RELATIVE, SEQUENCES_PER_STEP, SYMBOLIC, Row, writable_dir)

SUMMARY_COLUMNS = ["run", "kind", "d_model", "n_layers", "sa", "ra", "symbol_type", "symmetric_rels", "ra_type",
                   "arch", "vocab_size", "max_seq_len", "batch_sequences", "n_params", "steps", "tokens",
                   "min_val_loss", "last_val_loss", "min_val_perplexity", "nonfinite_evals", "paper_n_params",
                   "paper_val_loss", "paper_val_perplexity", "paper_comparison"]
METRICS_FILE = "metrics.jsonl"
# how the paper's runs were trained (the Llama 2 tokenizer: train.py's --vocab_size 0)
PAPER_CONTEXT, PAPER_LEARNING_RATE = PAPER_SETTINGS["max_seq_len"], PAPER_SETTINGS["learning_rate"]
PAPER_TOKENS = PAPER_STEPS * SEQUENCES_PER_STEP * PAPER_CONTEXT
PAPER_TRAINING = (f"vocabulary {LLAMA2_VOCAB_SIZE:,} (Llama 2), context {PAPER_CONTEXT}, batch {SEQUENCES_PER_STEP} "
                  f"sequences, tokens {PAPER_TOKENS:,} ({PAPER_STEPS:,} steps), learning rate {PAPER_LEARNING_RATE}, "
                  "constant schedule")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Curve:
    """Validation loss (and perplexity) against training steps and tokens, one point per evaluation."""
    steps: list
    tokens: list
    val_loss: list
    val_perplexity: list
    n_params: int = None  # of the model (the authors' logs)

    @property
    def min_loss(self):
        """The minimum over the finite losses (None when there is none)."""
        return min(filter(math.isfinite, self.val_loss), default=None)

    @property
    def min_perplexity(self):
        return min(filter(math.isfinite, self.val_perplexity), default=None)

    @property
    def nonfinite(self):
        """The number of evaluations whose loss is NaN or infinite."""
        return sum(not math.isfinite(v) for v in self.val_loss)

    @property
    def rank(self):
        """Sort key: the lower minimum first, runs without a finite loss last."""
        return math.inf if self.min_loss is None else self.min_loss


@dataclass
class Run:
    """One of our runs: its directory (relative to --runs), train.py's config, its evaluations."""
    name: str
    config: dict
    curve: Curve

    @property
    def row(self):
        return Row.from_flags(self.config)

    @property
    def is_paper_config(self):
        return self.config.get("arch") == "paper" and self.row in GRID_ROWS

    @property
    def steps(self):
        return self.curve.steps[-1]

    @property
    def tokens(self):
        return self.curve.tokens[-1]

    @property
    def vocab_size(self):
        return self.config.get("vocab_size") or LLAMA2_VOCAB_SIZE

    @property
    def batch_sequences(self):
        """Sequences per optimizer step (train.py's accumulation steps count over all DDP processes)."""
        c = self.config
        return c["batch_size"] * c.get("gradient_accumulation_steps", 1) if "batch_size" in c else None

    @property
    def note(self):
        n = self.curve.nonfinite
        return f"{n} of {len(self.curve.val_loss)} evaluations NaN or infinite (left out of the minimum)" if n else ""


GRID_ROWS = PAPER_ROWS + ABLATION_ROWS


# -----------------------------------------------------------------------------
# reading runs

def read_evals(path):
    """The evaluations logged in a metrics.jsonl, in step order. A resumed run appends to the same file from its
    checkpoint's step on, so an evaluation at or before the last one read replaces those from its step on; the records
of `train.py --eval_only` (evaluations of a checkpoint after the fact) are not part of the curve. A line cut
    short by a crash is skipped; ValueError naming the line for what train.py never writes: bytes that are not UTF-8,
    a line that is JSON but not a record, an evaluation without its step, tokens, loss or perplexity."""
    evals = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                record = json.loads(raw.decode())
            except UnicodeDecodeError:
                raise ValueError(f"line {n} of {METRICS_FILE} is not UTF-8 text") from None
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                raise ValueError(f"line {n} of {METRICS_FILE} is not a record: {raw.decode().strip()[:40]}")
            if "val/loss" not in record or record.get("eval_only"):  # train.py --eval_only: not the training curve
                continue
            missing = [k for k in ("iter", "tokens", "val/loss", "val/perplexity") if not is_number(record.get(k))]
            if missing:
                raise ValueError(f"line {n} of {METRICS_FILE} is an evaluation without {', '.join(missing)}")
            while evals and evals[-1]["iter"] >= record["iter"]:
                evals.pop()
            evals.append(record)
    return evals


def read_config(run_dir):
    """train.py's config, from the run's checkpoint (memory-mapped: the weights are not read)."""
    return read_checkpoint(os.path.join(run_dir, CHECKPOINT_FILE), mmap=True).get("config")


def read_run(run_dir, name):
    """The Run in run_dir; ValueError or RunError saying why it cannot be reported."""
    try:
        evals = read_evals(os.path.join(run_dir, METRICS_FILE))
    except OSError as e:
        raise ValueError(f"cannot read {METRICS_FILE} ({e.strerror})") from None
    if not evals:
        raise ValueError("no evaluation yet")
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT_FILE)):
        raise ValueError("no checkpoint yet")
    config = read_config(run_dir)
    if not isinstance(config, dict):
        raise ValueError("not a checkpoint of train.py (no config)")
    try:
        Row.from_flags(config)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"the checkpoint's config names no model of train.py ({type(e).__name__}: {e})") from None
    return Run(name, config, Curve(*([e[k] for e in evals] for k in ("iter", "tokens", "val/loss",
                                                                       "val/perplexity"))))


def find_runs(root):
    """(runs, skipped): every run directory under root (root itself included) with a metrics.jsonl; skipped holds
    (name, reason) for those that cannot be reported (no evaluation yet, a damaged checkpoint or metrics log)."""
    runs, skipped = [], []
    for path, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        if METRICS_FILE not in files:
            continue
        name = os.path.relpath(path, root)
        if name == ".":
            name = os.path.basename(os.path.abspath(root))
        try:
            runs.append(read_run(path, name))
        except (ValueError, RunError) as e:
            skipped.append((name, str(e)))
    return runs, skipped


def paper_settings(r):
    """Whether a logged run has the paper's training settings: context 512, 256 sequences per step, constant
    learning rate 1e-3 (not the exploratory runs)."""
    return (r["max_seq_len"] == "512" and float(r["learning_rate"]) == 1e-3 and r["use_cosine_sched"] in ("False", "0")
            and float(r["batch_size"]) * float(r["gradient_accumulation_steps"]) == 256)


def paper_row(r):
    """The Row of a logged run; the log uses the paper-era names (rca: ra; rca_type disentangled_v2: relational
    attention, standard: RCA; sym_attn, pos_relative; trainable_symbols empty before the flag existed)."""
    return Row.from_flags(dict(d_model=r["d_model"], n_layers=r["n_layers"], sa=r["sa"], ra=r["rca"],
                               symbol_type=PAPER_SYMBOL_TYPES.get(r["symbol_type"], r["symbol_type"]),
                               ra_type=PAPER_RA_TYPES.get(r["rca_type"], r["rca_type"]),
                               symmetric_rels=int(r["symmetric_rels"] == "True"),
                               trainable_symbols=int(r["trainable_symbols"] != "False")))


def read_paper_logs(path):
    """{Row: [Curve of each logged run]} of the authors' runs with the paper's training settings (one CSV line per
    evaluation of a run)."""
    runs = {}  # name -> (row, parameters, [(step, tokens, val loss, val perplexity)])
    try:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["val/loss"] and paper_settings(r):
                    points = runs.setdefault(r["name"], (paper_row(r), int(float(r["n_params"])), []))[2]
                    points.append((float(r["iter"]), float(r["tokens"]), float(r["val/loss"]),
                                   float(r["val/perplexity"])))
    except (OSError, KeyError, ValueError) as e:
        raise RunError(f"--paper_logs {path}: not the authors' run_histories.csv ({type(e).__name__}: {e})") \
            from None
    by_row = {}
    for row, n_params, points in runs.values():
        steps, tokens, loss, perplexity = map(list, zip(*sorted(points)))
        by_row.setdefault(row, []).append(Curve(steps, tokens, loss, perplexity, n_params))
    return by_row


# -----------------------------------------------------------------------------
# numbers

def paper_curves(logs, row):
    """The logged runs that the paper's number for this row is the minimum over: those of the row, plus the
    frozen-symbol runs for a symbolic-attention row with trainable symbols (the notebook's groups ignore
    trainable_symbols)."""
    curves = list(logs.get(row, []))
    if row.symbol_type == SYMBOLIC and row.trainable_symbols:
        curves += logs.get(replace(row, trainable_symbols=0), [])
    return curves


def best(curves):
    return min(curves, key=lambda c: c.rank) if curves else None


def paper_differences(run, paper_params=None):
    """[(setting, 'setting OURS (paper: THEIRS)')] for each training setting in which a run differs from the paper's
    runs (their parameter count only when known); empty when the run is comparable with the paper's numbers."""
    c = run.config
    ours = dict(vocabulary=run.vocab_size, context=c.get("max_seq_len"), batch=run.batch_sequences, tokens=run.tokens,
                learning_rate=c.get("learning_rate"), schedule="cosine" if c.get("use_cosine_sched") else "constant",
                parameters=c.get("n_params"))
    theirs = dict(vocabulary=LLAMA2_VOCAB_SIZE, context=PAPER_CONTEXT, batch=SEQUENCES_PER_STEP, tokens=PAPER_TOKENS,
                  learning_rate=PAPER_LEARNING_RATE, schedule="constant", parameters=paper_params)
    return [(name, f"{name.replace('_', ' ')} {readable(ours[name])} (paper: {readable(theirs[name])})")
            for name in ours if theirs[name] is not None and ours[name] != theirs[name]]


def readable(value):
    return f"{value:,}" if isinstance(value, int) else str(value)


@dataclass
class Line:
    """What the table and the figures show for one row: our run (the best comparable one, else the best one, with
    the settings in which it differs from the paper's runs) and the paper's numbers and best run."""
    row: Row
    ours: Run = None
    differences: list = field(default_factory=list)
    paper_loss: float = None
    paper_perplexity: float = None
    paper_curve: Curve = None  # the best logged run of exactly this row
    paper_params: int = None

    @property
    def has_data(self):
        return self.ours is not None or self.paper_loss is not None

    @property
    def comparable(self):
        return self.ours is not None and not self.differences

    @property
    def plotted(self):
        """Our curve beside the paper's: only a run trained like theirs (it may have seen fewer tokens)."""
        if self.ours is None or any(setting != "tokens" for setting, _ in self.differences):
            return None
        return self.ours.curve

    @property
    def drawn(self):
        """Whether the figures have a curve of this row."""
        return self.plotted is not None or self.paper_curve is not None


def lines_by_row(runs, logs):
    lines = {}
    for row in GRID_ROWS:
        logged = logs.get(row, [])
        paper_params = logged[0].n_params if logged else None
        mine = sorted((r for r in runs if r.is_paper_config and r.row == row),
                      key=lambda r: (bool(paper_differences(r, paper_params)), r.curve.rank))
        losses = [c.min_loss for c in paper_curves(logs, row) if c.min_loss is not None]
        perplexities = [c.min_perplexity for c in paper_curves(logs, row) if c.min_perplexity is not None]
        lines[row] = Line(row, mine[0] if mine else None, paper_differences(mine[0], paper_params) if mine else [],
                          min(losses, default=None), min(perplexities, default=None), best(logged), paper_params)
    return lines


# -----------------------------------------------------------------------------
# outputs

def blank(value):
    return "" if value is None else value


def write_summary_csv(path, runs, lines):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        for run in runs:
            c = run.config
            line = lines[run.row] if run.is_paper_config else Line(run.row)
            differences = [text for _, text in paper_differences(run, line.paper_params)]
            paper = (None, None)
            if not run.is_paper_config:
                compared = "not a row of the paper's grid trained with --arch paper"
            elif differences:
                compared = "not comparable: " + "; ".join(differences)
            else:
                compared, paper = "comparable", (line.paper_loss, line.paper_perplexity)
            w.writerow([run.name, "DAT" if c["ra"] else "Transformer", c["d_model"], c["n_layers"], c["sa"], c["ra"],
                        blank(c.get("symbol_type")), blank(c.get("symmetric_rels")), blank(c.get("ra_type")),
                        c.get("arch", "current"), run.vocab_size, blank(c.get("max_seq_len")),
                        blank(run.batch_sequences), blank(c.get("n_params")), run.steps, run.tokens,
                        blank(run.curve.min_loss), run.curve.val_loss[-1], blank(run.curve.min_perplexity),
                        run.curve.nonfinite, blank(line.paper_params), *map(blank, paper), compared])


def fmt(value, digits):
    return "—" if value is None else f"{value:.{digits}f}"


def count(n):
    """A count for a table: 1,024; 1.3M; 13.1B."""
    if n is None:
        return "—"
    for size, unit in ((1e9, "B"), (1e6, "M")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n):,}"


def runs_table(runs):
    out = ["| run | model | arch | vocab | context | batch | params | steps | tokens | val loss | last val loss | "
           "val ppl | note |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in runs:
        name = r.name.replace("|", "&#124;")  # (a table cell)
        out.append(f"| {name} | {r.row.label} | {r.config.get('arch', 'current')} | {r.vocab_size:,} | "
                   f"{r.config.get('max_seq_len', '—')} | {r.batch_sequences or '—'} | "
                   f"{count(r.config.get('n_params'))} | {r.steps:,} | {count(r.tokens)} | "
                   f"{fmt(r.curve.min_loss, 4)} | {fmt(r.curve.val_loss[-1], 4)} | "
                   f"{fmt(r.curve.min_perplexity, 3)} | {r.note} |")
    return out


def paper_table(lines):
    out = ["| d | L | model | symbols | relations | vocab | context | batch | tokens | params | paper params | "
           "val loss | paper | Δ | val ppl | paper ppl | compared with the paper |",
           "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
           "| --- |"]
    for line in lines:
        r, ours = line.row, line.ours
        loss = ours.curve.min_loss if ours else None
        delta = loss - line.paper_loss if line.comparable and None not in (loss, line.paper_loss) else None
        settings = [f"{ours.vocab_size:,}", str(ours.config.get("max_seq_len")), str(ours.batch_sequences),
                    count(ours.tokens), f"{ours.config['n_params']:,}" if ours.config.get("n_params") else "—"] \
            if ours else ["—"] * 5
        compared = "" if ours is None else "yes" if line.comparable else \
            "no: " + "; ".join(text for _, text in line.differences)
        out.append(f"| {r.d_model} | {r.n_layers} | " + " | ".join(r.columns) + " | " + " | ".join(
            settings + ["—" if line.paper_params is None else f"{line.paper_params:,}",
                        fmt(loss, 4), fmt(line.paper_loss, 4), "—" if delta is None else f"{delta:+.4f}",
                        fmt(ours.curve.min_perplexity if ours else None, 3), fmt(line.paper_perplexity, 3),
                        compared]) + " |")
    return out


def write_summary_md(path, runs, skipped, lines, runs_dir, paper_logs):
    md = [f"# Training runs under `{runs_dir}`", "",
          f"{len(runs)} runs. Val loss: the minimum over a run's evaluations (NaN ones left out); val ppl = exp(that "
          "loss); batch: sequences per optimizer step; tokens: training tokens at the last evaluation. runs.png draws "
          "every run's validation loss against tokens and against steps.", "",
          "## Runs", "", *runs_table(runs), ""]
    if skipped:
        md += ["## Left out (unreadable)", "", *[f"- {name}: {why}" for name, why in skipped], ""]
    grid = [(title, [lines[r] for r in rows if lines[r].has_data])
            for title, rows in (("The paper's table", PAPER_ROWS),
                                ("Ablations (RCA instead of relational attention; frozen symbols)", ABLATION_ROWS))]
    if any(shown for _, shown in grid):
        md += ["## Beside the paper", "",
               f"The paper's runs: {PAPER_TRAINING}. Our val loss is the minimum over our runs of a configuration "
               "(`sweep.py`, `--arch paper`), preferring those trained as the paper's; Δ only where a run has the "
               "paper's settings, else the last column says where it differs. " +
               (f"Paper: `{paper_logs}`, the minimum over the evaluations and duplicate runs of each configuration, "
                "as the paper's table; its perplexity is the mean of per-batch perplexities, slightly above "
                "exp(loss)." if paper_logs else "No --paper_logs given: the paper's columns are empty."), ""]
        md += [text for title, shown in grid if shown for text in (f"### {title}", "", *paper_table(shown), "")]
    with open(path, "w") as f:
        f.write("\n".join(md))


def plot_runs(path, runs):
    """Every run's validation loss against training tokens (log axis, step 0 left out) and against steps."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for i, run in enumerate(runs):
        c = run.curve
        points = [(t, v) for t, v in zip(c.tokens, c.val_loss) if t > 0]
        if points:
            axes[0].plot(*zip(*points), ".-", color=colors(i % colors.N), lw=1.2, ms=4)
        axes[1].plot(c.steps, c.val_loss, ".-", color=colors(i % colors.N), lw=1.2, ms=4, label=run.name)
    axes[0].set(xscale="log", xlabel="tokens", ylabel="validation loss")
    axes[1].set(xlabel="steps", ylabel="validation loss")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(len(runs), 3), fontsize=7)
    fig.suptitle("validation loss of every run", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(path, title, panels):
    """panels: [(panel title, [(label, our Curve or None, the paper's Curve or None)])]; ours solid, the paper's
    dashed in the same colour; tokens on a log axis (step 0 left out)."""
    cols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), squeeze=False, layout="constrained")
    for ax, (panel_title, curves) in zip(axes.flat, panels):
        for i, (label, ours, paper) in enumerate(curves):
            for curve, style, suffix in ((ours, "-", ""), (paper, "--", " (paper)")):
                if curve is not None:
                    points = [(t, v) for t, v in zip(curve.tokens, curve.val_loss) if t > 0]
                    ax.plot(*zip(*points), style, color=f"C{i}", lw=1.2, label=label + suffix)
        ax.set(xscale="log", title=panel_title, xlabel="tokens", ylabel="validation loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Tiny Stories: {title}\nsolid: ours; dashed: the paper's logged runs", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_of(lines, rows, labels):
    return [(label, lines[r].plotted, lines[r].paper_curve) for r, label in zip(rows, labels) if lines[r].drawn]


def size_panels(lines):
    """Per (d, L): the Transformer and DAT 6/2 and 4/4 (symbolic attention, asymmetric relations)."""
    panels = []
    for d, L in PAPER_DAT:
        rows = [Row(d, L, 8, 0), Row(d, L, 6, 2, SYMBOLIC, RA), Row(d, L, 4, 4, SYMBOLIC, RA)]
        curves = curves_of(lines, rows, [r.columns[0] for r in rows])
        if curves:
            panels.append((f"d={d}, L={L}", curves))
    return panels


SETTING_NAMES = {("symmetric_rels", 0): "asymmetric", ("symmetric_rels", 1): "symmetric",
                 ("symbol_type", SYMBOLIC): "symbolic attention", ("symbol_type", RELATIVE): "position-relative"}


def ablation_panels(lines, varied, variants, settings):
    """Per (d, L, heads): the rows that differ only in the field `varied` (variants: [(value, label)]), under the
    first of `settings` (values of other fields) where every variant has a curve."""
    panels = []
    for d, L in PAPER_DAT:
        for sa, ra in ((6, 2), (4, 4)):
            for setting in settings:
                base = replace(Row(d, L, sa, ra, SYMBOLIC, RA), **setting)
                rows = [Row.from_flags(dict(base.flags(), **{varied: value})) for value, _ in variants]
                if all(lines.get(r) and lines[r].drawn for r in rows):
                    title = ", ".join([f"d={d}", f"L={L}", f"DAT {sa}/{ra}"] + [SETTING_NAMES[kv]
                                                                                 for kv in setting.items()])
                    panels.append((title, curves_of(lines, rows, [label for _, label in variants])))
                    break
    return panels


FIGURES = [
    ("ablation_symbol_type.png", "symbol type", "symbol_type",
     [(SYMBOLIC, "symbolic attention"), (RELATIVE, "position-relative")],
     [dict(symmetric_rels=0), dict(symmetric_rels=1)]),
    ("ablation_symmetry.png", "symmetric relations", "symmetric_rels", [(0, "asymmetric"), (1, "symmetric")],
     [dict(symbol_type=SYMBOLIC), dict(symbol_type=RELATIVE)]),
    ("ablation_ra_type.png", "relational attention vs RCA", "ra_type",
     [(RA, "relational attention"), (RCA, "RCA")], [dict(symmetric_rels=0)]),
    ("ablation_frozen_symbols.png", "trainable vs frozen symbols", "trainable_symbols",
     [(1, "trainable symbols"), (0, "frozen symbols")], [dict(symmetric_rels=1), dict(symmetric_rels=0)]),
]


def write_figures(out_dir, runs, lines):
    """runs.png (when there are runs) and the paper's figures that have data; returns their file names."""
    written = []
    if runs:
        plot_runs(os.path.join(out_dir, "runs.png"), runs)
        written.append("runs.png")
    panels = size_panels(lines)
    if panels:
        plot(os.path.join(out_dir, "val_loss.png"), "validation loss per model size", panels)
        written.append("val_loss.png")
    for name, title, varied, variants, settings in FIGURES:
        panels = ablation_panels(lines, varied, variants, settings)
        if panels:
            plot(os.path.join(out_dir, name), f"ablation: {title}", panels)
            written.append(name)
    return written


def write_report(out_dir, runs, skipped, lines, args):
    """Every output file; returns the names written. RunError when out_dir refuses a file."""
    try:
        write_summary_csv(os.path.join(out_dir, "summary.csv"), runs, lines)
        write_summary_md(os.path.join(out_dir, "summary.md"), runs, skipped, lines, args.runs, args.paper_logs)
        return ["summary.csv", "summary.md"] + write_figures(out_dir, runs, lines)
    except OSError as e:
        raise RunError(f"--out_dir {out_dir}: cannot write {e.filename or 'a file'} ({e.strerror})") from None


# -----------------------------------------------------------------------------
# the command line

@one_line_errors()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--runs", required=True, help="directory holding train.py runs (out/, or sweep.py's out_dir)")
    p.add_argument("--paper_logs", help="the authors' run_histories.csv: fills in the paper's numbers and curves")
    p.add_argument("--out_dir", required=True, help="where summary.csv, summary.md and the figures go")
    args = p.parse_args(argv)
    if not os.path.isdir(args.runs):
        raise RunError(f"--runs {args.runs}: not a directory")
    writable_dir(args.out_dir)
    runs, skipped = find_runs(args.runs)
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    logs = read_paper_logs(args.paper_logs) if args.paper_logs else {}
    if not runs and not logs:
        raise RunError(f"no run with evaluations and a checkpoint under {args.runs}")
    written = write_report(args.out_dir, runs, skipped, lines_by_row(runs, logs), args)
    print(f"{len(runs)} runs" + (f" ({len(skipped)} skipped)" if skipped else "") +
          f": wrote {', '.join(written)} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
