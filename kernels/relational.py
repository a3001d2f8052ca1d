"""
Relational attention with position-relative symbols: a fused causal attention in Triton (FlashAttention-2 style).

For one head (batch b, head g) with queries and keys q, k (T, h) (RoPE applied), per-position values v (T, Dv)
(RA: the relation keys, shared by all heads; RCA: none) and a relative table R (2M+1, e) (W_v applied to the
symbol table first):

    P = dropout(causal softmax(q k^T / sqrt(h))),  o^v_i = sum_j P_ij v_j,  o^R_i = sum_j P_ij R[clip(j-i, -M, M) + M]

A tile of BM queries x BN keys touches the BM + BN - 1 offsets j - i = (j0 - i0) - (BM-1) .. (j0 - i0) + BN-1. The
tile of P is re-indexed by offset ("skewed", out[r, u] = P[r, u + r - (BM-1)], a register gather) into (BM, W)
and o^R += skew(P) R_tile with R_tile the W table rows of those offsets: one more matmul, no T x T x e tensor.
The forward keeps the log-sum-exp (base 2). The backward recomputes P per tile:

    dP_ij = do^v_i . v_j + do^R_i . R[off(i, j)]     (the second term: unskew(do^R R_tile^T))
    dS = P o (dP - D),  D_i = do_i . o_i;   dq = scale dS k,   dk = scale dS^T q,   dv = P^T do^v
    dR[o] = sum_i P_{i,i+o} do^R_i                    (a sum along diagonals)

dq over query blocks, dk and dv over key blocks (dv in chunks of the value width, one chunk also doing dk), and dR
over block diagonals: the tiles (I, I - delta) of one diagonal all touch the same 2B - 1 offsets, so one program
per (b, g, delta) sums skew(P)^T do^R over them in registers into a (2B, e) partial; the partials are summed over
the batch and folded onto the table in PyTorch (slices, no scatter, no atomics: deterministic). Dropout keeps P_ij
with probability 1 - p and scales it by 1/(1 - p); the mask is a function of (seed, b, g, i, j) through Philox
(16 bits per pair, 8 pairs per call), regenerated in the backward; the seed is drawn from torch's generator on
the device.

relative_position_attention() needs Triton (CUDA tensors, or the interpreter); `python -m bench.relational` checks and
times the kernels on a GPU.
"""

import math
from typing import Optional

import torch

from .common import triton, tl

if triton is not None:
    from .common import LOG2E, load_tile

RELPOS_CONFIGS = {  # launch settings of the four kernels, for head widths up to the key (python -m bench.relational)
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
                do = load_tile(do_v_ptr, rows, cols, T, DV, s_dot)
                v = load_tile(v_ptr, keys, cols, T, DV, s_vt)
                dp = tl.dot(do, tl.trans(v), dp, input_precision=PRECISION, out_dtype=dp.dtype)
        if HAS_R:
            cols = tl.arange(0, BLOCK_R)
            do_r = load_tile(do_r_ptr, rows, cols, T, DR, s_drt)
            tab = _table_tile(tab_ptr, j0 - i0, M, cols, DR, s_tr, BLOCK_M, BLOCK_N, BLOCK_W)
            dp += _unskew(tl.dot(do_r, tl.trans(tab), input_precision=PRECISION, out_dtype=dp.dtype), BLOCK_M, BLOCK_N)
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
        q = load_tile(q_ptr + b * s_qb + g * s_qh, rows, cols_h, T, H, s_qt)
        scale = _softmax_scale(H, ACC)
        qk_scale = scale * LOG2E
        m = tl.full((BLOCK_M,), float("-inf"), ACC)
        l = tl.zeros((BLOCK_M,), ACC)
        acc_v = tl.zeros((BLOCK_M, BLOCK_V), ACC)
        acc_r = tl.zeros((BLOCK_M, BLOCK_R), ACC)
        for j0 in range(0, tl.minimum(i0 + BLOCK_M, T), BLOCK_N):
            keys = j0 + tl.arange(0, BLOCK_N)
            k = load_tile(k_ptr, keys, cols_h, T, H, s_kt)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where((keys[None, :] <= rows[:, None]) & (keys[None, :] < T), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if HAS_DROPOUT:
                p = tl.where(_keep(seed_ptr, bh, rows, j0, T, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
            if HAS_V:
                v = load_tile(v_ptr, keys, cols_v, T, DV, s_vt)
                acc_v = tl.dot(p.to(v.dtype), v, acc_v * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
            if HAS_R:
                tab = _table_tile(tab_ptr, j0 - i0, M, cols_r, DR, s_tr, BLOCK_M, BLOCK_N, BLOCK_W)
                p_skew = _skew(p, BLOCK_M, BLOCK_N, BLOCK_W).to(tab.dtype)
                acc_r = tl.dot(p_skew, tab, acc_r * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
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
        q = load_tile(q_ptr + b * s_qb + g * s_qh, rows, cols_h, T, H, s_qt)
        lse2 = tl.load(lse_ptr + bh * T + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(delta_ptr + bh * T + rows, mask=rows < T, other=0.0)
        scale = _softmax_scale(H, ACC)
        qk_scale = scale * LOG2E
        dq = tl.zeros((BLOCK_M, BLOCK_H), ACC)
        for j0 in range(0, tl.minimum(i0 + BLOCK_M, T), BLOCK_N):
            keys = j0 + tl.arange(0, BLOCK_N)
            k = load_tile(k_ptr, keys, cols_h, T, H, s_kt)
            p = _probs(q, k, lse2, rows, keys, T, qk_scale, PRECISION)
            dp = _dp_tile(do_v_ptr, do_r_ptr, v_ptr, tab_ptr, rows, keys, i0, j0, T, DV, DR, M,
                          s_dovt, s_dort, s_vt, s_tr,
                          tl.zeros((BLOCK_M, BLOCK_N), ACC), HAS_V, HAS_R, BLOCK_M, BLOCK_N, BLOCK_V, NUM_V,
                          BLOCK_R, BLOCK_W, PRECISION)
            if HAS_DROPOUT:
                dp = tl.where(_keep(seed_ptr, bh, rows, j0, T, dropout_p, BLOCK_M, BLOCK_N), dp, 0.0)
            ds = p * (dp / (1.0 - dropout_p) - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=ACC)
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
        k = load_tile(k_ptr + b * s_kb + g * s_kh, keys, cols_h, T, H, s_kt)
        scale = _softmax_scale(H, ACC)
        qk_scale = scale * LOG2E
        dk = tl.zeros((BLOCK_N, BLOCK_H), ACC)
        dv = tl.zeros((BLOCK_N, BLOCK_V), ACC)
        for i0 in range((j0 // BLOCK_M) * BLOCK_M, T, BLOCK_M):
            rows = i0 + tl.arange(0, BLOCK_M)
            q = load_tile(q_ptr, rows, cols_h, T, H, s_qt)
            lse2 = tl.load(lse_ptr + bh * T + rows, mask=rows < T, other=float("inf"))
            p = _probs(q, k, lse2, rows, keys, T, qk_scale, PRECISION)
            if HAS_DROPOUT:
                keep = _keep(seed_ptr, bh, rows, j0, T, dropout_p, BLOCK_M, BLOCK_N)
            if HAS_V:
                do = load_tile(do_v_ptr, rows, cols_v, T, DV, s_dovt)
                p_drop = p
                if HAS_DROPOUT:
                    p_drop = tl.where(keep, p, 0.0)
                dv = tl.dot(tl.trans(p_drop.to(do.dtype)), do, dv, input_precision=PRECISION, out_dtype=ACC)
            if WITH_DK:
                delta = tl.load(delta_ptr + bh * T + rows, mask=rows < T, other=0.0)
                dp = _dp_tile(do_v_ptr, do_r_ptr, v_ptr, tab_ptr, rows, keys, i0, j0, T, DV, DR, M,
                              s_dovt, s_dort, s_vt, s_tr,
                              tl.zeros((BLOCK_M, BLOCK_N), ACC), HAS_V, HAS_R, BLOCK_M, BLOCK_N, BLOCK_V, NUM_V,
                              BLOCK_R, BLOCK_W, PRECISION)
                if HAS_DROPOUT:
                    dp = tl.where(keep, dp, 0.0)
                ds = p * (dp / (1.0 - dropout_p) - delta[:, None])
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION, out_dtype=ACC)
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
            q = load_tile(q_ptr, rows, cols_h, T, H, s_qt)
            k = load_tile(k_ptr, keys, cols_h, T, H, s_kt)
            lse2 = tl.load(lse_ptr + bh * T + rows, mask=rows < T, other=float("inf"))
            p = _probs(q, k, lse2, rows, keys, T, qk_scale, PRECISION)
            if HAS_DROPOUT:
                p = tl.where(_keep(seed_ptr, bh, rows, j0, T, dropout_p, BLOCK, BLOCK), p, 0.0)
            do_r = load_tile(do_r_ptr, rows, cols_r, T, DR, s_dort)
            p_skew = _skew(p, BLOCK, BLOCK, 2 * BLOCK).to(do_r.dtype)
            acc = tl.dot(tl.trans(p_skew), do_r, acc, input_precision=PRECISION, out_dtype=ACC)
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


def _relpos_forward(q, k, v, table, seed, max_rel_pos, dropout_p):
    """o^v (B, n, T, Dv), o^R (B, n, T, e) (e = 0 without a table), both laid out (B, T, n, .), and the base-2
    log-sum-exp (B n, T)."""
    cfg = dict(_relpos_configs(q, table)["forward"])
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


def _relpos_backward(do_v, do_r, q, k, v, table, seed, o_v, o_r, lse, max_rel_pos, dropout_p):
    """dq, dk (layouts of q, k), dv (B, 1 or n, T, Dv; empty without v), dR (n, 2M+1, e; empty without a table)."""
    cfgs = _relpos_configs(q, table)
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
