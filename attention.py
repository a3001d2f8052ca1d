"""
Attention for the Dual Attention Transformer: causal self-attention, relational attention (RA),
relational cross-attention (RCA), disentangled RCA (DisRCA), and dual attention (their concatenation).

Shapes: B batch, T length, d model width, H heads of width h, n_r relations of width d_r.
Symbols reach the relational modules in one of two forms:
  - per position, (B, T, d): from symbolic attention; the value of sender j is sv_j = W_v s_j;
  - position-relative, a table E of shape (2M+1, d): the value sender j gives receiver i is
    sv_ij = W_v E[clip(j - i, -M, M) + M]. W_v is applied to the table (never to a T x T x d tensor)
    and the attention weights are re-indexed by offset ("skewed") before one matmul with it; on CUDA,
    RA and RCA run a fused Triton kernel instead (kernels.relative_position_attention: no T x T weights).

Each relational module also has its plain formulation (`plain_forward`), every quantity of the formulas
materialised as the authors' code computes them; `module.plain = True` switches forward to it (the oracle of
the fast paths, and the "plain" side of `python -m bench.train`). Every module counts its own FLOPs (`forward_flops`).
"""

import torch
import torch.nn.functional as F
from torch import nn

import kernels


# -----------------------------------------------------------------------------
# rotary position embeddings (llama convention: consecutive pairs are rotated)

def rope_tables(head_dim, max_len, theta=10000.0):
    """cos and sin of the angles p * theta^(-2i/h), each (max_len, head_dim // 2), float32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, rope):
    """Rotate the pairs (x[2i], x[2i+1]) of x (B, H, T, h) by the angles of rope = (cos, sin), each (T, h/2).

    out[2i] = x[2i] cos - x[2i+1] sin;  out[2i+1] = x[2i] sin + x[2i+1] cos  (in float32, cast back)."""
    if rope is None:
        return x
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# -----------------------------------------------------------------------------
# shared pieces

def split_heads(x, n_heads):
    """(B, T, n*h) -> (B, n, T, h)"""
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def merge_heads(x):
    """(B, n, T, h) -> (B, T, n*h)"""
    return x.transpose(1, 2).flatten(2)


def table_heads(table, n_heads):
    """A projected relative table per head: (2M+1, n*h) -> (n, 2M+1, h)"""
    return table.unflatten(-1, (n_heads, -1)).transpose(0, 1)


def relative_kernel_applies(x):
    """Position-relative heads run the fused Triton kernel of kernels/relational.py (no T x T tensor) on CUDA tensors;
    elsewhere the skew below."""
    return x.is_cuda and kernels.HAS_TRITON


def repeat_kv(x, n_kv_heads, n_heads):
    """Grouped-query attention: features of n_kv key/value heads (..., n_kv*h) -> (..., n*h), key/value head
    g // (n / n_kv) serving query head g."""
    if n_kv_heads == n_heads:
        return x
    return x.unflatten(-1, (n_kv_heads, -1)).repeat_interleave(n_heads // n_kv_heads, dim=-2).flatten(-2)


def causal_softmax(q, k, scale):
    """Causal attention probabilities softmax(q k^T * scale) over j <= i: (B, H, T, T)."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def relative_offset_table(table, T, max_rel_pos):
    """Rows of a projected relative table (2M+1, C) for the offsets j - i = -(T-1) .. 0: (T, C).

    Row k holds offset k - (T-1), clipped to [-M, M]."""
    offsets = torch.arange(-(T - 1), 1, device=table.device).clamp(-max_rel_pos, max_rel_pos)
    return table[offsets + max_rel_pos]


def skew_causal(w):
    """Re-index causal weights by offset: out[..., i, k] = w[..., i, i + k - (T-1)] (0 where that j < 0).

    For causal w (zero above the diagonal) this is lossless, and
    sum_j w_ij E[j-i] = sum_k out_ik E[k-(T-1)], one matmul with the offset table."""
    T = w.size(-1)
    i = torch.arange(T, device=w.device).unsqueeze(1)
    k = torch.arange(T, device=w.device).unsqueeze(0)
    j = i + k - (T - 1)  # (T, T)
    gathered = torch.gather(w, -1, j.clamp(min=0).expand(w.shape))
    return gathered.masked_fill(j < 0, 0.0)


def attend_symbols(w, sv, n_heads, max_rel_pos, pos=None):
    """sum_j w_ij sv_j (per-position symbols) or sum_j w_ij sv_ij (relative symbols): (B, n, T, h).

    w: causal weights (B, n, T, T); sv: projected symbols (B, T, n*h), or the projected relative
    table (2M+1, n*h) when max_rel_pos is given. Decoding (pos, a (1,) tensor): w (B, n, 1, S) holds one
    receiver at position pos over the S cache slots (zero after pos), whose relative rows are E[clip(j - pos)]."""
    if max_rel_pos is None:
        return w @ split_heads(sv, n_heads)
    if pos is None:
        rows = relative_offset_table(sv, w.size(-1), max_rel_pos)  # (T, n*h)
        w = skew_causal(w)
    else:
        offsets = torch.arange(w.size(-1), device=w.device) - pos
        rows = sv[offsets.clamp(-max_rel_pos, max_rel_pos) + max_rel_pos]  # (S, n*h)
    return w @ rows.unflatten(-1, (n_heads, -1)).transpose(0, 1)  # rows (n, T or S, h)


def causal_attention(q, k, v, dropout_p):
    """Causal softmax(q k^T / sqrt(h)) v, with h the query/key width and values of any width.

    SDPA serves values wider than the keys (its memory-efficient kernel on CUDA) up to SDPA_MAX_VALUE_WIDTH;
    beyond that the probabilities are materialised, which measured 4x faster on an H200 at width 448."""
    if v.size(-1) <= SDPA_MAX_VALUE_WIDTH:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=q.size(-1) ** -0.5)
    probs = F.dropout(causal_softmax(q, k, q.size(-1) ** -0.5), dropout_p, dropout_p > 0)
    return probs.to(v.dtype) @ v


SDPA_MAX_VALUE_WIDTH = 192


def symbol_values(module, symbols, cache=None):
    """sv = W_v(symbols): per position (B, T, n*h), which a decoding cache extends to all its slots (B, S, n*h);
    or the projected relative table (2M+1, n*h), which a cache computes once."""
    if module.max_rel_pos is None:
        sv = repeat_kv(module.wv(symbols), module.n_kv_heads, module.n_heads)
        return sv if cache is None else cache.update(module, "sv", sv)
    if cache is None:
        return repeat_kv(module.wv(symbols), module.n_kv_heads, module.n_heads)
    return cache.constant(module, "sv", lambda: repeat_kv(module.wv(symbols), module.n_kv_heads, module.n_heads))


def setup_heads(module, config, n_heads, n_kv_heads=None):
    """The head counts (query heads, and key/value heads: n_kv_heads None means as many) and width, dropout rate
    and symbol form (max_rel_pos None: per-position symbols) every attention module keeps; returns the width of
    its heads together, n_heads * h."""
    module.n_heads, module.head_dim = n_heads, config.head_dim
    module.n_kv_heads = n_kv_heads or n_heads
    module.dropout = config.dropout_rate
    module.max_rel_pos = config.max_rel_pos
    return n_heads * config.head_dim


def linear_flops(module):
    """Forward FLOPs per token of the nn.Linear maps inside module (2 per weight; a shared map counted once)."""
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


# -----------------------------------------------------------------------------
# the generation cache

class KVCache:
    """What generation keeps of the positions it has seen (a batch of sequences, block_size slots): per attention
    module, its keys, relation keys and per-position symbol values, each a tensor with the time on dim -2 held in a
    buffer of block_size slots; and what is computed once (the projected relative-symbol table).

    Prefill (decoding False): the T prompt tokens at positions 0..T-1 fill slots 0..T-1 and the modules run their
    ordinary causal path. Decoding: one token at position `pos` fills slot pos, and its query attends over all
    block_size slots with those after pos masked out (`valid`). Shapes do not change from token to token and `pos`
    is a (1,) tensor changed in place, so a decoding step can be captured as a CUDA graph and replayed."""

    def __init__(self, block_size, device):
        self.block_size = block_size
        self.slots = torch.arange(block_size, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.decoding = False
        self.valid = None  # (1, S) bool: slots <= pos, set by the model at each decoding step
        self.buffers, self.constants = {}, {}

    def update(self, module, name, new):
        """Store `new` (..., T, C) of the new positions; return it (prefill) or the whole buffer (..., S, C)."""
        key = (module, name)
        if self.decoding:
            buffer = self.buffers[key]
            return buffer.index_copy_(buffer.dim() - 2, self.pos, new)
        shape = (*new.shape[:-2], self.block_size, new.size(-1))
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != new.dtype:
            buffer = self.buffers[key] = new.new_zeros(shape)
        buffer.narrow(-2, 0, new.size(-2)).copy_(new)  # in place: a captured graph keeps reading this buffer
        return new

    def constant(self, module, name, compute):
        key = (module, name)
        if key not in self.constants:
            self.constants[key] = compute()
        return self.constants[key]

    def probs(self, q, k, scale):
        """Decoding: softmax(q k^T * scale) of the one query (B, n, 1, h) over the valid slots: (B, n, 1, S)."""
        scores = (q @ k.transpose(-2, -1)) * scale
        return scores.masked_fill(~self.valid, float("-inf")).softmax(dim=-1)


# -----------------------------------------------------------------------------
# self-attention (sensory heads)

class Attention(nn.Module):
    """Causal multi-head self-attention: softmax(q k^T / sqrt(h)) v, heads concatenated, then W_o.

    Heads have the width h = d / (sa + ra) of the config (in dual attention, n_heads = sa < sa + ra); with
    n_kv_heads < n_heads, groups of query heads share key/value heads (grouped-query attention)."""

    def __init__(self, config, n_heads, bias=False, n_kv_heads=None):
        super().__init__()
        width = setup_heads(self, config, n_heads, n_kv_heads)
        self.wq = nn.Linear(config.d_model, width, bias=False)
        self.wk = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(width, width, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, rope=None, cache=None):
        q = apply_rope(split_heads(self.wq(x), self.n_heads), rope)  # (B, n, T, h)
        k = apply_rope(split_heads(repeat_kv(self.wk(x), self.n_kv_heads, self.n_heads), self.n_heads), rope)
        v = split_heads(repeat_kv(self.wv(x), self.n_kv_heads, self.n_heads), self.n_heads)
        if cache is not None:
            k, v = cache.update(self, "k", k), cache.update(self, "v", v)  # decoding: (B, n, S, h)
        if cache is not None and cache.decoding:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.valid)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.wo(merge_heads(out)))

    def forward_flops(self, T):
        """Forward FLOPs of one sequence of T tokens: the linear maps, then q k^T and probs @ v over all T keys."""
        return T * linear_flops(self) + 4 * T * T * self.n_heads * self.head_dim

    def weights(self, x, rope=None):
        """{'alpha': the causal attention probabilities (B, n, T, T)}."""
        q = apply_rope(split_heads(self.wq(x), self.n_heads), rope)
        k = apply_rope(split_heads(repeat_kv(self.wk(x), self.n_kv_heads, self.n_heads), self.n_heads), rope)
        return {"alpha": causal_softmax(q, k, self.head_dim ** -0.5)}


# -----------------------------------------------------------------------------
# relational heads

class RelationalHeads(nn.Module):
    """What the relational modules share: forward runs the fast path (`fast_forward`), or with `plain = True`
    the plain formulation (`plain_forward`, which also returns the materialised weights: 'alpha' (B, n, T, T),
    and 'relations' (B, T, T, n_r) for RA, 'rho' (B, n, T, T) for DisRCA, all before dropout)."""

    plain = False

    def forward(self, x, symbols, rope=None, cache=None):
        if self.plain:
            if cache is not None:
                raise ValueError("the plain formulation has no KV cache: generate with use_cache=False")
            return self.plain_forward(x, symbols, rope)[0]
        return self.fast_forward(x, symbols, rope, cache)

    def drop_weights(self, w):
        return F.dropout(w, self.dropout, self.training)

    def symbol_flops(self, T):
        """W_v on the symbols of T tokens, or once on the (2M+1)-row table of position-relative symbols."""
        if self.max_rel_pos is None:
            return T * linear_flops(self.wv)
        return linear_flops(self.wv) * (2 * self.max_rel_pos + 1)

    def token_flops(self, T):
        """The linear maps of the tokens (all but W_v) and of the symbols."""
        return T * (linear_flops(self) - linear_flops(self.wv)) + self.symbol_flops(T)


def pair_symbol_values(module, symbols, T):
    """Plain symbol values per (receiver, sender) pair: W_v s_j as (B, 1, T, n, h), broadcast over receivers i,
    or the gathered relative symbols W_v E[clip(j - i, -M, M) + M] as a (T, T, n, h) tensor."""
    n = module.n_heads
    if module.max_rel_pos is None:
        sv = repeat_kv(module.wv(symbols), module.n_kv_heads, n)
        return sv.unflatten(-1, (n, -1)).unsqueeze(1)  # (B, 1, T, n, h)
    M = module.max_rel_pos
    i = torch.arange(T, device=symbols.device).unsqueeze(1)
    j = torch.arange(T, device=symbols.device).unsqueeze(0)
    gathered = symbols[(j - i).clamp(-M, M) + M]  # (T, T, d)
    return repeat_kv(module.wv(gathered), module.n_kv_heads, n).unflatten(-1, (n, -1))  # (T, T, n, h)


def attend_pairs(w, sv):
    """sum_j w[b, n, i, j] sv[(b,) i, j, n, h] -> (B, n, T, h)."""
    if sv.dim() == 5:
        return torch.einsum("bnij,bxjnh->bnih", w, sv)
    return torch.einsum("bnij,ijnh->bnih", w, sv)


class RelationalAttention(RelationalHeads):
    """Relational attention (RA). For head g and receiver i:

        alpha^g = causal softmax(q^g_i . k^g_j / sqrt(h))                 (selection, RoPE on q, k)
        r_ij[l] = <x_i W^rel_{q,l}, x_j W^rel_{k,l}> / sqrt(d_r)           (n_r relations, no RoPE)
        a^g_i   = sum_j alpha^g_ij (sv^g_j + W_r[g] r_ij)                  (W_r[g]: h x n_r)

    Computed without a B.T.T.n.h tensor: since relations are bilinear,
        sum_j alpha_ij r_ij[l] = <q^rel_{i,l}, sum_j alpha_ij k^rel_{j,l}> / sqrt(d_r),
    so the relation keys are attended like extra value columns, then W_r maps the n_r-vector.
    `symmetric_rels` ties W^rel_k to W^rel_q. n_r and d_r come from the config (by default n_r = ra and d_r = h;
    d // ra for the paper arch). With grouped-query attention, k and W_v have n_kv_heads heads (the relations
    do not)."""

    def __init__(self, config):
        super().__init__()
        d, width = config.d_model, setup_heads(self, config, config.ra, config.n_kv_heads_ra)
        kv_width = self.n_kv_heads * self.head_dim
        self.n_relations, self.rel_dim = config.n_relations, config.rel_dim
        self.symmetric_rels = config.symmetric_rels
        self.wr = nn.Parameter(torch.empty(self.n_heads, self.head_dim, self.n_relations))
        bound = self.n_relations ** -0.5  # the default init of the paper era's nn.Linear(n_r, n*h)
        nn.init.uniform_(self.wr, -bound, bound)
        self.wq_attn = nn.Linear(d, width, bias=False)
        self.wk_attn = nn.Linear(d, kv_width, bias=False)
        self.wq_rel = nn.Linear(d, self.n_relations * self.rel_dim, bias=False)
        self.wk_rel = self.wq_rel if self.symmetric_rels else nn.Linear(d, self.n_relations * self.rel_dim, bias=False)
        self.wv = nn.Linear(d, kv_width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout_rate)

    def fast_forward(self, x, symbols, rope=None, cache=None):
        B, T, _ = x.shape
        n, n_r, d_r = self.n_heads, self.n_relations, self.rel_dim
        q = apply_rope(split_heads(self.wq_attn(x), n), rope)  # (B, n, T, h)
        k = apply_rope(split_heads(repeat_kv(self.wk_attn(x), self.n_kv_heads, n), n), rope)
        q_rel = self.wq_rel(x)  # (B, T, n_r*d_r)
        k_rel = q_rel if self.symmetric_rels else self.wk_rel(x)
        sv = symbol_values(self, symbols, cache)  # (B, T, n*h) or relative table (2M+1, n*h)
        if cache is not None:
            k, k_rel = cache.update(self, "k", k), cache.update(self, "k_rel", k_rel)  # decoding: S slots
        k_rel_heads = k_rel.unsqueeze(1).expand(B, n, -1, n_r * d_r)
        p = self.dropout if self.training else 0.0
        if cache is not None and cache.decoding:
            alpha = cache.probs(q, k, self.head_dim ** -0.5)  # (B, n, 1, S)
            attended_symbols = attend_symbols(alpha, sv, n, self.max_rel_pos, cache.pos)
            attended_keys = (alpha.squeeze(2) @ k_rel).unsqueeze(2)  # (B, n, S) @ (B, S, n_r*d_r): (B, n, 1, n_r*d_r)
        elif self.max_rel_pos is None:
            values = torch.cat((split_heads(sv, n), k_rel_heads), dim=-1)  # (B, n, T, h + n_r*d_r)
            out = causal_attention(q, k, values, p)
            attended_symbols, attended_keys = out.split((self.head_dim, n_r * d_r), dim=-1)
        elif relative_kernel_applies(x):
            attended_keys, attended_symbols = kernels.relative_position_attention(
                q, k, k_rel.unsqueeze(1), table_heads(sv, n), self.max_rel_pos, p)
        else:
            alpha = F.dropout(causal_softmax(q, k, self.head_dim ** -0.5), p, self.training)  # (B, n, T, T)
            attended_symbols = attend_symbols(alpha, sv, n, self.max_rel_pos)
            attended_keys = alpha @ k_rel_heads  # (B, n, T, n_r*d_r)
        # sum_j alpha_ij r_ij[l] = <q_rel_i,l , (sum_j alpha_ij k_rel_j),l> / sqrt(d_r): (B, n, T, n_r)
        q_rel = q_rel.view(B, 1, T, n_r, d_r)
        attended_relations = (attended_keys.view(B, n, T, n_r, d_r) * q_rel).sum(-1) * d_r ** -0.5
        out = attended_symbols + torch.einsum("bgtl,gdl->bgtd", attended_relations, self.wr)  # (B, n, T, h)
        return self.resid_dropout(self.wo(merge_heads(out)))

    def plain_forward(self, x, symbols, rope=None):
        """a_i^g = sum_j alpha^g_ij (sv^g_j + W_r[g] r_ij), with the (B, T, T, n_r) relations and the
        (B, T, T, n, h) projected relations materialised."""
        n, n_r, T = self.n_heads, self.n_relations, x.size(1)
        q = apply_rope(split_heads(self.wq_attn(x), n), rope)
        k = apply_rope(split_heads(repeat_kv(self.wk_attn(x), self.n_kv_heads, n), n), rope)
        alpha = causal_softmax(q, k, self.head_dim ** -0.5)  # (B, n, T, T)
        q_rel = self.wq_rel(x).unflatten(-1, (n_r, -1))  # (B, T, n_r, d_r)
        k_rel = self.wk_rel(x).unflatten(-1, (n_r, -1))
        relations = torch.einsum("bild,bjld->bijl", q_rel, k_rel) * self.rel_dim ** -0.5  # (B, T, T, n_r)
        projected = torch.einsum("bijl,nhl->bijnh", relations, self.wr)  # (B, T, T, n, h)
        w = self.drop_weights(alpha)
        out = attend_pairs(w, pair_symbol_values(self, symbols, T)) + torch.einsum("bnij,bijnh->bnih", w, projected)
        return self.resid_dropout(self.wo(merge_heads(out))), {"alpha": alpha, "relations": relations}

    def forward_flops(self, T):
        """Forward FLOPs of one sequence of T tokens: the linear maps, selection scores and symbol aggregation
        (4 T h per head and token), the n_r relations with every key (2 T n_r d_r), their aggregation
        (2 T n_r per head) and W_r (2 h n_r per head)."""
        n, n_r = self.n_heads, self.n_relations
        per_token = 4 * T * n * self.head_dim + 2 * T * n_r * self.rel_dim + 2 * T * n * n_r + 2 * self.wr.numel()
        return self.token_flops(T) + T * per_token


class RelationalCrossAttention(RelationalHeads):
    """Relational cross-attention (RCA): a^g_i = sum_j softmax_j(q^g_i . k^g_j / sqrt(h)) sv^g_j (causal, RoPE).
    With grouped-query attention, k and W_v have n_kv_heads heads."""

    def __init__(self, config):
        super().__init__()
        d, width = config.d_model, setup_heads(self, config, config.ra, config.n_kv_heads_ra)
        self.wq = nn.Linear(d, width, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(width, width, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout_rate)

    def fast_forward(self, x, symbols, rope=None, cache=None):
        n = self.n_heads
        q = apply_rope(split_heads(self.wq(x), n), rope)  # (B, n, T, h)
        k = apply_rope(split_heads(repeat_kv(self.wk(x), self.n_kv_heads, n), n), rope)
        sv = symbol_values(self, symbols, cache)
        if cache is not None:
            k = cache.update(self, "k", k)
        p = self.dropout if self.training else 0.0
        if cache is not None and cache.decoding:
            out = attend_symbols(cache.probs(q, k, self.head_dim ** -0.5), sv, n, self.max_rel_pos, cache.pos)
        elif self.max_rel_pos is None:
            out = causal_attention(q, k, split_heads(sv, n), p)
        elif relative_kernel_applies(x):
            _, out = kernels.relative_position_attention(q, k, None, table_heads(sv, n), self.max_rel_pos, p)
        else:
            alpha = F.dropout(causal_softmax(q, k, self.head_dim ** -0.5), p, self.training)
            out = attend_symbols(alpha, sv, n, self.max_rel_pos)
        return self.resid_dropout(self.wo(merge_heads(out)))

    def plain_forward(self, x, symbols, rope=None):
        """a_i^g = sum_j alpha^g_ij sv^g_j with alpha (and relative symbols per pair) materialised."""
        n = self.n_heads
        q = apply_rope(split_heads(self.wq(x), n), rope)
        k = apply_rope(split_heads(repeat_kv(self.wk(x), self.n_kv_heads, n), n), rope)
        alpha = causal_softmax(q, k, self.head_dim ** -0.5)  # (B, n, T, T)
        out = attend_pairs(self.drop_weights(alpha), pair_symbol_values(self, symbols, x.size(1)))
        return self.resid_dropout(self.wo(merge_heads(out))), {"alpha": alpha}

    def forward_flops(self, T):
        """Forward FLOPs of one sequence of T tokens: the linear maps, selection scores and symbol aggregation."""
        return self.token_flops(T) + 4 * T * T * self.n_heads * self.head_dim


class DisentangledRelationalCrossAttention(RelationalHeads):
    """Disentangled RCA (DisRCA): per head g,

        alpha^g = causal softmax(q^g_i . k^g_j / sqrt(h))     (RoPE on q, k)
        rho^g   = q^rel,g_i . k^rel,g_j / sqrt(h)              (no mask, no RoPE)
        a^g_i   = sum_j drop(alpha^g * rho^g)_ij sv^g_j.

    With per-position symbols and small heads (h*h <= OUTER_MAX) rho is never built: since rho is bilinear,
        a_i = sum_c q^rel_i[c] (sum_j alpha_ij k^rel_j[c] sv_j) / sqrt(h),
    ordinary attention over the h*h-wide values k^rel_j (outer) sv_j. Dropout on alpha equals dropout on
    alpha * rho (one elementwise mask). With grouped-query attention, k, k^rel and W_v have n_kv_heads heads."""

    OUTER_MAX = 256

    def __init__(self, config):
        super().__init__()
        d, width = config.d_model, setup_heads(self, config, config.ra, config.n_kv_heads_ra)
        kv_width = self.n_kv_heads * self.head_dim
        self.wq_attn = nn.Linear(d, width, bias=False)
        self.wk_attn = nn.Linear(d, kv_width, bias=False)
        self.wq_rel = nn.Linear(d, width, bias=False)
        self.wk_rel = nn.Linear(d, kv_width, bias=False)
        self.wv = nn.Linear(d, kv_width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout_rate)

    def fast_forward(self, x, symbols, rope=None, cache=None):
        n, h = self.n_heads, self.head_dim
        q = apply_rope(split_heads(self.wq_attn(x), n), rope)  # (B, n, T, h)
        k = apply_rope(split_heads(repeat_kv(self.wk_attn(x), self.n_kv_heads, n), n), rope)
        q_rel = split_heads(self.wq_rel(x), n)
        k_rel = split_heads(repeat_kv(self.wk_rel(x), self.n_kv_heads, n), n)
        sv = symbol_values(self, symbols, cache)
        if cache is not None:
            k, k_rel = cache.update(self, "k", k), cache.update(self, "k_rel", k_rel)  # decoding: (B, n, S, h)
        p = self.dropout if self.training else 0.0
        if cache is not None and cache.decoding:
            w = cache.probs(q, k, h ** -0.5) * (q_rel @ k_rel.transpose(-2, -1)) * h ** -0.5  # (B, n, 1, S)
            out = attend_symbols(w, sv, n, self.max_rel_pos, cache.pos)
        elif self.max_rel_pos is None and h * h <= self.OUTER_MAX:
            outer = (k_rel.unsqueeze(-1) * split_heads(sv, n).unsqueeze(-2)).flatten(-2)  # (B, n, T, h*h)
            attended = causal_attention(q, k, outer, p).unflatten(-1, (h, h))  # (B, n, T, h, h)
            out = (q_rel.unsqueeze(-1) * attended).sum(-2) * h ** -0.5
        else:
            w = causal_softmax(q, k, h ** -0.5) * (q_rel @ k_rel.transpose(-2, -1)) * h ** -0.5  # (B, n, T, T)
            out = attend_symbols(F.dropout(w, p, self.training), sv, n, self.max_rel_pos)
        return self.resid_dropout(self.wo(merge_heads(out)))

    def plain_forward(self, x, symbols, rope=None):
        """a_i^g = sum_j alpha^g_ij rho^g_ij sv^g_j with alpha and rho (B, n, T, T) materialised."""
        n, scale = self.n_heads, self.head_dim ** -0.5
        q = apply_rope(split_heads(self.wq_attn(x), n), rope)
        k = apply_rope(split_heads(repeat_kv(self.wk_attn(x), self.n_kv_heads, n), n), rope)
        alpha = causal_softmax(q, k, scale)
        k_rel = split_heads(repeat_kv(self.wk_rel(x), self.n_kv_heads, n), n)
        rho = split_heads(self.wq_rel(x), n) @ k_rel.transpose(-2, -1) * scale
        out = attend_pairs(self.drop_weights(alpha * rho), pair_symbol_values(self, symbols, x.size(1)))
        return self.resid_dropout(self.wo(merge_heads(out))), {"alpha": alpha, "rho": rho}

    def forward_flops(self, T):
        """Forward FLOPs of one sequence of T tokens: the linear maps, selection scores and symbol aggregation
        (4 T h per head and token), and the second score matrix and the product (2 T h + T per head and token)."""
        n, h = self.n_heads, self.head_dim
        return self.token_flops(T) + T * (4 * T * n * h + (2 * h + 1) * T * n)


RELATIONAL_ATTENTION = {
    "relational_attention": RelationalAttention,
    "rca": RelationalCrossAttention,
    "disrca": DisentangledRelationalCrossAttention,
}


class DualAttention(nn.Module):
    """concat(self-attention over sa heads, relational attention (config.ra_type) over ra heads):
    width (sa + ra) * h = d. With config.share_attn_params, the self-attention heads select with the relational
    heads' W_q, W_k (one pair of maps, registered under both names)."""

    def __init__(self, config):
        super().__init__()
        self.self_attention = Attention(config, config.sa, n_kv_heads=config.n_kv_heads_sa) if config.sa > 0 else None
        self.relational_attention = RELATIONAL_ATTENTION[config.ra_type](config)
        if config.share_attn_params:
            self.self_attention.wq = self.relational_attention.wq_attn
            self.self_attention.wk = self.relational_attention.wk_attn

    def forward(self, x, symbols, rope=None, cache=None):
        relational = self.relational_attention(x, symbols, rope, cache)
        if self.self_attention is None:
            return relational
        return torch.cat((self.self_attention(x, rope, cache), relational), dim=-1)

    def forward_flops(self, T):
        sensory = 0 if self.self_attention is None else self.self_attention.forward_flops(T)
        return sensory + self.relational_attention.forward_flops(T)

    def attention_maps(self, x, symbols, rope=None):
        """The weights of both kinds of heads (see LanguageModel.attention_maps); the relational ones as the plain
        formulation computes them."""
        sensory = None if self.self_attention is None else self.self_attention.weights(x, rope)["alpha"]
        relational = self.relational_attention.plain_forward(x, symbols, rope)[1]
        return {"self_attention": sensory, "relational_attention": relational["alpha"],
                "relations": relational.get("relations", relational.get("rho"))}
