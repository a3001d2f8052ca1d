"""
Tests of tiny_stories_data.py: download (against a real HTTP server on 127.0.0.1), pretokenize, train_vocab
and the command line. The core tests run on a SentencePiece model trained here, in seconds, on
stories generated below; tests that need the real Llama 2 tokenizer or real stories read ../shared/data and skip
when it is absent.
"""

import base64
import gzip
import hashlib
import http.server
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import tiny_stories_data as tsd  # noqa: E402
from loader import SHARD_DIR, json_shards  # noqa: E402
from tokenizer import DataError, Tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB = 384


def need_shared(*names):
    """Skip the test unless ../shared/data holds these files."""
    missing = [n for n in names if not (SHARED_DATA / n).exists()]
    if missing:
        pytest.skip(f"real data not found: {', '.join(str(SHARED_DATA / n) for n in missing)}")


# -----------------------------------------------------------------------------
# generated stories, shards, archives

def make_stories(n, seed=0):
    """Small TinyStories-like stories with digits, Unicode punctuation and stray surrounding whitespace."""
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Zoe", "Sam", "Anna", "Leo"]
    animals = ["cat", "dog", "bird", "frog", "bunny", "duck", "bear", "fish"]
    places = ["park", "garden", "forest", "kitchen", "yard", "river", "school"]
    things = ["ball", "kite", "box", "hat", "book", "toy car", "flower", "cookie"]
    adjs = ["big", "shiny", "red", "little", "happy", "funny", "soft", "blue"]
    stories = []
    for i in range(n):
        name, animal, place, thing, adj = (rng.choice(x) for x in (names, animals, places, things, adjs))
        story = (f"Once upon a time, there was a {adj} {animal} named {name}. {name} liked to play in the {place}.\n"
                 f"One day, {name} found a {rng.choice(adjs)} {thing} with {rng.randint(2, 999)} spots. "
                 f"“Look!” said {name}. “It’s so {rng.choice(adjs)}!”\n"
                 f"{name} and the {rng.choice(animals)} played all day. They were very {rng.choice(adjs)}.")
        stories.append(" " * (i % 3) + story + "\n" * (i % 2))
    return stories


def write_shards(shard_dir, shards):
    """Write JSON shards data00.json, data01.json, ... of {"story": ...} records (lists of stories)."""
    os.makedirs(shard_dir, exist_ok=True)
    for i, stories in enumerate(shards):
        with open(os.path.join(shard_dir, f"data{i:02d}.json"), "w", encoding="utf-8") as f:
            json.dump([{"story": s, "source": "test"} for s in stories], f)


def tar_gz(members):
    """Bytes of a .tar.gz holding {name: bytes} regular files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_members(n_shards=2, per_shard=5, noise=0):
    """{name: bytes} of JSON shards; `noise` bytes of incompressible text make the archive that much larger."""
    stories = make_stories(n_shards * per_shard, seed=1)
    stories[-1] += base64.b64encode(random.Random(0).randbytes(noise)).decode()
    return {f"data{i:02d}.json": json.dumps([{"story": s} for s in stories[i * per_shard:(i + 1) * per_shard]]).encode()
            for i in range(n_shards)}


def leftovers(directory):
    """Hidden temporary files/dirs and .part files anywhere under a directory."""
    return [str(p) for p in Path(directory).rglob("*") if p.name.startswith(".") or p.name.endswith((".part", ".tmp"))]


def assert_one_line(err):
    assert str(err).strip() and "\n" not in str(err).strip(), repr(str(err))


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    """A SentencePiece BPE model of VOCAB pieces trained by train_vocab on generated stories: (data_dir, model)."""
    data_dir = tmp_path_factory.mktemp("vocab")
    stories = make_stories(400)
    write_shards(data_dir / SHARD_DIR, [stories[:200], stories[200:]])
    tsd.train_vocab(VOCAB, str(data_dir), num_shards=2)
    return data_dir, str(data_dir / f"tok{VOCAB}.model")


# -----------------------------------------------------------------------------
# a real HTTP server on 127.0.0.1 with Range support and dropped connections

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        state = self.server.state
        name, rng = self.path.lstrip("/"), self.headers.get("Range")
        state["requests"].append((name, rng))
        if name not in state["files"]:
            self.send_error(404)
            return
        data, start = state["files"][name], 0
        if rng and state["ranges"]:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if state["cuts"]:  # send only the first n bytes, then drop the connection
            body = body[:state["cuts"].pop(0)]
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch):
    """state: files {name: bytes}, requests [(name, Range header)], cuts [bytes sent before each drop], ranges."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = {"files": {}, "requests": [], "cuts": [], "ranges": True,
                   "url": f"http://127.0.0.1:{httpd.server_address[1]}/"}
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


def serve(server, archive, tiny_tok):
    """Serve an archive and the tiny tokenizer model; return download() keyword arguments for them."""
    model = Path(tiny_tok[1]).read_bytes()
    server["files"].update({"TinyStories_all_data.tar.gz": archive, "tokenizer.model": model})
    return dict(source=server["url"] + "TinyStories_all_data.tar.gz", tokenizer_url=server["url"] + "tokenizer.model",
                tokenizer_sha256=hashlib.sha256(model).hexdigest(), timeout=5, retries=0, backoff=0)


def archive_requests(server):
    return [r for name, r in server["requests"] if name == "TinyStories_all_data.tar.gz"]


# -----------------------------------------------------------------------------
# download

def test_download_full(server, tiny_tok, tmp_path, capsys):
    members = shard_members()
    archive = tar_gz(members)
    kw = serve(server, archive, tiny_tok)
    data_dir, tok = tmp_path / "data", tmp_path / "tokenizer.model"
    tsd.download(str(data_dir), tokenizer_model=str(tok), **kw)
    for name, data in members.items():
        assert (data_dir / SHARD_DIR / name).read_bytes() == data
    assert (data_dir / "TinyStories_all_data.tar.gz").read_bytes() == archive
    assert tok.read_bytes() == Path(tiny_tok[1]).read_bytes()
    assert leftovers(tmp_path) == []
    assert archive_requests(server) == [None]
    out = capsys.readouterr().out
    assert "Number of shards: 2" in out
    assert json.loads(members["data00.json"])[0]["story"] in out


def received(cut):
    """Bytes kept in the .part when the connection drops after `cut` bytes (whole chunks only)."""
    return cut // tsd.DOWNLOAD_CHUNK * tsd.DOWNLOAD_CHUNK


def test_download_resumes_interrupted_transfer(server, tiny_tok, tmp_path):
    archive = tar_gz(shard_members(3, 40, noise=300_000))
    kw = serve(server, archive, tiny_tok)
    cut = len(archive) // 2
    server["cuts"] = [cut]
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="resume") as e:
        tsd.download(str(data_dir), tokenizer_model=str(tmp_path / "tok.model"), **kw)
    assert_one_line(e.value)
    part = data_dir / "TinyStories_all_data.tar.gz.part"
    assert part.stat().st_size == received(cut) > 0
    assert part.read_bytes() == archive[:received(cut)]
    assert not (data_dir / "TinyStories_all_data.tar.gz").exists()
    assert not (data_dir / SHARD_DIR).exists()

    tsd.download(str(data_dir), tokenizer_model=str(tmp_path / "tok.model"), **kw)
    assert archive_requests(server) == [None, f"bytes={received(cut)}-"]
    assert (data_dir / "TinyStories_all_data.tar.gz").read_bytes() == archive
    assert len(json_shards(str(data_dir / SHARD_DIR))) == 3
    assert leftovers(tmp_path) == []


def test_download_retries_within_one_call(server, tiny_tok, tmp_path):
    archive = tar_gz(shard_members(3, 40, noise=400_000))
    kw = serve(server, archive, tiny_tok) | {"retries": 2}
    server["cuts"] = [100_000, 150_000]
    tsd.download(str(tmp_path / "data"), tokenizer_model=str(tmp_path / "tok.model"), **kw)
    first, second = received(100_000), received(100_000) + received(150_000)
    assert archive_requests(server) == [None, f"bytes={first}-", f"bytes={second}-"]
    assert (tmp_path / "data" / "TinyStories_all_data.tar.gz").read_bytes() == archive


def test_download_restarts_when_server_ignores_range(server, tiny_tok, tmp_path):
    archive = tar_gz(shard_members(3, 40, noise=300_000))
    kw = serve(server, archive, tiny_tok) | {"retries": 1}
    server["cuts"], server["ranges"] = [150_000], False
    tsd.download(str(tmp_path / "data"), tokenizer_model=str(tmp_path / "tok.model"), **kw)
    assert archive_requests(server) == [None, f"bytes={received(150_000)}-"]  # answered with the whole file (200)
    assert (tmp_path / "data" / "TinyStories_all_data.tar.gz").read_bytes() == archive


def damaged_tar_header():
    """A valid gzip stream of a tar whose second member header is corrupted (tarfile stops there silently)."""
    tar = bytearray(gzip.decompress(tar_gz(shard_members(2, 40))))
    first = json.dumps([{"story": s} for s in make_stories(80, seed=1)[:40]]).encode()
    tar[512 + -(-len(first) // 512) * 512] ^= 0xFF  # first byte of the second header's name
    return gzip.compress(bytes(tar))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "bad gzip crc", "damaged tar header", "not gzip"])
def test_download_rejects_corrupted_archive(server, tiny_tok, tmp_path, damage):
    archive = bytearray(tar_gz(shard_members(2, 40)))
    if damage == "flipped byte":
        archive[len(archive) // 2] ^= 0xFF
    elif damage == "truncated":
        archive = archive[:-200]
    elif damage == "bad gzip crc":
        archive[-8] ^= 0xFF  # the trailer's CRC32: only reading to the very end notices
    elif damage == "damaged tar header":
        archive = bytearray(damaged_tar_header())
    else:
        archive = bytearray(b"<html>Service unavailable</html>")
    kw = serve(server, bytes(archive), tiny_tok)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="not a valid .tar.gz|data after the end of the tar") as e:
        tsd.download(str(data_dir), tokenizer_model=str(tmp_path / "tok.model"), **kw)
    assert_one_line(e.value)
    assert os.listdir(data_dir) == []  # no shards, no archive, no .part, no temporary directory
    assert not (tmp_path / "tok.model").exists()


def unsafe_archive(kind, tmp_path):
    """A .tar.gz with one good shard and one member that must not be unpacked."""
    buf = io.BytesIO()
    good = json.dumps([{"story": "Hi."}]).encode()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("data00.json")
        info.size = len(good)
        tf.addfile(info, io.BytesIO(good))
        info = tarfile.TarInfo({"dotdot": "../evil.json", "absolute": str(tmp_path / "evil.json"),
                                "nested dotdot": "sub/../../evil.json"}.get(kind, "evil.json"))
        if kind in ("symlink", "hardlink"):
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = str(tmp_path / "target.json")
            tf.addfile(info)
        elif kind == "device":
            info.type = tarfile.CHRTYPE
            tf.addfile(info)
        else:
            info.size = len(good)
            tf.addfile(info, io.BytesIO(good))
    path = tmp_path / "unsafe.tar.gz"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("kind", ["dotdot", "nested dotdot", "absolute", "symlink", "hardlink", "device"])
def test_download_rejects_escaping_member(tiny_tok, tmp_path, kind):
    path = unsafe_archive(kind, tmp_path)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="unsafe archive member") as e:
        tsd.download(str(data_dir), source=str(path), tokenizer_model=tiny_tok[1])
    assert_one_line(e.value)
    assert not (tmp_path / "evil.json").exists()
    assert os.listdir(data_dir) == []
    assert path.exists()  # a local source is never deleted


def test_download_completes_a_finished_part_file(server, tiny_tok, tmp_path):
    """A .part that already holds the whole file (a run stopped before the rename) is finished, not refetched."""
    archive = tar_gz(shard_members())
    kw = serve(server, archive, tiny_tok)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "TinyStories_all_data.tar.gz.part").write_bytes(archive)
    tsd.download(str(data_dir), tokenizer_model=tiny_tok[1], **kw)
    assert archive_requests(server) == [f"bytes={len(archive)}-"]  # answered 416, nothing left to send
    assert (data_dir / "TinyStories_all_data.tar.gz").read_bytes() == archive
    assert len(json_shards(str(data_dir / SHARD_DIR))) == 2


def test_download_is_idempotent(server, tiny_tok, tmp_path, capsys):
    kw = serve(server, tar_gz(shard_members()), tiny_tok)
    args = dict(data_dir=str(tmp_path / "data"), tokenizer_model=str(tmp_path / "tok.model"), **kw)
    tsd.download(**args)
    n_requests = len(server["requests"])
    capsys.readouterr()
    tsd.download(**args)
    out = capsys.readouterr().out
    assert len(server["requests"]) == n_requests
    assert "already holds 2 shards" in out and "already present" in out


def test_download_unpacks_an_already_downloaded_archive(server, tiny_tok, tmp_path):
    """An archive left by a run interrupted before unpacking is used without a new request."""
    kw = serve(server, b"", tiny_tok)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "TinyStories_all_data.tar.gz").write_bytes(tar_gz(shard_members()))
    tsd.download(str(data_dir), tokenizer_model=tiny_tok[1], **kw)
    assert len(json_shards(str(data_dir / SHARD_DIR))) == 2
    assert server["requests"] == []


def test_fetch_tokenizer_checks_sha256(server, tiny_tok, tmp_path):
    model = Path(tiny_tok[1]).read_bytes()
    server["files"]["tokenizer.model"] = model
    url, dest = server["url"] + "tokenizer.model", tmp_path / "tokenizer.model"
    with pytest.raises(DataError, match="sha256") as e:
        tsd.fetch_tokenizer(str(dest), url, sha256="0" * 64, timeout=5, retries=0, backoff=0)
    assert_one_line(e.value)
    assert os.listdir(tmp_path) == []
    tsd.fetch_tokenizer(str(dest), url, sha256=hashlib.sha256(model).hexdigest(), timeout=5, retries=0, backoff=0)
    assert dest.read_bytes() == model
    assert Tokenizer(str(dest)).n_words == VOCAB


def test_download_http_error_is_one_line(server, tiny_tok, tmp_path):
    with pytest.raises(DataError, match="HTTP 404") as e:
        tsd.download(str(tmp_path / "data"), source=server["url"] + "missing.tar.gz",
                     tokenizer_model=tiny_tok[1], timeout=5, retries=0, backoff=0)
    assert_one_line(e.value)
    assert leftovers(tmp_path) == []


def test_download_without_a_network_says_to_copy_tokenizer_model_at_once(tiny_tok, tmp_path, monkeypatch):
    """Nothing listens on the port (a released one, on 127.0.0.1): one line at once, no retry (retries are for
    interrupted transfers); for the tokenizer, where to copy it and its sha256."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    sleeps = []
    monkeypatch.setattr(tsd.time, "sleep", sleeps.append)
    write_shards(tmp_path / "src", [["a story."], ["another story."]])
    tok = tmp_path / "tokenizer.model"
    with pytest.raises(DataError) as e:
        tsd.download(str(tmp_path / "data"), source=str(tmp_path / "src"), tokenizer_model=str(tok),
                     tokenizer_url=dead + "tokenizer.model")
    assert_one_line(e.value)
    assert str(e.value).startswith(f"cannot connect to {dead[7:-1]} to download {dead}tokenizer.model (")
    assert str(e.value).endswith(f"copy the Llama 2 tokenizer.model to {tok} (sha256 {tsd.TOKENIZER_SHA256})")
    with pytest.raises(DataError, match="or give --source a local copy") as e:
        tsd.download(str(tmp_path / "data2"), source=dead + "TinyStories_all_data.tar.gz", tokenizer_model=str(tok))
    assert_one_line(e.value)
    assert sleeps == [] and not tok.exists() and leftovers(tmp_path) == []


def test_txt_source_splits_into_shards(tiny_tok, tmp_path):
    stories = make_stories(11, seed=2)
    text = "\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n  \n<|endoftext|>"  # an empty story is dropped
    (tmp_path / "stories.txt").write_text(text, encoding="utf-8")
    data_dir = tmp_path / "data"
    tsd.download(str(data_dir), source=str(tmp_path / "stories.txt"), tokenizer_model=tiny_tok[1],
                 stories_per_shard=4)
    shards = json_shards(str(data_dir / SHARD_DIR))
    assert [os.path.basename(s) for s in shards] == ["data00.json", "data01.json", "data02.json"]
    records = [json.loads(Path(s).read_text(encoding="utf-8")) for s in shards]
    assert [len(r) for r in records] == [4, 4, 3]
    assert [r["story"] for r in itertools.chain(*records)] == [s.strip() for s in stories]
    assert leftovers(data_dir) == []


@pytest.mark.parametrize("chunk_chars", [1, 5, 13, 1 << 20])
def test_txt_stories_across_read_chunks(tmp_path, chunk_chars):
    stories = [s.strip() for s in make_stories(6, seed=3)]
    path = tmp_path / "s.txt"
    path.write_text("<|endoftext|>".join(stories) + "\n<|endoftext|>\nunfinished sto", encoding="utf-8")
    assert list(tsd.iter_txt_stories(str(path), chunk_chars)) == stories + ["unfinished sto"]


def test_directory_source_is_copied(tiny_tok, tmp_path):
    src = tmp_path / "src"
    write_shards(src, [["a story."], ["another story."]])
    data_dir = tmp_path / "data"
    tsd.download(str(data_dir), source=str(src), tokenizer_model=tiny_tok[1])
    for name in ("data00.json", "data01.json"):
        assert (data_dir / SHARD_DIR / name).read_bytes() == (src / name).read_bytes()


# -----------------------------------------------------------------------------
# train_vocab, pretokenize

def test_train_vocab_model(tiny_tok):
    data_dir, model = tiny_tok
    enc = Tokenizer(model)
    assert (enc.n_words, enc.bos_id, enc.eos_id) == (VOCAB, 1, 2)
    assert os.path.exists(data_dir / f"tok{VOCAB}.vocab")
    assert not os.path.exists(data_dir / "tiny.txt")  # the temporary text is deleted by default
    assert leftovers(data_dir) == []
    sp = enc.sp_model
    assert [sp.id_to_piece(i) for i in enc.encode("2024", bos=False)][-4:] == ["2", "0", "2", "4"]  # split digits
    text = "Zoë said “ünïcödé” 🙂 and 42.\nTwice."  # (like llama2.c, runs of spaces are collapsed)
    assert enc.decode(enc.encode(text)) == text  # byte fallback, identity normalisation
    ids = enc.encode("Lily", bos=True, eos=True)
    assert ids[0] == enc.bos_id and ids[-1] == enc.eos_id
    assert enc.decode(torch.tensor(ids)) == "Lily"


def test_train_vocab_keep_text(tmp_path):
    write_shards(tmp_path / SHARD_DIR, [make_stories(150, seed=4)])
    tsd.train_vocab(320, str(tmp_path), num_shards=1, keep_text=True)
    assert (tmp_path / "tok320.model").exists()
    assert (tmp_path / "tiny.txt").read_text(encoding="utf-8").startswith(make_stories(1, seed=4)[0].strip())


def test_train_vocab_prints_one_summary_line_not_the_sentencepiece_log(tmp_path, capfd):
    write_shards(tmp_path / SHARD_DIR, [make_stories(150, seed=5)])
    tsd.train_vocab(320, str(tmp_path), num_shards=1)
    out, err = capfd.readouterr()
    assert out.splitlines()[-1] == f"Trained {tmp_path / 'tok320'}.model (320 pieces)"
    assert all(" shards" in line for line in err.splitlines()), err[:2000]  # at most the progress bar


def test_train_vocab_error_is_one_line(tmp_path):
    write_shards(tmp_path / SHARD_DIR, [["Hi there."] * 5])
    with pytest.raises(DataError, match="SentencePiece") as e:
        tsd.train_vocab(5000, str(tmp_path), num_shards=1)
    assert_one_line(e.value)
    assert not (tmp_path / "tok5000.model").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "tiny.txt").exists()


def expected_tokens(stories, sp):
    return [t for s in stories for t in [sp.bos_id()] + sp.encode(s.strip())]


def test_pretokenize_equals_sentencepiece_with_bos(tiny_tok, tmp_path):
    shards = [make_stories(30, seed=5), make_stories(17, seed=6), make_stories(1, seed=7)]
    write_shards(tmp_path / SHARD_DIR, shards)
    shutil.copy(tiny_tok[1], tmp_path)
    n = tsd.pretokenize(VOCAB, str(tmp_path), workers=2)
    sp = spm.SentencePieceProcessor(model_file=tiny_tok[1])
    total = 0
    for i, stories in enumerate(shards):
        got = np.fromfile(tmp_path / f"tok{VOCAB}" / f"data{i:02d}.bin", dtype=np.uint16)
        assert got.tolist() == expected_tokens(stories, sp)
        total += got.size
    assert n == total
    assert not list((tmp_path / SHARD_DIR).glob("*.bin"))
    assert leftovers(tmp_path) == []


def test_pretokenize_vocab0_writes_next_to_shards(tiny_tok, tmp_path):
    stories = make_stories(3, seed=8)
    write_shards(tmp_path / SHARD_DIR, [stories])
    tsd.pretokenize(0, str(tmp_path), workers=1, tokenizer_model=tiny_tok[1])
    got = np.fromfile(tmp_path / SHARD_DIR / "data00.bin", dtype=np.uint16)
    assert got.tolist() == expected_tokens(stories, spm.SentencePieceProcessor(model_file=tiny_tok[1]))


def test_pretokenize_real_stories_with_llama2_tokenizer(tmp_path):
    need_shared("tokenizer.model", "TinyStories-train.head-2MiB.txt")
    text = (SHARED_DATA / "TinyStories-train.head-2MiB.txt").read_text(encoding="utf-8")
    stories = text.split("<|endoftext|>")[:-1]  # the text after the last marker is an unfinished story
    assert len(stories) == 2316
    write_shards(tmp_path / SHARD_DIR, [stories[i:i + 600] for i in range(0, len(stories), 600)])
    model = str(SHARED_DATA / "tokenizer.model")
    assert tsd.pretokenize(0, str(tmp_path), workers=2, tokenizer_model=model) == 544_652  # see shared/data/README
    sp = spm.SentencePieceProcessor(model_file=model)
    for i in (0, 3):
        got = np.fromfile(tmp_path / SHARD_DIR / f"data{i:02d}.bin", dtype=np.uint16)
        assert got.tolist() == expected_tokens(stories[i * 600:(i + 1) * 600], sp)
    enc = Tokenizer(model)
    assert (enc.n_words, enc.bos_id, enc.eos_id) == (32000, 1, 2)
    assert enc.encode("Once upon a time, there was a little girl named Lily.", bos=False) == [
        9038, 2501, 263, 931, 29892, 727, 471, 263, 2217, 7826, 4257, 365, 2354, 29889]


def test_pretokenize_rejects_shard_without_story(tiny_tok, tmp_path):
    write_shards(tmp_path / SHARD_DIR, [["Fine."], ["Fine too."]])
    (tmp_path / SHARD_DIR / "data01.json").write_text(json.dumps([{"story": "ok"}, {"text": "no story"}]))
    shutil.copy(tiny_tok[1], tmp_path)
    with pytest.raises(DataError, match=r"data01.json: record 1 has no 'story' field") as e:
        tsd.pretokenize(VOCAB, str(tmp_path), workers=2)
    assert_one_line(e.value)
    assert not (tmp_path / f"tok{VOCAB}" / "data01.bin").exists()
    assert leftovers(tmp_path) == []


def test_pretokenize_rejects_invalid_json(tiny_tok, tmp_path):
    (tmp_path / SHARD_DIR).mkdir()
    (tmp_path / SHARD_DIR / "data00.json").write_text('[{"story": "cut')
    shutil.copy(tiny_tok[1], tmp_path)
    with pytest.raises(DataError, match="not valid JSON") as e:
        tsd.pretokenize(VOCAB, str(tmp_path), workers=1)
    assert_one_line(e.value)


def test_vocab_over_uint16_is_refused(tmp_path):
    write_shards(tmp_path / SHARD_DIR, [["A story."]])
    for stage in (tsd.pretokenize, tsd.train_vocab):
        with pytest.raises(DataError, match="65,535"):
            stage(70_000, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [SHARD_DIR]


# -----------------------------------------------------------------------------
# the command line: a single `error: ...` line and exit status 1

def cli_case(case, tmp_path):
    """Set up one bad-input case; return (arguments, expected message)."""
    if case == "corrupted archive":
        (tmp_path / "bad.tar.gz").write_bytes(tar_gz(shard_members())[:-300])
        return ["download", "--source", "bad.tar.gz"], "not a valid .tar.gz"
    if case == "missing source":
        return ["download", "--source", "nowhere.tar.gz"], "no such file or directory"
    if case == "no shards":
        return ["pretokenize"], "run `python tiny_stories_data.py download` first"
    if case == "missing tokenizer":
        write_shards(tmp_path / "data" / SHARD_DIR, [["A story."]])
        return ["pretokenize", "--vocab_size", "512"], "run `python tiny_stories_data.py train_vocab --vocab_size 512`"
    if case == "train_vocab without shards":
        return ["train_vocab", "--vocab_size", "512"], "run `python tiny_stories_data.py download` first"
    if case == "non-UTF-8 text":
        (tmp_path / "b.txt").write_bytes(b"A story.<|endoftext|>Another.<|endoftext|>\xff<|endoftext|>x")
        return ["download", "--source", "b.txt", "--stories_per_shard", "1"], "b.txt is not UTF-8 text (byte 0xff"
    if case == "text of one shard":
        (tmp_path / "one.txt").write_text("<|endoftext|>".join(make_stories(3)), encoding="utf-8")
        return ["download", "--source", "one.txt"], \
            "one.txt gives a single shard (3 stories at --stories_per_shard 100000), but shard 0 is the validation " \
            "split and training needs another: lower --stories_per_shard to at most 2"
    assert case == "vocab too large"
    return ["train_vocab", "--vocab_size", "70000"], "does not fit uint16"


CLI_CASES = ["corrupted archive", "missing source", "no shards", "missing tokenizer", "train_vocab without shards",
             "vocab too large", "non-UTF-8 text", "text of one shard"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, case):
    """main() in this process: the message, exit status 1, and nothing written (at most an empty data dir)."""
    monkeypatch.chdir(tmp_path)
    args, message = cli_case(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = tsd.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    new = [p for p in tmp_path.rglob("*") if p.relative_to(tmp_path) not in before]
    assert all(p.is_dir() and not any(p.iterdir()) for p in new), new


# -----------------------------------------------------------------------------
# killed and interrupted processes

def live_children(pid):
    """Process ids whose parent is `pid` and that have not exited (zombies are dead), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pids):
    return [p for p in pids if Path(f"/proc/{p}/stat").exists() and
            Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


@pytest.fixture(scope="module")
def busy_data(tmp_path_factory, tiny_tok):
    """Eight shards of 3,000 stories and the tiny tokenizer: pretokenize runs for about a second with 2 workers."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find the worker processes")
    data_dir = tmp_path_factory.mktemp("busy")
    write_shards(data_dir / SHARD_DIR, [make_stories(3000, seed=9)] * 8)
    shutil.copy(tiny_tok[1], data_dir)
    return data_dir


def start_pretokenize(data_dir):
    """pretokenize in its own process group (as a terminal runs it); returns it and its 2 workers, once started."""
    proc = subprocess.Popen([sys.executable, str(REPO / "tiny_stories_data.py"), "pretokenize", "--vocab_size",
                             str(VOCAB), "--data_dir", str(data_dir), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(workers := live_children(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    return proc, workers


def wait_gone(pids, seconds=5):
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def test_pretokenize_workers_die_with_a_killed_parent(busy_data):
    """kill -9 of pretokenize: its workers exit too instead of waiting forever for work; the next run cleans up what
    they were writing and finishes."""
    proc, workers = start_pretokenize(busy_data)
    proc.kill()
    proc.wait(timeout=30)
    assert wait_gone(workers) == []
    assert tsd.pretokenize(VOCAB, str(busy_data), workers=2) > 0
    assert len(list((busy_data / f"tok{VOCAB}").glob("*.bin"))) == 8
    assert leftovers(busy_data) == []


def test_pretokenize_ctrl_c_is_one_line(busy_data):
    """Ctrl-C (SIGINT to the process group): one line that does not promise a resumed download, exit 130, the
    workers stopped at once, no temporary file left."""
    proc, workers = start_pretokenize(busy_data)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["error: interrupted: no half-written shard was kept; run the same command "
                                        "again to encode every shard"]
    assert wait_gone(workers) == []
    assert leftovers(busy_data) == []


def test_download_killed_mid_split_leaves_nothing_for_good(tiny_tok, tmp_path):
    """kill -9 of download while it writes shards into its hidden temporary directory: the next run removes that
    directory (its process is gone) and completes."""
    stories = make_stories(1500, seed=10)
    (tmp_path / "s.txt").write_text("<|endoftext|>".join(stories), encoding="utf-8")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    proc = subprocess.Popen([sys.executable, str(REPO / "tiny_stories_data.py"), "download", "--source",
                             str(tmp_path / "s.txt"), "--data_dir", str(data_dir), "--stories_per_shard", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (temp := list(data_dir.glob(".TinyStories_all_data.*"))) or len(list(temp[0].iterdir())) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.kill()
    proc.wait(timeout=30)
    assert temp[0].exists()  # what the killed run left
    tsd.download(str(data_dir), source=str(tmp_path / "s.txt"), tokenizer_model=tiny_tok[1], stories_per_shard=10)
    shards = json_shards(str(data_dir / SHARD_DIR))
    assert len(shards) == 150 and tsd.read_stories(shards[-1])[-1] == stories[-1].strip()
    assert leftovers(data_dir) == []


def test_cli_help_lists_options(capsys):
    for stage in ("download", "pretokenize", "train_vocab"):
        with pytest.raises(SystemExit) as e:
            tsd.main([stage, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data_dir", "--source", "--tokenizer_url", "--tokenizer_sha256", "--stories_per_shard",
                   "--timeout", "--retries", "--workers", "--num_shards", "--keep_text", "--vocab_size"):
        assert option in out
