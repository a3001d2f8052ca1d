"""
Tests of tokenizer.py: the SentencePiece wrapper on a small BPE model trained here, where the model files live, the
one-line errors of a missing or broken model, and what importing it loads.
"""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from tokenizer import TOKENIZER_MODEL, DataError, MissingDataError, Tokenizer, tokenizer_path

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [f"{name} saw {n} {thing} in the {place}." for name in ("Lily", "Tom", "Mia", "Ben")
             for n in range(12) for thing in ("cats", "kites", "hats") for place in ("park", "garden")]


def assert_one_line(err):
    assert str(err).strip() and "\n" not in str(err).strip(), repr(str(err))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Path of a 300-piece BPE model with byte fallback (ids 0-2: unk, BOS, EOS)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf, model_type="bpe",
                                   vocab_size=300, byte_fallback=True, character_coverage=1.0, num_threads=1)
    path = tmp_path_factory.mktemp("tokenizer") / "tok300.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def test_encode_and_decode(model):
    enc = Tokenizer(model)
    assert (enc.model_path, enc.n_words, enc.bos_id, enc.eos_id, enc.pad_id) == (model, 300, 1, 2, -1)
    ids = enc.encode("Lily saw 3 kites.")
    assert ids[0] == enc.bos_id and enc.eos_id not in ids
    assert enc.encode("Lily saw 3 kites.", bos=False, eos=True) == ids[1:] + [enc.eos_id]
    for same in (ids, np.array(ids, dtype=np.uint16), torch.tensor(ids)):
        assert enc.decode(same) == "Lily saw 3 kites."
    assert enc.decode(enc.encode("Zoë 🙂")) == "Zoë 🙂"  # unseen characters through byte fallback


def test_encode_batch_equals_encode_one_by_one(model):
    enc = Tokenizer(model)
    texts = SENTENCES[:7] + ["", "Ben saw 11 hats."]
    assert enc.encode_batch(texts) == [enc.encode(t) for t in texts]
    assert enc.encode_batch(iter(texts), bos=False, eos=True) == [enc.encode(t, bos=False, eos=True) for t in texts]


def test_missing_tokenizer_says_which_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"train_vocab --vocab_size 512 --data_dir {tmp_path}`")) as e:
        Tokenizer(str(tmp_path / "tok512.model"))
    assert isinstance(e.value, DataError) and isinstance(e.value, MissingDataError)
    assert_one_line(e.value)
    with pytest.raises(FileNotFoundError, match="tiny_stories_data.py download"):
        Tokenizer(str(tmp_path / "tokenizer.model"))
    assert tokenizer_path(0) == TOKENIZER_MODEL == str(REPO / "tokenizer.model")
    assert tokenizer_path(512, "d") == os.path.join("d", "tok512.model")


def test_a_file_that_is_no_model_is_a_one_line_data_error(tmp_path):
    (tmp_path / "tok512.model").write_text("<html>Not found</html>\n")
    with pytest.raises(DataError, match="tok512.model is not a SentencePiece model") as e:
        Tokenizer(str(tmp_path / "tok512.model"))
    assert not isinstance(e.value, MissingDataError)
    assert_one_line(e.value)


def test_import_loads_sentencepiece_only():
    """In a fresh interpreter `import tokenizer` loads neither torch nor numpy nor the preparation tool and its
    download and archive modules."""
    heavy = ["torch", "numpy", "requests", "tarfile", "gzip", "hashlib", "tqdm", "tiny_stories_data", "loader"]
    code = f"import sys, tokenizer\nprint(' '.join(name for name in {heavy!r} if name in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
