"""
Export a trained model to the Hugging Face format of the authors' `dual-attention` package:

    python export.py --ckpt_path out/<run name> --out_dir exported/dat-d64-L4

writes exported/dat-d64-L4/config.json (the keyword arguments of their DualAttnTransformerLM or TransformerLM)
and model.safetensors. Their package then loads it (and can push it to the hub with push_to_hub):

    from dual_attention.hf import DualAttnTransformerLM_HFHub
    model = DualAttnTransformerLM_HFHub.from_pretrained("exported/dat-d64-L4")

and so does ours: checkpoints.load_model("exported/dat-d64-L4"), and so every script's --ckpt_path. A paper-era
model (--arch paper) is refused: their classes always end with a LayerNorm and tie the output layer to the token
embedding, and the paper-era model has neither, so no config.json of theirs describes it.
--out_dir is a new or empty directory, or a previous export (its files are replaced); a run directory of train.py
or any other non-empty directory is refused, so an export never overwrites a file it did not write.
"""

import os
import sys

from checkpoints import CHECKPOINT_FILE, PATH_HELP, TOKENIZER_FILE, load_model
from reference import HF_CONFIG, HF_WEIGHTS, is_hf_config, save_hf_directory
from runs import LOCK_FILE, METRICS_FILE
from runtime import Parser, RunError, one_line_errors

HF_CLASSES = {"DualAttnTransformerLM": "DualAttnTransformerLM_HFHub", "TransformerLM": "TransformerLM_HFHub"}
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, LOCK_FILE)  # what only a run directory of train.py holds
EXPORT_FILES = (HF_CONFIG, HF_WEIGHTS, TOKENIZER_FILE)  # what a previous export holds (a tokenizer the user added)


def check_out_dir(out_dir):
    """RunError unless `out_dir` may receive the export: absent, empty, or a previous export."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise RunError(f"--out_dir {out_dir} is a file")
    names = sorted(os.listdir(out_dir))
    run_files = [name for name in names if name in RUN_FILES]
    if run_files:
        raise RunError(f"--out_dir {out_dir} is a run directory of train.py (it holds {', '.join(run_files)}): an "
                       f"export never writes into a run; give a new or empty directory")
    others = [name for name in names if name not in EXPORT_FILES or
              name == HF_CONFIG and not is_hf_config(os.path.join(out_dir, name))]
    if others:
        raise RunError(f"--out_dir {out_dir} is neither empty nor a previous export (it holds {', '.join(others)}): "
                       f"give a new or empty directory")


@one_line_errors(OSError, ValueError)
def main(argv=None):
    parser = Parser(description=__doc__)
    parser.add_argument("--ckpt_path", required=True, help=PATH_HELP)
    parser.add_argument("--out_dir", required=True,
                        help=f"new or empty directory (or a previous export) to write {HF_CONFIG} and {HF_WEIGHTS} to")
    args = parser.parse_args(argv)
    check_out_dir(args.out_dir)
    model, _ = load_model(args.ckpt_path)
    kind = save_hf_directory(model, args.out_dir)
    print(f"wrote {os.path.join(args.out_dir, HF_CONFIG)} and {os.path.join(args.out_dir, HF_WEIGHTS)} "
          f"({model.num_params():,} parameters)")
    print(f"load with: from dual_attention.hf import {HF_CLASSES[kind]}; "
          f"{HF_CLASSES[kind]}.from_pretrained({args.out_dir!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
