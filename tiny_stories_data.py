"""
The TinyStories preparation tool: download, pretokenize, train_vocab (training reads its output through loader.py).

    python tiny_stories_data.py download                    # data/TinyStories_all_data/*.json + tokenizer.model
    python tiny_stories_data.py pretokenize                 # uint16 .bin next to every shard (Llama 2 tokenizer)
    python tiny_stories_data.py train_vocab --vocab_size 4096   # optional: data/tok4096.model
    python tiny_stories_data.py pretokenize --vocab_size 4096   # then data/tok4096/*.bin

Inherited from llama2.c's tinystories.py, made safe for a flaky connection: downloads resume (HTTP Range into
a .part file), archives are verified before they are unpacked, every output appears atomically, and bad input
stops with a one-line error. Shard 0 is the validation split, all other shards are training data.
"""

import argparse
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import Event
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import numpy as np
import requests
import sentencepiece as spm
from tqdm import tqdm as _tqdm
from urllib3.exceptions import NewConnectionError

from loader import SHARD_DIR, bin_dir, json_shards
from tokenizer import TOKENIZER_MODEL, DataError, MissingDataError, Tokenizer, prepare_command, tokenizer_path
from runtime import RunError, one_line_errors

DATA_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
TOKENIZER_URL = "https://raw.githubusercontent.com/karpathy/llama2.c/master/tokenizer.model"
TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"  # Llama 2 tokenizer.model
END_OF_TEXT = "<|endoftext|>"  # story separator of the TinyStories .txt exports
MAX_UINT16_VOCAB = 65535
ENCODE_BATCH = 1024  # stories per SentencePiece call in pretokenize
DOWNLOAD_CHUNK = 1 << 16  # bytes per write; a dropped connection loses at most the chunk in flight
PROGRESS_DELAY = 1.0  # seconds before a progress bar appears: quick stages and early errors print no bar


def check_uint16(vocab_size):
    """Refuse a vocabulary whose ids do not fit the uint16 shards."""
    if vocab_size > MAX_UINT16_VOCAB:
        raise DataError(f"a vocabulary of {vocab_size:,} tokens does not fit uint16 shards "
                        f"(at most {MAX_UINT16_VOCAB:,})")


def tqdm(*args, **kwargs):
    """A progress bar on stderr that appears only after PROGRESS_DELAY seconds."""
    return _tqdm(*args, delay=PROGRESS_DELAY, **kwargs)


# -----------------------------------------------------------------------------
# files written atomically

def _umask():
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(target):
    """Name prefix of this process's temporary files and directories for `target`: hidden, with the process id, so
    that a later run can tell (and remove) what a killed run left behind."""
    return f".{os.path.basename(target)}.{os.getpid()}."


def pid_alive(pid):
    """Whether process `pid` runs (an exited process that its parent has not reaped yet, a zombie, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:  # Linux: the state follows the parenthesised name
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): assume it runs
        return True


def remove_stale_temps(target):
    """Delete the temporary files and directories for `target` that a process no longer alive left next to it
    (a run killed with kill -9, say)."""
    parent = os.path.dirname(target) or "."
    pattern = re.compile(re.escape(f".{os.path.basename(target)}.") + r"(\d+)\.")
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        m = pattern.match(name)
        if m and not pid_alive(int(m.group(1))):
            path = os.path.join(parent, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def write_atomic(path, data):
    """Write bytes to `path` through a temporary file in the same directory and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=temp_prefix(path), suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def temp_dir_for(target):
    """A new hidden temporary directory next to `target`, with the usual permissions, to be renamed into place
    (those a killed run left are deleted first)."""
    remove_stale_temps(target)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(target), dir=os.path.dirname(target) or ".")
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def publish_dir(tmp, target):
    """Atomically move a fully written temporary directory to `target` (which must be absent or empty)."""
    if os.path.isdir(target) and not os.listdir(target):
        os.rmdir(target)
    if os.path.exists(target):
        raise DataError(f"{target} exists but holds no .json shards: remove it and run the command again")
    os.replace(tmp, target)


# -----------------------------------------------------------------------------
# download

def _content_range(header):
    """(start, total) from a Content-Range header such as 'bytes 100-999/1000' or 'bytes */1000'."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _transfer(url, part, timeout, desc):
    """One HTTP request that appends the rest of `url` to `part`. True when the file is complete."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing left to send: complete if the server's size is what we have
            _, total = _content_range(r.headers.get("Content-Range"))
            if total == have:
                return True
            os.remove(part)
            return False
        if r.status_code >= 500:
            r.raise_for_status()  # a RequestException: retried
        if r.status_code not in (200, 206):
            raise DataError(f"{url}: HTTP {r.status_code} {r.reason}")
        if r.status_code == 206:
            start, total = _content_range(r.headers.get("Content-Range"))
            if start != have:
                raise DataError(f"{url}: server resumed at byte {start}, expected {have}")
        else:  # a full response, either a fresh transfer or a server that ignores Range
            have, total = 0, int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(desc=desc, total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024) as bar:
            for chunk in r.iter_content(chunk_size=DOWNLOAD_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = os.path.getsize(part)
    if total is not None and size > total:
        os.remove(part)
        raise DataError(f"{url}: received {size:,} bytes, more than the announced {total:,}")
    return total is None or size == total


class NoConnection(DataError):
    """The server cannot be reached at all: its name does not resolve, or nothing accepts the connection."""


def unreachable_because(error):
    """Why a requests error means that the host cannot be reached at all, or None (an interrupted transfer)."""
    if isinstance(error, requests.ConnectTimeout):
        return "the connection timed out"
    reason = getattr(error.args[0], "reason", None) if error.args else None
    if isinstance(reason, NewConnectionError):  # the name does not resolve, or the connection is refused
        return str(reason).split("): ", 1)[-1]
    return None


def download_file(url, dest, verify=None, timeout=30.0, retries=5, backoff=2.0):
    """
    Download `url` to `dest`, resumably: bytes stream into `dest.part`; after a dropped connection the transfer
    continues with an HTTP Range request (within this call up to `retries` times, and in the next call). A host
    that cannot be reached at all on the first try (no network) raises NoConnection at once: retries are for
    interrupted transfers.
    The length is checked against Content-Length / Content-Range, then `verify(part)` (which raises DataError)
    runs, and only then does `dest` appear, through os.replace. A part that fails verification is deleted.
    """
    part = dest + ".part"
    name = os.path.basename(dest)
    for attempt in range(retries + 1):
        try:
            if _transfer(url, part, timeout, desc=name):
                break
            why = "the connection closed before the end of the file"
        except requests.RequestException as e:
            unreachable = unreachable_because(e)
            if unreachable and attempt == 0:
                kept = os.path.getsize(part) if os.path.exists(part) else 0
                raise NoConnection(f"cannot connect to {urlsplit(url).netloc} to download {url} ({unreachable})"
                                   + (f"; {kept:,} bytes kept in {part}" if kept else "")) from None
            why = f"{type(e).__name__}: {e}"
        if attempt == retries:
            kept = os.path.getsize(part) if os.path.exists(part) else 0
            raise DataError(f"downloading {url} failed after {retries + 1} attempt(s) ({why}); "
                            f"{kept:,} bytes kept in {part}: run the command again to resume")
        time.sleep(backoff * 2 ** attempt)
    if verify is not None:
        try:
            verify(part)
        except DataError:
            os.remove(part)
            raise
    os.replace(part, dest)


def check_sha256(path, expected):
    """Raise DataError unless the file's sha256 is `expected` (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected.lower():
        raise DataError(f"sha256 of {path} is {h.hexdigest()}, expected {expected}: wrong or corrupted file")


def fetch_tokenizer(dest=TOKENIZER_MODEL, url=TOKENIZER_URL, sha256=TOKENIZER_SHA256, timeout=30.0, retries=5,
                    backoff=2.0):
    """Download the tokenizer model to `dest` unless it is there, checking its sha256 before it appears."""
    if os.path.exists(dest):
        print(f"{dest} already present")
        return
    print(f"Downloading {url} to {dest}...")
    try:
        download_file(url, dest, verify=lambda p: check_sha256(p, sha256), timeout=timeout, retries=retries,
                      backoff=backoff)
    except NoConnection as e:
        which = "the Llama 2 tokenizer.model" if sha256 == TOKENIZER_SHA256 else "the tokenizer model"
        raise DataError(f"{e}: copy {which} to {dest} (sha256 {sha256})") from None


def _unsafe(member):
    """Why an archive member must not be unpacked, or None if it is a plain file or directory inside the target."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "path with '..'"
    if not (member.isfile() or member.isdir()):
        return "link" if member.issym() or member.islnk() else "device or special file"
    return None


def check_archive(path):
    """Read a whole .tar.gz (tar headers, member data, gzip CRC and length); raise DataError on corruption or an
    unsafe member (absolute path, '..', link, device) or when it holds no .json file."""
    n_json = 0
    try:
        with gzip.open(path, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
            for member in tqdm(tf, desc=f"verifying {os.path.basename(path)}", unit=" files"):
                why = _unsafe(member)
                if why:
                    raise DataError(f"{path}: unsafe archive member {member.name!r} ({why}); refusing to unpack")
                n_json += member.isfile() and member.name.endswith(".json")
            for rest in iter(lambda: gz.read(1 << 20), b""):  # to the end: gzip checks its CRC and length
                if rest.strip(b"\0"):
                    raise DataError(f"{path}: data after the end of the tar archive (a damaged tar header?)")
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise DataError(f"{path} is not a valid .tar.gz, truncated or corrupted ({e})") from None
    if n_json == 0:
        raise DataError(f"{path} holds no .json shards")


def unpack_archive(path, shard_dir):
    """Verify the archive, then extract it into a temporary directory next to shard_dir and rename that into place.
    Only plain files and directories are written, each checked to stay inside the target."""
    check_archive(path)
    tmp = temp_dir_for(shard_dir)
    try:
        with tarfile.open(path, "r:gz") as tf:
            for member in tqdm(tf, desc=f"unpacking {os.path.basename(path)}", unit=" files"):
                why = _unsafe(member)
                if why:
                    raise DataError(f"{path}: unsafe archive member {member.name!r} ({why}); refusing to unpack")
                out = os.path.join(tmp, member.name)
                if member.isdir():
                    os.makedirs(out, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with tf.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if not json_shards(tmp):
            raise DataError(f"{path} has no .json shards at its top level")
        publish_dir(tmp, shard_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def iter_txt_stories(path, chunk_chars=1 << 24):
    """Stream the stripped, non-empty stories of a text file in which they are separated by <|endoftext|>."""
    rest = ""
    with open(path, encoding="utf-8") as f:
        try:
            for chunk in iter(lambda: f.read(chunk_chars), ""):
                *stories, rest = (rest + chunk).split(END_OF_TEXT)
                yield from (s.strip() for s in stories if s.strip())
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} cannot be decoded): convert "
                            f"it to UTF-8 first, e.g. with iconv") from None
    if rest.strip():
        yield rest.strip()


def split_txt(path, shard_dir, stories_per_shard=100_000):
    """Turn a TinyStories .txt export into JSON shards data00.json, data01.json, ... of {"story": ...} records
    (the format of TinyStories_all_data), written to a temporary directory that is renamed into place."""
    if stories_per_shard < 1:
        raise DataError("--stories_per_shard must be at least 1")
    tmp = temp_dir_for(shard_dir)
    try:
        stories, parts, n = iter_txt_stories(path), [], 0
        with tqdm(desc=f"splitting {os.path.basename(path)}", unit=" stories") as bar:
            while batch := list(itertools.islice(stories, stories_per_shard)):
                parts.append(os.path.join(tmp, f"part{len(parts)}"))
                write_atomic(parts[-1], json.dumps([{"story": s} for s in batch], ensure_ascii=False).encode())
                bar.update(len(batch))
                n += len(batch)
        if not parts:
            raise DataError(f"{path} holds no stories")
        if len(parts) < 2:
            fix = f"lower --stories_per_shard to at most {n - 1}" if n > 1 else "it must hold at least two stories"
            raise DataError(f"{path} gives a single shard ({n} stories at --stories_per_shard {stories_per_shard}), "
                            f"but shard 0 is the validation split and training needs another: {fix}")
        width = max(2, len(str(len(parts) - 1)))  # zero-padded names sort in shard order
        for i, p in enumerate(parts):
            os.replace(p, os.path.join(tmp, f"data{i:0{width}d}.json"))
        publish_dir(tmp, shard_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_shards(src_dir, shard_dir):
    """Copy a directory of .json shards into shard_dir through a temporary directory."""
    shards = json_shards(src_dir)
    if not shards:
        raise MissingDataError(f"{src_dir} holds no .json shards")
    tmp = temp_dir_for(shard_dir)
    try:
        for s in tqdm(shards, desc=f"copying {src_dir}", unit=" shards"):
            shutil.copyfile(s, os.path.join(tmp, os.path.basename(s)))
        publish_dir(tmp, shard_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def download(data_dir="data", source=DATA_URL, tokenizer_model=TOKENIZER_MODEL, tokenizer_url=TOKENIZER_URL,
             tokenizer_sha256=TOKENIZER_SHA256, stories_per_shard=100_000, timeout=30.0, retries=5, backoff=2.0):
    """
    Fill <data_dir>/TinyStories_all_data/ with JSON shards from `source` (a URL, a local .tar.gz, a directory of
    .json shards, or a .txt of stories separated by <|endoftext|>), then fetch tokenizer_model if it is missing.
    A URL is downloaded (resumably) to <data_dir>/<its file name> first. Does nothing for what is already there.
    """
    shard_dir = os.path.join(data_dir, SHARD_DIR)
    if json_shards(shard_dir):
        print(f"{shard_dir} already holds {len(json_shards(shard_dir))} shards: nothing to download")
    else:
        os.makedirs(data_dir, exist_ok=True)
        local, is_url = source, source.startswith(("http://", "https://"))
        if is_url:
            local = os.path.join(data_dir, os.path.basename(source.split("?")[0]) or "download")
            if os.path.exists(local):
                print(f"{local} already downloaded")
            else:
                print(f"Downloading {source} to {local}...")
                try:
                    download_file(source, local, timeout=timeout, retries=retries, backoff=backoff)
                except NoConnection as e:
                    raise DataError(f"{e}: run the command again when the network is back, or give --source a "
                                    f"local copy (a .tar.gz, a directory of .json shards or a .txt)") from None
        if os.path.isdir(local):
            copy_shards(local, shard_dir)
        elif not os.path.isfile(local):
            raise MissingDataError(f"--source {source}: no such file or directory "
                                   f"(expected a URL, a .tar.gz, a directory of .json shards or a .txt file)")
        elif local.endswith(".txt"):
            split_txt(local, shard_dir, stories_per_shard)
        else:
            try:
                unpack_archive(local, shard_dir)
            except DataError as e:
                if not is_url:
                    raise
                os.remove(local)  # never keep a bad download: the next run fetches it anew
                raise DataError(f"{e}; deleted the download, run the command again") from None
    fetch_tokenizer(tokenizer_model, tokenizer_url, tokenizer_sha256, timeout=timeout, retries=retries,
                    backoff=backoff)
    shards = json_shards(shard_dir)
    example = read_stories(shards[0])[:1]
    print("Download done.")
    print(f"Number of shards: {len(shards)}")
    print(f"Example story:\n{example[0] if example else '(shard 0 is empty)'}")


# -----------------------------------------------------------------------------
# pretokenize

def read_stories(shard):
    """The stripped `story` of every record of a JSON shard; DataError if the shard is malformed."""
    try:
        with open(shard, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{shard} is not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise DataError(f"{shard} must hold a JSON list of {{\"story\": ...}} records")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("story"), str)):
            raise DataError(f"{shard}: record {i} has no 'story' field")
    return [r["story"].strip() for r in records]


def tokenize_shard(shard, out_path, enc):
    """Encode every story of a shard (BOS prepended, no EOS) in batches and write uint16 tokens atomically.
    Returns (n_stories, n_tokens)."""
    stories = read_stories(shard)
    chunks = []
    for i in range(0, len(stories), ENCODE_BATCH):
        ids = enc.encode_batch(stories[i:i + ENCODE_BATCH], bos=True, eos=False)
        chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=sum(map(len, ids))))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)
    write_atomic(out_path, tokens.tobytes())
    return len(stories), tokens.size


_worker_enc = None  # each pretokenize worker process loads the tokenizer once


def _init_worker(model_path, parent_pid, stop):
    """Load the tokenizer once. Ctrl-C reaches the whole process group: the parent alone handles it. A watchdog
    ends the worker as soon as the parent sets `stop` or is gone (after kill -9 the parent can ask nothing)."""
    global _worker_enc
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_on_stop, args=(parent_pid, stop), daemon=True).start()
    _worker_enc = Tokenizer(model_path)


def _exit_on_stop(parent_pid, stop, poll=0.2):
    while os.getppid() == parent_pid and not stop.wait(poll):
        pass
    os._exit(1)


def _tokenize_in_worker(shard, out_path):
    return tokenize_shard(shard, out_path, _worker_enc)


def pretokenize(vocab_size=0, data_dir="data", workers=None, tokenizer_model=None):
    """
    Write one uint16 .bin per JSON shard: next to the shards for vocab_size 0 (Llama 2 tokenizer), else into
    <data_dir>/tok{N}/. Shards are encoded in parallel by `workers` processes (default min(cpu_count, shards)).
    `tokenizer_model` overrides the model file (default tokenizer_path(vocab_size, data_dir)).
    Returns the total number of tokens.
    """
    check_uint16(vocab_size)
    shard_dir = os.path.join(data_dir, SHARD_DIR)
    shards = json_shards(shard_dir)
    if not shards:
        raise MissingDataError(f"no .json shards in {shard_dir}: run {prepare_command('download', 0, data_dir)} first")
    model = tokenizer_model or tokenizer_path(vocab_size, data_dir)
    check_uint16(Tokenizer(model).n_words)
    out_dir = bin_dir(vocab_size, data_dir)
    os.makedirs(out_dir, exist_ok=True)
    outs = [os.path.join(out_dir, os.path.basename(s)[:-len(".json")] + ".bin") for s in shards]
    for out in outs:
        remove_stale_temps(out)  # of a killed earlier run
    workers = workers or min(os.cpu_count() or 1, len(shards))
    n_stories = n_tokens = 0
    t0 = time.time()
    stop = Event()
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(model, os.getpid(), stop)) as pool:
        try:
            # the workers, forked now, never see Ctrl-C; a Ctrl-C meanwhile waits until they exist
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                futures = [pool.submit(_tokenize_in_worker, s, o) for s, o in zip(shards, outs)]
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            for fut in tqdm(as_completed(futures), total=len(futures), desc="pretokenize", unit=" shards"):
                stories, tokens = fut.result()
                n_stories, n_tokens = n_stories + stories, n_tokens + tokens
        except BaseException:  # a bad shard or Ctrl-C: stop every worker now, mid-shard, and drop its temporary file
            stop.set()
            pool.shutdown(cancel_futures=True)
            for out in outs:
                remove_stale_temps(out)
            raise
    dt = time.time() - t0
    print(f"Pretokenized {len(shards)} shards into {out_dir}: {n_stories:,} stories, {n_tokens:,} tokens "
          f"(average {n_tokens / max(n_stories, 1):.1f} per story), {dt:.1f}s, {n_tokens / dt:,.0f} tokens/s")
    return n_tokens


# -----------------------------------------------------------------------------
# custom vocabulary

def train_vocab(vocab_size, data_dir="data", num_shards=10, keep_text=False):
    """
    Train a SentencePiece BPE model on the first `num_shards` shards (llama2.c's settings) and write
    <data_dir>/tok{N}.model and .vocab atomically. The temporary text file <data_dir>/tiny.txt is deleted
    unless keep_text. SentencePiece logs nothing but errors; one line sums up the result.
    """
    if vocab_size <= 0:
        raise DataError("--vocab_size must be positive for train_vocab")
    check_uint16(vocab_size)
    shard_dir = os.path.join(data_dir, SHARD_DIR)
    shards = json_shards(shard_dir)[:num_shards]
    if not shards:
        raise MissingDataError(f"no .json shards in {shard_dir}: run {prepare_command('download', 0, data_dir)} first")
    prefix = os.path.join(data_dir, f"tok{vocab_size}")
    tmp_prefix = os.path.join(data_dir, f".tok{vocab_size}.tmp")
    text_file = os.path.join(data_dir, "tiny.txt")
    print(f"Writing {text_file} with {len(shards)} shards...")
    try:
        with open(text_file, "w", encoding="utf-8") as f:
            for shard in tqdm(shards, unit=" shards"):
                f.writelines(s + "\n" for s in read_stories(shard))
        try:
            spm.SentencePieceTrainer.train(
                input=text_file, model_prefix=tmp_prefix, model_type="bpe", vocab_size=vocab_size,
                input_format="text", character_coverage=1.0, num_threads=os.cpu_count(),
                split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True,
                unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
                input_sentence_size=200_000, shuffle_input_sentence=True, minloglevel=2)  # its errors only, no log
        except RuntimeError as e:
            raise DataError(f"SentencePiece training failed: {str(e).strip().splitlines()[-1]}") from None
        os.replace(tmp_prefix + ".vocab", prefix + ".vocab")
        os.replace(tmp_prefix + ".model", prefix + ".model")
    finally:
        for p in (tmp_prefix + ".model", tmp_prefix + ".vocab") + (() if keep_text else (text_file,)):
            if os.path.exists(p):
                os.remove(p)
    print(f"Trained {prefix}.model ({vocab_size} pieces)" + (f"; kept {text_file}" if keep_text else ""))


# -----------------------------------------------------------------------------
# command line

@one_line_errors(DataError, OSError)
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    stages = parser.add_subparsers(dest="stage", required=True)
    data_help = "directory that holds TinyStories_all_data/, tok{N}.model and tok{N}/ (default: data)"

    p = stages.add_parser("download", allow_abbrev=False,
                          help="fetch, verify and unpack the JSON shards; fetch tokenizer.model")
    p.add_argument("--data_dir", default="data", help=data_help)
    p.add_argument("--source", default=DATA_URL,
                   help="URL or local path of the data: a .tar.gz of JSON shards, a directory of .json shards, or "
                        "a .txt of stories separated by <|endoftext|> (default: the Hugging Face TinyStories archive)")
    p.add_argument("--tokenizer_url", default=TOKENIZER_URL,
                   help=f"where to fetch tokenizer.model when {TOKENIZER_MODEL} is missing")
    p.add_argument("--tokenizer_sha256", default=TOKENIZER_SHA256,
                   help="expected sha256 of the fetched tokenizer.model (default: the Llama 2 tokenizer)")
    p.add_argument("--stories_per_shard", type=int, default=100_000,
                   help="stories per JSON shard when --source is a .txt file (default: 100000)")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default: 30)")
    p.add_argument("--retries", type=int, default=5,
                   help="reconnections after a dropped transfer, each resuming where it stopped (default: 5)")

    p = stages.add_parser("pretokenize", allow_abbrev=False,
                          help="encode every shard into a uint16 .bin (BOS before each story)")
    p.add_argument("--vocab_size", type=int, default=0,
                   help="0: the Llama 2 tokenizer, .bin next to the shards; N: data_dir/tok{N}.model, into tok{N}/")
    p.add_argument("--data_dir", default="data", help=data_help)
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, one shard at a time each (default: min(cpu count, number of shards))")

    p = stages.add_parser("train_vocab", allow_abbrev=False,
                          help="train a custom SentencePiece BPE vocabulary into data_dir/tok{N}.model")
    p.add_argument("--vocab_size", type=int, required=True, help="number of pieces (at most 65535)")
    p.add_argument("--data_dir", default="data", help=data_help)
    p.add_argument("--num_shards", type=int, default=10, help="train on the first N shards (default: 10)")
    p.add_argument("--keep_text", action="store_true", help="keep the temporary training text data_dir/tiny.txt")

    args = parser.parse_args(argv)
    try:
        if args.stage == "download":
            download(args.data_dir, args.source, tokenizer_url=args.tokenizer_url,
                     tokenizer_sha256=args.tokenizer_sha256, stories_per_shard=args.stories_per_shard,
                     timeout=args.timeout, retries=args.retries)
        elif args.stage == "pretokenize":
            pretokenize(args.vocab_size, args.data_dir, args.workers)
        else:
            train_vocab(args.vocab_size, args.data_dir, args.num_shards, args.keep_text)
    except KeyboardInterrupt:
        what = {"download": "run the same command again: the download resumes where it stopped",
                "pretokenize": "no half-written shard was kept; run the same command again to encode every shard",
                "train_vocab": "nothing was written; run the same command again"}[args.stage]
        raise RunError(f"interrupted: {what}", code=130) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
