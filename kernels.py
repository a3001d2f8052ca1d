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
