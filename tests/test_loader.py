"""
Tests of loader.py: the windows of the uint16 shards, BatchLoader (uniform windows, resumable state, prefetch),
EvalBatches, the token-id check, the one-line errors of missing or bad shards, and what importing it loads.
The shards are written here, with tokens that name their place.
"""

import io
import json
import os
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loader import SHARD_DIR, BatchLoader, EvalBatches, LoaderSettings, check_token_ids
from tokenizer import DataError, MissingDataError

REPO = Path(__file__).resolve().parents[1]
VOCAB = 384


def settings(data_dir, batch_size, max_seq_len, **kw):
    """LoaderSettings of (batch_size, max_seq_len) batches from the shards under data_dir."""
    return LoaderSettings(batch_size, max_seq_len, data_dir=str(data_dir), **kw)


def write_bins(directory, lengths):
    """uint16 shards whose tokens name their place: shard k, offset j holds k * 10000 + j."""
    os.makedirs(directory, exist_ok=True)
    shards = []
    for k, n in enumerate(lengths):
        tokens = (k * 10000 + np.arange(n)).astype(np.uint16)
        tokens.tofile(os.path.join(directory, f"data{k:02d}.bin"))
        shards.append(tokens.astype(np.int64))
    return shards


def write_json_shards(directory, n):
    """JSON shards data00.json ... data{n-1}.json of one story each (the loader only asks which exist)."""
    os.makedirs(directory, exist_ok=True)
    for k in range(n):
        Path(directory, f"data{k:02d}.json").write_text(json.dumps([{"story": f"Story {k}."}]))


def assert_one_line(err):
    assert str(err).strip() and "\n" not in str(err).strip(), repr(str(err))


def check_windows(x, y, shards, allowed, T):
    """Every row of x, y is shards[k][o:o + T], shards[k][o + 1:o + T + 1] for an allowed k; returns the (k, o)."""
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == T
    assert x.is_contiguous() and y.is_contiguous()
    places = []
    for xr, yr in zip(x.numpy(), y.numpy()):
        k, o = divmod(int(xr[0]), 10000)
        assert k in allowed
        assert np.array_equal(xr, shards[k][o:o + T]) and np.array_equal(yr, shards[k][o + 1:o + T + 1])
        places.append((k, o))
    return places


# -----------------------------------------------------------------------------
# BatchLoader

def test_loader_windows_are_exact_slices(tmp_path):
    T = 64
    shards = write_bins(tmp_path / SHARD_DIR, [500, 300, 700, T])  # the last is too short for a window
    train = BatchLoader("train", settings(tmp_path, 16, T))
    val = BatchLoader("val", settings(tmp_path, 16, T))
    assert train.n_tokens == 1000 and val.n_tokens == 500
    for _ in range(20):
        check_windows(*train.next_batch(), shards, {1, 2}, T)
        check_windows(*val.next_batch(), shards, {0}, T)


def test_loader_is_uniform_over_start_positions(tmp_path):
    T = 32
    shards = write_bins(tmp_path / SHARD_DIR, [100, T + 5, T + 15])  # 5 and 15 windows
    loader = BatchLoader("train", settings(tmp_path, 500, T, seed=1))
    places = [p for _ in range(8) for p in check_windows(*loader.next_batch(), shards, {1, 2}, T)]
    assert set(places) == {(1, o) for o in range(5)} | {(2, o) for o in range(15)}
    share = sum(k == 2 for k, _ in places) / len(places)
    assert abs(share - 0.75) < 0.03


def test_loader_state_reproduces_batches(tmp_path):
    write_bins(tmp_path / SHARD_DIR, [300, 400, 500])
    make = lambda **kw: BatchLoader("train", settings(tmp_path, 8, 16, world_size=2, **kw))  # noqa: E731
    a = make(seed=3, rank=1)
    first = [a.next_batch() for _ in range(3)]
    state = a.state_dict()
    buf = io.BytesIO()
    torch.save(pickle.loads(pickle.dumps(state)), buf)  # as train.py stores it in a checkpoint
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = [a.next_batch() for _ in range(5)]
    b = make(seed=99, rank=0)
    b.load_state_dict(state)
    for (x, y), (xe, ye) in zip([b.next_batch() for _ in range(5)], expected):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    c = make(seed=3, rank=1)  # same seed and rank: same stream from the start
    assert all(torch.equal(c.next_batch()[0], x) for x, _ in first)


def loader_trace(loader, n):
    """n batches, each with the state_dict() taken before it, and a load_state_dict() round trip every third
    batch (as a resumed run does), as comparable tuples."""
    trace = []
    for i in range(n):
        state = loader.state_dict()
        if i % 3 == 2:
            loader.load_state_dict(state)
        x, y = loader.next_batch()
        trace.append((state, x.tolist(), y.tolist()))
    return trace


def test_prefetch_keeps_the_batch_sequence_and_state(tmp_path):
    write_bins(tmp_path / SHARD_DIR, [300, 400, 500])
    make = lambda prefetch: BatchLoader("train", settings(tmp_path, 8, 16, seed=5, prefetch=prefetch))  # noqa: E731
    expected = loader_trace(make(0), 12)
    for prefetch in (1, 3):
        loader = make(prefetch)
        assert loader_trace(loader, 12) == expected
        loader.close()
    loader = make(3)
    loader.next_batch()
    while not loader.queue.full():  # the thread has drawn 3 batches ahead of the caller
        threading.Event().wait(0.001)
    assert loader.rng.bit_generator.state != loader.state_dict()["rng"]
    loader.close()  # the batches drawn ahead are given back: the generator is back before batch 2 (1 is held)
    assert loader.thread is None and loader.rng.bit_generator.state == expected[2][0]["rng"]
    assert loader_trace(loader, 11) == expected[1:]
    loader.close()


def test_prefetch_passes_errors_on(tmp_path):
    write_bins(tmp_path / SHARD_DIR, [300, 400])
    loader = BatchLoader("train", settings(tmp_path, 4, 16, prefetch=2))
    gather, calls = loader.windows.gather, []

    def failing_gather(idx):
        calls.append(idx)
        if len(calls) == 3:
            raise OSError("disk gone")
        return gather(idx)

    loader.windows.gather = failing_gather
    loader.next_batch(), loader.next_batch()
    with pytest.raises(OSError, match="disk gone"):
        loader.next_batch()
    assert loader.thread is None


def test_loader_seeds_differ_per_rank_and_seed(tmp_path):
    write_bins(tmp_path / SHARD_DIR, [300, 5000])
    first = {(s, r): BatchLoader("train", settings(tmp_path, 8, 16, seed=s, rank=r, world_size=2)).next_batch()[0]
             for s, r in [(0, 0), (0, 1), (1, 0)]}
    assert not torch.equal(first[0, 0], first[0, 1]) and not torch.equal(first[0, 0], first[1, 0])


def test_loader_custom_vocab_directory(tmp_path):
    write_bins(tmp_path / f"tok{VOCAB}", [100, 100])
    assert BatchLoader("train", settings(tmp_path, 2, 8, vocab_size=VOCAB)).n_tokens == 100
    with pytest.raises(FileNotFoundError, match="pretokenize"):
        BatchLoader("train", settings(tmp_path, 2, 8, vocab_size=0))


def test_loader_errors(tmp_path):
    download_then_pretokenize = "run `python tiny_stories_data.py download.*, then .*pretokenize"
    with pytest.raises(MissingDataError, match=download_then_pretokenize) as e:
        BatchLoader("train", settings(tmp_path, 4, 8))
    assert_one_line(e.value)
    write_json_shards(tmp_path / SHARD_DIR, 1)
    with pytest.raises(MissingDataError, match=r"run `python tiny_stories_data.py pretokenize --data_dir"):
        BatchLoader("val", settings(tmp_path, 4, 8))
    write_bins(tmp_path / SHARD_DIR, [100])
    write_json_shards(tmp_path / SHARD_DIR, 2)  # an unfinished pretokenize
    with pytest.raises(DataError, match=r"1 JSON shard\(s\) have no .bin .*data01.json.*pretokenize") as e:
        BatchLoader("val", settings(tmp_path, 4, 8))
    assert_one_line(e.value)
    (tmp_path / SHARD_DIR / "data01.json").unlink()
    with pytest.raises(DataError, match="single shard"):
        BatchLoader("train", settings(tmp_path, 4, 8))
    write_bins(tmp_path / SHARD_DIR, [100, 20, 30])
    with pytest.raises(DataError, match=r"every train shard .* shorter than max_seq_len \+ 1 = 33 tokens") as e:
        BatchLoader("train", settings(tmp_path, 4, 32))
    assert_one_line(e.value)
    assert BatchLoader("train", settings(tmp_path, 4, 29)).n_tokens == 30  # 30 tokens: exactly one window
    (tmp_path / SHARD_DIR / "data02.bin").write_bytes(b"")  # an empty shard is skipped, not a crash
    with pytest.raises(DataError, match="shorter than"):
        BatchLoader("train", settings(tmp_path, 4, 29))
    (tmp_path / SHARD_DIR / "data02.bin").write_bytes(b"abc")  # not uint16 tokens
    with pytest.raises(DataError, match="odd number of bytes"):
        BatchLoader("train", settings(tmp_path, 4, 29))


# -----------------------------------------------------------------------------
# EvalBatches, settings, token ids

def test_eval_batches_are_deterministic_and_shared_across_ranks(tmp_path):
    T = 16
    shards = write_bins(tmp_path / SHARD_DIR, [1000, 400, 800])
    single = list(EvalBatches("train", settings(tmp_path, 4, T), 5))
    assert len(single) == 5
    again = list(EvalBatches("train", settings(tmp_path, 4, T), 5))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(single, again))
    places = [p for x, y in single for p in check_windows(x, y, shards, {1, 2}, T)]
    assert len(set(places)) == 20  # distinct windows
    assert all({k for k, _ in places[i:i + 4]} == {1, 2} for i in range(0, 20, 4))  # each batch spans the split
    ranks = [list(EvalBatches("train", settings(tmp_path, 4, T, rank=r, world_size=2), 5)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 2]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ranks[0] + ranks[1], single[0::2] + single[1::2]))
    val = list(EvalBatches("val", settings(tmp_path, 2, T), 3))
    assert all(int(x[0, 0]) // 10000 == 0 for x, _ in val)


def test_eval_batches_0_cover_every_non_overlapping_window_of_a_split_once(tmp_path):
    """n_batches 0: inputs start every T tokens of each shard (shards too short for a window left out), in order;
    every token but a shard's first is a target once, up to the shard's last whole window; the last batch is
    smaller; ranks share the batches out."""
    T = 16
    shards = write_bins(tmp_path / SHARD_DIR, [100, 500, 10, 170])  # val is shard 0; shard 2 is too short
    for split, kept, lengths in (("val", [0], [100]), ("train", [1, 3], [500, 170])):
        batches = EvalBatches(split, settings(tmp_path, 4, T), 0)
        starts = [(k, o) for k, n in zip(kept, lengths) for o in range(0, n - T, T)]
        assert len(batches) == -(-len(starts) // 4)
        got = [list(check_windows(x, y, shards, set(kept), T)) for x, y in batches]
        assert [p for batch in got for p in batch] == starts
        assert [len(b) for b in got] == [4] * (len(got) - 1) + [len(starts) - 4 * (len(got) - 1)]
        ranks = [[check_windows(x, y, shards, set(kept), T)
                  for x, y in EvalBatches(split, settings(tmp_path, 4, T, rank=r, world_size=2), 0)] for r in (0, 1)]
        assert ranks[0] + ranks[1] == got[0::2] + got[1::2]
    assert len(starts) == 31 + 10  # (500 - 16) / 16 and (170 - 16) / 16, rounded up


def test_settings_take_all_but_the_batch_shape_by_keyword_and_check_the_rank():
    assert LoaderSettings(4, 8) == LoaderSettings(batch_size=4, max_seq_len=8, vocab_size=0, data_dir="data",
                                                  device="cpu", seed=0, rank=0, world_size=1, prefetch=2)
    with pytest.raises(TypeError):
        LoaderSettings(4, 8, 512)  # a vocab_size that reads like a third dimension
    for rank, world_size in ((1, 1), (-1, 2), (2, 2)):
        with pytest.raises(ValueError, match=f"rank {rank} outside world_size {world_size}"):
            LoaderSettings(4, 8, rank=rank, world_size=world_size)


def test_check_token_ids_names_the_shard_and_the_fix(tmp_path):
    write_bins(tmp_path / f"tok{VOCAB}", [100, 1, 0])  # shard 1 holds id 10000, shard 2 is empty
    check_token_ids(SimpleNamespace(n_words=10001, model_path="big.model"), VOCAB, str(tmp_path))
    fix = re.escape(f"run `python tiny_stories_data.py pretokenize --vocab_size {VOCAB} --data_dir {tmp_path}` again")
    with pytest.raises(DataError, match=f"data01.bin holds token id 10000, outside the 10,000 tokens of small.model: "
                                        f"it was pretokenized with another tokenizer; {fix}") as e:
        check_token_ids(SimpleNamespace(n_words=10000, model_path="small.model"), VOCAB, str(tmp_path))
    assert_one_line(e.value)


def test_import_loads_neither_the_preparation_tool_nor_its_download_code():
    """In a fresh interpreter: numpy and torch (torch itself imports tarfile, gzip, hashlib and tqdm) are imported,
    the download tool's modules are forgotten, then `import loader` must load none of them again."""
    tool = ["requests", "urllib3", "tarfile", "gzip", "hashlib", "tqdm", "concurrent.futures", "tiny_stories_data"]
    code = (f"import sys, numpy, torch\n"
            f"tool = {tool!r}\n"
            f"for name in tool: sys.modules.pop(name, None)\n"
            f"import loader\n"
            f"print(' '.join(name for name in tool if name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
