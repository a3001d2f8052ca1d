"""
The plain, obviously-correct formulation of the relational heads: every quantity of the formulas is
materialised (attention matrices, the B.T.T.n_r relation tensor, the B.T.T.n.h projected relations, the
T.T.d gathered relative symbols), exactly as the reference computes them. It is the oracle for the fast
paths in attention.py (tests) and the "plain" side of bench.py. Dropout is not modelled: compare in eval
mode or with dropout 0.

`use_plain_attention()` swaps these in for the fast forwards of attention.py's classes.
"""

import contextlib

import torch

from attention import (DisentangledRelationalCrossAttention, RelationalAttention, RelationalCrossAttention,
                       apply_rope, merge_heads, split_heads)


def causal_probs(q, k, scale):
    """softmax over j <= i of q_i . k_j * scale: (B, n, T, T)."""
    T = q.size(-2)
    scores = torch.einsum("bnid,bnjd->bnij", q, k) * scale
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def symbol_values(module, symbols, T):
    """Per-pair symbol values sv[b?, i, j, n, h]: (B, 1, T, n, h) broadcast over receivers i, or the
    gathered relative symbols W_v E[clip(j - i, -M, M) + M] as a (T, T, n, h) tensor."""
    n = module.n_heads
    if module.max_rel_pos is None:
        return module.wv(symbols).unflatten(-1, (n, -1)).unsqueeze(1)  # (B, 1, T, n, h)
    M = module.max_rel_pos
    i = torch.arange(T, device=symbols.device).unsqueeze(1)
    j = torch.arange(T, device=symbols.device).unsqueeze(0)
    gathered = symbols[(j - i).clamp(-M, M) + M]  # (T, T, d)
    return module.wv(gathered).unflatten(-1, (n, -1))  # (T, T, n, h)


def refuse_cache(cache):
    if cache is not None:
        raise NotImplementedError("the plain formulation has no generation cache")


def attend_pairs(weights, sv):
    """sum_j w[b, n, i, j] sv[(b,) i, j, n, h] -> (B, n, T, h)."""
    if sv.dim() == 5:
        return torch.einsum("bnij,bxjnh->bnih", weights, sv)
    return torch.einsum("bnij,ijnh->bnih", weights, sv)


def plain_relational_attention(module, x, symbols, rope=None, cache=None):
    """a_i^g = sum_j alpha^g_ij (sv^g_j + W_r[g] r_ij), r_ij[l] = <x_i Wq_l, x_j Wk_l> / sqrt(d_r)."""
    refuse_cache(cache)
    B, T, _ = x.shape
    n, n_r = module.n_heads, module.n_relations
    q = apply_rope(split_heads(module.wq_attn(x), n), rope)
    k = apply_rope(split_heads(module.wk_attn(x), n), rope)
    alpha = causal_probs(q, k, module.head_dim ** -0.5)
    q_rel = module.wq_rel(x).unflatten(-1, (n_r, -1))  # (B, T, n_r, d_r)
    k_rel = module.wk_rel(x).unflatten(-1, (n_r, -1))
    relations = torch.einsum("bild,bjld->bijl", q_rel, k_rel) * module.rel_dim ** -0.5  # (B, T, T, n_r)
    projected = torch.einsum("bijl,nhl->bijnh", relations, module.wr)  # (B, T, T, n, h)
    out = attend_pairs(alpha, symbol_values(module, symbols, T)) + torch.einsum("bnij,bijnh->bnih", alpha, projected)
    return module.wo(merge_heads(out))


def plain_relational_cross_attention(module, x, symbols, rope=None, cache=None):
    """a_i^g = sum_j softmax_j(q_i . k_j / sqrt(h)) sv^g_j."""
    refuse_cache(cache)
    n = module.n_heads
    q = apply_rope(split_heads(module.wq(x), n), rope)
    k = apply_rope(split_heads(module.wk(x), n), rope)
    alpha = causal_probs(q, k, module.head_dim ** -0.5)
    return module.wo(merge_heads(attend_pairs(alpha, symbol_values(module, symbols, x.size(1)))))


def plain_disentangled_rca(module, x, symbols, rope=None, cache=None):
    """a_i^g = sum_j alpha^g_ij rho^g_ij sv^g_j, rho^g_ij = q^rel_i . k^rel_j / sqrt(h) (unmasked)."""
    refuse_cache(cache)
    n, scale = module.n_heads, module.head_dim ** -0.5
    q = apply_rope(split_heads(module.wq_attn(x), n), rope)
    k = apply_rope(split_heads(module.wk_attn(x), n), rope)
    alpha = causal_probs(q, k, scale)
    rho = torch.einsum("bnid,bnjd->bnij", split_heads(module.wq_rel(x), n), split_heads(module.wk_rel(x), n)) * scale
    return module.wo(merge_heads(attend_pairs(alpha * rho, symbol_values(module, symbols, x.size(1)))))


PLAIN_FORWARDS = {
    RelationalAttention: plain_relational_attention,
    RelationalCrossAttention: plain_relational_cross_attention,
    DisentangledRelationalCrossAttention: plain_disentangled_rca,
}


@contextlib.contextmanager
def use_plain_attention():
    """Within the block, every relational module computes with its plain formulation."""
    saved = {cls: cls.forward for cls in PLAIN_FORWARDS}
    try:
        for cls, plain in PLAIN_FORWARDS.items():
            cls.forward = plain
        yield
    finally:
        for cls, forward in saved.items():
            cls.forward = forward
