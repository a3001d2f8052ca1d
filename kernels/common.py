"""
What the Triton kernels share: the triton import, whether the kernels can run here, and a tile loader.

Triton runs kernels on CUDA tensors, or on CPU tensors in its interpreter (TRITON_INTERPRET=1, read when the
kernels are decorated: set it before importing kernels). Without triton, or on a CPU outside the interpreter,
HAS_TRITON is False and the callers take their PyTorch paths.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch paths
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = triton is not None and (torch.cuda.is_available() or INTERPRET)

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = 2^(x log2 e): exp2 is the fast instruction

    @triton.jit
    def load_tile(ptr, rows, cols, n_rows, n_cols, stride):
        """ptr[rows, cols] of a row-major (n_rows, n_cols) matrix as a (len(rows), len(cols)) tile, 0 outside."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)
