"""Make the top-level modules (model, attention, ...) importable from any directory; without a GPU, Triton kernels
run in the Triton interpreter. The fixtures of the toy corpus and of a finished run (toy_runs.py) live here."""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter, whichever test imports kernels.py first
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import toy_runs  # noqa: E402 (after the path)


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
