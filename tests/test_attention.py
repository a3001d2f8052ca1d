"""The fast relational heads of attention.py against their plain materialised formulation (`plain_forward`, the
`plain` switch), in float64: outputs and gradients to 1e-10; the materialised weights; the pieces."""

from unittest import mock

import pytest
import torch

import attention
from attention import (DisentangledRelationalCrossAttention, DualAttention, RelationalAttention,
                       RelationalCrossAttention, apply_rope, rope_tables, skew_causal)
from model import ModelConfig, build_model

RELATIONAL = [RelationalAttention, RelationalCrossAttention, DisentangledRelationalCrossAttention]
RA_TYPES = {cls: ra_type for ra_type, cls in attention.RELATIONAL_ATTENTION.items()}


def randomise(module, generator):
    """Redraw every parameter at a scale where each path moves the output."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / max(p.shape[-1], 1) ** 0.5)


def config(d, n, total, relative=False, max_rel_pos=None, ra_type="relational_attention", **fields):
    """n relational heads of a model with `total` heads (the rest self-attention), dropout 0."""
    return ModelConfig(sa=total - n, ra=n, d_model=d, n_layers=1, pos_enc_type="pos_emb", ra_type=ra_type,
                       symbol_type="position_relative" if relative else "symbolic_attention",
                       max_rel_pos=max_rel_pos if relative else None, symbol_heads=1, dropout_rate=0.0, **fields)


def build(cls, d, n, total, relative, max_rel_pos, **fields):
    module = cls(config(d, n, total, relative, max_rel_pos, RA_TYPES[cls], **fields)).double()
    randomise(module, torch.Generator().manual_seed(0))
    return module


def inputs(B, T, d, relative, max_rel_pos, generator):
    x = torch.randn(B, T, d, generator=generator, dtype=torch.float64, requires_grad=True)
    shape = (2 * max_rel_pos + 1, d) if relative else (B, T, d)
    symbols = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    return x, symbols


def plain_output(module, x, symbols, rope=None):
    return module.plain_forward(x, symbols, rope)[0]


def grads(module, x, symbols, out):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    tensors = [x, symbols, *module.parameters()]
    return torch.autograd.grad((out * weights).sum(), tensors)


CASES = [  # (d, n heads here, total heads, T, max_rel_pos, use_rope)
    (32, 2, 4, 9, 9, True),
    (24, 3, 4, 7, 16, False),  # T shorter than the table
    (30, 1, 5, 12, 4, True),   # offsets clipped to +-M, odd head counts
    (16, 4, 4, 1, 2, False),   # a single position
    (36, 1, 2, 6, 8, True),    # head width 18: DisRCA builds rho (h*h > OUTER_MAX)
]


@pytest.mark.parametrize("cls", RELATIONAL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("relative", [False, True], ids=["symbolic", "position_relative"])
@pytest.mark.parametrize("case", CASES, ids=[f"d{c[0]}_n{c[1]}of{c[2]}_T{c[3]}_M{c[4]}" for c in CASES])
def test_fast_equals_plain(cls, relative, case):
    d, n, total, T, max_rel_pos, use_rope = case
    module = build(cls, d, n, total, relative, max_rel_pos)
    x, symbols = inputs(2, T, d, relative, max_rel_pos, torch.Generator().manual_seed(2))
    rope = tuple(t[:T].double() for t in rope_tables(d // total, T)) if use_rope else None
    fast = module(x, symbols, rope)
    plain = plain_output(module, x, symbols, rope)
    assert fast.shape == (2, T, n * (d // total))
    assert torch.allclose(fast, plain, rtol=0, atol=1e-10)
    assert plain.abs().max() > 1e-3  # the comparison is not between two zeros
    for g_fast, g_plain in zip(grads(module, x, symbols, fast), grads(module, x, symbols, plain)):
        assert torch.allclose(g_fast, g_plain, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", RELATIONAL, ids=lambda c: c.__name__)
def test_wide_values_materialise_the_probabilities(cls, monkeypatch):
    """Past SDPA_MAX_VALUE_WIDTH the attention probabilities are built explicitly: same result."""
    monkeypatch.setattr(attention, "SDPA_MAX_VALUE_WIDTH", 0)
    module = build(cls, 32, 2, 4, False, 9)
    x, symbols = inputs(2, 9, 32, False, 9, torch.Generator().manual_seed(6))
    fast = module(x, symbols)
    plain = plain_output(module, x, symbols)
    assert torch.allclose(fast, plain, rtol=0, atol=1e-10)
    for g_fast, g_plain in zip(grads(module, x, symbols, fast), grads(module, x, symbols, plain)):
        assert torch.allclose(g_fast, g_plain, rtol=0, atol=1e-10)


def test_symmetric_relations_share_one_map():
    module = build(RelationalAttention, 32, 4, 4, False, 8, symmetric_rels=True)
    assert module.wk_rel is module.wq_rel
    x, symbols = inputs(2, 8, 32, False, 8, torch.Generator().manual_seed(3))
    assert torch.allclose(module(x, symbols), plain_output(module, x, symbols),
                          rtol=0, atol=1e-10)


def test_relation_width_can_differ_from_head_width():
    """The paper-era RA uses d_r = d // ra relations: 30 // 4 = 7 here, with head width 3."""
    module = build(RelationalAttention, 30, 4, 10, False, 8, arch="paper")
    assert module.wq_rel.weight.shape == (4 * 7, 30)
    x, symbols = inputs(2, 6, 30, False, 8, torch.Generator().manual_seed(4))
    assert torch.allclose(module(x, symbols), plain_output(module, x, symbols),
                          rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", RELATIONAL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("relative", [False, True], ids=["symbolic", "position_relative"])
def test_grouped_query_attention_fast_equals_plain(cls, relative):
    """4 query heads sharing 2 key/value heads (and 8 relations of width 4 for RA): outputs and gradients."""
    fields = dict(n_kv_heads_ra=2, **({"n_relations": 8} if cls is RelationalAttention else {}))
    module = build(cls, 32, 4, 4, relative, 9, **fields)
    assert module.wv.weight.shape == (16, 32)
    x, symbols = inputs(2, 9, 32, relative, 9, torch.Generator().manual_seed(7))
    fast, plain = module(x, symbols), plain_output(module, x, symbols)
    assert torch.allclose(fast, plain, rtol=0, atol=1e-10)
    for g_fast, g_plain in zip(grads(module, x, symbols, fast), grads(module, x, symbols, plain)):
        assert torch.allclose(g_fast, g_plain, rtol=0, atol=1e-10)


@pytest.mark.parametrize("ra_type", ["relational_attention", "rca", "disrca"])
def test_the_plain_switch_of_a_model(ra_type):
    """model.use_plain_attention(True) switches every relational module (and only those) to plain_forward."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(sa=2, ra=2, d_model=32, n_layers=2, pos_enc_type="RoPE", ra_type=ra_type,
                                    symbol_type="position_relative", max_seq_len=12, vocab_size=40,
                                    dropout_rate=0.0)).double().eval()
    randomise(model, torch.Generator().manual_seed(7))
    idx = torch.randint(0, 40, (2, 12))
    fast = model.hidden_states(idx)
    cls = attention.RELATIONAL_ATTENTION[ra_type]
    model.use_plain_attention(True)
    assert all(block.dual_attn.relational_attention.plain for block in model.layers.blocks)
    with mock.patch.object(cls, "plain_forward", autospec=True, side_effect=cls.plain_forward) as spy:
        plain = model.hidden_states(idx)
        assert spy.call_count == 2  # once per layer
        assert torch.allclose(fast, plain, rtol=0, atol=1e-9)
        assert torch.equal(model.use_plain_attention(False).hidden_states(idx), fast)
        assert spy.call_count == 2


@pytest.mark.parametrize("cls", RELATIONAL, ids=lambda c: c.__name__)
def test_plain_forward_returns_the_materialised_weights(cls):
    B, T, d, n = 2, 6, 24, 2
    module = build(cls, d, n, 4, False, 8)
    x, symbols = inputs(B, T, d, False, 8, torch.Generator().manual_seed(8))
    _, weights = module.plain_forward(x, symbols)
    alpha = weights["alpha"]
    assert alpha.shape == (B, n, T, T)
    assert torch.allclose(alpha.sum(-1), torch.ones(B, n, T, dtype=alpha.dtype))
    assert (alpha.triu(1) == 0).all()  # causal
    if cls is RelationalAttention:  # r_ij[l] = <x_i W^rel_q,l, x_j W^rel_k,l> / sqrt(d_r)
        assert set(weights) == {"alpha", "relations"} and weights["relations"].shape == (B, T, T, n)
        q_rel, k_rel = module.wq_rel(x[1, 4]).view(n, -1), module.wk_rel(x[1, 2]).view(n, -1)
        expected = (q_rel * k_rel).sum(-1) / module.rel_dim ** 0.5
        assert torch.allclose(weights["relations"][1, 4, 2], expected, rtol=0, atol=1e-12)
    elif cls is DisentangledRelationalCrossAttention:  # rho: every pair, future ones too
        assert set(weights) == {"alpha", "rho"} and weights["rho"].shape == (B, n, T, T)
        q_rel, k_rel = module.wq_rel(x[0, 1]).view(n, -1), module.wk_rel(x[0, 5]).view(n, -1)
        expected = (q_rel * k_rel).sum(-1) / module.head_dim ** 0.5
        assert torch.allclose(weights["rho"][0, :, 1, 5], expected, rtol=0, atol=1e-12)
    else:
        assert set(weights) == {"alpha"}


def test_skew_reindexes_by_offset():
    w = torch.arange(16.0).view(4, 4).tril()
    skewed = skew_causal(w)
    for i in range(4):
        for k in range(4):
            j = i + k - 3
            assert skewed[i, k] == (w[i, j] if j >= 0 else 0)


def test_rope_rotates_consecutive_pairs():
    cos, sin = rope_tables(4, 3)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    out = apply_rope(x, (cos, sin))
    angle = torch.tensor(2.0)  # position 2, first pair: theta_0 = 1
    assert torch.allclose(out[0, 0, 2, :2], torch.stack([1 * angle.cos() - 2 * angle.sin(),
                                                         1 * angle.sin() + 2 * angle.cos()]))
    assert torch.allclose(out[0, 0, 0], x[0, 0, 0])  # position 0 is not rotated
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1))


def test_dual_attention_concatenates_self_attention_first():
    dual = DualAttention(config(24, 2, 3, ra_type="rca")).double().eval()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    symbols = torch.randn(2, 5, 24, dtype=torch.float64)
    out = dual(x, symbols)
    assert out.shape == (2, 5, 24)
    assert torch.equal(out[..., :8], dual.self_attention(x))
    assert torch.equal(out[..., 8:], dual.relational_attention(x, symbols))


def test_dual_attention_without_self_attention_heads():
    dual = DualAttention(config(24, 3, 3))
    assert dual.self_attention is None
    assert dual(torch.randn(1, 4, 24), torch.randn(1, 4, 24)).shape == (1, 4, 24)


def test_unknown_relational_type_is_rejected():
    with pytest.raises(ValueError, match="--ra_type relational_attention, rca or disrca"):
        config(24, 2, 3, ra_type="nonsense")
