"""
Summarise training runs beside the paper's Tiny Stories results: a CSV, the paper's table with our numbers beside
the authors', and validation-loss figures.

$ python report.py --runs out/paper --paper_logs run_histories.csv --out_dir report

--runs: a directory searched for train.py run directories (metrics.jsonl and the checkpoint, whose config gives
the model); sweep.py's out_dir, for example. --paper_logs: the authors' exported W&B histories (run_histories.csv from
github.com/Awni00/abstract_transformer, branch paper, figure_generation/figure_data/tiny_stories/). Writes
out_dir/summary.csv (one line per run), out_dir/summary.md and the PNG figures val_loss.png,
ablation_symbol_type.png, ablation_symmetry.png, ablation_ra_type.png, ablation_frozen_symbols.png.

Numbers are computed as the paper's table computes them: the minimum validation loss over the evaluations of a run
and over the runs of one model configuration (the authors' frozen-symbol runs count for the trainable
configuration, as in their notebook; a frozen-symbol run of ours is compared with their frozen-symbol runs only).
"""

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

from checkpoints import CHECKPOINT_FILE, read_checkpoint  # noqa: E402
from reference import PAPER_RA_TYPES, PAPER_SYMBOL_TYPES  # noqa: E402
from runtime import RunError, one_line_errors  # noqa: E402
from sweep import ABLATION_ROWS, PAPER_DAT, PAPER_ROWS, RA, RCA, RELATIVE, SYMBOLIC, Row, parse_record  # noqa: E402

SUMMARY_COLUMNS = ["run", "kind", "d_model", "n_layers", "sa", "ra", "symbol_type", "symmetric_rels", "ra_type",
                   "arch", "n_params", "steps", "tokens", "min_val_loss", "last_val_loss", "min_val_perplexity",
                   "paper_val_loss", "paper_val_perplexity"]
PAPER_TOKENS_PER_STEP = 256 * 512


@dataclass
class Curve:
    """Validation loss (and perplexity) against training tokens, one point per evaluation."""
    tokens: list
    val_loss: list
    val_perplexity: list

    @property
    def min_loss(self):
        return min(self.val_loss)

    @property
    def min_perplexity(self):
        return min(self.val_perplexity)


@dataclass
class Run:
    """One of our runs: its directory (relative to --runs), train.py's config, its evaluations."""
    name: str
    config: dict
    curve: Curve
    steps: int

    @property
    def row(self):
        return Row.from_flags(self.config)

    @property
    def is_paper_config(self):
        return self.config.get("arch") == "paper" and self.row in GRID_ROWS


GRID_ROWS = PAPER_ROWS + ABLATION_ROWS


# -----------------------------------------------------------------------------
# reading runs

def read_evals(path):
    """The evaluations logged in a metrics.jsonl, in step order. A resumed run appends to the same file from its
    checkpoint's step on, so an evaluation at or before the last one read replaces those from its step on."""
    evals = []
    with open(path) as f:
        for record in map(parse_record, f):
            if record is None or "val/loss" not in record:
                continue
            while evals and evals[-1]["iter"] >= record["iter"]:
                evals.pop()
            evals.append(record)
    return evals


def read_config(run_dir):
    """train.py's config, from the run's checkpoint (memory-mapped: the weights are not read)."""
    return read_checkpoint(os.path.join(run_dir, CHECKPOINT_FILE), mmap=True).get("config")


def find_runs(root):
    """(runs, notes): every run directory under root with evaluations and a checkpoint written by train.py."""
    runs, notes = [], []
    for path, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        if "metrics.jsonl" not in files:
            continue
        name = os.path.relpath(path, root)
        evals = read_evals(os.path.join(path, "metrics.jsonl"))
        config = read_config(path) if CHECKPOINT_FILE in files else None
        if not evals or not config or "d_model" not in config:
            notes.append(f"skipped {name}: " + ("no evaluation yet" if not evals else "no checkpoint of train.py"))
            continue
        curve = Curve([e["tokens"] for e in evals], [e["val/loss"] for e in evals],
                      [e["val/perplexity"] for e in evals])
        runs.append(Run(name, config, curve, evals[-1]["iter"]))
    return runs, notes


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
    runs = {}  # name -> (row, [(step, tokens, val loss, val perplexity)])
    try:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["val/loss"] and paper_settings(r):
                    points = runs.setdefault(r["name"], (paper_row(r), []))[1]
                    points.append((float(r["iter"]), float(r["tokens"]), float(r["val/loss"]),
                                   float(r["val/perplexity"])))
    except (OSError, KeyError, ValueError) as e:
        raise RunError(f"--paper_logs {path}: not the authors' run_histories.csv ({type(e).__name__}: {e})") \
            from None
    by_row = {}
    for row, points in runs.values():
        _, tokens, loss, perplexity = zip(*sorted(points))
        by_row.setdefault(row, []).append(Curve(list(tokens), list(loss), list(perplexity)))
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
    return min(curves, key=lambda c: c.min_loss) if curves else None


@dataclass
class Line:
    """What the table and the figures show for one row: our best run and the paper's numbers and best run."""
    row: Row
    ours: Run = None
    paper_loss: float = None
    paper_perplexity: float = None
    paper_curve: Curve = None  # the best logged run of exactly this row

    @property
    def has_data(self):
        return self.ours is not None or self.paper_loss is not None


def lines_by_row(runs, logs):
    lines = {}
    for row in GRID_ROWS:
        mine = [r for r in runs if r.is_paper_config and r.row == row]
        curves = paper_curves(logs, row)
        lines[row] = Line(row, min(mine, key=lambda r: r.curve.min_loss) if mine else None,
                          min(c.min_loss for c in curves) if curves else None,
                          min(c.min_perplexity for c in curves) if curves else None, best(logs.get(row, [])))
    return lines


# -----------------------------------------------------------------------------
# outputs

def write_summary_csv(path, runs, lines):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        for run in runs:
            c, line = run.config, lines.get(run.row) if run.is_paper_config else None
            paper = (line.paper_loss, line.paper_perplexity) if line else (None, None)
            w.writerow([run.name, "DAT" if c["ra"] else "Transformer", c["d_model"], c["n_layers"], c["sa"], c["ra"],
                        c["symbol_type"], c["symmetric_rels"], c["ra_type"], c.get("arch", "current"),
                        c.get("n_params"), run.steps, run.curve.tokens[-1], run.curve.min_loss, run.curve.val_loss[-1],
                        run.curve.min_perplexity, *("" if v is None else v for v in paper)])


def fmt(value, digits):
    return "—" if value is None else f"{value:.{digits}f}"


def table(lines):
    out = ["| d | L | model | symbols | relations | params | steps | val loss | paper | Δ | val ppl | paper ppl |",
           "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for line in lines:
        r, ours = line.row, line.ours
        loss = ours.curve.min_loss if ours else None
        delta = None if loss is None or line.paper_loss is None else loss - line.paper_loss
        out.append(f"| {r.d_model} | {r.n_layers} | " + " | ".join(r.columns) + " | " +
                   " | ".join([f"{ours.config['n_params']:,}" if ours and ours.config.get("n_params") else "—",
                               f"{ours.steps:,}" if ours else "—", fmt(loss, 4), fmt(line.paper_loss, 4),
                               "—" if delta is None else f"{delta:+.4f}",
                               fmt(ours.curve.min_perplexity if ours else None, 3),
                               fmt(line.paper_perplexity, 3)]) + " |")
    return out


def write_summary_md(path, runs, lines, runs_dir, paper_logs):
    md = ["# Tiny Stories: our runs beside the paper's", "",
          f"Ours: {len(runs)} runs under `{runs_dir}`; val loss is the minimum over a run's evaluations (and over our "
          "runs of one configuration), val ppl = exp(that loss). " +
          (f"Paper: `{paper_logs}`, the minimum over the evaluations and duplicate runs of each configuration, as "
           "the paper's table; its perplexity is the mean of per-batch perplexities, slightly above exp(loss)."
           if paper_logs else "No --paper_logs given: the paper's columns are empty."),
          "Steps: the last step our run evaluated (the paper's runs: 100,000 steps of 131,072 tokens).", ""]
    for title, rows in (("The paper's table", PAPER_ROWS),
                        ("Ablations (RCA instead of relational attention; frozen symbols)", ABLATION_ROWS)):
        shown = [lines[r] for r in rows if lines[r].has_data]
        if shown:
            md += [f"## {title}", "", *table(shown), ""]
    others = [r for r in runs if not r.is_paper_config]
    if others:
        md += ["## Other runs (not a configuration of the paper with `--arch paper`)", "",
               "| run | arch | model | params | steps | val loss |", "| --- | --- | --- | ---: | ---: | ---: |"]
        md += [f"| {r.name} | {r.config.get('arch', 'current')} | {r.row.label} | {r.config.get('n_params', 0):,} | "
               f"{r.steps:,} | {r.curve.min_loss:.4f} |" for r in others]
        md.append("")
    with open(path, "w") as f:
        f.write("\n".join(md))


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
    return [(label, lines[r].ours.curve if lines[r].ours else None, lines[r].paper_curve)
            for r, label in zip(rows, labels) if lines[r].has_data]


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


def ablation_panels(lines, field, variants, settings):
    """Per (d, L, heads): the rows that differ only in `field` (variants: [(value, label)]), under the first of
    `settings` (values of other fields) where every variant has data."""
    panels = []
    for d, L in PAPER_DAT:
        for sa, ra in ((6, 2), (4, 4)):
            for setting in settings:
                base = replace(Row(d, L, sa, ra, SYMBOLIC, RA), **setting)
                rows = [Row.from_flags(dict(base.flags(), **{field: value})) for value, _ in variants]
                if all(lines.get(r) and lines[r].has_data for r in rows):
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


def write_figures(out_dir, lines):
    """The figures that have data; returns their file names."""
    written = []
    panels = size_panels(lines)
    if panels:
        plot(os.path.join(out_dir, "val_loss.png"), "validation loss per model size", panels)
        written.append("val_loss.png")
    for name, title, field, variants, settings in FIGURES:
        panels = ablation_panels(lines, field, variants, settings)
        if panels:
            plot(os.path.join(out_dir, name), f"ablation: {title}", panels)
            written.append(name)
    return written


# -----------------------------------------------------------------------------
# the command line

@one_line_errors()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--runs", required=True, help="directory holding train.py runs (e.g. sweep.py's out_dir)")
    p.add_argument("--paper_logs", help="the authors' run_histories.csv: fills in the paper's numbers and curves")
    p.add_argument("--out_dir", required=True, help="where summary.csv, summary.md and the figures go")
    args = p.parse_args(argv)
    if not os.path.isdir(args.runs):
        raise RunError(f"--runs {args.runs}: not a directory")
    runs, notes = find_runs(args.runs)
    logs = read_paper_logs(args.paper_logs) if args.paper_logs else {}
    if not runs and not logs:
        raise RunError(f"no run with evaluations and a checkpoint under {args.runs}")
    for note in notes:
        print(note)
    os.makedirs(args.out_dir, exist_ok=True)
    lines = lines_by_row(runs, logs)
    write_summary_csv(os.path.join(args.out_dir, "summary.csv"), runs, lines)
    write_summary_md(os.path.join(args.out_dir, "summary.md"), runs, lines, args.runs, args.paper_logs)
    figures = write_figures(args.out_dir, lines)
    print(f"{len(runs)} runs: wrote summary.csv, summary.md" + "".join(f", {f}" for f in figures) +
          f" to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
