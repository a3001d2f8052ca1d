"""kernels.linear_cross_entropy (kernels/cross_entropy.py) against a float64 formula: the Triton kernels (through
the interpreter on a CPU, natively on a GPU) and the PyTorch fallback, loss and the gradients of x, weight and bias;
custom-op checks and torch.compile. Triton tests skip without triton (pip install triton)."""

import math

import pytest
import torch

import kernels
from kernels import cross_entropy, linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Small tiles, so that the small shapes below span several token and vocabulary tiles with ragged ends; rows of up
# to 512 bytes (128 fp32 columns) are loaded whole. For rows of any width.
SMALL = {
    "forward": dict(BLOCK_M=64, BLOCK_N=64, K_BYTES=512, num_warps=4, num_stages=2),
    "dw": dict(BLOCK_M=64, BLOCK_N=64, K_BYTES=512, num_warps=4, num_stages=2, SPLIT=1),
}


@pytest.fixture
def config(monkeypatch):
    """cross_entropy.CONFIGS set to SMALL for every width, with the given settings in each kernel that has them; the
    kernels serve rows of any width (not only up to MAX_ROW_BYTES)."""
    monkeypatch.setattr(cross_entropy, "MAX_ROW_BYTES", math.inf)

    def use(**settings):
        small = {kernel: {**cfg, **{k: v for k, v in settings.items() if k in cfg}} for kernel, cfg in SMALL.items()}
        monkeypatch.setattr(cross_entropy, "CONFIGS", {math.inf: small})
    use()
    return use


def problem(shape, V, d, bias=True, ignore_index=-1, dtype=torch.float32, seed=0):
    """x (*shape, d), weight (V, d), bias (V,) fp32 or None, targets (*shape) with every 5th position ignored,
    at scales where the logits spread over a few units."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g)
    weight = 2 * torch.randn(V, d, generator=g) / d ** 0.5
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, shape, generator=g)
    targets.view(-1)[::5] = ignore_index
    leaves = [x.to(DEVICE, dtype), weight.to(DEVICE, dtype)] + ([b.to(DEVICE)] if bias else [])
    leaves = [t.requires_grad_() for t in leaves]
    return leaves, targets.to(DEVICE)


def plain_loss(x, weight, bias, targets, ignore_index=-1):
    """The loss from its definition, in float64: mean over the kept positions of logsumexp(z) - z[target]."""
    z = x.double().flatten(0, -2) @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    keep = targets.flatten() != ignore_index
    z, t = z[keep], targets.flatten()[keep]
    return (z.logsumexp(-1) - z.gather(1, t[:, None]).squeeze(1)).mean()


def loss_and_grads(fn, leaves, targets, **kwargs):
    bias = leaves[2] if len(leaves) == 3 else None
    loss = fn(leaves[0], leaves[1], bias, targets, **kwargs)
    return [loss, *torch.autograd.grad(loss, leaves)]


def assert_close(leaves, targets, tol, **kwargs):
    """linear_cross_entropy against plain_loss on the same values: loss and every gradient to tol (relative)."""
    got = loss_and_grads(linear_cross_entropy, leaves, targets, **kwargs)
    ref = loss_and_grads(plain_loss, [t.detach().double().requires_grad_() for t in leaves], targets, **kwargs)
    assert got[0].dtype == torch.float32
    for name, a, r, leaf in zip(["loss", "x", "weight", "bias"], got, ref, [None, *leaves]):
        assert leaf is None or a.dtype == leaf.dtype, name
        assert r.norm() > 0, name
        err = ((a.double() - r).norm() / r.norm()).item()
        assert err <= tol, f"{name}: relative error {err:.2e}"


# -----------------------------------------------------------------------------
# the Triton kernels

@pytest.mark.triton
@pytest.mark.parametrize("shape, V, d, bias, settings", [
    ((300,), 1000, 64, True, {}),                   # N, V not multiples of the tiles
    ((257,), 515, 96, False, {}),                   # d not a power of two (padded to 128), no bias
    ((3, 43), 333, 80, True, dict(K_BYTES=128)),    # d in chunks of 32, 32, 16 columns; leading dims
    ((200,), 700, 64, True, dict(SPLIT=3)),         # dW split into 3 atomically added partial sums
    ((70,), 150, 768, True, dict(K_BYTES=1024, BLOCK_M=32, BLOCK_N=32)),  # d = 768: 3 chunks of 256
])
def test_triton_float32(config, shape, V, d, bias, settings):
    config(**settings)
    leaves, targets = problem(shape, V, d, bias)
    assert_close(leaves, targets, tol=1e-5)


@pytest.mark.triton
def test_triton_no_bias_ignore_index_zero(config):
    """No bias (the columns past V masked), with ignore_index a real token."""
    leaves, targets = problem((150,), 230, 32, bias=False, ignore_index=0)
    assert_close(leaves, targets, tol=1e-5, ignore_index=0)


@pytest.mark.triton
def test_triton_rescale(config):
    """Logits that grow along the vocabulary (by ~40 across it, some rows more than others): the running max moves
    by more than 2^8 in the exponent several times; the result is the same."""
    (x, weight, bias), targets = problem((130,), 500, 32)
    with torch.no_grad():
        bias.copy_(torch.linspace(0, 30, 500, device=bias.device) + bias)
        weight.add_(torch.linspace(0, 1, 500, device=weight.device)[:, None] * x[:1])  # row-dependent growth
    assert_close([x, weight, bias], targets, tol=1e-5)


@pytest.mark.triton
def test_triton_signed_loss_weights(config):
    """Per-token losses through linear_ce_forward, weighted by signed weights: negative loss gradients g_i."""
    (x, weight, bias), targets = problem((150,), 300, 32)
    weights = torch.randn(150, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(x.device)
    loss = kernels.linear_ce_forward(x, weight, bias, targets, -1, True)[0]
    got = torch.autograd.grad((loss.double() * weights).sum(), (x, weight, bias))
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    z = leaves[0] @ leaves[1].T + leaves[2]
    keep = targets != -1
    ref_loss = torch.where(keep, z.logsumexp(-1) - z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ref = torch.autograd.grad((ref_loss * weights).sum(), leaves)
    for a, r in zip(got, ref):
        assert ((a.double() - r).norm() / r.norm()).item() < 1e-5


@pytest.mark.triton
def test_triton_ignore_index_inside_vocabulary(config):
    """ignore_index is a real token (0 here): only its positions are dropped, by value."""
    leaves, targets = problem((150,), 200, 32, ignore_index=0)
    assert_close(leaves, targets, tol=1e-5, ignore_index=0)


@pytest.mark.triton
def test_triton_bfloat16(config):
    """bf16 x and weight, fp32 bias: against the formula on the same bf16 values; gradients in the input dtypes."""
    leaves, targets = problem((300,), 1000, 64, dtype=torch.bfloat16)
    assert_close(leaves, targets, tol=1e-2)


@pytest.mark.triton
def test_triton_autocast(config):
    """Under autocast fp32 x and weight are cast to bf16, as F.linear would; the gradients come back in fp32."""
    leaves, targets = problem((100,), 300, 64)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = linear_cross_entropy(leaves[0], leaves[1], leaves[2], targets)
    grads = torch.autograd.grad(loss, leaves)
    rounded = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in leaves[:2]]
    rounded.append(leaves[2].detach().double().requires_grad_())
    ref = loss_and_grads(plain_loss, rounded, targets)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    for a, r in zip([loss, *grads], ref):
        assert ((a.double() - r).norm() / r.norm()).item() < 1e-2


@pytest.mark.triton
def test_triton_degenerate_targets(config):
    """Every position ignored: nan, as F.cross_entropy; a target outside the vocabulary: nan, not a wrong number."""
    leaves, targets = problem((40,), 100, 16)
    assert linear_cross_entropy(*leaves, torch.full_like(targets, -1)).isnan()
    targets[3] = 100
    assert linear_cross_entropy(*leaves, targets).isnan()


@pytest.mark.triton
def test_custom_ops(config):
    """torch.library.opcheck: schemas, fake (meta) functions and autograd registration agree with the kernels."""
    (x, weight, bias), targets = problem((40,), 70, 16)
    torch.library.opcheck(kernels.linear_ce_forward, (x, weight, bias, targets, -1, True))
    torch.library.opcheck(kernels.linear_ce_forward, (x.detach(), weight, bias, targets, -1, False))
    x, weight, bias = x.detach(), weight.detach(), bias.detach()  # the backward has no backward of its own
    loss, lse, _ = kernels.linear_ce_forward(x, weight, bias, targets, -1, False)
    grad = torch.full_like(lse, 0.1)
    for b in (bias, None):
        torch.library.opcheck(kernels.linear_ce_backward, (grad, x, weight, b, targets, lse, loss, -1))


@pytest.mark.triton
def test_triton_compile(config, monkeypatch):
    """torch.compile(fullgraph) of a loss through the custom ops, and its backward: no graph break, same values.
    Without AOTAutograd's on-disk cache, which keys on the graph but not on the custom ops' schemas."""
    import torch._functorch.config
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    leaves, targets = problem((2, 50), 200, 32)
    compiled = torch.compile(lambda x, *rest: linear_cross_entropy(x.tanh(), *rest), fullgraph=True)
    loss = compiled(*leaves, targets)
    loss.backward()
    grads = [t.grad for t in leaves]
    ref = loss_and_grads(lambda x, *rest: plain_loss(x.tanh(), *rest),
                         [t.detach().double().requires_grad_() for t in leaves], targets)
    for a, r in zip([loss, *grads], ref):
        assert ((a.double() - r).norm() / r.norm()).item() < 1e-5


# -----------------------------------------------------------------------------
# the PyTorch fallback (no Triton)

@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setattr(cross_entropy, "HAS_TRITON", False)


@pytest.mark.parametrize("shape, bias, ignore_index", [((4, 30), True, -1), ((90,), False, 7)])
def test_fallback(fallback, shape, bias, ignore_index):
    leaves, targets = problem(shape, 50, 24, bias, ignore_index)
    assert_close(leaves, targets, tol=1e-5, ignore_index=ignore_index)


def test_fallback_casts_weight_to_x(fallback):
    """bf16 x with an fp32 weight and bias: computed in bf16, gradients in each input's dtype."""
    (x, weight, bias), targets = problem((60,), 50, 24)
    x16 = x.detach().to(torch.bfloat16).requires_grad_()
    loss = linear_cross_entropy(x16, weight, bias, targets)
    grads = torch.autograd.grad(loss, (x16, weight, bias))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    ref = plain_loss(x16.detach(), weight.detach().to(torch.bfloat16), bias.detach().to(torch.bfloat16), targets)
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()


def test_fallback_compile(fallback):
    """torch.compile(fullgraph) through the fallback."""
    leaves, targets = problem((50,), 60, 16)
    compiled = torch.compile(lambda *args: linear_cross_entropy(*args), fullgraph=True)
    loss = compiled(*leaves, targets)
    assert abs(loss.item() - plain_loss(*leaves, targets).item()) < 1e-5
