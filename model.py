"""
The Transformer and Dual Attention Transformer (DAT) language models of Altabaa & Lafferty (ICML 2025),
with the reference implementation's parameter names, so its checkpoints load as they are.

    ModelConfig            everything a model is built from, in train.py's flag names
    TransformerLM          self-attention heads only (ra = 0)
    DualAttnTransformerLM  sa self-attention heads + ra relational heads, symbols from one shared retriever

Two architectures share this code (see ARCHS): 'current', the authors' code as the seed ships it, and
'paper', the May 2024 code behind the paper's published Tiny Stories numbers. The authors' own names
(constructor arguments, state-dict keys of the paper era) live in reference.py only.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from attention import (RELATIONAL_ATTENTION, Attention, DualAttention, KVCache, RelationalAttention, RelationalHeads,
                       linear_flops, rope_tables)
from kernels import linear_cross_entropy, linear_cross_entropy_eager

LLAMA2_VOCAB_SIZE = 32000
# dense bf16 tensor-core peak FLOP/s, matched by substring of the CUDA device name (first match wins)
PEAK_FLOPS = [("B200", 2250e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("L4", 121e12), ("A10", 125e12), ("V100", 125e12), ("T4", 65e12)]


# -----------------------------------------------------------------------------
# the two architectures

@dataclass(frozen=True)
class Arch:
    """What differs between the paper-era model ('paper') and the authors' code today ('current'):

    1. swiglu_two_thirds  swiglu d_ff = int(2/3 * 4d) (else 4d, like the other activations)
    2. exact_gelu         'gelu' is erf GELU (else the tanh approximation)
    3. rel_dim_from_d     RA relation width d_r = d // ra (else the head width h)
    4. final_norm         LayerNorm after the last block
    5. tied_output        output weight is the token embedding, no bias (else untied, with bias)
    6. gpt2_init          N(0, 0.02) init with scaled residual projections (else PyTorch defaults)"""
    name: str
    swiglu_two_thirds: bool
    exact_gelu: bool
    rel_dim_from_d: bool
    final_norm: bool
    tied_output: bool
    gpt2_init: bool


ARCHS = {
    "current": Arch("current", swiglu_two_thirds=True, exact_gelu=False, rel_dim_from_d=False,
                    final_norm=True, tied_output=True, gpt2_init=True),
    "paper": Arch("paper", swiglu_two_thirds=False, exact_gelu=True, rel_dim_from_d=True,
                  final_norm=False, tied_output=False, gpt2_init=False),
}

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
ACTIVATION_CHOICES = ["swiglu", *ACTIVATIONS]
POS_ENC_TYPES = ("RoPE", "pos_emb")
SYMBOL_TYPES = ("symbolic_attention", "position_relative")
NORM_TYPES = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


# -----------------------------------------------------------------------------
# the configuration

@dataclass(frozen=True)
class ModelConfig:
    """Everything a model is built from, in train.py's flag names (--d_model is `d_model`, ...).

    ra = 0 builds the Transformer with sa heads; ra > 0 the DAT with sa + ra heads of width d_model / (sa + ra).
    Fields that do not apply to the model are reset to their neutral values (the Transformer has no symbols, only
    relational_attention has symmetric relations, only the Transformer has `bias`, ...), so two configs are equal
    exactly when they build the same model. Derived values (heads, widths, kind) are properties."""
    sa: int                         # self-attention heads
    ra: int                         # relational heads (0: the Transformer)
    d_model: int
    n_layers: int
    pos_enc_type: str               # 'RoPE' or 'pos_emb'
    symbol_type: str = "NA"         # 'symbolic_attention' or 'position_relative' (ra > 0)
    ra_type: str = "NA"             # 'relational_attention', 'rca' or 'disrca' (ra > 0)
    vocab_size: int = LLAMA2_VOCAB_SIZE
    max_seq_len: int = 512          # the block size: longest sequence, and the learned positions' table
    activation: str = "swiglu"
    dropout_rate: float = 0.1
    dff: int | None = None          # feed-forward width (None: see d_ff)
    norm_first: bool = True         # pre-norm blocks (else post-norm)
    symmetric_rels: bool = False    # relational_attention: W^rel_k tied to W^rel_q
    trainable_symbols: bool = True  # symbolic attention: the symbol library is trained
    bias: bool = False              # the Transformer's FF and attention-output biases (the DAT's FF always has them)
    arch: str = "current"           # see ARCHS
    n_symbols: int | None = None    # symbolic attention: library size (None: max_seq_len)
    symbol_heads: int = 4           # symbolic attention: heads of the retrieval
    max_rel_pos: int | None = None  # position-relative symbols: largest offset M (None: max_seq_len)
    # options of the authors' larger published models ('current' arch; train.py leaves them at their defaults)
    n_kv_heads_sa: int | None = None    # grouped-query attention: key/value heads of the self-attention (None: sa)
    n_kv_heads_ra: int | None = None    # ... of the relational heads (None: ra)
    n_relations: int | None = None      # relational_attention: the number n_r of relations (None: ra)
    norm_type: str = "layernorm"        # or 'rmsnorm'
    share_attn_params: bool = False     # DAT with sa == ra: self-attention's W_q, W_k are the relational W_q, W_k

    def __post_init__(self):
        def fail(message):
            raise ValueError(message)

        def reset(**values):
            for name, value in values.items():
                object.__setattr__(self, name, value)

        if self.arch not in ARCHS:
            fail(f"unknown arch {self.arch!r}; choose from {sorted(ARCHS)}")
        if self.pos_enc_type not in POS_ENC_TYPES:
            fail(f"unknown pos_enc_type {self.pos_enc_type!r}; choose 'RoPE' or 'pos_emb'")
        if self.activation not in ACTIVATION_CHOICES:
            fail(f"unknown activation {self.activation!r}; choose from {ACTIVATION_CHOICES}")
        for name in ("d_model", "n_layers", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive (got {getattr(self, name)})")
        if self.sa < 0 or self.ra < 0:
            fail(f"the head counts must not be negative (sa={self.sa}, ra={self.ra})")
        if self.n_heads == 0 or self.d_model % self.n_heads != 0:
            fail(f"d_model={self.d_model} must be divisible by the number of heads ({self.n_heads})")
        if self.pos_enc_type == "RoPE" and self.head_dim % 2 != 0:
            fail(f"RoPE needs an even head width; d_model/heads = {self.head_dim}")
        if self.norm_type not in NORM_TYPES:
            fail(f"unknown norm_type {self.norm_type!r}; choose from {list(NORM_TYPES)}")
        for name, heads in (("n_kv_heads_sa", self.sa), ("n_kv_heads_ra", self.ra)):
            kv_heads = getattr(self, name)
            if kv_heads in (None, heads) or heads == 0:
                reset(**{name: None})  # None: one key/value head per query head
            elif kv_heads <= 0 or heads % kv_heads != 0:
                fail(f"{name}={kv_heads} must divide the {heads} heads")
        if self.ra == 0:  # the Transformer: no symbols, no relations
            reset(symbol_type="NA", ra_type="NA", symmetric_rels=False, trainable_symbols=True, n_symbols=None,
                  symbol_heads=4, max_rel_pos=None, n_relations=None, share_attn_params=False)
            self.check_paper_options()
            return
        if self.symbol_type not in SYMBOL_TYPES:
            fail(f"--ra {self.ra} needs --symbol_type symbolic_attention or position_relative "
                 f"(got {self.symbol_type})")
        if self.ra_type not in RELATIONAL_ATTENTION:
            fail(f"--ra {self.ra} needs --ra_type relational_attention, rca or disrca (got {self.ra_type})")
        relational = self.ra_type == "relational_attention"
        reset(bias=False, symmetric_rels=self.symmetric_rels and relational,
              n_relations=(self.n_relations or self.ra) if relational else None)
        if relational and (self.n_relations <= 0 or self.ra * self.head_dim % self.n_relations != 0):
            fail(f"{self.n_relations} relations do not divide the {self.ra * self.head_dim} relational features")
        if self.share_attn_params and (self.sa != self.ra or self.ra_type == "rca"
                                       or self.n_kv_heads_sa != self.n_kv_heads_ra):
            fail("share_attn_params needs sa == ra (and as many key/value heads) and ra_type relational_attention "
                 "or disrca")
        if self.symbol_type == "symbolic_attention":
            reset(n_symbols=self.n_symbols or self.max_seq_len, max_rel_pos=None)
            if self.d_model % self.symbol_heads != 0:
                fail(f"symbolic attention needs d_model ({self.d_model}) divisible by its {self.symbol_heads} heads")
        else:
            reset(max_rel_pos=self.max_rel_pos or self.max_seq_len, n_symbols=None, symbol_heads=4,
                  trainable_symbols=True)
        self.check_paper_options()

    def check_paper_options(self):
        """The paper-era code had none of the published models' options."""
        options = dict(n_kv_heads_sa=None, n_kv_heads_ra=None, norm_type="layernorm", share_attn_params=False)
        changed = [name for name, default in options.items() if getattr(self, name) != default]
        if self.n_relations not in (None, self.ra):
            changed.append("n_relations")
        if self.arch == "paper" and changed:
            raise ValueError(f"the paper arch has no {', '.join(changed)} (only the 'current' arch)")

    @classmethod
    def from_flags(cls, flags):
        """train.py's flags (an argparse Namespace or a dict; entries that are not fields are ignored) -> config.
        Flags not given take the defaults; --vocab_size 0 means the Llama 2 tokenizer; 0/1 switches become bools."""
        flags = flags if isinstance(flags, dict) else vars(flags)
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in flags.items() if k in names and v is not None}
        missing = [f"--{name}" for name in ("sa", "ra", "d_model", "n_layers", "pos_enc_type") if name not in values]
        if missing:
            raise ValueError(f"missing flags: {' '.join(missing)}")
        values["vocab_size"] = values.get("vocab_size") or LLAMA2_VOCAB_SIZE
        for switch in ("norm_first", "symmetric_rels", "trainable_symbols"):
            if switch in values:
                values[switch] = bool(values[switch])
        return cls(**values)

    @property
    def kind(self):
        return "TransformerLM" if self.ra == 0 else "DualAttnTransformerLM"

    @property
    def rules(self):
        """The architecture's row of ARCHS."""
        return ARCHS[self.arch]

    @property
    def n_heads(self):
        return self.sa + self.ra

    @property
    def head_dim(self):
        """h = d / (sa + ra): the width of every head, self-attention and relational."""
        return self.d_model // self.n_heads

    @property
    def d_ff(self):
        """--dff, else int(2/3 * 4d) for swiglu ('current') and 4d otherwise."""
        if self.dff is not None:
            return self.dff
        two_thirds = self.activation == "swiglu" and self.rules.swiglu_two_thirds
        return int(2 / 3 * 4 * self.d_model) if two_thirds else 4 * self.d_model

    @property
    def rel_dim(self):
        """d_r: the width of each relation, ra * h / n_r ('current': the head width for n_r = ra) or d // ra
        ('paper')."""
        return self.d_model // self.ra if self.rules.rel_dim_from_d else self.ra * self.head_dim // self.n_relations

    @property
    def relative_symbols(self):
        return self.symbol_type == "position_relative"

    @property
    def ff_bias(self):
        return self.bias if self.ra == 0 else True  # the reference's DAT blocks always give the FF a bias

    @property
    def attn_out_bias(self):
        return self.bias if self.ra == 0 else False


# -----------------------------------------------------------------------------
# feed-forward

class FeedForward(nn.Module):
    """swiglu: W2(silu(W1 x) * W3 x); otherwise W2(act(W1 x)). Width d_model -> d_ff -> d_model."""

    def __init__(self, config, bias):
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        self.linear1 = nn.Linear(config.d_model, config.d_ff, bias=bias)
        self.linear2 = nn.Linear(config.d_ff, config.d_model, bias=bias)
        if self.swiglu:
            self.linear3 = nn.Linear(config.d_model, config.d_ff, bias=bias)
        elif config.activation == "gelu" and config.rules.exact_gelu:
            self.act = nn.GELU()
        else:
            self.act = ACTIVATIONS[config.activation]()

    def forward(self, x):
        if self.swiglu:
            return self.linear2(F.silu(self.linear1(x)) * self.linear3(x))
        return self.linear2(self.act(self.linear1(x)))

    def forward_flops(self, T):
        return T * linear_flops(self)


# -----------------------------------------------------------------------------
# blocks

def make_norm(config):
    """LayerNorm(d) with affine weight and bias, or RMSNorm(d) with a weight (config.norm_type); eps 1e-5."""
    return NORM_TYPES[config.norm_type](config.d_model, eps=1e-5)


class Block(nn.Module):
    """Residual block around a mixing layer (attention, registered as `mixer_name`) and a feed-forward layer.

    pre-norm:  x = x + drop(mix(LN1(x))); x = x + drop(FF(LN2(x)))
    post-norm: x = LN1(x + drop(mix(x))); x = drop(x); x = LN2(x + drop(FF(x)))"""

    def __init__(self, config, mixer_name, mixer):
        super().__init__()
        self.norm_first = config.norm_first
        self.dropout = nn.Dropout(config.dropout_rate)
        self.norm1 = make_norm(config)
        setattr(self, mixer_name, mixer)  # registered in the reference's order
        self.mixer = mixer_name
        self.norm2 = make_norm(config)
        self.ff_block = FeedForward(config, config.ff_bias)

    def mix(self, x, symbols, rope, cache):
        mixer = getattr(self, self.mixer)
        return mixer(x, rope, cache) if symbols is None else mixer(x, symbols, rope, cache)

    def forward(self, x, symbols=None, rope=None, cache=None):
        if self.norm_first:
            x = x + self.dropout(self.mix(self.norm1(x), symbols, rope, cache))
            return x + self.dropout(self.ff_block(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.mix(x, symbols, rope, cache)))
        x = self.dropout(x)
        return self.norm2(x + self.dropout(self.ff_block(x)))

    def forward_flops(self, T):
        """Forward FLOPs of one sequence of T tokens (the LayerNorms are not counted)."""
        return getattr(self, self.mixer).forward_flops(T) + self.ff_block.forward_flops(T)

    def attention_maps(self, x, symbols=None, rope=None):
        """The attention weights of the mixing layer on the block's input x (see LanguageModel.attention_maps)."""
        x = self.norm1(x) if self.norm_first else x
        if self.mixer == "dual_attn":
            return self.dual_attn.attention_maps(x, symbols, rope)
        return {"self_attention": self.self_attn.weights(x, rope)["alpha"], "relational_attention": None,
                "relations": None}


# -----------------------------------------------------------------------------
# symbol retrievers (one module, shared by all layers, called on each layer's input)

class SymbolicAttention(nn.Module):
    """s = concat_c softmax(q^c F^c^T / sqrt(d/n)) S^c over n = symbol_heads chunks c, with q = q_proj(x).

    S (symbol_library) and F (template_features) are (n_symbols, d) learned tables; the softmax runs
    over all symbols (not causal). trainable_symbols=False freezes S only."""

    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.n_heads = config.symbol_heads
        self.q_proj = nn.Linear(d, d)
        self.template_features = nn.Parameter(torch.randn(config.n_symbols, d))
        self.symbol_library = nn.Parameter(torch.randn(config.n_symbols, d), requires_grad=config.trainable_symbols)

    def forward(self, x):
        """Every position of the batch queries the same library. When a backward follows, as B sequences over a
        broadcast view of it: SDPA's backward parallelises over batch x heads x key blocks, and one sequence of B*T
        queries against n_s keys gives it only heads x n_s/128 programs (d64 DAT steps: 18.2 ms, not 13.8, on an H100).
        Without gradients (generation), as one sequence of B*T queries, so that no B copies of it are made."""
        B, T, d = x.shape
        n, h = self.n_heads, d // self.n_heads
        batch = B if torch.is_grad_enabled() else 1
        q = self.q_proj(x).view(batch, -1, n, h).transpose(1, 2)  # (batch, n, B*T/batch, h)
        keys = self.template_features.view(1, -1, n, h).transpose(1, 2).expand(batch, -1, -1, -1)  # (batch, n, n_s, h)
        values = self.symbol_library.view(1, -1, n, h).transpose(1, 2).expand(batch, -1, -1, -1)
        symbols = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype))  # (batch, n, B*T/batch, h)
        return symbols.transpose(1, 2).reshape(B, T, d)

    def forward_flops(self, T):
        """q_proj, then the scores against and the mixing of the n_s symbols (2 n_s d each) per token."""
        return T * (linear_flops(self) + 4 * self.symbol_library.numel())

    def weights(self, x):
        """The retrieval weights softmax(q^c F^c^T / sqrt(d/n)) of each head c: (B, n, T, n_symbols)."""
        B, T, d = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, n, T, d/n)
        keys = self.template_features.view(-1, self.n_heads, d // self.n_heads).transpose(0, 1)  # (n, n_s, d/n)
        return (q @ keys.transpose(-2, -1) * (d // self.n_heads) ** -0.5).softmax(dim=-1)


class RelativePositionalEncoding(nn.Module):
    def __init__(self, dim, max_rel_pos):
        super().__init__()
        self.rel_pos_embeddings = nn.Parameter(torch.empty(2 * max_rel_pos + 1, dim))
        nn.init.xavier_uniform_(self.rel_pos_embeddings)


class PositionRelativeSymbolRetriever(nn.Module):
    """Symbols indexed by the offset j - i: the table E (2M+1, d), row clip(j - i, -M, M) + M.

    Returns the table itself; the attention heads project it and index it by offset."""

    def __init__(self, config):
        super().__init__()
        self.max_rel_pos = config.max_rel_pos
        self.rel_pos_enc = RelativePositionalEncoding(config.d_model, config.max_rel_pos)

    def forward(self, x):
        return self.rel_pos_enc.rel_pos_embeddings

    def forward_flops(self, T):
        return 0  # W_v maps the table in the attention heads, which count it


SYMBOL_RETRIEVERS = {"symbolic_attention": SymbolicAttention, "position_relative": PositionRelativeSymbolRetriever}


# -----------------------------------------------------------------------------
# language models

class LanguageModel(nn.Module):
    """Embedding (+ learned positions or RoPE), blocks, final LayerNorm, output layer tied to the embedding.

    Subclasses build the blocks (and the shared symbol retriever). Modules are created and registered in the
    reference's order, so the initial weights of a seed, the parameter order (and hence optimizer state) and the
    state-dict keys match its checkpoints."""

    def __init__(self, config):
        super().__init__()
        if MODEL_KINDS[config.kind] is not type(self):
            raise ValueError(f"a {config.kind} config (sa={config.sa}, ra={config.ra}) cannot build a "
                             f"{type(self).__name__}")
        self.config = config
        retriever = self.make_retriever(config)
        blocks = nn.ModuleList([self.make_block(config) for _ in range(config.n_layers)])
        d, V = config.d_model, config.vocab_size
        self.layers = nn.ModuleDict(dict(
            token_embedder=nn.Embedding(V, d),
            dropout=nn.Dropout(config.dropout_rate),  # defined by the reference but never applied; kept for parity
        ))
        if retriever is not None:  # the reference registers the shared retriever once per layer
            self.layers["symbol_retrievers"] = nn.ModuleList([retriever] * config.n_layers)
        self.layers["blocks"] = blocks
        if config.rules.final_norm:
            self.layers["norm"] = make_norm(config)
        self.layers["final_out"] = nn.Linear(d, V, bias=not config.rules.tied_output)
        if config.rules.tied_output:
            self.layers.final_out.weight = self.layers.token_embedder.weight
        if config.pos_enc_type == "pos_emb":
            self.layers["positional_embedder"] = nn.Embedding(config.max_seq_len, d)
        else:
            cos, sin = rope_tables(config.head_dim, config.max_seq_len)
            self.register_buffer("freqs_cos", cos, persistent=False)
            self.register_buffer("freqs_sin", sin, persistent=False)
        self.init_weights()

    def make_retriever(self, config):
        """The symbol retriever shared by all layers (None for the Transformer)."""
        return None

    def init_weights(self):
        """GPT-2 initialisation ('current'): Linear/Embedding/W_r ~ N(0, 0.02), biases 0, then every
        `wo.weight` and the FF output map (`linear3` for swiglu, as in the reference; `linear2`
        otherwise) ~ N(0, 0.02/sqrt(2L)). The paper arch keeps PyTorch's defaults."""
        if not self.config.rules.gpt2_init:
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            if isinstance(module, RelationalAttention):
                nn.init.normal_(module.wr, mean=0.0, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        ff_out = "linear3.weight" if self.config.activation == "swiglu" else "linear2.weight"
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith(ff_out):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def symbols(self, layer, x):
        """The symbols of a layer (None for the Transformer)."""
        return None

    def hidden_states(self, idx, cache=None):
        """Final hidden states (B, T, d) before the output layer. With a cache (generation): idx is the prompt,
        at positions 0..T-1 (prefill), or one new token at position cache.pos (decoding)."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the block size {self.config.max_seq_len}")
        decoding = cache is not None and cache.decoding
        if decoding:
            cache.valid = (cache.slots <= cache.pos).view(1, -1)  # (1, S): the slots up to this token's
        x = self.layers.token_embedder(idx)
        rope = None
        if self.config.pos_enc_type == "pos_emb":
            x = x + self.layers.positional_embedder(cache.pos if decoding else torch.arange(T, device=idx.device))
        else:
            positions = cache.pos if decoding else slice(0, T)
            rope = (self.freqs_cos[positions], self.freqs_sin[positions])
        for layer, block in enumerate(self.layers.blocks):
            x = block(x, self.symbols(layer, x), rope, cache)
        if self.config.rules.final_norm:
            x = self.layers.norm(x)
        return x

    def forward(self, idx, targets=None, return_logits=True):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy against targets (ignore_index -1).

        return_logits=False (training) returns (None, loss) and lets the loss skip the (B, T, V) logits."""
        x = self.hidden_states(idx)
        out = self.layers.final_out
        if targets is not None and not return_logits:  # the fused Triton loss on CUDA (kernels/cross_entropy.py)
            loss_fn = linear_cross_entropy if x.is_cuda else linear_cross_entropy_eager
            return None, loss_fn(x.flatten(0, 1), out.weight, out.bias, targets.flatten())
        logits = out(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def last_logits(self, idx, cache=None):
        """Logits (B, V) of the last position of idx (B, T): the hidden states of every position, the output layer
        on the last one only."""
        return self.layers.final_out(self.hidden_states(idx, cache)[:, -1])

    @torch.no_grad()
    def attention_maps(self, idx):
        """The attention weights of the forward pass of idx (B, T), in eval mode (exact math): one dict per block,
            self_attention        (B, sa, T, T) causal probabilities of the self-attention heads, or None (sa = 0)
            relational_attention  (B, ra, T, T) selection probabilities alpha of the relational heads, or None
            relations             relational attention: r_ij as (B, T, T, n_r); DisRCA: its relation scores rho
                                  (B, ra, T, T), unmasked; RCA and the Transformer: None
            symbol_attention      symbolic attention: the weights with which each token retrieves its symbol,
                                  (B, symbol_heads, T, n_symbols); else None"""
        blocks, was_training = self.layers.blocks, self.training
        inputs = []  # each block's input (x, symbols, rope), as the forward pass gives it
        hooks = [block.register_forward_pre_hook(lambda block, args: inputs.append(args)) for block in blocks]
        try:
            self.eval()
            self.hidden_states(idx)
            maps = []
            for layer, (block, (x, symbols, rope, *_)) in enumerate(zip(blocks, inputs, strict=True)):
                retriever = self.layers.symbol_retrievers[layer] if self.config.ra > 0 else None
                symbol_attention = retriever.weights(x) if isinstance(retriever, SymbolicAttention) else None
                maps.append(dict(block.attention_maps(x, symbols, rope), symbol_attention=symbol_attention))
            return maps
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 cuda_graph=False, compile=False):
        """Append max_new_tokens tokens to idx (B, T), each drawn by sample_next from the logits of the context
        cropped to its last block_size tokens, in eval mode. use_cache: the same logits from a KV cache
        (CachedDecoder; cuda_graph and compile speed up its one-token step on CUDA)."""
        was_training = self.training
        self.eval()
        if use_cache:
            next_logits = CachedDecoder(self, cuda_graph=cuda_graph, compile=compile)
        else:
            next_logits = lambda context: self.last_logits(context[:, -self.config.max_seq_len:])  # noqa: E731
        for _ in range(max_new_tokens):
            idx_next = sample_next(next_logits(idx), temperature, top_k, top_p)
            idx = torch.cat((idx, idx_next), dim=1)
        self.train(was_training)
        return idx

    def num_params(self, non_embedding=False):
        """Unique parameters (tied/shared counted once); non_embedding drops the learned positions."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_enc_type == "pos_emb":
            n -= self.layers.positional_embedder.weight.numel()
        return n

    def use_plain_attention(self, plain=True):
        """Switch every relational module to its plain, materialised formulation (or back to the fast path)."""
        for module in self.modules():
            if isinstance(module, RelationalHeads):
                module.plain = plain
        return self

    def flops_per_token(self, seq_len=None):
        """Forward + backward FLOPs per token at sequence length T (default the block size):
        3 x (2 x every multiply-add of the forward pass), counting attention over all T keys
        (the nanoGPT/PaLM convention: 6N + 12 L H h T for a Transformer). Each module counts its own."""
        T = seq_len or self.config.max_seq_len
        forward = T * 2 * self.config.d_model * self.config.vocab_size  # output layer
        for block in self.layers.blocks:
            forward += block.forward_flops(T) + self.retriever_flops(T)
        return 3 * forward // T

    def retriever_flops(self, T):
        """Forward FLOPs of one layer's symbol retrieval for T tokens."""
        return 0

    def estimate_mfu(self, tokens_per_second, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved FLOP/s over the device's peak."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops


def peak_flops(device):
    """(dense bf16 peak FLOP/s of one device or None, a line saying so) for the MFU estimate."""
    if device.type != "cuda":
        return None, f"MFU: n/a on {device.type} (no peak FLOP/s known)"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops, f"MFU: relative to {flops / 1e12:.0f} TFLOP/s per GPU (dense bf16 peak of the {name})"
    return None, f"MFU: n/a (no peak FLOP/s known for {name})"


class TransformerLM(LanguageModel):
    """Transformer baseline (ra = 0): sa self-attention heads per block."""

    def make_block(self, config):
        return Block(config, "self_attn", Attention(config, config.sa, bias=config.attn_out_bias,
                                                         n_kv_heads=config.n_kv_heads_sa))


class DualAttnTransformerLM(LanguageModel):
    """Dual Attention Transformer: sa self-attention + ra relational heads per block, with symbols
    s = retriever(x) computed from each layer's input x by one retriever shared by all layers."""

    def make_retriever(self, config):
        return SYMBOL_RETRIEVERS[config.symbol_type](config)

    def make_block(self, config):
        return Block(config, "dual_attn", DualAttention(config))

    def symbols(self, layer, x):
        return self.layers.symbol_retrievers[layer](x)

    def retriever_flops(self, T):
        return self.layers.symbol_retrievers[0].forward_flops(T)


MODEL_KINDS = {"TransformerLM": TransformerLM, "DualAttnTransformerLM": DualAttnTransformerLM}


# -----------------------------------------------------------------------------
# generation

def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """Next tokens (B, 1) from last-position logits (B, V): the argmax for temperature 0; otherwise a draw (`draw`)
    from softmax(logits / temperature), restricted to the top_k most likely tokens, then to the nucleus: the most likely
    tokens whose probabilities, summed in decreasing order, first reach top_p (at least one token)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked before each
        ranked = ranked.masked_fill(above >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ranked)
    return draw(logits.softmax(dim=-1))


def draw(probs):
    """One token per row of probs (B, V), by the inverse of the cumulative distribution: the first token whose
    cumulative probability exceeds u ~ U[0, 1) times the total (one random number per row, where
    torch.multinomial draws V; zero-probability tokens are never drawn)."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.size(0), 1, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.size(-1) - 1)


class CachedDecoder:
    """Next-token logits for a growing batch of sequences (called with idx (B, T), then (B, T + 1), ...), equal to
    model.last_logits(idx[:, -block_size:]) but computing each position once (KVCache):

    - the first call prefills the cache with the context (at most its last block_size tokens);
    - each later call runs only the new token, at its position, against the cache;
    - once the sequence is longer than the block, the cropped context loses its first token at every step: every
      position moves (RoPE or learned positions), sees another context and retrieves other symbols, so nothing
      cached stays valid, and each step prefills the cache again from the window (the cost of the uncached step).

    cuda_graph (CUDA): capture the one-token step once as a CUDA graph and replay it (kernel launches dominate at
    small batch); compile: torch.compile the step (static shapes, so it compiles once)."""

    def __init__(self, model, cuda_graph=False, compile=False):
        self.model = model
        self.cache = None
        self.length = 0  # positions in the cache
        self.step = torch.compile(model.last_logits, fullgraph=True, dynamic=False) if compile else model.last_logits
        self.cuda_graph = cuda_graph
        self.graph = self.graph_token = self.graph_logits = None

    def __call__(self, idx):
        block_size = self.model.config.max_seq_len
        if self.cache is None:
            self.cache = KVCache(block_size, idx.device)
        if self.length == 0 or idx.size(1) != self.length + 1 or idx.size(1) > block_size:
            window = idx[:, -block_size:]
            self.cache.decoding = False
            logits = self.model.last_logits(window, self.cache)
            self.cache.decoding, self.length = True, window.size(1)
            return logits
        self.cache.pos.fill_(self.length)
        self.length += 1
        token = idx[:, -1:].contiguous()  # (B, 1), strides (1, 1) at every step
        if not self.cuda_graph:
            return self.step(token, self.cache)
        if self.graph is None:
            self.capture(token)
        self.graph_token.copy_(token)
        self.graph.replay()
        return self.graph_logits

    def capture(self, token):
        """Record the one-token step as a CUDA graph, after warm-up runs on a side stream (they write the same
        slot with the same values as the first replay). The caller's autocast is kept, without its cache of cast
        weights, so that the graph owns the casts it replays."""
        def autocast():
            return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)

        self.graph_token = token.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast():
            for _ in range(3):
                self.step(self.graph_token, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), autocast():
            self.graph_logits = self.step(self.graph_token, self.cache)


def build_model(config):
    """The model a config describes: TransformerLM (ra = 0) or DualAttnTransformerLM, in training mode."""
    return MODEL_KINDS[config.kind](config)
