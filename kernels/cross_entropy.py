"""
Fused output layer + cross-entropy in Triton, without the (N, V) logits (Cut-Cross-Entropy style).

For tokens x_i (N, d), an output layer W (V, d), b (V,) and targets t_i, with logits z = x W^T + b:

    loss = mean over {i : t_i != ignore_index} of  loss_i,   loss_i = lse_i - z_{i, t_i},   lse_i = log sum_v exp z_iv

The forward streams over vocabulary tiles with an online logsumexp (in base 2: exp2 is the fast instruction) and
saves lse (N,). With

    dz_iv = g_i (softmax(z)_iv - [v == t_i])      g_i = dloss/dloss_i (1 / n_valid; 0 where t_i is ignored)
    dx = dz W,   dW = dz^T x,   db = sum_i dz_i

the forward also accumulates dx_i / g_i = sum_v p_iv W_v - W_{t_i} alongside the logsumexp, as flash attention
accumulates its output, so that the backward of x is a row scaling. The backward of W and b recomputes each logit
tile from x, W, b and lse and contracts it at once. Two kernels: the forward over token blocks, dW (and db) over
vocabulary blocks; memory O(N d + V d) beyond the inputs. Matmuls take the input dtype (bf16 under autocast) and
accumulate in fp32.

The arithmetic is the plain one: tl.exp2, the running max and sums rescaled at every tile, the target column
selected in every tile, and dz formed as g_i (p_iv - [v == t_i]). A leaner variant (PTX ex2.approx.ftz, rescaling
only when the max moves by more than 2^8, the target select only where a target lies, g folded into the exponent)
made whole training steps slower on an H200; docs/kernels.md has the figures.

linear_cross_entropy() falls back to plain PyTorch when Triton cannot run (no triton, or CPU tensors outside the
interpreter, TRITON_INTERPRET=1). `python -m bench.kernels` checks and times the kernels on a GPU.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .common import HAS_TRITON, INTERPRET, triton, tl

if triton is not None:
    from .common import LOG2E, load_tile

# Launch settings of the two kernels for rows of x of up to so many bytes (the smallest bucket that holds them),
# read at every call; `python -m bench.kernels` times others by passing them to the launches explicitly.
#   BLOCK_M, BLOCK_N: tokens and vocabulary rows per tile; num_warps, num_stages: Triton's launch options.
#   K_BYTES: the kernels take rows of x and W K_BYTES bytes at a time: a row that fits is loaded once per tile and
#     serves both dots of a kernel; a longer row is cut into NUM_K chunks: a K-loop for the logits, and one grid
#     column per chunk of the gradient (dx in the forward, dW), each recomputing the logits (NUM_K times their cost).
#   SPLIT (dW): programs per vocabulary block over interleaved token blocks, adding fp32 partial sums atomically,
#     for when the V / BLOCK_N programs alone are too few for the SMs (132 on an H200).
CONFIGS = {  # N = 65536 (16384 for d = 768); tiles: the best of the sweep on an H200 (torch 2.11, triton 3.6)
    128: {  # bf16 d <= 64
        "forward": dict(BLOCK_M=128, BLOCK_N=64, K_BYTES=256, num_warps=4, num_stages=3),
        "dw": dict(BLOCK_M=64, BLOCK_N=128, K_BYTES=256, num_warps=4, num_stages=3, SPLIT=1),
    },
    256: {  # bf16 d <= 128
        "forward": dict(BLOCK_M=64, BLOCK_N=128, K_BYTES=256, num_warps=4, num_stages=3),
        "dw": dict(BLOCK_M=64, BLOCK_N=64, K_BYTES=256, num_warps=4, num_stages=4, SPLIT=1),
    },
    math.inf: {  # wider rows, in chunks (d = 768 in bf16: 3 chunks for the forward, 6 for dW)
        "forward": dict(BLOCK_M=128, BLOCK_N=64, K_BYTES=512, num_warps=8, num_stages=2),
        "dw": dict(BLOCK_M=64, BLOCK_N=64, K_BYTES=256, num_warps=4, num_stages=3, SPLIT=1),
    },
}

# wider rows take the PyTorch formula: the kernels recompute the logits per width chunk, and at d=768 (bf16) on the
# H200 the kernels took 32 ms where torch.compile's formula took 5.1 (docs/kernels.md)
MAX_ROW_BYTES = 256


# -----------------------------------------------------------------------------
# Triton kernels

if triton is not None:
    @triton.jit
    def _dot_nt(a, b, a_ptr, b_ptr, rows_a, rows_b, n_a, n_b, D, stride_a, stride_b,
                BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, PRECISION: tl.constexpr):
        """a[rows_a] b[rows_b]^T (fp32) over the full width D: from the loaded tiles a, b when they hold all of it
        (NUM_K == 1), else from NUM_K chunks of BLOCK_K columns loaded here (a and b are then not used)."""
        if NUM_K == 1:
            acc = tl.dot(a, tl.trans(b), input_precision=PRECISION)
        else:
            acc = tl.zeros((rows_a.shape[0], rows_b.shape[0]), tl.float32)
            for k in range(NUM_K):
                cols = k * BLOCK_K + tl.arange(0, BLOCK_K)
                a_k = load_tile(a_ptr, rows_a, cols, n_a, D, stride_a)
                b_k = load_tile(b_ptr, rows_b, cols, n_b, D, stride_b)
                acc = tl.dot(a_k, tl.trans(b_k), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _target_logit(x_ptr, w_ptr, b_ptr, rows, t, N, V, D, stride_x, stride_w,
                      HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr):
        """z_{i,t_i} = x_i . W_{t_i} + b_{t_i} (fp32) of the token rows, for targets t in [0, V)."""
        z_t = tl.zeros(rows.shape, tl.float32)
        for k in range(NUM_K):
            cols = k * BLOCK_K + tl.arange(0, BLOCK_K)
            x = load_tile(x_ptr, rows, cols, N, D, stride_x).to(tl.float32)
            w = load_tile(w_ptr, t, cols, V, D, stride_w).to(tl.float32)
            z_t += tl.sum(x * w, axis=1)
        if HAS_BIAS:
            z_t += tl.load(b_ptr + t).to(tl.float32)
        return z_t

    @triton.jit
    def _softmax_tile(z, n0, t, m, l, b_ptr, V, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
        """One step of the online logsumexp over the logit tile z (tokens x vocabulary columns n0 + [0, BLOCK_N)):
        m' = max(m, max_v z_v), alpha = 2^(log2e (m - m')), l' = l alpha + sum_v 2^(log2e (z_v - m')).
        Returns the terms 2^(log2e (z_v - m')) with the target column set to 0 (for the dx matmul), m', l', alpha."""
        cols = n0 + tl.arange(0, BLOCK_N)
        if HAS_BIAS:  # columns past V: -inf, out of every sum
            z += tl.load(b_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)[None, :]
        elif n0 + BLOCK_N > V:
            z = tl.where(cols[None, :] < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp2((m - m_new) * LOG2E)
        p = tl.exp2(z * LOG2E - (m_new * LOG2E)[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        p = tl.where(cols[None, :] == t[:, None], 0.0, p)
        return p, m_new, l, alpha

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, t_ptr, loss_ptr, lse_ptr, dx_ptr, N, V, D, stride_x, stride_w,
                        ignore_index, HAS_BIAS: tl.constexpr, WITH_DX: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, PRECISION: tl.constexpr):
        """lse_i and loss_i (0 if ignored, nan if t_i is outside [0, V)) of BLOCK_M tokens (program_id 0) and, with
        WITH_DX, the BLOCK_K columns of chunk program_id 1 of the gradient of loss_i, dx_i / g_i (fp32):

            dx_i / g_i = sum_v p_iv W_v - W_{t_i} = sum_{v != t_i} p_iv W_v - (1 - p_{i t_i}) W_{t_i}.

        Online logsumexp over vocabulary tiles of BLOCK_N (_softmax_tile, in natural units, each exponent one
        fused multiply-add); the sum over v != t_i is accumulated alongside as sum_v 2^(...) W_v (rescaled with l,
        as in flash attention) and divided by l at the end. The target column is left out of that matmul and added
        in fp32, so that 1 - p_t keeps its precision for confident predictions."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_d = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        t = tl.load(t_ptr + rows, mask=rows < N, other=ignore_index)
        x = load_tile(x_ptr, rows, cols_d, N, D, stride_x)  # the whole width if NUM_K == 1, loaded once
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for n0 in range(0, V, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            w = load_tile(w_ptr, cols, cols_d, V, D, stride_w)  # this chunk of W; the logits' if NUM_K == 1
            z = _dot_nt(x, w, x_ptr, w_ptr, rows, cols, N, V, D, stride_x, stride_w, BLOCK_K, NUM_K, PRECISION)
            p, m, l, alpha = _softmax_tile(z, n0, t, m, l, b_ptr, V, HAS_BIAS, BLOCK_N)
            if WITH_DX:
                acc = tl.dot(p.to(w.dtype), w, acc * alpha[:, None], input_precision=PRECISION)
        lse = m + tl.log2(l) / LOG2E

        in_vocab = (t >= 0) & (t < V)
        t_safe = tl.where(in_vocab, t, 0)
        z_t = _target_logit(x_ptr, w_ptr, b_ptr, rows, t_safe, N, V, D, stride_x, stride_w, HAS_BIAS, BLOCK_K, NUM_K)
        loss = tl.where(in_vocab, lse - z_t, float("nan"))
        if tl.program_id(1) == 0:  # lse and loss once, by the first chunk
            tl.store(lse_ptr + rows, lse, mask=rows < N)
            tl.store(loss_ptr + rows, tl.where(t == ignore_index, 0.0, loss), mask=rows < N)
        if WITH_DX:
            one_minus_p_t = 1.0 - tl.exp2((z_t - lse) * LOG2E)
            w_t = load_tile(w_ptr, t_safe, cols_d, V, D, stride_w).to(tl.float32)
            dx = acc / l[:, None] - one_minus_p_t[:, None] * w_t
            mask = (rows[:, None] < N) & (cols_d[None, :] < D)
            tl.store(dx_ptr + rows[:, None] * D + cols_d[None, :], dx, mask=mask)

    @triton.jit
    def _dz_tile(z, rows, v0, t_ptr, lse_ptr, loss_ptr, g_ptr, N, ignore_index, BLOCK_N: tl.constexpr):
        """The transposed gradient tile dz^T (vocabulary rows v0 + [0, BLOCK_N) x token columns rows) from the logit
        tile z: dz_iv = g_i p_iv with p_iv = 2^(log2e (z_iv - lse_i)) (0 on ignored and padding rows); the target
        column g_i (p_it - 1) = g_i (exp(-loss_i) - 1) from the forward's loss, which keeps 1 - p_it's precision."""
        cols = v0 + tl.arange(0, BLOCK_N)
        t = tl.load(t_ptr + rows, mask=rows < N, other=ignore_index)
        lse2 = tl.load(lse_ptr + rows, mask=rows < N, other=float("inf")) * LOG2E  # padding rows: p = 0
        loss = tl.load(loss_ptr + rows, mask=rows < N, other=0.0)
        g = tl.load(g_ptr + rows, mask=rows < N, other=0.0)
        g = tl.where(t == ignore_index, 0.0, g)
        dz = tl.exp2(z * LOG2E - lse2[None, :]) * g[None, :]
        dz_t = g * (tl.exp2(-loss * LOG2E) - 1.0)
        return tl.where(cols[:, None] == t[None, :], dz_t[None, :], dz)

    @triton.jit
    def _dw_kernel(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, loss_ptr, g_ptr, dw_ptr, db_ptr, N, V, D, stride_x,
                   stride_w, ignore_index, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        """dW = dz^T x and db = sum_i dz_i (fp32, into dw (V, D) and db (V,)) for BLOCK_N vocabulary rows
        (program_id 0) and the BLOCK_K columns of chunk program_id 1, over the token blocks
        program_id 2 + SPLIT j (j = 0, 1, ...). With SPLIT > 1 the partial sums are added atomically
        (dw and db must start at 0). Works on the transposed logit tile, so that dz^T x needs no transpose; the
        rows of the tile past V are computed but not stored."""
        v0 = tl.program_id(0) * BLOCK_N
        cols = v0 + tl.arange(0, BLOCK_N)
        cols_d = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        w = load_tile(w_ptr, cols, cols_d, V, D, stride_w)  # the whole width if NUM_K == 1, loaded once
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        db = tl.zeros((BLOCK_N,), tl.float32)
        for m0 in range(tl.program_id(2) * BLOCK_M, N, SPLIT * BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            x = load_tile(x_ptr, rows, cols_d, N, D, stride_x)  # this chunk of x; the logits' if NUM_K == 1
            z = _dot_nt(w, x, w_ptr, x_ptr, cols, rows, V, N, D, stride_w, stride_x, BLOCK_K, NUM_K, PRECISION)
            if HAS_BIAS:
                z += b[:, None]
            dz = _dz_tile(z, rows, v0, t_ptr, lse_ptr, loss_ptr, g_ptr, N, ignore_index, BLOCK_N)
            if HAS_BIAS:
                db += tl.sum(dz, axis=1)
            acc = tl.dot(dz.to(x.dtype), x, acc, input_precision=PRECISION)

        dw_ptrs = dw_ptr + cols[:, None] * D + cols_d[None, :]
        dw_mask = (cols[:, None] < V) & (cols_d[None, :] < D)
        db_mask = cols < tl.where(tl.program_id(1) == 0, V, 0)  # db once, by the first chunk
        if SPLIT == 1:
            tl.store(dw_ptrs, acc, mask=dw_mask)
            if HAS_BIAS:
                tl.store(db_ptr + cols, db, mask=db_mask)
        else:
            tl.atomic_add(dw_ptrs, acc, mask=dw_mask)
            if HAS_BIAS:
                tl.atomic_add(db_ptr + cols, db, mask=db_mask)


# -----------------------------------------------------------------------------
# launches

def _config(kernel, x):
    """The launch settings of kernel for the rows of x (the smallest bucket of CONFIGS that holds them)."""
    return CONFIGS[min(key for key in CONFIGS if key >= x.shape[1] * x.element_size())][kernel]


def _launch_args(x, bias, cfg):
    """The keyword arguments of a launch: cfg with K_BYTES turned into the chunk width BLOCK_K (a power of two,
    at least 16 for tl.dot) and the number of chunks NUM_K, and the constexprs shared by the kernels."""
    cfg = dict(cfg)
    block_k = max(16, min(triton.next_power_of_2(x.shape[1]), cfg.pop("K_BYTES") // x.element_size()))
    precision = "tf32x3" if x.dtype == torch.float32 else "tf32"  # fp32: near-fp32 accuracy on tensor cores
    return dict(cfg, HAS_BIAS=bias is not None, BLOCK_K=block_k, NUM_K=triton.cdiv(x.shape[1], block_k),
                PRECISION=precision)


def launch_forward(x, weight, bias, targets, ignore_index, with_dx, cfg=None, out=None):
    """Per-token losses and lse, (N,) fp32 each, and with_dx the gradient of each loss_i w.r.t. x_i, (N, d) fp32
    (else (0, d)); into out = (loss, lse, dx) if given. cfg: launch settings (default: CONFIGS)."""
    args = _launch_args(x, bias, cfg or _config("forward", x))
    (N, D), V = x.shape, weight.shape[0]
    if out is None:
        loss = torch.empty(N, device=x.device, dtype=torch.float32)
        out = loss, torch.empty_like(loss), torch.empty(N if with_dx else 0, D, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, args["BLOCK_M"]), args["NUM_K"] if with_dx else 1)
    _forward_kernel[grid](x, weight, bias, targets, *out, N, V, D, x.stride(0), weight.stride(0), ignore_index,
                          WITH_DX=with_dx, **args)
    return out


def launch_dw(grad_loss, x, weight, bias, targets, lse, loss, ignore_index, cfg=None, out=None):
    """dW and db (an empty tensor without a bias) in fp32, for the loss gradients grad_loss (N,) fp32 and the
    forward's lse and loss; into out = (dw, db) if given (zeros for SPLIT > 1). cfg: launch settings."""
    args = _launch_args(x, bias, cfg or _config("dw", x))
    (N, D), V = x.shape, weight.shape[0]
    if out is None:
        new = torch.zeros if args["SPLIT"] > 1 else torch.empty  # atomics add into zeros
        out = (new(V, D, device=x.device, dtype=torch.float32),
               new(V if bias is not None else 0, device=x.device, dtype=torch.float32))
    grid = (triton.cdiv(V, args["BLOCK_N"]), args["NUM_K"], args["SPLIT"])
    _dw_kernel[grid](x, weight, bias, targets, lse, loss, grad_loss, *out, N, V, D, x.stride(0), weight.stride(0),
                     ignore_index, **args)
    return out


# -----------------------------------------------------------------------------
# custom ops (opaque to torch.compile) and their autograd

@torch.library.custom_op("dat::linear_ce_forward", mutates_args=())
def linear_ce_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                      ignore_index: int, with_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses loss_i (0 where targets == ignore_index) and logsumexps of x W^T + b, (N,) fp32 each, and
    with_dx the gradients d loss_i / d x_i, (N, d) fp32 (else (0, d)): the backward of x is then a row scaling.
    x (N, d) and weight (V, d) contiguous in one dtype, bias (V,) any float dtype or None, targets (N,) int64."""
    return launch_forward(x, weight, bias, targets, ignore_index, with_dx)


@linear_ce_forward.register_fake
def _(x, weight, bias, targets, ignore_index, with_dx):
    loss = x.new_empty(x.shape[0], dtype=torch.float32)
    dx = x.new_empty(x.shape if with_dx else (0, x.shape[1]), dtype=torch.float32)
    return loss, torch.empty_like(loss), dx


@torch.library.custom_op("dat::linear_ce_backward", mutates_args=())
def linear_ce_backward(grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       targets: torch.Tensor, lse: torch.Tensor, loss: torch.Tensor,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_loss_i loss_i w.r.t. weight and bias, in their dtypes (db empty without a bias), from
    the forward's lse and loss."""
    dw, db = launch_dw(grad_loss.float().contiguous(), x, weight, bias, targets, lse, loss, ignore_index)
    return dw.to(weight.dtype), (db if bias is None else db.to(bias.dtype))


@linear_ce_backward.register_fake
def _(grad_loss, x, weight, bias, targets, lse, loss, ignore_index):
    return torch.empty_like(weight), (x.new_empty(0, dtype=torch.float32) if bias is None else torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    x, weight, bias, targets, ignore_index, with_dx = inputs
    loss, lse, dx = output
    ctx.save_for_backward(x, weight, bias, targets, lse, loss, dx)
    ctx.ignore_index, ctx.with_dx = ignore_index, with_dx


def _backward(ctx, grad_loss, grad_lse, grad_dx):
    """The gradients of x (a row scaling of the forward's dx), weight and bias; lse and dx are internal outputs,
    their gradients are ignored."""
    x, weight, bias, targets, lse, loss, dx = ctx.saved_tensors
    grad_loss = torch.where(targets != ctx.ignore_index, grad_loss.float(), 0.0)  # ignored: loss_i = 0, constant
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        if not ctx.with_dx:
            raise RuntimeError("the gradient of x needs linear_ce_forward(..., with_dx=True)")
        grad_x = (dx * grad_loss[:, None]).to(x.dtype)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_w, grad_b = linear_ce_backward(grad_loss, x, weight, bias, targets, lse, loss, ctx.ignore_index)
    return grad_x, grad_w, (grad_b if bias is not None else None), None, None, None


linear_ce_forward.register_autograd(_backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# the op

def linear_cross_entropy_eager(x, weight, bias, targets, ignore_index=-1):
    """The same loss in plain PyTorch (materialises the logits): weight and bias are cast to the dtype of x."""
    logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


def linear_cross_entropy(x, weight, bias, targets, ignore_index=-1):
    """Mean over the positions with targets != ignore_index of logsumexp(x W^T + b) - (x W^T + b)[target], in fp32.

    x (..., d), weight (V, d), bias (V,) or None, targets (...) int64. Differentiable w.r.t. x, weight and bias.
    With Triton (CUDA tensors, or the interpreter) the (N, V) logits are never materialised; otherwise this is
    linear_cross_entropy_eager (also for rows wider than MAX_ROW_BYTES, where torch.compile's version of the
    plain formula is faster). Under autocast x and weight are cast like F.linear would; weight is cast to
    the dtype of x; the bias may have any float dtype. All positions ignored: nan, as F.cross_entropy."""
    if not (HAS_TRITON and (x.is_cuda or INTERPRET)):
        return linear_cross_entropy_eager(x, weight, bias, targets, ignore_index)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.shape[-1] * x.element_size() > MAX_ROW_BYTES:
        return linear_cross_entropy_eager(x, weight, bias, targets, ignore_index)
    x = x.reshape(-1, x.shape[-1]).contiguous()
    weight = weight.to(x.dtype).contiguous()
    targets = targets.reshape(-1).contiguous()
    with_dx = torch.is_grad_enabled() and x.requires_grad
    loss, _, _ = linear_ce_forward(x, weight, bias, targets, ignore_index, with_dx)
    return loss.sum() / (targets != ignore_index).sum()
