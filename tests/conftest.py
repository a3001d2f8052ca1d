"""Make the top-level modules (model, attention, ...) and the test helpers importable from any directory; without
a GPU, Triton kernels run in the Triton interpreter."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter, whichever test imports kernels.py first
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS = Path(__file__).resolve().parent
for path in (TESTS.parent, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
