"""Make the top-level modules (model, attention, ...) importable from any directory; without a GPU, Triton kernels
run in the Triton interpreter (patched for bf16 matmuls); tests marked `triton` skip where the kernels cannot run."""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # read as kernels/ decorates its kernels: set before any test imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def patch_interpreter():
    """A gap of Triton's interpreter (3.6 to 3.9): tl.dot multiplies bf16 operands as their raw uint16 bits (here
    they are widened to fp32 first, exact)."""
    import triton.language as tl
    from triton.runtime import interpreter
    create_dot = interpreter.InterpreterBuilder.create_dot

    def patched_dot(self, a, b, *args):
        if a.dtype.scalar == tl.bfloat16:
            a, b = self.cast_impl(a, tl.float32), self.cast_impl(b, tl.float32)
        return create_dot(self, a, b, *args)

    interpreter.InterpreterBuilder.create_dot = patched_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        patch_interpreter()
    except ImportError:  # no triton: the triton tests skip
        pass


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: needs the Triton kernels (a GPU, or the interpreter on a CPU)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("triton") is None:
        return
    import kernels
    if kernels.triton is None:
        pytest.skip("triton is not installed")
    if not kernels.HAS_TRITON:
        pytest.skip("no GPU, and TRITON_INTERPRET is not 1")
