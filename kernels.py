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

At small d the dots are short (K = d) and each logit costs as much exponential and softmax arithmetic as matmul
work (at d = 64 on an H200: 2 x 64 multiply-adds per logit, one exp2 per logit per kernel, the MUFU unit does 16 a
clock per SM, the tensor cores 2048 multiply-adds), so the kernels keep the per-logit instruction count low; the
settings below switch each such step (bench_kernels.py times them against each other).

linear_cross_entropy() falls back to plain PyTorch when Triton cannot run (no triton, or CPU tensors outside the
interpreter, TRITON_INTERPRET=1). bench_kernels.py checks and times the kernels on a GPU.
"""

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch fallback
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = triton is not None and (torch.cuda.is_available() or INTERPRET)

# Launch settings of the two kernels for rows of x of up to so many bytes (the first bucket that holds them), read
# at every call; bench_kernels.py times others by passing them to the launches explicitly.
#   BLOCK_M, BLOCK_N: tokens and vocabulary rows per tile; num_warps, num_stages: Triton's launch options.
#   K_BYTES: the kernels take rows of x and W K_BYTES bytes at a time: a row that fits is loaded once per tile and
#     serves both dots of a kernel; a longer row is cut into NUM_K chunks: a K-loop for the logits, and one grid
#     column per chunk of the gradient (dx in the forward, dW), each recomputing the logits (NUM_K times their cost).
#   SPLIT (dW): programs per vocabulary block over interleaved token blocks, adding fp32 partial sums atomically,
#     for when the V / BLOCK_N programs alone are too few for the SMs (132 on an H200).
#   EXP: how 2^x is taken: "exp2" (tl.exp2), "ftz" (one PTX ex2.approx.ftz.f32: no subnormal handling, results
#     below 2^-126 are 0), "bf16x2" (PTX ex2.approx.ftz.bf16x2 on pairs: argument and result rounded to bf16, the
#     result feeds the bf16 matmul directly; sm_90+ and bf16 inputs, else "ftz"). In the interpreter the PTX
#     variants run as tl.exp2 (bf16x2 with its roundings).
#   LAZY_RESCALE (forward): move the running max, and rescale the sums, only when a tile's max exceeds it by more
#     than 2^RESCALE_LOG2 (softmax terms stay <= 2^8; exact otherwise) instead of at every tile.
#   TARGET_SKIP: apply the target-column select only in tiles that hold a target of the block.
#   PIPELINE (rows that fit K_BYTES): each loop iteration issues the logits matmul of the next tile before the
#     softmax of this one, and the second matmul of the previous tile first, so that the tensor cores' logits work
#     can overlap the exponentials (Triton runs a matmul whose result is only carried to the next iteration
#     asynchronously, past a synchronous one). Costs one more iteration and a second load of each tile.
#   G (dW): how the loss gradient g_i enters dz_iv = g_i (p_iv - [v == t_i]): "mul" (a product per logit), "exp"
#     (folded into the exponent: 2^(log2e (z - lse) + log2 |g|); not with "bf16x2", whose argument would lose
#     bits), "x" (the second matmul takes g x, (N, d), made before the launch).
LEAN = dict(LAZY_RESCALE=True, TARGET_SKIP=True, PIPELINE=False)
CONFIGS = {  # N = 65536 (16384 for d = 768); tiles: the best of the sweep on an H200 (torch 2.11, triton 3.6)
    128: {  # bf16 d <= 64
        "forward": dict(BLOCK_M=128, BLOCK_N=64, K_BYTES=256, num_warps=4, num_stages=3, EXP="ftz", **LEAN),
        "dw": dict(BLOCK_M=64, BLOCK_N=128, K_BYTES=256, num_warps=4, num_stages=3, SPLIT=1, EXP="ftz",
                   G="exp", TARGET_SKIP=True, PIPELINE=False),
    },
    256: {  # bf16 d <= 128
        "forward": dict(BLOCK_M=64, BLOCK_N=128, K_BYTES=256, num_warps=4, num_stages=3, EXP="ftz", **LEAN),
        "dw": dict(BLOCK_M=64, BLOCK_N=64, K_BYTES=256, num_warps=4, num_stages=4, SPLIT=1, EXP="ftz",
                   G="exp", TARGET_SKIP=True, PIPELINE=False),
    },
    math.inf: {  # wider rows, in chunks (d = 768 in bf16: 3 chunks for the forward, 6 for dW)
        "forward": dict(BLOCK_M=128, BLOCK_N=64, K_BYTES=512, num_warps=8, num_stages=2, EXP="ftz", **LEAN),
        "dw": dict(BLOCK_M=64, BLOCK_N=64, K_BYTES=256, num_warps=4, num_stages=3, SPLIT=1, EXP="ftz",
                   G="exp", TARGET_SKIP=True, PIPELINE=False),
    },
}


# -----------------------------------------------------------------------------
# Triton kernels

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)
    RESCALE_LOG2 = tl.constexpr(8.0)

    @triton.jit
    def _load_tile(ptr, rows, cols, n_rows, n_cols, stride):
        """ptr[rows, cols] of a row-major (n_rows, n_cols) matrix as a (len(rows), len(cols)) tile, 0 outside."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)

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
                a_k = _load_tile(a_ptr, rows_a, cols, n_a, D, stride_a)
                b_k = _load_tile(b_ptr, rows_b, cols, n_b, D, stride_b)
                acc = tl.dot(a_k, tl.trans(b_k), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _exp2(x, EXP: tl.constexpr, ASM: tl.constexpr):
        """2^x of an fp32 tile as EXP says (see CONFIGS): fp32, or bf16 for "bf16x2". ASM: on a GPU (PTX), else
        the interpreter's tl.exp2, with bf16x2's roundings of the argument and the result."""
        if EXP == "bf16x2":
            x = x.to(tl.bfloat16)
            if ASM:
                y = tl.inline_asm_elementwise("ex2.approx.ftz.bf16x2 $0, $1;", "=r,r", [x], dtype=tl.bfloat16,
                                              is_pure=True, pack=2)
            else:
                y = tl.exp2(x.to(tl.float32)).to(tl.bfloat16)
        elif EXP == "ftz" and ASM:
            y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            y = tl.exp2(x)
        return y

    @triton.jit
    def _holds_target(t, v0, BLOCK: tl.constexpr):
        """Whether some target of t lies in the vocabulary rows [v0, v0 + BLOCK)."""
        return tl.max(((t >= v0) & (t < v0 + BLOCK)).to(tl.int32)) > 0

    @triton.jit
    def _target_logit(x_ptr, w_ptr, b_ptr, rows, t, N, V, D, stride_x, stride_w,
                      HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr):
        """z_{i,t_i} = x_i . W_{t_i} + b_{t_i} (fp32) of the token rows, for targets t in [0, V)."""
        z_t = tl.zeros(rows.shape, tl.float32)
        for k in range(NUM_K):
            cols = k * BLOCK_K + tl.arange(0, BLOCK_K)
            x = _load_tile(x_ptr, rows, cols, N, D, stride_x).to(tl.float32)
            w = _load_tile(w_ptr, t, cols, V, D, stride_w).to(tl.float32)
            z_t += tl.sum(x * w, axis=1)
        if HAS_BIAS:
            z_t += tl.load(b_ptr + t).to(tl.float32)
        return z_t

    @triton.jit
    def _load_rows(ptr, rows, cols, n_rows, n_cols, stride):
        """_load_tile for rows that may be negative (0 there)."""
        mask = (rows[:, None] >= 0) & (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _softmax_tile(z, n0, t, m, l, b_ptr, V, HAS_BIAS: tl.constexpr, EXP: tl.constexpr, ASM: tl.constexpr,
                      LAZY_RESCALE: tl.constexpr, TARGET_SKIP: tl.constexpr, BLOCK_N: tl.constexpr):
        """One step of the online logsumexp over the logit tile z (tokens x vocabulary columns n0 + [0, BLOCK_N)):
        m <- max(m, max_v z_v),  l <- l 2^(log2e (m_old - m)) + sum_v 2^(log2e (z_v - m)).
        Returns the terms 2^(log2e (z_v - m)) with the target column set to 0 (for the dx matmul), m, l, and
        alpha = 2^(log2e (m_old - m)) with whether m moved (the dx sum is to be rescaled by alpha)."""
        cols = n0 + tl.arange(0, BLOCK_N)
        if HAS_BIAS:  # columns past V: -inf, out of every sum
            z += tl.load(b_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)[None, :]
        elif n0 + BLOCK_N > V:
            z = tl.where(cols[None, :] < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.full(m.shape, 1.0, tl.float32)
        if LAZY_RESCALE:
            rescale = tl.max(m_new - m) * LOG2E > RESCALE_LOG2
            if rescale:
                alpha = tl.exp2((m - m_new) * LOG2E)
                l *= alpha
                m = m_new
        else:
            rescale = tl.max(m_new - m) >= 0.0  # always
            alpha = tl.exp2((m - m_new) * LOG2E)
            l *= alpha
            m = m_new
        p = _exp2(z * LOG2E - (m * LOG2E)[:, None], EXP, ASM)
        l += tl.sum(p.to(tl.float32), axis=1)
        if TARGET_SKIP:
            if _holds_target(t, n0, BLOCK_N):
                p = tl.where(cols[None, :] == t[:, None], 0.0, p).to(p.dtype)
        else:
            p = tl.where(cols[None, :] == t[:, None], 0.0, p).to(p.dtype)
        return p, m, l, alpha, rescale

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, t_ptr, loss_ptr, lse_ptr, dx_ptr, N, V, D, stride_x, stride_w,
                        ignore_index, HAS_BIAS: tl.constexpr, WITH_DX: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, PRECISION: tl.constexpr,
                        EXP: tl.constexpr, ASM: tl.constexpr, LAZY_RESCALE: tl.constexpr,
                        TARGET_SKIP: tl.constexpr, PIPELINE: tl.constexpr):
        """lse_i and loss_i (0 if ignored, nan if t_i is outside [0, V)) of BLOCK_M tokens (program_id 0) and, with
        WITH_DX, the BLOCK_K columns of chunk program_id 1 of the gradient of loss_i, dx_i / g_i (fp32):

            dx_i / g_i = sum_v p_iv W_v - W_{t_i} = sum_{v != t_i} p_iv W_v - (1 - p_{i t_i}) W_{t_i}.

        Online logsumexp over vocabulary tiles of BLOCK_N (_softmax_tile, in natural units, each exponent one
        fused multiply-add); the sum over v != t_i is accumulated alongside as sum_v 2^(...) W_v (rescaled with l,
        as in flash attention) and divided by l at the end. The target column is left out of that matmul and added
        in fp32, so that 1 - p_t keeps its precision for confident predictions. With PIPELINE (and WITH_DX,
        NUM_K == 1) iteration j runs the dx matmul of tile j - 1, then starts the logits matmul of tile j + 1,
        then the softmax of tile j, which the tensor cores' work on tile j + 1 can overlap (one iteration more,
        on an empty tile past V)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_d = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        t = tl.load(t_ptr + rows, mask=rows < N, other=ignore_index)
        x = _load_tile(x_ptr, rows, cols_d, N, D, stride_x)  # the whole width if NUM_K == 1, loaded once
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        if PIPELINE and WITH_DX and NUM_K == 1:
            z = tl.dot(x, tl.trans(_load_tile(w_ptr, tl.arange(0, BLOCK_N), cols_d, V, D, stride_w)),
                       input_precision=PRECISION)
            p_prev = tl.zeros((BLOCK_M, BLOCK_N), x.dtype)
            alpha_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
            rescale_prev = tl.max(alpha_prev) > 2.0  # False
            for n0 in range(0, V + BLOCK_N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                if LAZY_RESCALE:
                    if rescale_prev:
                        acc *= alpha_prev[:, None]
                else:
                    acc *= alpha_prev[:, None]
                w_prev = _load_rows(w_ptr, cols - BLOCK_N, cols_d, V, D, stride_w)
                acc = tl.dot(p_prev, w_prev, acc, input_precision=PRECISION)
                w_next = _load_tile(w_ptr, cols + BLOCK_N, cols_d, V, D, stride_w)
                z_next = tl.dot(x, tl.trans(w_next), input_precision=PRECISION)
                p, m, l, alpha_prev, rescale_prev = _softmax_tile(z, n0, t, m, l, b_ptr, V, HAS_BIAS, EXP, ASM,
                                                                  LAZY_RESCALE, TARGET_SKIP, BLOCK_N)
                p_prev = p.to(x.dtype)
                z = z_next
        else:
            for n0 in range(0, V, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                w = _load_tile(w_ptr, cols, cols_d, V, D, stride_w)  # this chunk of W; the logits' if NUM_K == 1
                z = _dot_nt(x, w, x_ptr, w_ptr, rows, cols, N, V, D, stride_x, stride_w, BLOCK_K, NUM_K, PRECISION)
                p, m, l, alpha, rescale = _softmax_tile(z, n0, t, m, l, b_ptr, V, HAS_BIAS, EXP, ASM, LAZY_RESCALE,
                                                        TARGET_SKIP, BLOCK_N)
                if WITH_DX:
                    if LAZY_RESCALE:
                        if rescale:
                            acc *= alpha[:, None]
                    else:
                        acc *= alpha[:, None]
                    acc = tl.dot(p.to(w.dtype), w, acc, input_precision=PRECISION)
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
            w_t = _load_tile(w_ptr, t_safe, cols_d, V, D, stride_w).to(tl.float32)
            dx = acc / l[:, None] - one_minus_p_t[:, None] * w_t
            mask = (rows[:, None] < N) & (cols_d[None, :] < D)
            tl.store(dx_ptr + rows[:, None] * D + cols_d[None, :], dx, mask=mask)

    @triton.jit
    def _dz_tile(z, rows, v0, t_ptr, lse_ptr, loss_ptr, g_ptr, N, ignore_index, EXP: tl.constexpr,
                 ASM: tl.constexpr, G: tl.constexpr, TARGET_SKIP: tl.constexpr, BLOCK_N: tl.constexpr):
        """The transposed gradient tile dz^T (vocabulary rows v0 + [0, BLOCK_N) x token columns rows) from the logit
        tile z, as
        G says (see _dw_kernel), and the tokens' loss gradients g (0 on ignored and padding rows)."""
        cols = v0 + tl.arange(0, BLOCK_N)
        t = tl.load(t_ptr + rows, mask=rows < N, other=ignore_index)
        lse2 = tl.load(lse_ptr + rows, mask=rows < N, other=float("inf")) * LOG2E  # padding rows: p = 0
        loss = tl.load(loss_ptr + rows, mask=rows < N, other=0.0)
        g = tl.load(g_ptr + rows, mask=rows < N, other=0.0)
        g = tl.where(t == ignore_index, 0.0, g)
        p_t_minus_1 = tl.exp2(-loss * LOG2E) - 1.0
        if G == "exp":
            dz = _exp2(z * LOG2E + (tl.log2(tl.abs(g)) - lse2)[None, :], EXP, ASM)
            dz_t = tl.abs(g) * p_t_minus_1
        else:
            dz = _exp2(z * LOG2E - lse2[None, :], EXP, ASM)
            dz_t = p_t_minus_1
        if TARGET_SKIP:
            if _holds_target(t, v0, BLOCK_N):
                dz = tl.where(cols[:, None] == t[None, :], dz_t.to(dz.dtype)[None, :], dz)
        else:
            dz = tl.where(cols[:, None] == t[None, :], dz_t.to(dz.dtype)[None, :], dz)
        if G == "exp":
            if tl.min(g) < 0:
                dz = tl.where(g[None, :] < 0, -dz, dz)
        elif G == "mul":
            dz = dz.to(tl.float32) * g[None, :]
        return dz, g

    @triton.jit
    def _db_terms(dz, g, G: tl.constexpr):
        """sum_i dz_vi (sum_i dz_vi g_i for G == "x") of a transposed gradient tile."""
        if G == "x":
            return tl.sum(dz.to(tl.float32) * g[None, :], axis=1)
        else:
            return tl.sum(dz.to(tl.float32), axis=1)

    @triton.jit
    def _dw_kernel(x_ptr, xg_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, loss_ptr, g_ptr, dw_ptr, db_ptr, N, V, D, stride_x,
                   stride_w, ignore_index, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                   EXP: tl.constexpr, ASM: tl.constexpr, G: tl.constexpr, TARGET_SKIP: tl.constexpr,
                   PIPELINE: tl.constexpr):
        """dW = dz^T x and db = sum_i dz_i (fp32, into dw (V, D) and db (V,)) for BLOCK_N vocabulary rows
        (program_id 0) and the BLOCK_K columns of chunk program_id 1, over the token blocks
        program_id 2 + SPLIT j (j = 0, 1, ...). With SPLIT > 1 the partial sums are added atomically
        (dw and db must start at 0). Works on the transposed logit tile, so that dz^T x needs no transpose; the
        rows of the tile past V are computed but not stored. The target column p_it - 1 = exp(-loss_i) - 1 comes
        from the forward's loss; the loss gradient g_i enters as G says (see CONFIGS): for "exp",
        dz_iv = sign(g_i) 2^(log2e (z_iv - lse_i) + log2 |g_i|); for "x", dW = (p - [v == t])^T (g x), with
        xg = g x (N, D) given. PIPELINE (with NUM_K == 1) as in _forward_kernel: iteration j runs the dW matmul of
        token block j - 1, starts the logits of block j + 1, then makes dz of block j."""
        v0 = tl.program_id(0) * BLOCK_N
        cols = v0 + tl.arange(0, BLOCK_N)
        cols_d = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        w = _load_tile(w_ptr, cols, cols_d, V, D, stride_w)  # the whole width if NUM_K == 1, loaded once
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        db = tl.zeros((BLOCK_N,), tl.float32)
        rhs_ptr = xg_ptr if G == "x" else x_ptr  # the second matmul's token rows
        step = SPLIT * BLOCK_M
        start = tl.program_id(2) * BLOCK_M
        if PIPELINE and NUM_K == 1:
            z = tl.dot(w, tl.trans(_load_tile(x_ptr, start + tl.arange(0, BLOCK_M), cols_d, N, D, stride_x)),
                       input_precision=PRECISION)
            dz_prev = tl.zeros((BLOCK_N, BLOCK_M), w.dtype)
            for m0 in range(start, N + step, step):
                rows = m0 + tl.arange(0, BLOCK_M)
                rhs_prev = _load_rows(rhs_ptr, rows - step, cols_d, N, D, stride_x)
                acc = tl.dot(dz_prev, rhs_prev, acc, input_precision=PRECISION)
                z_next = tl.dot(w, tl.trans(_load_tile(x_ptr, rows + step, cols_d, N, D, stride_x)),
                                input_precision=PRECISION)
                if HAS_BIAS:
                    z += b[:, None]
                dz, g = _dz_tile(z, rows, v0, t_ptr, lse_ptr, loss_ptr, g_ptr, N, ignore_index, EXP, ASM, G,
                                 TARGET_SKIP, BLOCK_N)
                if HAS_BIAS:
                    db += _db_terms(dz, g, G)
                dz_prev = dz.to(w.dtype)
                z = z_next
        else:
            for m0 in range(start, N, step):
                rows = m0 + tl.arange(0, BLOCK_M)
                x = _load_tile(x_ptr, rows, cols_d, N, D, stride_x)  # this chunk of x; the logits' if NUM_K == 1
                z = _dot_nt(w, x, w_ptr, x_ptr, cols, rows, V, N, D, stride_w, stride_x, BLOCK_K, NUM_K, PRECISION)
                if HAS_BIAS:
                    z += b[:, None]
                dz, g = _dz_tile(z, rows, v0, t_ptr, lse_ptr, loss_ptr, g_ptr, N, ignore_index, EXP, ASM, G,
                                 TARGET_SKIP, BLOCK_N)
                if HAS_BIAS:
                    db += _db_terms(dz, g, G)
                rhs = _load_tile(xg_ptr, rows, cols_d, N, D, stride_x) if G == "x" else x
                acc = tl.dot(dz.to(x.dtype), rhs, acc, input_precision=PRECISION)

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

def _bucket(x):
    """The key of CONFIGS for the rows of x."""
    return min(key for key in CONFIGS if key >= x.shape[1] * x.element_size())


def _config(kernel, x):
    """The launch settings of kernel for the rows of x."""
    return CONFIGS[_bucket(x)][kernel]


def _exp_mode(exp, x):
    """EXP as run: "bf16x2" needs bf16 inputs and, on a GPU, sm_90+ (else "ftz")."""
    old_gpu = x.is_cuda and torch.cuda.get_device_capability(x.device) < (9, 0)
    return "ftz" if exp == "bf16x2" and (x.dtype != torch.bfloat16 or old_gpu) else exp


def _launch_args(x, bias, cfg):
    """The keyword arguments of a launch: cfg with K_BYTES turned into the chunk width BLOCK_K (a power of two,
    at least 16 for tl.dot) and the number of chunks NUM_K, and the constexprs shared by the kernels."""
    cfg = dict(cfg)
    block_k = max(16, min(triton.next_power_of_2(x.shape[1]), cfg.pop("K_BYTES") // x.element_size()))
    precision = "tf32x3" if x.dtype == torch.float32 else "tf32"  # fp32: near-fp32 accuracy on tensor cores
    cfg["EXP"] = _exp_mode(cfg["EXP"], x)
    if cfg["EXP"] == "bf16x2" and cfg.get("G") == "exp":
        raise ValueError("G='exp' with EXP='bf16x2': the exponent would be rounded to bf16 far from 0")
    return dict(cfg, ASM=not INTERPRET, HAS_BIAS=bias is not None, BLOCK_K=block_k,
                NUM_K=triton.cdiv(x.shape[1], block_k), PRECISION=precision)


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
    xg = (x.float() * grad_loss[:, None]).to(x.dtype) if args["G"] == "x" else None
    grid = (triton.cdiv(V, args["BLOCK_N"]), args["NUM_K"], args["SPLIT"])
    _dw_kernel[grid](x, xg, weight, bias, targets, lse, loss, grad_loss, *out, N, V, D, x.stride(0),
                     weight.stride(0), ignore_index, **args)
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

def linear_cross_entropy_reference(x, weight, bias, targets, ignore_index=-1):
    """The same loss in plain PyTorch (materialises the logits): weight and bias are cast to the dtype of x."""
    logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


MAX_ROW_BYTES = 256  # wider rows recompute the logits per width chunk: on the H200, d=768 took 32 ms (compiled: 5.1)


def linear_cross_entropy(x, weight, bias, targets, ignore_index=-1):
    """Mean over the positions with targets != ignore_index of logsumexp(x W^T + b) - (x W^T + b)[target], in fp32.

    x (..., d), weight (V, d), bias (V,) or None, targets (...) int64. Differentiable w.r.t. x, weight and bias.
    With Triton (CUDA tensors, or the interpreter) the (N, V) logits are never materialised; otherwise this is
    linear_cross_entropy_reference (also for rows wider than MAX_ROW_BYTES, where torch.compile's version of the
    plain formula is faster). Under autocast x and weight are cast like F.linear would; weight is cast to
    the dtype of x; the bias may have any float dtype. All positions ignored: nan, as F.cross_entropy."""
    if not (HAS_TRITON and (x.is_cuda or INTERPRET)):
        return linear_cross_entropy_reference(x, weight, bias, targets, ignore_index)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.shape[-1] * x.element_size() > MAX_ROW_BYTES:
        return linear_cross_entropy_reference(x, weight, bias, targets, ignore_index)
    x = x.reshape(-1, x.shape[-1]).contiguous()
    weight = weight.to(x.dtype).contiguous()
    targets = targets.reshape(-1).contiguous()
    with_dx = torch.is_grad_enabled() and x.requires_grad
    loss, _, _ = linear_ce_forward(x, weight, bias, targets, ignore_index, with_dx)
    return loss.sum() / (targets != ignore_index).sum()


# =============================================================================
# Relational attention with position-relative symbols: a fused causal attention (FlashAttention-2 style)
#
# For one head (batch b, head g) with queries and keys q, k (T, h) (RoPE applied), per-position values v (T, Dv)
# (RA: the relation keys, shared by all heads; RCA: none) and a relative table R (2M+1, e) (W_v applied to the
# symbol table first):
#
#     P = dropout(causal softmax(q k^T / sqrt(h))),  o^v_i = sum_j P_ij v_j,  o^R_i = sum_j P_ij R[clip(j-i, -M, M) + M]
#
# A tile of BM queries x BN keys touches the BM + BN - 1 offsets j - i = (j0 - i0) - (BM-1) .. (j0 - i0) + BN-1. The
# tile of P is re-indexed by offset ("skewed", out[r, u] = P[r, u + r - (BM-1)], a register gather) into (BM, W)
# and o^R += skew(P) R_tile with R_tile the W table rows of those offsets: one more matmul, no T x T x e tensor.
# The forward keeps the log-sum-exp (base 2). The backward recomputes P per tile:
#
#     dP_ij = do^v_i . v_j + do^R_i . R[off(i, j)]     (the second term: unskew(do^R R_tile^T))
#     dS = P o (dP - D),  D_i = do_i . o_i;   dq = scale dS k,   dk = scale dS^T q,   dv = P^T do^v
#     dR[o] = sum_i P_{i,i+o} do^R_i                    (a sum along diagonals)
#
# dq over query blocks, dk and dv over key blocks (dv in chunks of the value width, one chunk also doing dk), and dR
# over block diagonals: the tiles (I, I - delta) of one diagonal all touch the same 2B - 1 offsets, so one program
# per (b, g, delta) sums skew(P)^T do^R over them in registers into a (2B, e) partial; the partials are summed over
# the batch and folded onto the table in PyTorch (slices, no scatter, no atomics: deterministic). Dropout keeps P_ij
# with probability 1 - p and scales it by 1/(1 - p); the mask is a function of (seed, b, g, i, j) through Philox
# (16 bits per pair, 8 pairs per call), regenerated in the backward; the seed is drawn from torch's generator on
# the device.
# =============================================================================

RELPOS_CONFIGS = {  # launch settings of the four kernels, for head widths up to the key (python bench_relational.py)
    16: {
        "forward": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_V=128, num_warps=4, num_stages=2),
        "dq": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_V=128, num_warps=4, num_stages=2),
        "dkdv": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_V=128, num_warps=4, num_stages=2),
        "dtable": dict(BLOCK=64, num_warps=4, num_stages=2),
    },
    math.inf: {  # h = 64 in bf16: two stages of 128-wide value chunks overflow the H200's 227 KiB of shared memory
        "forward": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_V=64, num_warps=8, num_stages=1),
        "dq": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_V=64, num_warps=8, num_stages=1),
        "dkdv": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_V=64, num_warps=8, num_stages=1),
        "dtable": dict(BLOCK=64, num_warps=4, num_stages=2),
    },
}


RELPOS_CONFIGS_WIDE_DTYPES = {  # fp32 and fp64 (checks, training without autocast)
    "forward": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_V=64, num_warps=4, num_stages=1),
    "dq": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_V=64, num_warps=4, num_stages=1),
    "dkdv": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_V=64, num_warps=4, num_stages=1),
    "dtable": dict(BLOCK=32, num_warps=4, num_stages=1),
}

if triton is not None:

    @triton.jit
    def _skew(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        """A (BLOCK_M, BLOCK_N) tile of pair values re-indexed by offset: out[r, u] = x[r, u + r - (BLOCK_M-1)]
        (0 where that column is outside the tile), (BLOCK_M, BLOCK_W)."""
        r = tl.arange(0, BLOCK_M)[:, None]
        c = tl.arange(0, BLOCK_W)[None, :] + r - (BLOCK_M - 1)
        gathered = tl.gather(x, tl.minimum(tl.maximum(c, 0), BLOCK_N - 1), axis=1)
        return tl.where((c >= 0) & (c < BLOCK_N), gathered, 0.0)

    @triton.jit
    def _unskew(y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The inverse re-indexing of a (BLOCK_M, BLOCK_W) tile by offset: out[r, c] = y[r, c - r + BLOCK_M - 1]."""
        r = tl.arange(0, BLOCK_M)[:, None]
        c = tl.arange(0, BLOCK_N)[None, :]
        return tl.gather(y, c - r + (BLOCK_M - 1), axis=1)

    @triton.jit
    def _table_tile(tab_ptr, base, M, cols, n_cols, stride,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        """Rows R[clip(o, -M, M) + M] for the offsets o = base - (BLOCK_M-1) + u, u < BLOCK_W, of a tile whose first
        key is base after its first query: (BLOCK_W, len(cols)), 0 past the BLOCK_M + BLOCK_N - 1 offsets."""
        u = tl.arange(0, BLOCK_W)
        rows = tl.minimum(tl.maximum(base - (BLOCK_M - 1) + u, -M), M) + M
        mask = (u[:, None] < BLOCK_M + BLOCK_N - 1) & (cols[None, :] < n_cols)
        return tl.load(tab_ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _softmax_scale(H, ACC: tl.constexpr):
        """1 / sqrt(H), the score scale, in the accumulator dtype (fp64 keeps its precision)."""
        return 1.0 / tl.sqrt(tl.full((), 0, ACC) + H)

    @triton.jit
    def _probs(q, k, lse2, rows, keys, T, qk_scale, PRECISION: tl.constexpr):
        """P = exp2(q k^T * qk_scale - lse2) of a tile, 0 above the diagonal and past T (qk_scale = scale log2 e)."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        causal = (keys[None, :] <= rows[:, None]) & (keys[None, :] < T)
        return tl.where(causal, tl.exp2(s - lse2[:, None]), 0.0)

    @triton.jit
    def _keep(seed_ptr, bh, rows, j0, T, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Which pairs (i, j) of the tile of queries rows and keys j0 .. j0 + BLOCK_N - 1 (j0 a multiple of 8) of head
        bh = b n + g dropout keeps, the same in every kernel: Philox4x32(seed; i T + j - j % 8, bh, 0, 0) gives 128
        random bits per row and 8 consecutive keys, dealt out as eight 16-bit numbers u; (i, j) is kept iff its
        u >= round(dropout_p 2^16) (so the rate is dropout_p to within 2^-17). (BLOCK_M, BLOCK_N) bool."""
        c0 = rows[:, None] * T + (j0 + 8 * tl.arange(0, BLOCK_N // 8))[None, :]
        zero = c0 * 0
        r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr), c0, zero + bh, zero, zero)
        halves01 = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
        halves23 = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
        u = tl.reshape(tl.join(halves01, halves23), (BLOCK_M, BLOCK_N)).to(tl.int32)
        return u >= tl.cast(dropout_p * 65536.0 + 0.5, tl.int32)

    @triton.jit
    def _dp_tile(do_v_ptr, do_r_ptr, v_ptr, tab_ptr, rows, keys, i0, j0, T, DV, DR, M, s_dot, s_drt, s_vt, s_tr, dp,
                 HAS_V: tl.constexpr, HAS_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, NUM_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
                 PRECISION: tl.constexpr):
        """dp + do_i . [v_j || R[off(i, j)]] for a tile (before dropout): the value width in NUM_V chunks, then the
        table term unskewed from do^R R_tile^T (BLOCK_M, BLOCK_W)."""
        if HAS_V:
            for c in tl.static_range(NUM_V):
                cols = c * BLOCK_V + tl.arange(0, BLOCK_V)
                do = _load_tile(do_v_ptr, rows, cols, T, DV, s_dot)
                v = _load_tile(v_ptr, keys, cols, T, DV, s_vt)
                dp = tl.dot(do, tl.trans(v), dp, input_precision=PRECISION)
        if HAS_R:
            cols = tl.arange(0, BLOCK_R)
            do_r = _load_tile(do_r_ptr, rows, cols, T, DR, s_drt)
            tab = _table_tile(tab_ptr, j0 - i0, M, cols, DR, s_tr, BLOCK_M, BLOCK_N, BLOCK_W)
            dp += _unskew(tl.dot(do_r, tl.trans(tab), input_precision=PRECISION), BLOCK_M, BLOCK_N)
        return dp

    @triton.jit
    def _relpos_forward_kernel(q_ptr, k_ptr, v_ptr, tab_ptr, seed_ptr, ov_ptr, or_ptr, lse_ptr,
                               T, n_heads, H, DV, DR, M, dropout_p, first_chunk,
                               s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_th, s_tr,
                               s_ovb, s_ovh, s_ovt, s_orb, s_orh, s_ort,
                               HAS_V: tl.constexpr, HAS_R: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                               STORE_LSE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_W: tl.constexpr, PRECISION: tl.constexpr):
        """o^v (columns of value chunk first_chunk + program_id 2), with HAS_R o^R, and with STORE_LSE the
        log-sum-exp (base 2, into (B n, T)) of BLOCK_M queries (program_id 0) of head program_id 1 = b * n + g.
        Online softmax over the key tiles j0 <= the last query; the dropout mask applies to the accumulated P, the
        softmax sum l to the undropped P, and 1 / (l (1 - p)) at the end."""
        i0 = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b, g = bh // n_heads, bh % n_heads
        rows = i0 + tl.arange(0, BLOCK_M)
        cols_h = tl.arange(0, BLOCK_H)
        cols_v = (first_chunk + tl.program_id(2)) * BLOCK_V + tl.arange(0, BLOCK_V)
        cols_r = tl.arange(0, BLOCK_R)
        k_ptr += b * s_kb + g * s_kh
        v_ptr += b * s_vb + g * s_vh
        tab_ptr += g * s_th
        q = _load_tile(q_ptr + b * s_qb + g * s_qh, rows, cols_h, T, H, s_qt)
        scale = _softmax_scale(H, ACC)
        qk_scale = scale * LOG2E
        m = tl.full((BLOCK_M,), float("-inf"), ACC)
        l = tl.zeros((BLOCK_M,), ACC)
        acc_v = tl.zeros((BLOCK_M, BLOCK_V), ACC)
        acc_r = tl.zeros((BLOCK_M, BLOCK_R), ACC)
        for j0 in range(0, tl.minimum(i0 + BLOCK_M, T), BLOCK_N):
            keys = j0 + tl.arange(0, BLOCK_N)
            k = _load_tile(k_ptr, keys, cols_h, T, H, s_kt)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where((keys[None, :] <= rows[:, None]) & (keys[None, :] < T), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if HAS_DROPOUT:
                p = tl.where(_keep(seed_ptr, bh, rows, j0, T, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
            if HAS_V:
                v = _load_tile(v_ptr, keys, cols_v, T, DV, s_vt)
                acc_v = tl.dot(p.to(v.dtype), v, acc_v * alpha[:, None], input_precision=PRECISION)
            if HAS_R:
                tab = _table_tile(tab_ptr, j0 - i0, M, cols_r, DR, s_tr, BLOCK_M, BLOCK_N, BLOCK_W)
                p_skew = _skew(p, BLOCK_M, BLOCK_N, BLOCK_W).to(tab.dtype)
                acc_r = tl.dot(p_skew, tab, acc_r * alpha[:, None], input_precision=PRECISION)
            m = m_new
        norm = 1.0 / (l * (1.0 - dropout_p))
        in_rows = rows[:, None] < T
        if HAS_V:
            ptrs = ov_ptr + b * s_ovb + g * s_ovh + rows[:, None] * s_ovt + cols_v[None, :]
            tl.store(ptrs, acc_v * norm[:, None], mask=in_rows & (cols_v[None, :] < DV))
        if HAS_R:
            ptrs = or_ptr + b * s_orb + g * s_orh + rows[:, None] * s_ort + cols_r[None, :]
            tl.store(ptrs, acc_r * norm[:, None], mask=in_rows & (cols_r[None, :] < DR))
        if STORE_LSE:
            tl.store(lse_ptr + bh * T + rows, m + tl.log2(l), mask=rows < T)

    @triton.jit
    def _relpos_dq_kernel(q_ptr, k_ptr, v_ptr, tab_ptr, seed_ptr, do_v_ptr, do_r_ptr, lse_ptr, delta_ptr, dq_ptr,
                          T, n_heads, H, DV, DR, M, dropout_p,
                          s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_th, s_tr,
                          s_dovb, s_dovh, s_dovt, s_dorb, s_dorh, s_dort,
                          HAS_V: tl.constexpr, HAS_R: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_V: tl.constexpr, NUM_V: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_W: tl.constexpr, PRECISION: tl.constexpr):
        """dq = scale sum_j dS_ij k_j of BLOCK_M queries (program_id 0) of head program_id 1 (layout of q)."""
        i0 = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b, g = bh // n_heads, bh % n_heads
        rows = i0 + tl.arange(0, BLOCK_M)
        cols_h = tl.arange(0, BLOCK_H)
        k_ptr += b * s_kb + g * s_kh
        v_ptr += b * s_vb + g * s_vh
        tab_ptr += g * s_th
        do_v_ptr += b * s_dovb + g * s_dovh
        do_r_ptr += b * s_dorb + g * s_dorh
        q = _load_tile(q_ptr + b * s_qb + g * s_qh, rows, cols_h, T, H, s_qt)
        lse2 = tl.load(lse_ptr + bh * T + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(delta_ptr + bh * T + rows, mask=rows < T, other=0.0)
        scale = _softmax_scale(H, ACC)
        qk_scale = scale * LOG2E
        dq = tl.zeros((BLOCK_M, BLOCK_H), ACC)
        for j0 in range(0, tl.minimum(i0 + BLOCK_M, T), BLOCK_N):
            keys = j0 + tl.arange(0, BLOCK_N)
            k = _load_tile(k_ptr, keys, cols_h, T, H, s_kt)
            p = _probs(q, k, lse2, rows, keys, T, qk_scale, PRECISION)
            dp = _dp_tile(do_v_ptr, do_r_ptr, v_ptr, tab_ptr, rows, keys, i0, j0, T, DV, DR, M,
                          s_dovt, s_dort, s_vt, s_tr,
                          tl.zeros((BLOCK_M, BLOCK_N), ACC), HAS_V, HAS_R, BLOCK_M, BLOCK_N, BLOCK_V, NUM_V,
                          BLOCK_R, BLOCK_W, PRECISION)
            if HAS_DROPOUT:
                dp = tl.where(_keep(seed_ptr, bh, rows, j0, T, dropout_p, BLOCK_M, BLOCK_N), dp, 0.0)
            ds = p * (dp / (1.0 - dropout_p) - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        ptrs = dq_ptr + b * s_qb + g * s_qh + rows[:, None] * s_qt + cols_h[None, :]
        tl.store(ptrs, dq * scale, mask=(rows[:, None] < T) & (cols_h[None, :] < H))

    @triton.jit
    def _relpos_dkdv_kernel(q_ptr, k_ptr, v_ptr, tab_ptr, seed_ptr, do_v_ptr, do_r_ptr, lse_ptr, delta_ptr,
                            dk_ptr, dv_ptr, T, n_heads, H, DV, DR, M, dropout_p, first_chunk,
                            s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_th, s_tr,
                            s_dovb, s_dovh, s_dovt, s_dorb, s_dorh, s_dort,
                            HAS_V: tl.constexpr, HAS_R: tl.constexpr, HAS_DROPOUT: tl.constexpr, WITH_DK: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_V: tl.constexpr, NUM_V: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_W: tl.constexpr, PRECISION: tl.constexpr):
        """For BLOCK_N keys (program_id 0) of head program_id 1: dv = sum_i P_ij do^v_i over the columns of value
        chunk first_chunk + program_id 2 (into dv, (B, n, T, DV) contiguous, per head) and, WITH_DK,
        dk = scale sum_i dS_ij q_i (layout of k). The query tiles run from the one holding key j0 to T."""
        j0 = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1)
        b, g = bh // n_heads, bh % n_heads
        keys = j0 + tl.arange(0, BLOCK_N)
        cols_h = tl.arange(0, BLOCK_H)
        cols_v = (first_chunk + tl.program_id(2)) * BLOCK_V + tl.arange(0, BLOCK_V)
        q_ptr += b * s_qb + g * s_qh
        v_ptr += b * s_vb + g * s_vh
        tab_ptr += g * s_th
        do_v_ptr += b * s_dovb + g * s_dovh
        do_r_ptr += b * s_dorb + g * s_dorh
        k = _load_tile(k_ptr + b * s_kb + g * s_kh, keys, cols_h, T, H, s_kt)
        scale = _softmax_scale(H, ACC)
        qk_scale = scale * LOG2E
        dk = tl.zeros((BLOCK_N, BLOCK_H), ACC)
        dv = tl.zeros((BLOCK_N, BLOCK_V), ACC)
        for i0 in range((j0 // BLOCK_M) * BLOCK_M, T, BLOCK_M):
            rows = i0 + tl.arange(0, BLOCK_M)
            q = _load_tile(q_ptr, rows, cols_h, T, H, s_qt)
            lse2 = tl.load(lse_ptr + bh * T + rows, mask=rows < T, other=float("inf"))
            p = _probs(q, k, lse2, rows, keys, T, qk_scale, PRECISION)
            if HAS_DROPOUT:
                keep = _keep(seed_ptr, bh, rows, j0, T, dropout_p, BLOCK_M, BLOCK_N)
            if HAS_V:
                do = _load_tile(do_v_ptr, rows, cols_v, T, DV, s_dovt)
                p_drop = p
                if HAS_DROPOUT:
                    p_drop = tl.where(keep, p, 0.0)
                dv = tl.dot(tl.trans(p_drop.to(do.dtype)), do, dv, input_precision=PRECISION)
            if WITH_DK:
                delta = tl.load(delta_ptr + bh * T + rows, mask=rows < T, other=0.0)
                dp = _dp_tile(do_v_ptr, do_r_ptr, v_ptr, tab_ptr, rows, keys, i0, j0, T, DV, DR, M,
                              s_dovt, s_dort, s_vt, s_tr,
                              tl.zeros((BLOCK_M, BLOCK_N), ACC), HAS_V, HAS_R, BLOCK_M, BLOCK_N, BLOCK_V, NUM_V,
                              BLOCK_R, BLOCK_W, PRECISION)
                if HAS_DROPOUT:
                    dp = tl.where(keep, dp, 0.0)
                ds = p * (dp / (1.0 - dropout_p) - delta[:, None])
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
        if HAS_V:
            ptrs = dv_ptr + (bh * T + keys[:, None]) * DV + cols_v[None, :]
            tl.store(ptrs, dv / (1.0 - dropout_p), mask=(keys[:, None] < T) & (cols_v[None, :] < DV))
        if WITH_DK:
            ptrs = dk_ptr + b * s_kb + g * s_kh + keys[:, None] * s_kt + cols_h[None, :]
            tl.store(ptrs, dk * scale, mask=(keys[:, None] < T) & (cols_h[None, :] < H))

    @triton.jit
    def _relpos_dtable_kernel(q_ptr, k_ptr, seed_ptr, do_r_ptr, lse_ptr, part_ptr,
                              T, n_heads, H, DR, dropout_p,
                              s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_dorb, s_dorh, s_dort,
                              HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
        """sum over the tiles (I, I - delta) of block diagonal delta = program_id 0 of head program_id 1 of
        skew(P)^T do^R: part[bh, delta, u] = sum_i P_{i, i+o} do^R_i for the offsets o = -delta BLOCK - (BLOCK-1) + u,
        u < 2 BLOCK (one (2 BLOCK, DR) block of part, (B n, cdiv(T, BLOCK), 2 BLOCK, DR) contiguous)."""
        delta_blocks = tl.program_id(0)
        bh = tl.program_id(1)
        b, g = bh // n_heads, bh % n_heads
        cols_h = tl.arange(0, BLOCK_H)
        cols_r = tl.arange(0, BLOCK_R)
        q_ptr += b * s_qb + g * s_qh
        k_ptr += b * s_kb + g * s_kh
        do_r_ptr += b * s_dorb + g * s_dorh
        scale = _softmax_scale(H, ACC)
        qk_scale = scale * LOG2E
        acc = tl.zeros((2 * BLOCK, BLOCK_R), ACC)
        for j0 in range(0, T - delta_blocks * BLOCK, BLOCK):
            i0 = j0 + delta_blocks * BLOCK
            rows = i0 + tl.arange(0, BLOCK)
            keys = j0 + tl.arange(0, BLOCK)
            q = _load_tile(q_ptr, rows, cols_h, T, H, s_qt)
            k = _load_tile(k_ptr, keys, cols_h, T, H, s_kt)
            lse2 = tl.load(lse_ptr + bh * T + rows, mask=rows < T, other=float("inf"))
            p = _probs(q, k, lse2, rows, keys, T, qk_scale, PRECISION)
            if HAS_DROPOUT:
                p = tl.where(_keep(seed_ptr, bh, rows, j0, T, dropout_p, BLOCK, BLOCK), p, 0.0)
            do_r = _load_tile(do_r_ptr, rows, cols_r, T, DR, s_dort)
            p_skew = _skew(p, BLOCK, BLOCK, 2 * BLOCK).to(do_r.dtype)
            acc = tl.dot(tl.trans(p_skew), do_r, acc, input_precision=PRECISION)
        u = tl.arange(0, 2 * BLOCK)
        ptrs = part_ptr + ((bh * tl.num_programs(0) + delta_blocks) * 2 * BLOCK + u[:, None]) * DR + cols_r[None, :]
        tl.store(ptrs, acc / (1.0 - dropout_p), mask=cols_r[None, :] < DR)


# -----------------------------------------------------------------------------
# launches of the relational kernels

def _relpos_configs(q, table):
    """The launch settings for the widths of q and the table (the larger picks the bucket of RELPOS_CONFIGS); fp32
    and fp64 take RELPOS_CONFIGS_WIDE_DTYPES (tiles that fit shared memory at twice or four times the bytes)."""
    if q.element_size() > 2:
        return RELPOS_CONFIGS_WIDE_DTYPES
    width = max(q.shape[-1], 0 if table is None else table.shape[-1])
    return RELPOS_CONFIGS[min(key for key in RELPOS_CONFIGS if key >= width)]


def _table_args(q, table):
    """(width e, the table or a stand-in pointer, its head and row strides) of a table or of none."""
    return (0, q, 0, 0) if table is None else (table.shape[-1], table, *table.stride()[:2])


def _pow2(x):
    """The tile width holding x columns: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(x))


def _relpos_common(q, cfg, dropout_p):
    """Constexprs every relational kernel takes: accumulator dtype (fp64 for fp64 inputs, else fp32), matmul
    precision (near-fp32 accuracy for fp32 on tensor cores), dropout flag, launch options."""
    precision = {torch.float64: "ieee", torch.float32: "tf32x3"}.get(q.dtype, "tf32")
    return dict(cfg, HAS_DROPOUT=dropout_p > 0, ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
                BLOCK_H=_pow2(q.shape[-1]), PRECISION=precision)


def _head_strides(x, n_heads):
    """Batch, head and row strides of a (B, n or 1, T, D) tensor; a single head is broadcast (head stride 0)."""
    return x.stride(0), (x.stride(1) if x.shape[1] == n_heads else 0), x.stride(2)


def _value_chunks(cfg, dv):
    """(BLOCK_V, number of chunks): the value width dv in chunks of at most cfg's BLOCK_V columns."""
    block_v = min(cfg.pop("BLOCK_V"), _pow2(dv))
    return block_v, triton.cdiv(dv, block_v)


def _relpos_forward(q, k, v, table, seed, max_rel_pos, dropout_p, cfg=None):
    """o^v (B, n, T, Dv), o^R (B, n, T, e) (e = 0 without a table), both laid out (B, T, n, .), and the base-2
    log-sum-exp (B n, T)."""
    cfg = dict(cfg or _relpos_configs(q, table)["forward"])
    B, n, T, H = q.shape
    dv = 0 if v is None else v.shape[-1]
    dr, table_, *table_strides = _table_args(q, table)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    o_v = q.new_empty(B, T, n, dv).transpose(1, 2)
    o_r = q.new_empty(B, T, n, dr).transpose(1, 2)
    lse = torch.empty(B * n, T, device=q.device, dtype=acc_dtype)
    block_v, n_chunks = _value_chunks(cfg, dv)
    v_ = q if v is None else v
    args = (q, k, v_, table_, q if seed is None else seed, o_v, o_r, lse, T, n, H, dv, dr, max_rel_pos, dropout_p)
    strides = (*q.stride()[:3], *k.stride()[:3], *_head_strides(v_, n), *table_strides, *o_v.stride()[:3],
               *o_r.stride()[:3])
    common = dict(_relpos_common(q, cfg, dropout_p), BLOCK_V=block_v, BLOCK_R=_pow2(dr),
                  BLOCK_W=triton.next_power_of_2(cfg["BLOCK_M"] + cfg["BLOCK_N"] - 1))
    rows = triton.cdiv(T, cfg["BLOCK_M"])
    if n_chunks > 1:  # all value chunks but the last: o^v only
        _relpos_forward_kernel[(rows, B * n, n_chunks - 1)](*args, 0, *strides, HAS_V=True, HAS_R=False,
                                                             STORE_LSE=False, **common)
    _relpos_forward_kernel[(rows, B * n, 1)](*args, max(n_chunks - 1, 0), *strides, HAS_V=dv > 0, HAS_R=dr > 0,
                                             STORE_LSE=True, **common)
    return o_v, o_r, lse


def _fold_table_grad(part, batch, T, max_rel_pos):
    """dR (n, 2M+1, e) from the per-diagonal partials (B n, D, 2 BLOCK, e) of _relpos_dtable_kernel.

    Entry u of diagonal d holds the lag i - j = d BLOCK + BLOCK-1 - u: the first half lags d BLOCK .. d BLOCK + BLOCK-1,
    the second half the block before (lags of diagonal 0's second half are negative: 0 by causality). Lag t is
    the offset -t, table row M - t, and every lag beyond M is row 0."""
    n_diag, width, dr = part.shape[1:]
    halves = part.view(batch, -1, n_diag, 2, width // 2, dr).sum(0).flip(-2)  # (n, D, 2, BLOCK, e), lags ascending
    by_lag = halves[:, :, 0].clone()
    by_lag[:, :-1] += halves[:, 1:, 1]
    by_lag = by_lag.flatten(1, 2)[:, :T]  # (n, T, e)
    grad = by_lag.new_zeros(by_lag.shape[0], 2 * max_rel_pos + 1, dr)
    kept = min(T, max_rel_pos + 1)
    grad[:, max_rel_pos + 1 - kept:max_rel_pos + 1] = by_lag[:, :kept].flip(1)
    if T > max_rel_pos + 1:
        grad[:, 0] += by_lag[:, max_rel_pos + 1:].sum(1)
    return grad


def _relpos_backward(do_v, do_r, q, k, v, table, seed, o_v, o_r, lse, max_rel_pos, dropout_p, cfgs=None):
    """dq, dk (layouts of q, k), dv (B, 1 or n, T, Dv; empty without v), dR (n, 2M+1, e; empty without a table)."""
    cfgs = cfgs or _relpos_configs(q, table)
    B, n, T, H = q.shape
    dv = 0 if v is None else v.shape[-1]
    dr, table_, *table_strides = _table_args(q, table)
    acc_dtype = lse.dtype
    delta = ((do_r.to(acc_dtype) * o_r.to(acc_dtype)).sum(-1)  # D_i = do_i . o_i: (B, n, T)
             + (do_v.to(acc_dtype) * o_v.to(acc_dtype)).sum(-1)).contiguous()
    v_ = q if v is None else v
    seed_ = q if seed is None else seed
    do_v_ = do_r if v is None else do_v
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dv_heads = torch.empty(B, n, T, dv, device=q.device, dtype=acc_dtype)
    sizes = (T, n, H, dv, dr, max_rel_pos, dropout_p)
    strides = (*q.stride()[:3], *k.stride()[:3], *_head_strides(v_, n), *table_strides,
               *_head_strides(do_v_, n), *do_r.stride()[:3])
    br = _pow2(dr)

    cfg = dict(cfgs["dq"])
    block_v, n_chunks = _value_chunks(cfg, dv)
    common = dict(_relpos_common(q, cfg, dropout_p), HAS_V=dv > 0, HAS_R=dr > 0, BLOCK_V=block_v, NUM_V=n_chunks,
                  BLOCK_R=br, BLOCK_W=triton.next_power_of_2(cfg["BLOCK_M"] + cfg["BLOCK_N"] - 1))
    _relpos_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * n)](
        q, k, v_, table_, seed_, do_v_, do_r, lse, delta, dq, *sizes, *strides, **common)

    cfg = dict(cfgs["dkdv"])
    block_v, n_chunks = _value_chunks(cfg, dv)
    common = dict(_relpos_common(q, cfg, dropout_p), HAS_R=dr > 0, BLOCK_V=block_v, NUM_V=n_chunks, BLOCK_R=br,
                  BLOCK_W=triton.next_power_of_2(cfg["BLOCK_M"] + cfg["BLOCK_N"] - 1))
    args = (q, k, v_, table_, seed_, do_v_, do_r, lse, delta, dk, dv_heads, *sizes)
    keys = triton.cdiv(T, cfg["BLOCK_N"])
    if n_chunks > 1:  # all value chunks but the last: dv only
        _relpos_dkdv_kernel[(keys, B * n, n_chunks - 1)](*args, 0, *strides, HAS_V=True, WITH_DK=False, **common)
    _relpos_dkdv_kernel[(keys, B * n, 1)](*args, max(n_chunks - 1, 0), *strides, HAS_V=dv > 0, WITH_DK=True,
                                          **common)

    d_table = q.new_empty(0)
    if table is not None:
        cfg = dict(cfgs["dtable"])
        block = cfg.pop("BLOCK")
        n_diag = triton.cdiv(T, block)
        part = torch.empty(B * n, n_diag, 2 * block, dr, device=q.device, dtype=acc_dtype)
        _relpos_dtable_kernel[(n_diag, B * n)](
            q, k, seed_, do_r, lse, part, T, n, H, dr, dropout_p, *q.stride()[:3], *k.stride()[:3],
            *do_r.stride()[:3], **_relpos_common(q, cfg, dropout_p), BLOCK=block, BLOCK_R=br)
        d_table = _fold_table_grad(part, B, T, max_rel_pos).to(table.dtype)
    if v is None:
        return dq, dk, q.new_empty(0), d_table
    d_v = dv_heads.sum(1, keepdim=True) if v.shape[1] == 1 else dv_heads
    return dq, dk, d_v.to(v.dtype), d_table


# -----------------------------------------------------------------------------
# the relational custom ops and their autograd

@torch.library.custom_op("dat::relpos_attention_forward", mutates_args=())
def relpos_attention_forward(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor],
                             table: Optional[torch.Tensor],
                             seed: Optional[torch.Tensor], max_rel_pos: int,
                             dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """o^v_i = sum_j P_ij v_j (B, n, T, Dv; (B, n, T, 0) without v), o^R_i = sum_j P_ij R[clip(j-i, -M, M) + M]
    (B, n, T, e; (B, n, T, 0) without a table), P = dropout(causal softmax(q k^T / sqrt(h))), and the base-2
    log-sum-exp (B n, T). q, k (B, n, T, h), v (B, 1 or n, T, Dv) (one head: shared by all), table R (n, 2M+1, e),
    in one dtype with unit last strides; seed: an int64 tensor of one element (None: no dropout)."""
    return _relpos_forward(q, k, v, table, seed, max_rel_pos, dropout_p)


@relpos_attention_forward.register_fake
def _(q, k, v, table, seed, max_rel_pos, dropout_p):
    B, n, T, _ = q.shape
    o_v = q.new_empty(B, T, n, 0 if v is None else v.shape[-1]).transpose(1, 2)
    o_r = q.new_empty(B, T, n, 0 if table is None else table.shape[-1]).transpose(1, 2)
    return o_v, o_r, q.new_empty(B * n, T, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("dat::relpos_attention_backward", mutates_args=())
def relpos_attention_backward(do_v: torch.Tensor, do_r: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: Optional[torch.Tensor], table: Optional[torch.Tensor],
                              seed: Optional[torch.Tensor],
                              o_v: torch.Tensor, o_r: torch.Tensor, lse: torch.Tensor,
                              max_rel_pos: int, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]:
    """Gradients of q, k, v and table (each empty where absent), given those of o^v and o^R."""
    return _relpos_backward(do_v, do_r, q, k, v, table, seed, o_v, o_r, lse, max_rel_pos, dropout_p)


@relpos_attention_backward.register_fake
def _(do_v, do_r, q, k, v, table, seed, o_v, o_r, lse, max_rel_pos, dropout_p):
    d_v = q.new_empty(0) if v is None else v.new_empty(v.shape)
    d_table = q.new_empty(0) if table is None else table.new_empty(table.shape)
    return torch.empty_like(q), torch.empty_like(k), d_v, d_table


def _relpos_setup_context(ctx, inputs, output):
    q, k, v, table, seed, max_rel_pos, dropout_p = inputs
    o_v, o_r, lse = output
    ctx.save_for_backward(q, k, v, table, seed, o_v, o_r, lse)
    ctx.max_rel_pos, ctx.dropout_p = max_rel_pos, dropout_p


def _relpos_backward_autograd(ctx, grad_o_v, grad_o_r, grad_lse):
    """The lse is an internal output: its gradient is ignored."""
    q, k, v, table, seed, o_v, o_r, lse = ctx.saved_tensors
    grad_o_v = torch.zeros_like(o_v) if grad_o_v is None else _unit_last_stride(grad_o_v)
    grad_o_r = torch.zeros_like(o_r) if grad_o_r is None else _unit_last_stride(grad_o_r)
    dq, dk, dv, d_table = relpos_attention_backward(grad_o_v, grad_o_r, q, k, v, table, seed, o_v, o_r, lse,
                                                    ctx.max_rel_pos, ctx.dropout_p)
    return dq, dk, (None if v is None else dv), (None if table is None else d_table), None, None, None


relpos_attention_forward.register_autograd(_relpos_backward_autograd, setup_context=_relpos_setup_context)


def _unit_last_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def relative_position_attention(q, k, v, table, max_rel_pos=0, dropout_p=0.0):
    """Causal attention with position-relative values, fused (no T x T tensor): (o^v, o^R) with

        P = dropout(causal softmax(q k^T / sqrt(h))),  o^v_i = sum_j P_ij v_j,
        o^R_i = sum_j P_ij R[clip(j - i, -M, M) + M].

    q, k (B, n, T, h); v (B, 1 or n, T, Dv) per-position values (one head: shared by all heads, at no copy) or
    None; table R (n, 2M+1, e) with M = max_rel_pos, or None (then this is plain causal attention over v). Returns
    o^v (B, n, T, Dv) and o^R (B, n, T, e) (None where v or the table is), laid out (B, T, n, .) so that merging
    heads is a view. Inputs are cast to the dtype of q. The dropout seed is drawn from torch's generator of q's
    device. Needs Triton (CUDA tensors, or the interpreter)."""
    if v is None and table is None:
        raise ValueError("relative_position_attention needs values v, a relative table, or both")
    if table is not None and table.shape[1] != 2 * max_rel_pos + 1:
        raise ValueError(f"the relative table has {table.shape[1]} rows, not 2 max_rel_pos + 1 = {2 * max_rel_pos + 1}")
    widths = [q.shape[-1]] + [t.shape[-1] for t in (v, table) if t is not None]
    if q.shape[:-1].numel() * max(widths) >= 2**31:
        raise ValueError("relative_position_attention indexes with 32-bit offsets: B n T times the widest width "
                         "must stay below 2^31")
    dtype = q.dtype
    k = _unit_last_stride(k.to(dtype))
    v, table = (None if t is None else _unit_last_stride(t.to(dtype)) for t in (v, table))
    seed = torch.randint(2**62, (1,), device=q.device) if dropout_p > 0 else None
    o_v, o_r, _ = relpos_attention_forward(_unit_last_stride(q), k, v, table, seed, max_rel_pos,
                                           float(dropout_p))
    return (None if v is None else o_v), (None if table is None else o_r)
