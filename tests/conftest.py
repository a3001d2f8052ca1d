"""Make the top-level modules (model, attention, ...) importable from any directory; without a GPU, Triton kernels
run in the Triton interpreter."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter, whichever test imports kernels.py first
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
