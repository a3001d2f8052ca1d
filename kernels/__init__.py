"""
The Triton kernels of the models, one file each: cross_entropy.py (the output layer fused with the cross-entropy
loss, no N x V logits) and relational.py (causal attention with position-relative values, no T x T weights);
common.py holds what they share.

The names below are what model.py, attention.py, the tests and the benches use. The launch settings (CONFIGS,
MAX_ROW_BYTES, RELPOS_CONFIGS, ...) are read from their own modules at every call: replace them there
(kernels.cross_entropy.CONFIGS = ...), not here.
"""

from .common import HAS_TRITON, INTERPRET, triton
from .cross_entropy import (CONFIGS, MAX_ROW_BYTES, launch_dw, launch_forward, linear_ce_backward, linear_ce_forward,
                            linear_cross_entropy, linear_cross_entropy_eager)
from .relational import (RELPOS_CONFIGS, RELPOS_CONFIGS_WIDE_DTYPES, relative_position_attention,
                         relpos_attention_backward, relpos_attention_forward)

__all__ = ["HAS_TRITON", "INTERPRET", "triton", "CONFIGS", "MAX_ROW_BYTES", "launch_dw", "launch_forward",
           "linear_ce_backward", "linear_ce_forward", "linear_cross_entropy", "linear_cross_entropy_eager",
           "RELPOS_CONFIGS", "RELPOS_CONFIGS_WIDE_DTYPES", "relative_position_attention", "relpos_attention_backward",
           "relpos_attention_forward"]
