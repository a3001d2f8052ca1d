"""Make the top-level modules (model, attention, ...) importable from any directory; without a GPU, Triton kernels
run in the Triton interpreter (patched for bf16 matmuls); tests marked `triton` skip where the kernels cannot run.
The fixtures of the toy corpus and of a finished run (toy_runs.py) live here."""
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


import toy_runs  # noqa: E402 (after the path)


@pytest.fixture(autouse=True)
def float32_matmul_precision():
    """train.main on CUDA allows TF32 matmuls for its process: undo that after each test run in this process."""
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The toy corpus: JSON shards, tok300.model and its uint16 shards (toy_runs.make_toy_data)."""
    return toy_runs.make_toy_data(tmp_path_factory.mktemp("toy_data"))


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory):
    """A finished 4-step Transformer run with a checkpoint at step 4 (written by --always_save_checkpoint). Tests
    that write into a run copy it first."""
    out = tmp_path_factory.mktemp("trained")
    argv = toy_runs.args_for(data_dir, out, toy_runs.TRANSFORMER, *toy_runs.CONSTANT_LR, "--max_iters", 4,
                             "--eval_interval", 2, "--always_save_checkpoint", 1)
    assert toy_runs.train.main(argv) == 0
    return toy_runs.the_run_dir(out)
