"""
Export a trained model to the Hugging Face format of the authors' `dual-attention` package:

    python export.py --ckpt_path out/<run name> --out_dir exported/dat-d64-L4

writes exported/dat-d64-L4/config.json (the keyword arguments of their DualAttnTransformerLM or TransformerLM)
and model.safetensors. Their package then loads it (and can push it to the hub with push_to_hub):

    from dual_attention.hf import DualAttnTransformerLM_HFHub
    model = DualAttnTransformerLM_HFHub.from_pretrained("exported/dat-d64-L4")

and so does ours: reference.load_model("exported/dat-d64-L4"). Only the 'current' architecture exists in their
package; a paper-era model (--arch paper) is refused.
"""

import argparse
import os
import sys

from reference import load_model, save_hf_directory

HF_CLASSES = {"DualAttnTransformerLM": "DualAttnTransformerLM_HFHub", "TransformerLM": "TransformerLM_HFHub"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True,
                        help="a run directory or ckpt.pt (ours or the authors' train.py), or a Hugging Face directory")
    parser.add_argument("--out_dir", required=True, help="directory to write config.json and model.safetensors to")
    args = parser.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        print(f"error: --out_dir {args.out_dir} is a file", file=sys.stderr)
        return 1
    try:
        model = load_model(args.ckpt_path)
        kind = save_hf_directory(model, args.out_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.join(args.out_dir, 'config.json')} and {os.path.join(args.out_dir, 'model.safetensors')} "
          f"({model.num_params():,} parameters)")
    print(f"load with: from dual_attention.hf import {HF_CLASSES[kind]}; "
          f"{HF_CLASSES[kind]}.from_pretrained({args.out_dir!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
