"""
Export a trained model to the Hugging Face format of the authors' `dual-attention` package:

    python export.py --ckpt_path out/<run name> --out_dir exported/dat-d64-L4

writes exported/dat-d64-L4/config.json (the keyword arguments of their DualAttnTransformerLM or TransformerLM)
and model.safetensors. Their package then loads it (and can push it to the hub with push_to_hub):

    from dual_attention.hf import DualAttnTransformerLM_HFHub
    model = DualAttnTransformerLM_HFHub.from_pretrained("exported/dat-d64-L4")

and so does ours: checkpoints.load_model("exported/dat-d64-L4"), and so every script's --ckpt_path. Only the
'current' architecture exists in their package; a paper-era model (--arch paper) is refused.
"""

import argparse
import os
import sys

from checkpoints import PATH_HELP, load_model
from reference import HF_CONFIG, HF_WEIGHTS, save_hf_directory
from runtime import RunError, one_line_errors

HF_CLASSES = {"DualAttnTransformerLM": "DualAttnTransformerLM_HFHub", "TransformerLM": "TransformerLM_HFHub"}


@one_line_errors(OSError, ValueError)
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--ckpt_path", required=True, help=PATH_HELP)
    parser.add_argument("--out_dir", required=True, help=f"directory to write {HF_CONFIG} and {HF_WEIGHTS} to")
    args = parser.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise RunError(f"--out_dir {args.out_dir} is a file")
    model, _ = load_model(args.ckpt_path)
    kind = save_hf_directory(model, args.out_dir)
    print(f"wrote {os.path.join(args.out_dir, HF_CONFIG)} and {os.path.join(args.out_dir, HF_WEIGHTS)} "
          f"({model.num_params():,} parameters)")
    print(f"load with: from dual_attention.hf import {HF_CLASSES[kind]}; "
          f"{HF_CLASSES[kind]}.from_pretrained({args.out_dir!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
