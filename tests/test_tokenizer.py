"""
Tests of tokenizer.py: where the model files live and the one-line error of a missing model.
"""

import os
import re
from pathlib import Path

import pytest

from tokenizer import TOKENIZER_MODEL, DataError, Tokenizer, tokenizer_path

REPO = Path(__file__).resolve().parents[1]


def assert_one_line(err):
    assert str(err).strip() and "\n" not in str(err).strip(), repr(str(err))


def test_missing_tokenizer_says_which_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"train_vocab --vocab_size 512 --data_dir {tmp_path}`")) as e:
        Tokenizer(str(tmp_path / "tok512.model"))
    assert isinstance(e.value, DataError)
    assert_one_line(e.value)
    with pytest.raises(FileNotFoundError, match="tiny_stories_data.py download"):
        Tokenizer(str(tmp_path / "tokenizer.model"))
    assert tokenizer_path(0) == TOKENIZER_MODEL == str(REPO / "tokenizer.model")
    assert tokenizer_path(512, "d") == os.path.join("d", "tok512.model")
