"""
Checkpoints on disk, and the one loader of a model (and its tokenizer) from a path that every script calls.

    CHECKPOINT_FILE                  the file name of a run's checkpoint in its run directory
    checkpoint_file(path)            a run directory or a checkpoint file -> the checkpoint file
    read_checkpoint(path)            torch.load after a CRC check of every record (RunError when damaged)
    write_checkpoint(path, ckpt)     torch.save to a fresh temporary file, then an atomic rename
    load_model(path)                 (our model in eval mode, the checkpoint) of a run directory or checkpoint file
                                     (ours or the authors', either era), a Hugging Face directory or hub id
    find_tokenizer(path, ckpt, n)    the tokenizer the model was trained with

Every error is a RunError with a one-line message naming the path.
"""

import os
import re
import zipfile

import torch

import reference
from model import LLAMA2_VOCAB_SIZE
from runtime import RunError, replacing_file
from tokenizer import Tokenizer, tokenizer_path

CHECKPOINT_FILE = "ckpt.pt"
TOKENIZER_FILE = "tokenizer.model"  # a Hugging Face directory may hold its SentencePiece model
DAMAGED_ADVICE = "use another copy of the checkpoint"
PATH_HELP = f"run directory or {CHECKPOINT_FILE} (ours or the authors' train.py), Hugging Face directory or hub id"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name of a Hugging Face Hub model


def checkpoint_file(path):
    """path/ckpt.pt for a run directory, else path itself; RunError when there is no such file."""
    file = os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise RunError(f"no checkpoint at {file}" + ("" if os.path.exists(path) else ": it does not exist"))
    return file


def read_checkpoint(path, mmap=False, advice=DAMAGED_ADVICE):
    """torch.load (weights_only) of a checkpoint of train.py, ours or the authors', after a CRC check of every record
    of its zip archive (torch.load checks none: a flipped bit in a tensor would load silently). mmap=True maps the
    tensors instead of reading them (no CRC check; for a look at the recorded config). RunError naming the file,
    then `advice`, when it is damaged or holds no model."""
    zipped = zipfile.is_zipfile(path)
    mmap = mmap and zipped  # (the legacy format cannot be mapped)
    try:
        if zipped and not mmap:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad:
                raise RunError(f"{path} is corrupted (checksum mismatch in its record {bad}): {advice}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RunError:
        raise
    except Exception as e:  # truncated, empty, text...: torch raises all kinds
        why = " ".join(str(e).split())[:120] or type(e).__name__
        raise RunError(f"{path} is not a readable checkpoint (truncated or corrupted: {why}): {advice}") from None
    missing = [k for k in ("model", "model_args") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"{path} is not a checkpoint of train.py (no {', '.join(missing)}): {advice}")
    return ckpt


def write_checkpoint(path, ckpt):
    """torch.save to a fresh temporary file (created exclusively: never through a link planted in the run
    directory), then an atomic rename: a crash or a full disk never leaves a half-written checkpoint (RunError; the
    previous checkpoint stays)."""
    try:
        with replacing_file(path) as f:
            torch.save(ckpt, f)
    except (OSError, RuntimeError) as e:  # torch.save reports some write errors as RuntimeError
        why = e.strerror if isinstance(e, OSError) else " ".join(str(e).split())
        kept = "the previous checkpoint is kept" if os.path.exists(path) else "no checkpoint was written"
        raise RunError(f"writing the checkpoint {path} failed ({why}): stopped, {kept}") from None


# -----------------------------------------------------------------------------
# the one loader

def load_model(path, advice=DAMAGED_ADVICE, **changes):
    """(our model in eval mode, on the CPU, and its checkpoint: {} for a Hugging Face directory) from any of:
      - a run directory of train.py (ours or the authors', either era) or its checkpoint file: read_checkpoint,
        so every record's checksum is verified; a run directory's ckpt.pt is preferred to its config.json;
      - a directory in the Hugging Face format (their package's save_pretrained, or export.py);
      - a Hugging Face Hub model id such as 'awni00/DAT-sa8-ra8-ns1024-sh8-nkvh4-343M' (downloaded with
        huggingface_hub's snapshot_download, when that package is installed; then read as a directory).
    `changes` replace config fields that leave the weights as they are (train.py resumes with its own
    dropout_rate). RunError with a one-line message (ending in `advice` for a damaged checkpoint) otherwise."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        if not os.path.isfile(os.path.join(path, reference.HF_CONFIG)):
            raise RunError(f"{path} has neither a {CHECKPOINT_FILE} nor a {reference.HF_CONFIG}")
        return hf_model(path, path, **changes), {}
    if not os.path.exists(path) and HUB_ID.fullmatch(path) and not path.endswith(".pt"):
        return hf_model(path, download_from_hub(path), **changes), {}
    file = checkpoint_file(path)
    ckpt = read_checkpoint(file, advice=advice)
    try:
        model = reference.model_from_checkpoint(ckpt, **changes)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise RunError(f"{file} is not a checkpoint of a model this code builds ({e})") from None
    return model, ckpt


def hf_model(path, directory, **changes):
    """reference.load_hf_directory, its errors as RunError naming `path`."""
    try:
        return reference.load_hf_directory(directory, **changes)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise RunError(f"{path} is not a model in the Hugging Face format this code builds: {e}") from None


def download_from_hub(repo_id):
    """The local directory of a Hugging Face Hub model (network; cached by huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RunError(f"{repo_id} is not a local path, and reading it from the Hugging Face Hub needs "
                       "`pip install huggingface_hub`") from None
    try:
        return snapshot_download(repo_id, allow_patterns=[reference.HF_CONFIG, reference.HF_WEIGHTS,
                                                          reference.HF_WEIGHTS_PICKLE])
    except Exception as e:  # network, authentication and not-found errors of the hub client
        raise RunError(f"{repo_id}: not a local path, and the Hugging Face Hub gave "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def find_tokenizer(path, ckpt, vocab_size, given=None):
    """The Tokenizer of a model loaded from `path` with checkpoint `ckpt` (load_model's): `given` (--tokenizer) if
    set; else a Hugging Face directory's own tokenizer.model; else the one the run trained with, as train.py finds
    it: tokenizer_path of its --vocab_size and --data_dir (without a record: the model's vocab_size, in ./data).
    DataError when the file is missing or unreadable, RunError when it does not have the model's vocab_size."""
    if given is None and os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        given = os.path.join(path, TOKENIZER_FILE)
    if given is None:
        flags = ckpt.get("config") or {}
        vocab = flags.get("vocab_size") or vocab_size
        given = tokenizer_path(0 if vocab == LLAMA2_VOCAB_SIZE else vocab, flags.get("data_dir", "data"))
    tokenizer = Tokenizer(given)
    if tokenizer.n_words != vocab_size:
        raise RunError(f"{given} has {tokenizer.n_words} tokens, the model {vocab_size} (give the right --tokenizer)")
    return tokenizer
