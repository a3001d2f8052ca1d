"""
Training and evaluation batches from the pretokenized uint16 shards that `tiny_stories_data.py pretokenize` writes.

Shard 0 is the validation split, all other shards are training data. BatchLoader draws random training batches
(resumable through its state_dict), EvalBatches the same fixed evaluation batches in every run (or every window of a
split once); both take one LoaderSettings. Importing it loads numpy, torch and the tokenizer module, never the preparation tool or its download
and archive code.
"""

import glob
import os
import queue
import threading
import warnings
from dataclasses import KW_ONLY, dataclass

import numpy as np
import torch

from tokenizer import DataError, MissingDataError, Tokenizer, prepare_command, tokenizer_path

SHARD_DIR = "TinyStories_all_data"  # <data_dir>/TinyStories_all_data/data00.json ...


@dataclass(frozen=True)
class LoaderSettings:
    """What batches are drawn from and how, for BatchLoader and EvalBatches (all but the batch shape by keyword)."""
    batch_size: int
    max_seq_len: int  # T: x and y are (batch_size, T); a window holds T + 1 tokens
    _: KW_ONLY
    vocab_size: int = 0  # 0: the Llama 2 shards next to the JSON shards; N: <data_dir>/tok{N}/
    data_dir: str = "data"
    device: str | torch.device = "cpu"
    seed: int = 0  # BatchLoader's generator is seeded from (seed, rank)
    rank: int = 0
    world_size: int = 1  # EvalBatches: batch i goes to rank i % world_size
    prefetch: int = 2  # batches BatchLoader's background thread draws ahead (0: drawn in the caller's thread)

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")


def json_shards(shard_dir):
    """Sorted paths of the .json shards in shard_dir (empty if it does not exist)."""
    return sorted(glob.glob(os.path.join(shard_dir, "*.json")))


def bin_dir(vocab_size=0, data_dir="data"):
    """Directory of the pretokenized .bin shards: next to the JSON shards for vocab_size 0, else <data_dir>/tok{N}."""
    return os.path.join(data_dir, SHARD_DIR) if vocab_size == 0 else os.path.join(data_dir, f"tok{vocab_size}")


def open_bin(path):
    """Memory-map a uint16 token shard (an empty file maps to an empty array)."""
    size = os.path.getsize(path)
    if size % 2:
        raise DataError(f"{path} has an odd number of bytes, not a uint16 token file: run pretokenize again")
    return np.memmap(path, dtype=np.uint16, mode="r") if size else np.zeros(0, dtype=np.uint16)


def check_token_ids(tokenizer, vocab_size=0, data_dir="data"):
    """Raise DataError if a .bin shard holds a token id outside the tokenizer's vocabulary (shards written with
    another tokenizer). One pass over the memory-mapped shards."""
    d = bin_dir(vocab_size, data_dir)
    for path in sorted(glob.glob(os.path.join(d, "*.bin"))):
        tokens = open_bin(path)
        top = int(tokens.max()) if len(tokens) else -1
        if top >= tokenizer.n_words:
            raise DataError(f"{path} holds token id {top}, outside the {tokenizer.n_words:,} tokens of "
                            f"{tokenizer.model_path}: it was pretokenized with another tokenizer; run "
                            f"{prepare_command('pretokenize', vocab_size, data_dir)} again")


class Windows:
    """All windows of max_seq_len + 1 consecutive tokens of a split, numbered 0..n_windows-1 shard after shard.
    Shard 0 is "val", the others "train"; shards too short for a single window are left out."""

    def __init__(self, split, settings):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        T, vocab_size, data_dir = settings.max_seq_len, settings.vocab_size, settings.data_dir
        d = bin_dir(vocab_size, data_dir)
        paths = sorted(glob.glob(os.path.join(d, "*.bin")))
        if not paths:
            fix = prepare_command("pretokenize", vocab_size, data_dir)
            if not json_shards(os.path.join(data_dir, SHARD_DIR)):
                fix = f"{prepare_command('download', 0, data_dir)}, then {fix}"
            raise MissingDataError(f"no pretokenized shards (*.bin) in {d}: run {fix}")
        missing = [j for j in json_shards(os.path.join(data_dir, SHARD_DIR))
                   if not os.path.exists(os.path.join(d, os.path.basename(j)[:-len(".json")] + ".bin"))]
        if missing:
            raise DataError(f"{len(missing)} JSON shard(s) have no .bin in {d} (first: {missing[0]}): pretokenize "
                            f"did not finish, run {prepare_command('pretokenize', vocab_size, data_dir)}")
        if split == "train" and len(paths) < 2:
            raise DataError(f"{d} holds a single shard, which is the val split: train needs at least two shards")
        opened = [open_bin(p) for p in (paths[:1] if split == "val" else paths[1:])]
        shards = [m for m in opened if len(m) > T]
        if not shards:
            raise DataError(f"every {split} shard in {d} is shorter than max_seq_len + 1 = {T + 1} tokens "
                            f"(longest: {max(len(m) for m in opened)}): lower max_seq_len or pretokenize more stories")
        self.views = [np.lib.stride_tricks.sliding_window_view(m, T + 1) for m in shards]  # no copy
        self.counts = np.array([len(v) for v in self.views], dtype=np.int64)  # windows per shard
        self.ends = np.cumsum(self.counts)
        self.n_windows = int(self.ends[-1])
        self.n_tokens = int(sum(len(m) for m in shards))

    def gather(self, idx):
        """(len(idx), max_seq_len + 1) int64 array of the windows with these global indices, one vectorised
        read per shard involved."""
        shard = np.searchsorted(self.ends, idx, side="right")
        start = idx - (self.ends[shard] - self.counts[shard])
        out = np.empty((len(idx), self.views[0].shape[1]), dtype=np.int64)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            out[rows] = self.views[s][start[rows]]
        return out


def split_windows(windows, pin=False):
    """Split (B, T + 1) windows into inputs x and targets y (x shifted by one): int64 host tensors, in pinned
    memory when `pin` (so that the copy to a GPU can be non-blocking)."""
    t = torch.from_numpy(windows)
    x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    if pin:
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def to_device(x, y, device):
    """x, y on the device; from pinned memory to CUDA the copies are queued without waiting for them."""
    non_blocking = device.type == "cuda"
    return x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)


class BatchLoader:
    """
    Random training batches: windows chosen uniformly among all valid start positions of the split (a shard with
    probability proportional to its number of windows, then an offset), gathered a whole batch at a time from
    memory-mapped shards. The numpy Generator is seeded from (seed, rank), and state_dict()/load_state_dict()
    carry it so a resumed run draws exactly the batches it would have drawn.

    With prefetch > 0 a background thread draws up to `prefetch` batches ahead (random offsets, memmap reads, pinned
    host memory on CUDA) while the caller's device works; next_batch() then only queues the copy to the device. The
    batches, their order and state_dict() are exactly those of prefetch=0: state_dict() is always the generator state
    before the batch that the next next_batch() returns.
    """

    def __init__(self, split, settings):
        self.windows = Windows(split, settings)
        self.split, self.settings, self.device = split, settings, torch.device(settings.device)
        self.n_tokens = self.windows.n_tokens
        self.rng = np.random.default_rng([settings.seed, settings.rank])
        self.prefetch = settings.prefetch
        self.head = None  # (generator state before the batch, x, y): the batch the next next_batch() returns
        self.thread = self.queue = self.stopping = None

    def draw(self):
        """(generator state before the batch, x, y on the host): the next batch of the generator."""
        state = self.rng.bit_generator.state
        idx = self.rng.integers(self.windows.n_windows, size=self.settings.batch_size)
        return (state, *split_windows(self.windows.gather(idx), pin=self.device.type == "cuda"))

    def produce(self, batches, stopping):
        """The prefetch thread: draw batches in order into the bounded queue (an exception is passed on)."""
        try:
            while not stopping.is_set():
                batches.put(self.draw())
        except Exception as e:  # re-raised by next_batch() in the caller's thread
            batches.put(e)

    def peek(self):
        """The batch the next next_batch() returns, drawn now or taken from the prefetch queue."""
        if self.head is None:
            if not self.prefetch:
                self.head = self.draw()
            else:
                if self.thread is None:
                    self.queue, self.stopping = queue.Queue(maxsize=self.prefetch), threading.Event()
                    self.thread = threading.Thread(target=self.produce, args=(self.queue, self.stopping),
                                                   name=f"BatchLoader-{self.split}", daemon=True)
                    self.thread.start()
                item = self.queue.get()
                if isinstance(item, Exception):
                    self.close()
                    raise item
                self.head = item
        return self.head

    def next_batch(self):
        """x, y: int64 tensors of shape (batch_size, max_seq_len) on the device, y[:, i] == x[:, i + 1]."""
        _, x, y = self.peek()
        self.head = None
        return to_device(x, y, self.device)

    def state_dict(self):
        """Plain python objects: the generator state (before the next batch) and the size of the data it indexes."""
        state = self.peek()[0] if self.prefetch else self.rng.bit_generator.state
        return {"rng": state, "split": self.split, "n_windows": self.windows.n_windows}

    def load_state_dict(self, state):
        """Continue from a state_dict(); warns if the shards changed since (the batches then differ)."""
        if (state["split"], state["n_windows"]) != (self.split, self.windows.n_windows):
            warnings.warn(f"loader state was saved for {state['split']} data with {state['n_windows']:,} windows, "
                          f"now {self.split} with {self.windows.n_windows:,}: batches will not repeat exactly")
        self.close()
        self.head = None
        self.rng.bit_generator.state = state["rng"]

    def close(self):
        """Stop the prefetch thread. The batches it drew ahead are given back (the generator is rewound to the first
        of them), so the sequence continues unchanged; the next call starts a new thread."""
        if self.thread is None:
            return
        self.stopping.set()
        drawn = []
        while self.thread.is_alive():  # take what the thread puts, so that it is never stuck on a full queue
            try:
                drawn.append(self.queue.get(timeout=0.01))
            except queue.Empty:
                pass
        self.thread.join()
        while not self.queue.empty():
            drawn.append(self.queue.get_nowait())
        batches = [item for item in drawn if not isinstance(item, Exception)]
        if batches:
            self.rng.bit_generator.state = batches[0][0]
        self.thread = self.queue = self.stopping = None


class EvalBatches:
    """
    The evaluation batches of a split, the same in every call and run (no RNG). n_batches > 0: n_batches * batch_size
    windows evenly spaced over the split, batch i holding every n_batches-th of them (so each batch spans the whole
    split). n_batches = 0: every non-overlapping window once, in order: inputs of max_seq_len tokens starting every
    max_seq_len tokens of each shard, so that each token but a shard's first is a target once (bar a shard's last
    partial window); the last batch may be smaller. With world_size > 1, batch i goes to rank i % world_size.
    len() counts the batches of every rank; iterating yields this rank's x, y of shape (B, max_seq_len).
    """

    def __init__(self, split, settings, n_batches):
        self.windows, self.settings = Windows(split, settings), settings
        B = settings.batch_size
        if n_batches:
            n = n_batches * B
            idx = (np.arange(n, dtype=np.int64) * self.windows.n_windows) // n
            self.batches = list(idx.reshape(B, n_batches).T)  # n_batches arrays of B window indices
        else:
            firsts = self.windows.ends - self.windows.counts  # the index of each shard's first window
            starts = np.concatenate([first + np.arange(0, count, settings.max_seq_len)
                                     for first, count in zip(firsts, self.windows.counts)])
            self.batches = [starts[i:i + B] for i in range(0, len(starts), B)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        device = torch.device(self.settings.device)
        for idx in self.batches[self.settings.rank::self.settings.world_size]:
            yield to_device(*split_windows(self.windows.gather(idx), pin=device.type == "cuda"), device)


def check_tokenizer(model_vocab_size, vocab_size=0, data_dir="data"):
    """The Tokenizer of the shards of (vocab_size, data_dir); DataError unless it has the model's vocabulary
    (model_vocab_size tokens) and every shard's token ids fit it."""
    tokenizer = Tokenizer(tokenizer_path(vocab_size, data_dir))
    if tokenizer.n_words != model_vocab_size:
        raise DataError(f"{tokenizer.model_path} has {tokenizer.n_words} tokens, the model {model_vocab_size}")
    check_token_ids(tokenizer, vocab_size, data_dir)
    return tokenizer
