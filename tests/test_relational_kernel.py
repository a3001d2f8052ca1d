"""kernels.relative_position_attention (kernels/relational.py, the fused position-relative attention in Triton)
against the materialised formula: outputs and the gradients of q, k, v and the table, in float64 (to 1e-10) and
float32, with clipped offsets, odd lengths, no values, no table, values shared by all heads; dropout against its own
mask; the custom ops, and attention.py's RA and RCA through the kernel. On a CPU the kernels run in the Triton
interpreter (slowly: tiny shapes, tiles of 16)."""

import math

import pytest
import torch

import attention
import kernels
from kernels import relational
from test_attention import CASES, build, grads, inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.triton

SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_V=16, num_warps=4, num_stages=1)


@pytest.fixture
def tiles(monkeypatch):
    """Tiles of 16 (several tiles, ragged ends, value chunks at these sizes); use(**kernel settings) changes them."""
    def use(forward=None, dq=None, dkdv=None, block=16):
        small = {"forward": {**SMALL, **(forward or {})}, "dq": {**SMALL, **(dq or {})},
                 "dkdv": {**SMALL, **(dkdv or {})}, "dtable": dict(BLOCK=block, num_warps=4, num_stages=1)}
        monkeypatch.setattr(relational, "RELPOS_CONFIGS", {math.inf: small})
        monkeypatch.setattr(relational, "RELPOS_CONFIGS_WIDE_DTYPES", small)
    use()
    return use


def plain(q, k, v, table, max_rel_pos, keep=None, dropout_p=0.0):
    """(o^v, o^R) from the definition (None where v or the table is): P (B, n, T, T) and the gathered table
    (n, T, T, e) materialised; keep is the dropout mask (B, n, T, T) (kept pairs scaled by 1 / (1 - dropout_p))."""
    B, n, T, h = q.shape
    scores = q @ k.transpose(-2, -1) * h ** -0.5
    P = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf")).softmax(-1)
    if keep is not None:
        P = P * keep / (1 - dropout_p)
    o_v = None if v is None else P @ v
    if table is None:
        return o_v, None
    offsets = torch.arange(T, device=q.device)[None, :] - torch.arange(T, device=q.device)[:, None]  # j - i
    gathered = table[:, offsets.clamp(-max_rel_pos, max_rel_pos) + max_rel_pos]  # (n, T, T, e)
    return o_v, torch.einsum("bnij,nije->bnie", P, gathered)


def problem(B, n, T, h, dv, e, max_rel_pos, shared=True, dtype=torch.float64, seed=0):
    """q, k (B, n, T, h), v (B, 1 or n, T, dv) or None, table (n, 2M+1, e) or None (e = 0): leaves requiring
    grad."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, n, T, h, generator=g, dtype=dtype) for _ in range(2))
    v = None if dv == 0 else torch.randn(B, 1 if shared else n, T, dv, generator=g, dtype=dtype)
    table = None if e == 0 else torch.randn(n, 2 * max_rel_pos + 1, e, generator=g, dtype=dtype)
    return [None if t is None else t.to(DEVICE).requires_grad_() for t in (q, k, v, table)]


def outputs_and_grads(fn, leaves):
    """(o^v, o^R) and the gradients of every leaf for a fixed random weighting of the outputs."""
    o_v, o_r = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    outputs = [o for o in (o_v, o_r) if o is not None]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(DEVICE, o.dtype)).sum() for o in outputs)
    used = [t for t in leaves if t is not None]
    return outputs + list(torch.autograd.grad(loss, used))


def assert_close(got, ref, atol, rtol=0.0, nonzero=True):
    for a, r in zip(got, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert r.abs().max() > 1e-3 or not nonzero  # not a comparison of zeros
        torch.testing.assert_close(a, r, atol=atol, rtol=rtol)


SHAPES = [  # (B, n, T, h, Dv, e, M, shared v)
    (2, 2, 37, 8, 12, 8, 40, True),     # odd T over 3 tiles, v shared by the heads, no clipping
    (1, 2, 23, 6, 40, 10, 5, False),    # clipped offsets (M < T - 1), v per head in 3 chunks, h and e not powers of 2
    (2, 1, 20, 16, 0, 16, 3, True),     # no values (RCA), heavy clipping
    (1, 3, 1, 8, 4, 8, 2, True),        # a single position
    (1, 1, 33, 4, 20, 24, 31, True),    # T = M + 2: the last row's first key clipped; table wider than the heads
    (2, 2, 21, 8, 24, 0, 0, False),     # no table: plain causal attention over per-head values in 2 chunks
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}n{s[1]}T{s[2]}h{s[3]}v{s[4]}e{s[5]}M{s[6]}" for s in SHAPES])
def test_float64_equals_plain(tiles, shape):
    *sizes, M, shared = shape
    leaves = problem(*sizes, M, shared)
    got = outputs_and_grads(lambda *t: kernels.relative_position_attention(*t, M), leaves)
    ref = outputs_and_grads(lambda *t: plain(*t, M), leaves)
    assert_close(got, ref, atol=1e-10, nonzero=sizes[2] > 1)  # T = 1: dq = dk = 0


def test_unequal_tiles(tiles):
    """Query and key tiles of different sizes in each kernel; the table gradient in tiles of 32."""
    tiles(forward=dict(BLOCK_M=32), dq=dict(BLOCK_N=32), dkdv=dict(BLOCK_M=32), block=32)
    leaves = problem(1, 2, 45, 8, 8, 8, 20)
    got = outputs_and_grads(lambda *t: kernels.relative_position_attention(*t, 20), leaves)
    ref = outputs_and_grads(lambda *t: plain(*t, 20), leaves)
    assert_close(got, ref, atol=1e-10)


def test_float32(tiles):
    leaves = problem(2, 2, 29, 8, 16, 8, 12, dtype=torch.float32)
    got = outputs_and_grads(lambda *t: kernels.relative_position_attention(*t, 12), leaves)
    ref = outputs_and_grads(lambda *t: plain(*t, 12),
                            [t.detach().double().requires_grad_() for t in leaves])
    assert_close(got, [r.float() for r in ref], atol=2e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# dropout

def kernel_with_identity_values(q, k, v, table, max_rel_pos, dropout_p):
    """The kernel with the values v and, appended, the identity: its last T value columns are then row i of the
    dropped and rescaled P, which gives the mask the kernel drew."""
    B, n, T, _ = q.shape
    eye = torch.eye(T, dtype=q.dtype, device=q.device).expand(B, n, T, T)
    o_v, o_r = kernels.relative_position_attention(q, k, torch.cat((v.expand(B, n, T, -1), eye), -1), table,
                                                   max_rel_pos, dropout_p)
    return o_v[..., :v.shape[-1]], o_r, o_v[..., v.shape[-1]:]


def test_dropout_equals_plain_with_the_same_mask(tiles):
    """Outputs and all gradients against the formula with the kernel's own mask (dropout 0.25: 1 / 0.75 exact)."""
    M, p = 9, 0.25
    leaves = problem(2, 2, 19, 8, 6, 8, M)
    torch.manual_seed(3)
    _, _, dropped = kernel_with_identity_values(*(t.detach() for t in leaves), M, p)
    keep = (dropped != 0).double()
    causal = torch.ones(19, 19, dtype=torch.bool).tril()
    assert 0 < keep[..., causal].mean() < 1 and keep[..., ~causal].sum() == 0
    torch.manual_seed(3)  # the same seed again: the same mask
    got = outputs_and_grads(lambda *t: kernel_with_identity_values(*t, M, p)[:2], leaves)
    ref = outputs_and_grads(lambda q, k, v, tab: plain(q, k, v.expand(2, 2, 19, 6), tab, M, keep, p), leaves)
    assert_close(got, ref, atol=1e-10)


def test_dropout_rate_and_seeding(tiles):
    """About a fraction p of the pairs dropped; the mask follows torch's generator: the same after restoring its
    state, different for another draw."""
    tiles(forward=dict(BLOCK_V=64))
    q, k, v, table = (t.detach() for t in problem(1, 2, 40, 8, 4, 8, 39, dtype=torch.float32))
    p = 0.3
    state = torch.get_rng_state() if DEVICE == "cpu" else torch.cuda.get_rng_state()
    first = kernel_with_identity_values(q, k, v, table, 39, p)
    second = kernel_with_identity_values(q, k, v, table, 39, p)
    if DEVICE == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state)
    again = kernel_with_identity_values(q, k, v, table, 39, p)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[2], second[2])
    causal = torch.ones(40, 40, dtype=torch.bool, device=DEVICE).tril()
    kept = (first[2] != 0)[..., causal].float().mean().item()  # 1640 pairs: standard deviation 0.011
    assert abs(kept - (1 - p)) < 0.05


# -----------------------------------------------------------------------------
# custom ops, torch.compile

def test_custom_ops(tiles):
    """torch.library.opcheck: schemas, fake functions and autograd registration agree with the kernels."""
    q, k, v, table = problem(1, 2, 9, 8, 6, 8, 5, dtype=torch.float32)
    seed = torch.tensor([7], device=DEVICE)
    torch.library.opcheck(kernels.relpos_attention_forward, (q, k, v, table, seed, 5, 0.1),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(kernels.relpos_attention_forward, (q, k, None, table, None, 5, 0.0))
    torch.library.opcheck(kernels.relpos_attention_forward, (q, k, v, None, None, 0, 0.0))
    o_v, o_r, lse = kernels.relpos_attention_forward(*(t.detach() for t in (q, k, v, table)), seed, 5, 0.1)
    args = (torch.randn_like(o_v), torch.randn_like(o_r), *(t.detach() for t in (q, k, v, table)), seed, o_v, o_r,
            lse, 5, 0.1)
    torch.library.opcheck(kernels.relpos_attention_backward, args)


def test_compile(tiles):
    """torch.compile(fullgraph) through the custom ops, forward and backward: no graph break, same values."""
    leaves = problem(1, 2, 17, 8, 6, 8, 5, dtype=torch.float32)
    fn = lambda q, k, v, table: kernels.relative_position_attention(q.tanh(), k, v, table, 5)  # noqa: E731
    got = outputs_and_grads(torch.compile(fn, fullgraph=True), leaves)
    assert_close(got, outputs_and_grads(fn, leaves), atol=1e-6)


# -----------------------------------------------------------------------------
# attention.py through the kernel

@pytest.mark.parametrize("cls", [attention.RelationalAttention, attention.RelationalCrossAttention],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", CASES[:3], ids=[f"d{c[0]}_n{c[1]}of{c[2]}_T{c[3]}_M{c[4]}" for c in CASES[:3]])
def test_modules_through_the_kernel(tiles, monkeypatch, cls, case):
    """RA and RCA with position-relative symbols, the kernel path forced on (never the skew): equal to the plain
    formulation in float64, outputs and the gradients of every parameter."""
    monkeypatch.setattr(attention, "relative_kernel_applies", lambda x: True)
    monkeypatch.setattr(attention, "skew_causal", None)
    d, n, total, T, max_rel_pos, use_rope = case
    module = build(cls, d, n, total, True, max_rel_pos).to(DEVICE)
    x, symbols = (t.detach().to(DEVICE).requires_grad_() for t in inputs(2, T, d, True, max_rel_pos,
                                                                         torch.Generator().manual_seed(2)))
    rope = tuple(t[:T].double().to(DEVICE) for t in attention.rope_tables(d // total, T)) if use_rope else None
    fast = module(x, symbols, rope)
    plain_out = module.plain_forward(x, symbols, rope)[0]
    torch.testing.assert_close(fast, plain_out, rtol=0, atol=1e-10)
    for g_fast, g_plain in zip(grads(module, x, symbols, fast), grads(module, x, symbols, plain_out)):
        torch.testing.assert_close(g_fast, g_plain, rtol=0, atol=1e-10)


def test_bad_arguments():
    q, k, v, table = problem(1, 2, 5, 8, 4, 8, 3)
    with pytest.raises(ValueError, match="2 max_rel_pos"):
        kernels.relative_position_attention(q, k, v, table, 4)
    with pytest.raises(ValueError, match="needs values"):
        kernels.relative_position_attention(q, k, None, None)
