"""
The Transformer and Dual Attention Transformer (DAT) language models of Altabaa & Lafferty (ICML 2025),
with the reference implementation's parameter names, so its checkpoints load as they are.

    TransformerLM          self-attention heads only
    DualAttnTransformerLM  sa self-attention heads + ra relational heads, symbols from one shared retriever

Two architectures share this code (see ARCHS): 'current', the authors' code as the seed ships it, and
'paper', the May 2024 code behind the paper's published Tiny Stories numbers.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attention import Attention, DualAttention, rope_tables
from kernels import linear_cross_entropy, linear_cross_entropy_reference


# -----------------------------------------------------------------------------
# the two architectures: every difference between them is listed here

@dataclass(frozen=True)
class Arch:
    name: str
    swiglu_two_thirds: bool   # swiglu d_ff = int(2/3 * 4d) (else 4d, like the other activations)
    exact_gelu: bool          # 'gelu' is erf GELU (else the tanh approximation)
    rel_dim_from_d: bool      # RA relation width d_r = d // ra (else the head width h)
    final_norm: bool          # LayerNorm after the last block
    tied_output: bool         # output weight is the token embedding, no bias (else untied, with bias)
    gpt2_init: bool           # N(0, 0.02) init with scaled residual projections (else PyTorch defaults)


ARCHS = {
    "current": Arch("current", swiglu_two_thirds=True, exact_gelu=False, rel_dim_from_d=False,
                    final_norm=True, tied_output=True, gpt2_init=True),
    "paper": Arch("paper", swiglu_two_thirds=False, exact_gelu=True, rel_dim_from_d=True,
                  final_norm=False, tied_output=False, gpt2_init=False),
}


def get_arch(arch):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch]


# -----------------------------------------------------------------------------
# feed-forward

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
ACTIVATION_CHOICES = ["swiglu", *ACTIVATIONS]


class FeedForward(nn.Module):
    """swiglu: W2(silu(W1 x) * W3 x); otherwise W2(act(W1 x))."""

    def __init__(self, d_model, dff, activation, bias, arch):
        super().__init__()
        if activation not in ACTIVATION_CHOICES:
            raise ValueError(f"unknown activation {activation!r}; choose from {ACTIVATION_CHOICES}")
        if dff is None:
            dff = int(2 / 3 * 4 * d_model) if activation == "swiglu" and arch.swiglu_two_thirds else 4 * d_model
        self.swiglu = activation == "swiglu"
        self.linear1 = nn.Linear(d_model, dff, bias=bias)
        self.linear2 = nn.Linear(dff, d_model, bias=bias)
        if self.swiglu:
            self.linear3 = nn.Linear(d_model, dff, bias=bias)
        elif activation == "gelu" and arch.exact_gelu:
            self.act = nn.GELU()
        else:
            self.act = ACTIVATIONS[activation]()

    def forward(self, x):
        if self.swiglu:
            return self.linear2(F.silu(self.linear1(x)) * self.linear3(x))
        return self.linear2(self.act(self.linear1(x)))


# -----------------------------------------------------------------------------
# blocks

class Block(nn.Module):
    """Residual block around a mixing layer (attention, registered as `mixer_name`) and a feed-forward layer.

    pre-norm:  x = x + drop(mix(LN1(x))); x = x + drop(FF(LN2(x)))
    post-norm: x = LN1(x + drop(mix(x))); x = drop(x); x = LN2(x + drop(FF(x)))"""

    def __init__(self, d_model, dropout_rate, norm_first, mixer_name, mixer, ff_block):
        super().__init__()
        self.norm_first = norm_first
        self.dropout = nn.Dropout(dropout_rate)
        self.norm1 = nn.LayerNorm(d_model)
        setattr(self, mixer_name, mixer)  # registered in the reference's order
        self.mixer = mixer_name
        self.norm2 = nn.LayerNorm(d_model)
        self.ff_block = ff_block

    def mix(self, x, symbols, rope):
        mixer = getattr(self, self.mixer)
        return mixer(x, rope) if symbols is None else mixer(x, symbols, rope)

    def forward(self, x, symbols=None, rope=None):
        if self.norm_first:
            x = x + self.dropout(self.mix(self.norm1(x), symbols, rope))
            return x + self.dropout(self.ff_block(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.mix(x, symbols, rope)))
        x = self.dropout(x)
        return self.norm2(x + self.dropout(self.ff_block(x)))


def transformer_block(d_model, n_heads, dff, dropout_rate, activation, norm_first, bias, arch):
    """Self-attention (output bias = `bias`) and a feed-forward layer (bias = `bias`)."""
    attn = Attention(d_model, n_heads, dropout_rate, bias_out=bias)
    ff = FeedForward(d_model, dff, activation, bias, arch)
    return Block(d_model, dropout_rate, norm_first, "self_attn", attn, ff)


def dual_attn_block(d_model, n_heads_sa, n_heads_ra, dff, dropout_rate, activation, norm_first, ra_type, ra_kwargs,
                    max_rel_pos, arch):
    """Dual attention and a feed-forward layer that always has biases (attention never: as in the reference)."""
    attn = DualAttention(d_model, n_heads_sa, n_heads_ra, dropout_rate, ra_type, ra_kwargs, max_rel_pos)
    ff = FeedForward(d_model, dff, activation, True, arch)
    return Block(d_model, dropout_rate, norm_first, "dual_attn", attn, ff)


# -----------------------------------------------------------------------------
# symbol retrievers (one module, shared by all layers, called on each layer's input)

class SymbolicAttention(nn.Module):
    """s = concat_c softmax(q^c F^c^T / sqrt(d/n)) S^c over n head chunks c, with q = q_proj(x).

    S (symbol_library) and F (template_features) are (n_symbols, d) learned tables; the softmax runs
    over all symbols (not causal). trainable_symbols=False freezes S only."""

    def __init__(self, d_model, n_symbols, n_heads=4, trainable_symbols=True):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"symbolic attention needs d_model ({d_model}) divisible by its {n_heads} heads")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.template_features = nn.Parameter(torch.randn(n_symbols, d_model))
        self.symbol_library = nn.Parameter(torch.randn(n_symbols, d_model), requires_grad=trainable_symbols)

    def forward(self, x):
        B, T, d = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, n, T, d/n)
        keys = self.template_features.view(-1, self.n_heads, d // self.n_heads).transpose(0, 1)  # (n, n_s, d/n)
        values = self.symbol_library.view(-1, self.n_heads, d // self.n_heads).transpose(0, 1)
        keys, values = (t.to(q.dtype).expand(B, -1, -1, -1) for t in (keys, values))
        symbols = F.scaled_dot_product_attention(q, keys, values)  # (B, n, T, d/n)
        return symbols.transpose(1, 2).reshape(B, T, d)


class RelativePositionalEncoding(nn.Module):
    def __init__(self, dim, max_rel_pos):
        super().__init__()
        self.rel_pos_embeddings = nn.Parameter(torch.empty(2 * max_rel_pos + 1, dim))
        nn.init.xavier_uniform_(self.rel_pos_embeddings)


class PositionRelativeSymbolRetriever(nn.Module):
    """Symbols indexed by the offset j - i: the table E (2M+1, d), row clip(j - i, -M, M) + M.

    Returns the table itself; the attention heads project it and index it by offset."""

    def __init__(self, symbol_dim, max_rel_pos):
        super().__init__()
        self.max_rel_pos = max_rel_pos
        self.rel_pos_enc = RelativePositionalEncoding(symbol_dim, max_rel_pos)

    def forward(self, x):
        return self.rel_pos_enc.rel_pos_embeddings


SYMBOL_RETRIEVERS = {"symbolic_attention": SymbolicAttention, "position_relative": PositionRelativeSymbolRetriever}


# -----------------------------------------------------------------------------
# language models

class LanguageModel(nn.Module):
    """Embedding (+ learned positions or RoPE), blocks, final LayerNorm, output layer tied to the embedding.

    Subclasses build the blocks (and the shared symbol retriever). Modules are registered in the
    reference's order, so parameter order (and hence optimizer state) matches its checkpoints."""

    def __init__(self, vocab_size, d_model, n_layers, max_block_size, pos_enc_type, total_heads, dropout_rate, arch,
                 blocks, retriever=None):
        super().__init__()
        self.arch = get_arch(arch)
        if pos_enc_type not in ("RoPE", "pos_emb"):
            raise ValueError(f"unknown pos_enc_type {pos_enc_type!r}; choose 'RoPE' or 'pos_emb'")
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.block_size, self.pos_enc_type = max_block_size, pos_enc_type
        self.n_heads, self.head_dim = total_heads, d_model // total_heads
        self.layers = nn.ModuleDict(dict(
            token_embedder=nn.Embedding(vocab_size, d_model),
            dropout=nn.Dropout(dropout_rate),  # defined by the reference but never applied; kept for parity
        ))
        if retriever is not None:  # the reference registers the shared retriever once per layer
            self.layers["symbol_retrievers"] = nn.ModuleList([retriever] * n_layers)
        self.layers["blocks"] = blocks
        if self.arch.final_norm:
            self.layers["norm"] = nn.LayerNorm(d_model)
        self.layers["final_out"] = nn.Linear(d_model, vocab_size, bias=not self.arch.tied_output)
        if self.arch.tied_output:
            self.layers.final_out.weight = self.layers.token_embedder.weight
        if pos_enc_type == "pos_emb":
            self.layers["positional_embedder"] = nn.Embedding(max_block_size, d_model)
        else:
            if self.head_dim % 2 != 0:
                raise ValueError(f"RoPE needs an even head width; d_model/heads = {self.head_dim}")
            cos, sin = rope_tables(self.head_dim, max_block_size)
            self.register_buffer("freqs_cos", cos, persistent=False)
            self.register_buffer("freqs_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        """GPT-2 initialisation ('current'): Linear/Embedding/W_r ~ N(0, 0.02), biases 0, then every
        `wo.weight` and the FF output map (`linear3` for swiglu, as in the reference; `linear2`
        otherwise) ~ N(0, 0.02/sqrt(2L)). The paper arch keeps PyTorch's defaults."""
        if not self.arch.gpt2_init:
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            if hasattr(module, "wr") and isinstance(module.wr, nn.Parameter):
                nn.init.normal_(module.wr, mean=0.0, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith(self._ff_out_name()):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _ff_out_name(self):
        return "linear3.weight" if self.layers.blocks[0].ff_block.swiglu else "linear2.weight"

    def symbols(self, layer, x):
        """The symbols of a layer (None for the Transformer)."""
        return None

    def hidden_states(self, idx):
        """Final hidden states (B, T, d) before the output layer."""
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds the block size {self.block_size}")
        x = self.layers.token_embedder(idx)
        rope = None
        if self.pos_enc_type == "pos_emb":
            x = x + self.layers.positional_embedder(torch.arange(T, device=idx.device))
        else:
            rope = (self.freqs_cos[:T], self.freqs_sin[:T])
        for layer, block in enumerate(self.layers.blocks):
            x = block(x, self.symbols(layer, x), rope)
        if self.arch.final_norm:
            x = self.layers.norm(x)
        return x

    def forward(self, idx, targets=None, return_logits=True):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy against targets (ignore_index -1).

        return_logits=False (training) returns (None, loss) and lets the loss skip the (B, T, V) logits."""
        x = self.hidden_states(idx)
        out = self.layers.final_out
        if targets is not None and not return_logits:  # the fused Triton loss on CUDA (kernels.py)
            loss_fn = linear_cross_entropy if x.is_cuda else linear_cross_entropy_reference
            return None, loss_fn(x.flatten(0, 1), out.weight, out.bias, targets.flatten())
        logits = out(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens tokens after idx (B, T), cropping the context to the block size, in eval mode."""
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size:])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx_next = torch.multinomial(logits.softmax(dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        self.train(was_training)
        return idx

    def num_params(self, non_embedding=False):
        """Unique parameters (tied/shared counted once); non_embedding drops the learned positions."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_enc_type == "pos_emb":
            n -= self.layers.positional_embedder.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Forward + backward FLOPs per token at sequence length T (default the block size):
        3 x (2 x every multiply-add of the forward pass), counting attention over all T keys
        (the nanoGPT/PaLM convention: 6N + 12 L H h T for a Transformer)."""
        T = seq_len or self.block_size
        d, V = self.d_model, self.vocab_size
        forward = 2 * d * V  # output layer
        for block in self.layers.blocks:
            forward += block_forward_flops(block, T)
        forward += self.retriever_forward_flops(T)
        return 3 * forward

    def retriever_forward_flops(self, T):
        return 0

    def estimate_mfu(self, tokens_per_second, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved FLOP/s over the device's peak."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops


def linear_flops(module):
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def block_forward_flops(block, T):
    """Forward FLOPs per token of one block: its linear maps plus the attention products over T keys.
    (W_v of position-relative symbols maps the offset table, not the tokens: see retriever_forward_flops.)"""
    flops = linear_flops(block)
    if block.mixer == "self_attn":
        return flops + 4 * T * block.self_attn.n_heads * block.self_attn.head_dim  # q k^T and probs @ v
    if block.dual_attn.self_attention is not None:
        flops += 4 * T * block.dual_attn.self_attention.n_heads * block.dual_attn.self_attention.head_dim
    return flops + relational_forward_flops(block.dual_attn.relational_attention, T)


def relational_forward_flops(ra, T):
    """Per token: selection scores and symbol aggregation (4 T h per head), plus for RA the n_r relations
    with every key (2 T n_r d_r), their aggregation (2 T n_r per head) and W_r (2 h n_r per head);
    for DisRCA the second score matrix and the product (2 T h + T per head)."""
    n, h = ra.n_heads, ra.head_dim
    flops = 4 * T * n * h
    if hasattr(ra, "wr"):
        flops += 2 * T * ra.n_relations * ra.rel_dim + 2 * T * n * ra.n_relations + 2 * ra.wr.numel()
    elif hasattr(ra, "wq_rel"):
        flops += (2 * h + 1) * T * n
    if ra.max_rel_pos is not None:
        flops -= linear_flops(ra.wv)
    return flops


def check_heads(d_model, total_heads):
    if total_heads <= 0 or d_model % total_heads != 0:
        raise ValueError(f"d_model={d_model} must be divisible by the number of heads ({total_heads})")


class TransformerLM(LanguageModel):
    """Transformer baseline: n_heads self-attention heads per block."""

    def __init__(self, vocab_size, d_model, n_layers, n_heads, dff, dropout_rate, activation, norm_first,
                 max_block_size, bias=True, pos_enc_type="pos_emb", arch="current"):
        check_heads(d_model, n_heads)
        blocks = nn.ModuleList([
            transformer_block(d_model, n_heads, dff, dropout_rate, activation, norm_first, bias, get_arch(arch))
            for _ in range(n_layers)])
        super().__init__(vocab_size, d_model, n_layers, max_block_size, pos_enc_type, n_heads, dropout_rate, arch,
                         blocks)


class DualAttnTransformerLM(LanguageModel):
    """Dual Attention Transformer: n_heads_sa self-attention + n_heads_ra relational heads per block, with
    symbols s = retriever(x) computed from each layer's input x by one retriever shared by all layers."""

    def __init__(self, vocab_size, d_model, n_layers, n_heads_sa, n_heads_ra, symbol_retrieval_kwargs, dff,
                 dropout_rate, activation, norm_first, max_block_size, ra_kwargs=None,
                 ra_type="relational_attention", symbol_retrieval="symbolic_attention", pos_enc_type="pos_emb",
                 bias=True, arch="current"):
        if n_heads_ra <= 0 or n_heads_sa < 0:
            raise ValueError(f"a DAT needs n_heads_ra > 0 and n_heads_sa >= 0 (got {n_heads_sa}, {n_heads_ra})")
        check_heads(d_model, n_heads_sa + n_heads_ra)
        if symbol_retrieval not in SYMBOL_RETRIEVERS:
            raise ValueError(f"unknown symbol_retrieval {symbol_retrieval!r}; choose from {sorted(SYMBOL_RETRIEVERS)}")
        retriever = SYMBOL_RETRIEVERS[symbol_retrieval](**symbol_retrieval_kwargs)
        ra_kwargs = dict(ra_kwargs or {})
        if get_arch(arch).rel_dim_from_d and ra_type == "relational_attention":
            ra_kwargs["rel_dim"] = d_model // n_heads_ra
        relative = ra_kwargs.get("use_relative_positional_symbols", False)
        if relative != (symbol_retrieval == "position_relative"):
            raise ValueError("use_relative_positional_symbols must be set exactly when symbols are position-relative")
        max_rel_pos = retriever.max_rel_pos if relative else None
        blocks = nn.ModuleList([
            dual_attn_block(d_model, n_heads_sa, n_heads_ra, dff, dropout_rate, activation, norm_first, ra_type,
                          ra_kwargs, max_rel_pos, get_arch(arch))
            for _ in range(n_layers)])
        super().__init__(vocab_size, d_model, n_layers, max_block_size, pos_enc_type, n_heads_sa + n_heads_ra,
                         dropout_rate, arch, blocks, retriever)
        self.n_heads_sa, self.n_heads_ra = n_heads_sa, n_heads_ra

    def symbols(self, layer, x):
        return self.layers.symbol_retrievers[layer](x)

    def retriever_forward_flops(self, T):
        retriever = self.layers.symbol_retrievers[0]
        if isinstance(retriever, SymbolicAttention):  # q_proj, then scores and mixing over n_s symbols
            return self.n_layers * (linear_flops(retriever) + 4 * retriever.symbol_library.numel())
        # W_v applied to the (2M+1, d) table once per layer and sequence, shared by its T tokens
        wv = [b.dual_attn.relational_attention.wv.weight.numel() for b in self.layers.blocks]
        return sum(2 * w * retriever.rel_pos_enc.rel_pos_embeddings.size(0) for w in wv) // T


MODEL_KINDS = {"TransformerLM": TransformerLM, "DualAttnTransformerLM": DualAttnTransformerLM}


# -----------------------------------------------------------------------------
# the reference's constructor arguments, command-line flags and checkpoints

def model_args_from_flags(flags, arch="current"):
    """Map train.py flags (sa, ra, symbol_type, pos_enc_type, ra_type, n_layers, d_model, activation,
    dropout_rate, dff, norm_first, symmetric_rels, trainable_symbols, max_seq_len, vocab_size) to the
    reference constructor: (kind, model_args) exactly as the reference train.py builds them
    (arch='paper': the paper-era train.py's kind and argument names)."""
    get_arch(arch)
    f = dict(FLAG_DEFAULTS, **flags)
    sa, ra = f["sa"], f["ra"]
    common = dict(vocab_size=f["vocab_size"], d_model=f["d_model"], n_layers=f["n_layers"], dff=f["dff"],
                  pos_enc_type=f["pos_enc_type"], dropout_rate=f["dropout_rate"], activation=f["activation"],
                  norm_first=bool(f["norm_first"]), max_block_size=f["max_seq_len"], bias=False)
    if ra == 0:
        return "TransformerLM", dict(common, n_heads=sa)
    if f["symbol_type"] not in SYMBOL_RETRIEVERS:
        raise ValueError(f"--ra {ra} needs --symbol_type symbolic_attention or position_relative "
                         f"(got {f['symbol_type']})")
    if f["ra_type"] not in ("relational_attention", "rca", "disrca"):
        raise ValueError(f"--ra {ra} needs --ra_type relational_attention, rca or disrca (got {f['ra_type']})")
    ra_kwargs = {}
    if f["symbol_type"] == "position_relative":
        ra_kwargs["use_relative_positional_symbols"] = True
        symbol_kwargs = dict(symbol_dim=f["d_model"], max_rel_pos=f["max_seq_len"])
    else:
        symbol_kwargs = dict(d_model=f["d_model"], n_symbols=f["max_seq_len"], n_heads=4,
                             trainable_symbols=bool(f["trainable_symbols"]))
    if f["ra_type"] == "relational_attention":
        ra_kwargs["symmetric_rels"] = bool(f["symmetric_rels"])
    args = dict(common, n_heads_sa=sa, n_heads_ra=ra, ra_kwargs=ra_kwargs, ra_type=f["ra_type"],
                symbol_retrieval=f["symbol_type"], symbol_retrieval_kwargs=symbol_kwargs)
    if arch == "paper":
        return current_args_to_paper("DualAttnTransformerLM", args)
    return "DualAttnTransformerLM", args


FLAG_DEFAULTS = dict(activation="swiglu", dropout_rate=0.1, dff=None, norm_first=1, symmetric_rels=0,
                     trainable_symbols=1, max_seq_len=512, vocab_size=32000, symbol_type="NA", ra_type="NA")


def from_reference(kind, model_args, state_dict=None, arch="current"):
    """Build our model from the reference constructor's (kind, model_args), load a reference
    state_dict (reference key names) when given, and return it in eval mode.

    arch='paper' also accepts the paper-era names (kind 'AbstractTransformerLM', n_heads_rca, rca_kwargs,
    rca_type, sym_attn/pos_relative) and state-dict layout (PAPER_ARCH.md §5)."""
    get_arch(arch)
    if arch == "paper":
        kind, model_args = paper_args_to_current(kind, model_args)
        if state_dict is not None:
            state_dict = paper_state_dict_to_current(state_dict, model_args["n_layers"], model_args.get("n_heads_ra"))
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    model = MODEL_KINDS[kind](**model_args, arch=arch)
    if state_dict is not None:
        load_reference_state_dict(model, state_dict)
    return model.eval()


def load_reference_state_dict(model, state_dict):
    """Load reference weights, with a one-line error naming the mismatch when they do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError("checkpoint does not fit this model (" + "; ".join(parts) + ")")
    model.load_state_dict(state_dict)


# -----------------------------------------------------------------------------
# the paper-era (May 2024) names

PAPER_RA_TYPES = {"disentangled_v2": "relational_attention", "standard": "rca", "disentangled_v1": "disrca"}
PAPER_SYMBOL_TYPES = {"sym_attn": "symbolic_attention", "pos_relative": "position_relative"}


def current_args_to_paper(kind, model_args):
    """Today's constructor arguments -> the paper-era ones, as the paper-era train.py stored them."""
    if kind == "TransformerLM":
        return kind, dict(model_args)
    ra_types = {v: k for k, v in PAPER_RA_TYPES.items()}
    symbol_types = {v: k for k, v in PAPER_SYMBOL_TYPES.items()}
    renames = dict(n_heads_ra="n_heads_rca", ra_kwargs="rca_kwargs", ra_type="rca_type")
    args = {renames.get(k, k): v for k, v in model_args.items()}
    args["rca_type"] = ra_types[args["rca_type"]]
    args["symbol_retrieval"] = symbol_types[args["symbol_retrieval"]]
    return "AbstractTransformerLM", args


def paper_args_to_current(kind, model_args):
    """Paper-era constructor arguments -> today's (the May-31 renamed twin passes through)."""
    if kind != "AbstractTransformerLM":
        return kind, dict(model_args)
    args = dict(model_args)
    renames = dict(n_heads_rca="n_heads_ra", rca_kwargs="ra_kwargs", rca_type="ra_type")
    args = {renames.get(k, k): v for k, v in args.items()}
    args["ra_type"] = PAPER_RA_TYPES[args.get("ra_type", "disentangled_v2")]
    args["symbol_retrieval"] = PAPER_SYMBOL_TYPES[args.get("symbol_retrieval", "sym_attn")]
    return "DualAttnTransformerLM", args


def paper_state_dict_to_current(state_dict, n_layers, n_heads_ra=None):
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
    """(kind, arch) of a checkpoint: ours record them; the reference's train.py stores only model_args, so
    the kind follows from the head arguments and the arch from the state dict (PAPER_ARCH.md §5: the
    paper era has an output bias and no final LayerNorm)."""
    args, state = ckpt["model_args"], ckpt["model"]
    kind = ckpt.get("kind") or ("TransformerLM" if "n_heads" in args else
                                "AbstractTransformerLM" if "n_heads_rca" in args else "DualAttnTransformerLM")
    keys = {k.removeprefix("_orig_mod.").removeprefix("module.") for k in state}
    paper = "layers.final_out.bias" in keys and "layers.norm.weight" not in keys
    return kind, ckpt.get("arch") or ("paper" if paper else "current")


def model_from_checkpoint(ckpt):
    """Our model with a checkpoint's weights (ours or the reference's, either arch), in eval mode."""
    kind, arch = checkpoint_kind_and_arch(ckpt)
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    return from_reference(kind, ckpt["model_args"], state, arch=arch)
