"""
The authors' format, and the one boundary to their code: their constructor keyword arguments (`model_args`, as
their train.py builds them and stores them in checkpoints) of both eras, their state-dict names, the contents of
their checkpoints and their Hugging Face directories. Nothing else in the project uses their names; inside, a model
is a ModelConfig (model.py). Finding and reading files is checkpoints.py's job (checkpoints.load_model).

    model_args_from_flags(flags, arch)  train.py flags -> (kind, model_args), exactly as the authors' train.py
    from_reference(kind, model_args, state_dict, arch)  their (kind, model_args) [+ weights] -> our model
    model_from_checkpoint(ckpt)         a checkpoint's contents (theirs or ours, either arch) -> our model
    load_hf_directory(directory)        config.json + model.safetensors of their package -> our model
    save_hf_directory(model, directory) our model -> config.json + model.safetensors of their package

Their `dual-attention` package publishes models in the Hugging Face format of `PyTorchModelHubMixin`: a directory
with config.json (the constructor's keyword arguments) and model.safetensors (the state dict, each shared tensor
stored once).

The paper era (May 2024, arch 'paper') names the DAT 'AbstractTransformerLM', its relational heads `n_heads_rca`
(`rca_kwargs`, `rca_type` in {disentangled_v2, standard, disentangled_v1}), its symbols sym_attn/pos_relative,
keeps one `symbol_retriever` and an output-layer alias in its state dict, and stores W_r as a Linear.
"""

import json
import os
import re
import secrets
from dataclasses import replace

import torch

from model import ModelConfig, build_model

PAPER_KIND = "AbstractTransformerLM"
PAPER_RA_TYPES = {"disentangled_v2": "relational_attention", "standard": "rca", "disentangled_v1": "disrca"}
PAPER_SYMBOL_TYPES = {"sym_attn": "symbolic_attention", "pos_relative": "position_relative"}
PAPER_ARG_NAMES = {"n_heads_ra": "n_heads_rca", "ra_kwargs": "rca_kwargs", "ra_type": "rca_type"}

# the authors' constructors: argument -> default (None: required)
COMMON_ARGS = dict(vocab_size=None, d_model=None, n_layers=None, dff=None, dropout_rate=None, activation=None,
                   norm_first=None, max_block_size=None, bias=True, pos_enc_type="pos_emb", norm_type="layernorm")
CONSTRUCTOR_ARGS = {
    "TransformerLM": dict(COMMON_ARGS, n_heads=None, use_flash_attention=True, block_kwargs={}),
    "DualAttnTransformerLM": dict(COMMON_ARGS, n_heads_sa=None, n_heads_ra=None, symbol_retrieval_kwargs=None,
                                  ra_kwargs={}, ra_type="relational_attention",
                                  symbol_retrieval="symbolic_attention", sa_kwargs={}, share_attn_params=False,
                                  symbol_retriever_config={}),
}
OPTIONAL = {"dff"}  # required by position in the authors' signature, but None is its value
# options of their attention modules that we build only at these values (they change nothing there)
NEUTRAL_ATTENTION_ARGS = dict(add_bias_kv=False, add_bias_out=False, key_dim=None, symmetric_attn=False,
                              rel_activation="identity", activation="softmax")


# -----------------------------------------------------------------------------
# model_args <-> ModelConfig

def reference_args(config):
    """ModelConfig -> (kind, model_args) of the authors' constructor, in the era of config.arch."""
    common = dict(vocab_size=config.vocab_size, d_model=config.d_model, n_layers=config.n_layers, dff=config.dff,
                  pos_enc_type=config.pos_enc_type, dropout_rate=config.dropout_rate, activation=config.activation,
                  norm_first=config.norm_first, max_block_size=config.max_seq_len, bias=config.bias)
    if config.norm_type != "layernorm":
        common["norm_type"] = config.norm_type
    if config.ra == 0:
        if config.n_kv_heads_sa:
            common["block_kwargs"] = dict(attn_kwargs=dict(n_kv_heads=config.n_kv_heads_sa))
        return "TransformerLM", dict(common, n_heads=config.sa)
    ra_kwargs = {}
    if config.n_kv_heads_sa:
        common["sa_kwargs"] = dict(n_kv_heads=config.n_kv_heads_sa)
    if config.n_kv_heads_ra:
        ra_kwargs["n_kv_heads"] = config.n_kv_heads_ra
    if config.ra_type == "relational_attention" and config.n_relations != config.ra:
        ra_kwargs.update(n_relations=config.n_relations, rel_proj_dim=config.rel_dim)
    if config.share_attn_params:
        common["share_attn_params"] = True
    if config.relative_symbols:
        ra_kwargs["use_relative_positional_symbols"] = True
        symbol_kwargs = dict(symbol_dim=config.d_model, max_rel_pos=config.max_rel_pos)
    else:
        symbol_kwargs = dict(d_model=config.d_model, n_symbols=config.n_symbols, n_heads=config.symbol_heads,
                             trainable_symbols=config.trainable_symbols)
    if config.ra_type == "relational_attention":
        ra_kwargs["symmetric_rels"] = config.symmetric_rels
    args = dict(common, n_heads_sa=config.sa, n_heads_ra=config.ra, ra_kwargs=ra_kwargs, ra_type=config.ra_type,
                symbol_retrieval=config.symbol_type, symbol_retrieval_kwargs=symbol_kwargs)
    if config.arch == "paper":
        return to_paper_names(args)
    return "DualAttnTransformerLM", args


def config_from_reference(kind, model_args, arch="current"):
    """The authors' (kind, model_args) -> ModelConfig; ValueError for what their constructors would refuse.
    arch='paper' also accepts the paper-era names."""
    if arch == "paper" and kind == PAPER_KIND:
        kind, model_args = from_paper_names(model_args)
    if kind not in CONSTRUCTOR_ARGS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(CONSTRUCTOR_ARGS)}")
    expected = CONSTRUCTOR_ARGS[kind]
    unknown = sorted(set(model_args) - set(expected))
    missing = sorted(k for k, v in expected.items() if v is None and k not in model_args and k not in OPTIONAL)
    if unknown or missing:
        raise ValueError(f"{kind} arguments: " + "; ".join(f"{label} {', '.join(keys)}" for label, keys in
                                                       (("unknown", unknown), ("missing", missing)) if keys))
    a = {**expected, **model_args}
    common = dict(vocab_size=a["vocab_size"], d_model=a["d_model"], n_layers=a["n_layers"], dff=a["dff"],
                  dropout_rate=a["dropout_rate"], activation=a["activation"], norm_first=bool(a["norm_first"]),
                  max_seq_len=a["max_block_size"], bias=bool(a["bias"]), pos_enc_type=a["pos_enc_type"], arch=arch,
                  norm_type=a["norm_type"])
    if kind == "TransformerLM":
        block_kwargs = dict(a["block_kwargs"] or {})
        attn = attention_options(block_kwargs.pop("attn_kwargs", None), "block_kwargs['attn_kwargs']")
        if block_kwargs:
            raise ValueError(f"unsupported block_kwargs {sorted(block_kwargs)}")
        return ModelConfig(sa=a["n_heads"], ra=0, n_kv_heads_sa=attn.get("n_kv_heads"), **common)
    if a["n_heads_ra"] <= 0:
        raise ValueError(f"a DAT needs n_heads_ra > 0 (got {a['n_heads_ra']})")
    retriever = dict(a["symbol_retriever_config"] or {})
    if not retriever.pop("shared_symbol_retriever", True):
        raise ValueError("symbol_retriever_config: one symbol retriever per layer (shared_symbol_retriever=False) "
                         "is not supported")
    retriever.pop("weight_tie_symbol_library", None)  # only acts on per-layer retrievers
    if retriever:
        raise ValueError(f"unsupported symbol_retriever_config {sorted(retriever)}")
    symbol_type, symbols = a["symbol_retrieval"], a["symbol_retrieval_kwargs"]
    sa = attention_options(a["sa_kwargs"], "sa_kwargs")
    ra = attention_options(a["ra_kwargs"], "ra_kwargs", "use_relative_positional_symbols", "symmetric_rels",
                           "n_relations", "rel_proj_dim")
    if bool(ra.get("use_relative_positional_symbols")) != (symbol_type == "position_relative"):
        raise ValueError("use_relative_positional_symbols must be set exactly when symbols are position-relative")
    symmetric_rels = bool(ra.get("symmetric_rels"))
    if symbol_type == "symbolic_attention":
        symbol_fields = dict(n_symbols=symbols["n_symbols"], symbol_heads=symbols.get("n_heads", 4),
                             trainable_symbols=bool(symbols.get("trainable_symbols", True)))
        width = symbols["d_model"]
    elif symbol_type == "position_relative":
        symbol_fields, width = dict(max_rel_pos=symbols["max_rel_pos"]), symbols["symbol_dim"]
    else:
        raise ValueError(f"unknown symbol_retrieval {symbol_type!r}; choose symbolic_attention or position_relative")
    if width != a["d_model"]:
        raise ValueError(f"symbols of width {width} for a model of width d_model={a['d_model']}")
    config = ModelConfig(sa=a["n_heads_sa"], ra=a["n_heads_ra"], symbol_type=symbol_type, ra_type=a["ra_type"],
                         symmetric_rels=symmetric_rels, n_kv_heads_sa=sa.get("n_kv_heads"),
                         n_kv_heads_ra=ra.get("n_kv_heads"), n_relations=ra.get("n_relations"),
                         share_attn_params=bool(a["share_attn_params"]), **symbol_fields, **common)
    if ra.get("rel_proj_dim") is not None and (config.n_relations is None or ra["rel_proj_dim"] != config.rel_dim):
        raise ValueError(f"rel_proj_dim={ra['rel_proj_dim']}: {config.n_relations} relations of "
                         f"{config.ra} heads of width {config.head_dim} have width {config.rel_dim}")
    return config


def attention_options(kwargs, where, *known):
    """The authors' attention keyword arguments (sa_kwargs, ra_kwargs, ...) -> the ones we build (`known` and
    n_kv_heads); ValueError for any other option not at its neutral value (NEUTRAL_ATTENTION_ARGS)."""
    options = dict(kwargs or {})
    taken = {k: options.pop(k) for k in (*known, "n_kv_heads") if k in options}
    odd = sorted(f"{k}={v!r}" for k, v in options.items()
                 if k not in NEUTRAL_ATTENTION_ARGS or v != NEUTRAL_ATTENTION_ARGS[k])
    if odd:
        raise ValueError(f"unsupported {where}: {', '.join(odd)}")
    return taken


def to_paper_names(model_args):
    """Today's DualAttnTransformerLM arguments -> the paper era's, as the paper-era train.py stored them."""
    ra_types = {v: k for k, v in PAPER_RA_TYPES.items()}
    symbol_types = {v: k for k, v in PAPER_SYMBOL_TYPES.items()}
    args = {PAPER_ARG_NAMES.get(k, k): v for k, v in model_args.items()}
    args["rca_type"] = ra_types[args["rca_type"]]
    args["symbol_retrieval"] = symbol_types[args["symbol_retrieval"]]
    return PAPER_KIND, args


def from_paper_names(model_args):
    """The paper era's AbstractTransformerLM arguments -> today's DualAttnTransformerLM ones."""
    today = {v: k for k, v in PAPER_ARG_NAMES.items()}
    args = {today.get(k, k): v for k, v in model_args.items()}
    args["ra_type"] = PAPER_RA_TYPES[args.get("ra_type", "disentangled_v2")]
    args["symbol_retrieval"] = PAPER_SYMBOL_TYPES[args.get("symbol_retrieval", "sym_attn")]
    return "DualAttnTransformerLM", args


def model_args_from_flags(flags, arch="current"):
    """train.py flags (a dict or Namespace: sa, ra, symbol_type, pos_enc_type, ra_type, n_layers, d_model,
    activation, dropout_rate, dff, norm_first, symmetric_rels, trainable_symbols, max_seq_len, vocab_size) ->
    (kind, model_args) exactly as the authors' train.py builds them (arch='paper': the paper-era kind and names).
    ValueError when the flags contradict each other."""
    flags = dict(flags if isinstance(flags, dict) else vars(flags), arch=arch)
    return reference_args(ModelConfig.from_flags(flags))


# -----------------------------------------------------------------------------
# weights and checkpoints

def from_reference(kind, model_args, state_dict=None, arch="current"):
    """Our model for the authors' (kind, model_args), with their state_dict (their key names, either era) loaded
    when given, in eval mode."""
    config = config_from_reference(kind, model_args, arch)
    return model_with_weights(config, state_dict)


def model_with_weights(config, state_dict=None):
    model = build_model(config)
    if state_dict is not None:
        if config.arch == "paper":
            state_dict = paper_state_dict_to_current(state_dict, config.n_layers, config.ra)
        load_state_dict(model, state_dict)
    return model.eval()


def load_state_dict(model, state_dict):
    """Load weights, with a one-line error naming the mismatch when they do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError("checkpoint does not fit this model (" + "; ".join(parts) + ")")
    model.load_state_dict(state_dict)


def paper_state_dict_to_current(state_dict, n_layers, n_heads_ra):
    """Paper-era keys -> ours: drop the `token_embedder.weights.*` aliases of the output layer, repeat the
    shared `symbol_retriever` per layer, rename abstract_attn/relational_cross_attention, view W_r's
    Linear weight (ra*h, n_r) as (ra, h, n_r). Keys already in our layout (our own --arch paper
    checkpoints store our module names next to the paper-era model_args) pass through unchanged."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("layers.token_embedder.weights."):
            continue
        key = key.replace(".abstract_attn.", ".dual_attn.").replace(".relational_cross_attention.",
                                                                     ".relational_attention.")
        if key.endswith("relational_attention.wr.weight"):
            key, value = key.removesuffix(".weight"), value.view(n_heads_ra, -1, value.size(1))
        if key.startswith("layers.symbol_retriever."):
            for layer in range(n_layers):
                out[key.replace("layers.symbol_retriever.", f"layers.symbol_retrievers.{layer}.")] = value
            continue
        out[key] = value
    return out


def checkpoint_kind_and_arch(ckpt):
    """(kind, arch) of a checkpoint: ours record them; the authors' train.py stores only model_args, so the kind
    follows from the head arguments and the arch from the state dict (the paper era has an output bias and no
    final LayerNorm)."""
    args, state = ckpt["model_args"], ckpt["model"]
    kind = ckpt.get("kind") or ("TransformerLM" if "n_heads" in args else
                                PAPER_KIND if "n_heads_rca" in args else "DualAttnTransformerLM")
    keys = {k.removeprefix("_orig_mod.").removeprefix("module.") for k in state}
    paper = "layers.final_out.bias" in keys and "layers.norm.weight" not in keys
    return kind, ckpt.get("arch") or ("paper" if paper else "current")


def config_from_checkpoint(ckpt):
    kind, arch = checkpoint_kind_and_arch(ckpt)
    return config_from_reference(kind, ckpt["model_args"], arch)


def model_from_checkpoint(ckpt, **changes):
    """Our model with a checkpoint's weights (ours or the authors', either arch), in eval mode. `changes` replace
    config fields that leave the weights as they are (train.py resumes with its own dropout_rate)."""
    config = replace(config_from_checkpoint(ckpt), **changes)
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    return model_with_weights(config, state)


# -----------------------------------------------------------------------------
# the Hugging Face format of their package

HF_CONFIG, HF_WEIGHTS, HF_WEIGHTS_PICKLE = "config.json", "model.safetensors", "pytorch_model.bin"
# why the paper-era model (--arch paper) has no counterpart in their package (checked against dual-attention 0.0.7)
PAPER_NOT_IN_PACKAGE = (
    "a paper-era model (--arch paper) cannot be exported: the authors' dual-attention package builds only today's "
    "architecture, whose DualAttnTransformerLM and TransformerLM always end with a LayerNorm and tie the output "
    "layer to the token embedding without a bias, while the paper-era model has no final LayerNorm and a separate "
    "output layer with a bias (no config.json of theirs describes it); every tool here reads the run directory "
    "itself")


def kind_of_hf_config(model_args):
    return "TransformerLM" if "n_heads" in model_args else "DualAttnTransformerLM"


def load_hf_directory(directory, **changes):
    """config.json + model.safetensors (or pytorch_model.bin) of their package -> our model, in eval mode, on the
    CPU. `changes` replace config fields that leave the weights as they are. ValueError naming the file when one
    is malformed (not a JSON object, truncated or not weights)."""
    model_args = read_hf_config(os.path.join(directory, HF_CONFIG))
    config = replace(config_from_reference(kind_of_hf_config(model_args), model_args), **changes)
    state = read_hf_weights(directory)
    model = build_model(config)
    load_state_dict(model, with_shared_names(model, state))
    return model.eval()


def read_hf_config(path):
    """The constructor's keyword arguments in a config.json; ValueError unless it is a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            model_args = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(model_args, dict):
        raise ValueError(f"{path} holds a JSON {type(model_args).__name__}, not an object of the model's arguments")
    return model_args


def is_hf_config(path):
    """Whether a config.json is that of a Hugging Face directory of their package (export.py writes one): a JSON
    object of their constructors' arguments only (train.py's config.json holds its flags)."""
    try:
        model_args = read_hf_config(path)
    except (OSError, ValueError):
        return False
    known = set(CONSTRUCTOR_ARGS["TransformerLM"]) | set(CONSTRUCTOR_ARGS["DualAttnTransformerLM"])
    return bool(model_args) and set(model_args) <= known


def read_hf_weights(directory):
    """The state dict of model.safetensors, else of pytorch_model.bin (read weights-only: tensors, no code);
    ValueError naming the file when it is truncated, empty, not weights or not a dict of tensors."""
    safetensors_path, pickle_path = os.path.join(directory, HF_WEIGHTS), os.path.join(directory, HF_WEIGHTS_PICKLE)
    if os.path.isfile(safetensors_path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        path = safetensors_path
        try:
            state = load_file(path, device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted: {e})") from None
    elif os.path.isfile(pickle_path):
        path = pickle_path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises all kinds for a truncated, empty or text file
            unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            why = (f"it holds a Python object ({unsafe.group(1)}), not only tensors" if unsafe else
                   f"truncated or corrupted: {' '.join(str(e).split())[:120] or type(e).__name__}")
            raise ValueError(f"{path} is not a weights-only PyTorch file ({why})") from None
    else:
        raise FileNotFoundError(f"{directory} has a {HF_CONFIG} but no {HF_WEIGHTS}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return state


def with_shared_names(model, state_dict):
    """A state dict that stores each shared tensor once (safetensors) -> one entry under every name the model
    gives it (the tied output layer, the symbol retriever of every layer, symmetric or shared projections)."""
    names = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    full = dict(state_dict)
    for group in names.values():
        stored = [name for name in group if name in state_dict]
        if stored:
            full.update({name: state_dict[stored[0]] for name in group if name not in state_dict})
    return full


def save_hf_directory(model, directory):
    """Write config.json (the keyword arguments of their DualAttnTransformerLM / TransformerLM) and
    model.safetensors, which their `dual_attention.hf` classes read with from_pretrained(directory).
    ValueError for a paper-era model (PAPER_NOT_IN_PACKAGE). Each file is written to a fresh temporary file and
    renamed into place, readable like any file the user writes (the umask's permissions)."""
    from safetensors.torch import save_model
    if model.config.arch != "current":
        raise ValueError(PAPER_NOT_IN_PACKAGE)
    kind, model_args = reference_args(model.config)
    os.makedirs(directory, exist_ok=True)
    temps = {}
    try:
        temps[HF_CONFIG] = new_temp_file(directory, HF_CONFIG)
        with open(temps[HF_CONFIG], "w") as f:
            json.dump(model_args, f, indent=2, sort_keys=True)
        temps[HF_WEIGHTS] = new_temp_file(directory, HF_WEIGHTS)
        mode = os.stat(temps[HF_WEIGHTS]).st_mode  # an ordinary file's under the umask
        save_model(model, temps[HF_WEIGHTS], metadata={"format": "pt"})  # (safetensors makes it 0600)
        os.chmod(temps[HF_WEIGHTS], mode)
        for name in (HF_WEIGHTS, HF_CONFIG):
            os.replace(temps.pop(name), os.path.join(directory, name))
    finally:
        for path in temps.values():
            os.unlink(path)
    return kind


def new_temp_file(directory, name):
    """The path of a new empty file for `name` in `directory`: a fresh hidden name, created exclusively (never
    through an existing file or link), with the permissions of an ordinary file under the umask."""
    while True:
        path = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
