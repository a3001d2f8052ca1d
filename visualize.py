"""
Heatmaps of what a trained model attends to, for one prompt:

    python visualize.py --ckpt_path out/<run name> --prompt "Once upon a time, Lily found a ball." --out_dir viz

writes, for each layer (--layers 0,3 for a few), PNGs of the self-attention heads, the relational heads' selection
weights, each relation (relational attention: r_ij; DisRCA: its relation scores rho), and the symbols each token
retrieves (symbolic attention), labelled with the prompt's tokens, and viz/index.html showing them all.
Prompts longer than MAX_TOKENS tokens (BOS included) are cropped to their first MAX_TOKENS, with a note.
The checkpoint may be anything checkpoints.load_model reads; the tokenizer is found as train.py finds it.
"""

import html
import os
import sys

import torch
from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend, no global state

from checkpoints import PATH_HELP, find_tokenizer, load_model
from runtime import Parser, RunError, one_line_errors, setup_device
from tokenizer import DataError, text_from_argv

MAX_TOKENS = 64
COLUMNS = 4  # heatmaps per row, at most
MAX_WIDTH = 24  # inches per figure
PANELS = [  # (key of attention_maps, title, colormap, file name)
    ("self_attention", "self-attention heads: probability that token i (row) attends to token j (column)",
     "viridis", "self_attention"),
    ("relational_attention", "relational heads: selection probabilities alpha_ij", "viridis", "relational_attention"),
    ("relations", "relations between token i (row) and token j (column), j <= i", "RdBu_r", "relations"),
    ("symbol_attention", "symbols retrieved: weight of each symbol (column) for each token (row)", "magma",
     "symbols"),
]


# -----------------------------------------------------------------------------
# tokens and layers

def token_labels(tokenizer, ids):
    """Readable labels of SentencePiece pieces: the word-start mark shown as a space."""
    return [tokenizer.sp_model.id_to_piece(i).replace("\u2581", " ") for i in ids]


def parse_layers(text, n_layers):
    """'0,2' -> [0, 2]; None -> every layer."""
    if text is None:
        return list(range(n_layers))
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--layers {text!r}: give layer numbers separated by commas, e.g. 0,2") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"--layers {text!r}: the model has layers 0..{n_layers - 1}")
    return layers


# -----------------------------------------------------------------------------
# figures

def heatmap_grid(panels, row_labels, col_labels, title, cmap, path, symmetric=False):
    """One figure of heatmaps (each a (rows, cols) tensor with a name), labelled axes, saved to path as a PNG.
    Columns beyond MAX_TOKENS (a large symbol library) get automatic ticks instead of one label each."""
    label_columns = len(col_labels) <= MAX_TOKENS
    width = min(max(3.0, 0.13 * len(col_labels) + 1.5), 10.0)  # inches per heatmap
    height = max(3.0, 0.13 * len(row_labels) + 1.5)
    columns = min(COLUMNS, len(panels), max(1, int(MAX_WIDTH // width)))
    rows = (len(panels) + columns - 1) // columns
    fig = Figure(figsize=(width * columns, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    fontsize = 7 if len(row_labels) <= 32 else 5
    for ax, (name, values) in zip(axes.flat, panels):
        limit = float(values.nan_to_num().abs().max()) or 1.0
        image = ax.imshow(values.numpy(), cmap=cmap, aspect="auto", interpolation="nearest",
                          vmin=-limit if symmetric else 0.0, vmax=limit)
        ax.set_title(name, fontsize=9)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=fontsize)
        if label_columns:
            ax.set_xticks(range(len(col_labels)), col_labels, fontsize=fontsize, rotation=90)
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)


def layer_panels(key, maps, layer):
    """The heatmaps of one kind for one layer: [(name, (rows, cols) tensor)], [] where the model has none."""
    values = maps[key]
    if values is None:
        return []
    values = values[0].float().cpu()
    if key != "relations":
        return [(f"layer {layer}, head {h}", v) for h, v in enumerate(values)]
    if values.shape[0] == values.shape[1]:  # relational attention: r_ij as (T, T, n_r)
        values = values.permute(2, 0, 1)
        names = [f"layer {layer}, relation {r}" for r in range(values.shape[0])]
    else:  # DisRCA: rho as (heads, T, T)
        names = [f"layer {layer}, head {h}: rho" for h in range(values.shape[0])]
    T = values.shape[-1]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return list(zip(names, values.masked_fill(future, float("nan"))))


def write_index(out_dir, prompt, labels, note, sections):
    """index.html: the prompt, its tokens and every figure, by layer."""
    parts = ["<!doctype html><meta charset='utf-8'><title>attention maps</title>",
             "<style>body{font-family:sans-serif;margin:2em} img{max-width:100%;border:1px solid #ddd}</style>",
             f"<h1>Attention maps</h1><p><b>prompt:</b> {html.escape(prompt)}</p>",
             f"<p><b>tokens ({len(labels)}):</b> " + " | ".join(html.escape(repr(t)[1:-1]) for t in labels) + "</p>"]
    if note:
        parts.append(f"<p><i>{html.escape(note)}</i></p>")
    for layer, figures in sections:
        parts.append(f"<h2>layer {layer}</h2>")
        for title, file in figures:
            parts.append(f"<h3>{html.escape(title)}</h3><img src='{html.escape(file)}' alt='{html.escape(title)}'>")
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")


def visualize(model, tokenizer, prompt, out_dir, layers, device):
    """Compute the maps of the prompt and write the figures and index.html; returns the list of files."""
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    limit = min(MAX_TOKENS, model.config.max_seq_len)
    note = ""
    if len(ids) > limit:
        note = f"The prompt has {len(ids)} tokens; the maps show its first {limit}."
        ids = ids[:limit]
    labels = token_labels(tokenizer, ids)
    maps = model.to(device).attention_maps(torch.tensor([ids], device=device))
    os.makedirs(out_dir, exist_ok=True)
    sections, files = [], []
    for layer in layers:
        figures = []
        for key, title, cmap, name in PANELS:
            panels = layer_panels(key, maps[layer], layer)
            if not panels:
                continue
            columns = [f"s{k}" for k in range(panels[0][1].shape[1])] if key == "symbol_attention" else labels
            file = f"layer{layer}_{name}.png"
            heatmap_grid(panels, labels, columns, f"layer {layer}: {title}", cmap, os.path.join(out_dir, file),
                         symmetric=key == "relations")
            figures.append((title, file))
        sections.append((layer, figures))
        files += [file for _, file in figures]
    write_index(out_dir, prompt, labels, note, sections)
    return files + ["index.html"], note


@one_line_errors(DataError, OSError, ValueError, RuntimeError)
def main(argv=None):
    parser = Parser(description=__doc__)
    parser.add_argument("--ckpt_path", required=True, help=PATH_HELP)
    parser.add_argument("--prompt", required=True, help="the text to visualise (BOS is prepended)")
    parser.add_argument("--out_dir", required=True, help="directory for the PNGs and index.html")
    parser.add_argument("--layers", default=None, help="layers to draw, e.g. 0,2 (default: all)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: found from the checkpoint)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise RunError(f"--out_dir {args.out_dir} is a file")
    device, _, _ = setup_device(args)
    model, ckpt = load_model(args.ckpt_path)
    tokenizer = find_tokenizer(args.ckpt_path, ckpt, model.config.vocab_size, args.tokenizer)
    layers = parse_layers(args.layers, model.config.n_layers)
    files, note = visualize(model, tokenizer, text_from_argv(args.prompt), args.out_dir, layers, device)
    if note:
        print(note)
    print(f"wrote {len(files)} files to {args.out_dir}; open {os.path.join(args.out_dir, 'index.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
