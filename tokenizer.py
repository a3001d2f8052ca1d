"""
The tokenizer: a SentencePiece wrapper, where its model file lives, and the errors of missing or bad data files.

vocab_size 0 is the Llama 2 model ./tokenizer.model (`tiny_stories_data.py download` fetches it); vocab_size N is
<data_dir>/tok{N}.model (`tiny_stories_data.py train_vocab --vocab_size N`). Importing it loads sentencepiece only,
neither torch nor the preparation tool.
"""

import os
import re

import sentencepiece as spm

TOKENIZER_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.model")  # the Llama 2 model


class DataError(Exception):
    """Bad input or a failed stage: the command lines print it as a single `error: ...` line."""


class MissingDataError(DataError, FileNotFoundError):
    """A file or directory an earlier stage should have created is missing."""


def prepare_command(stage, vocab_size=0, data_dir="data"):
    """The tiny_stories_data.py command line that runs `stage` with these settings, for error messages."""
    cmd = f"python tiny_stories_data.py {stage}"
    if vocab_size:
        cmd += f" --vocab_size {vocab_size}"
    if os.path.normpath(data_dir) != "data":
        cmd += f" --data_dir {data_dir}"
    return f"`{cmd}`"


def text_from_argv(text):
    """A command-line argument as the text the user typed: bytes that are not UTF-8 (which Python keeps as lone
    surrogates, that SentencePiece and every UTF-8 writer refuse) become U+FFFD, the rest is unchanged."""
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def tokenizer_path(vocab_size=0, data_dir="data"):
    """Path of the SentencePiece model: the Llama 2 model for vocab_size 0, else <data_dir>/tok{N}.model."""
    return TOKENIZER_MODEL if vocab_size == 0 else os.path.join(data_dir, f"tok{vocab_size}.model")


class Tokenizer:
    """Thin SentencePiece wrapper (llama2.c's tokenizer.py)."""

    def __init__(self, model_path):
        if not os.path.isfile(model_path):
            m = re.fullmatch(r"tok(\d+)\.model", os.path.basename(model_path))
            fix = (prepare_command("train_vocab", int(m.group(1)), os.path.dirname(model_path) or ".") if m
                   else prepare_command("download"))
            raise MissingDataError(f"tokenizer model {model_path} not found: run {fix}")
        try:
            self.sp_model = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{model_path} is not a SentencePiece model ({e})") from None
        self.model_path = model_path
        self.n_words = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        self.pad_id = self.sp_model.pad_id()

    def encode(self, s, bos=True, eos=False):
        """Token ids of one string, optionally framed by BOS/EOS."""
        assert isinstance(s, str)
        return self.sp_model.encode(s, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts, bos=True, eos=False):
        """Token ids of a list of strings in one SentencePiece call (no per-string Python call)."""
        return self.sp_model.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=1)

    def decode(self, ids):
        """Text of a sequence of ids (list, numpy array or 1-D tensor)."""
        return self.sp_model.decode([int(i) for i in ids])
