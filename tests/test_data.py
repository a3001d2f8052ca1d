"""
Tests of tiny_stories_data.py: download (against a real HTTP server on 127.0.0.1), pretokenize, train_vocab,
the batch loader and the command line. The core tests run on a SentencePiece model trained here, in seconds, on
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
import pickle
import random
import re
import shutil
import signal
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
    write_shards(data_dir / tsd.SHARD_DIR, [stories[:200], stories[200:]])
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
        assert (data_dir / tsd.SHARD_DIR / name).read_bytes() == data
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
    with pytest.raises(tsd.DataError, match="resume") as e:
        tsd.download(str(data_dir), tokenizer_model=str(tmp_path / "tok.model"), **kw)
    assert_one_line(e.value)
    part = data_dir / "TinyStories_all_data.tar.gz.part"
    assert part.stat().st_size == received(cut) > 0
    assert part.read_bytes() == archive[:received(cut)]
    assert not (data_dir / "TinyStories_all_data.tar.gz").exists()
    assert not (data_dir / tsd.SHARD_DIR).exists()

    tsd.download(str(data_dir), tokenizer_model=str(tmp_path / "tok.model"), **kw)
    assert archive_requests(server) == [None, f"bytes={received(cut)}-"]
    assert (data_dir / "TinyStories_all_data.tar.gz").read_bytes() == archive
    assert len(tsd.json_shards(str(data_dir / tsd.SHARD_DIR))) == 3
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
    with pytest.raises(tsd.DataError, match="not a valid .tar.gz|data after the end of the tar") as e:
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
    with pytest.raises(tsd.DataError, match="unsafe archive member") as e:
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
    assert len(tsd.json_shards(str(data_dir / tsd.SHARD_DIR))) == 2


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
    assert len(tsd.json_shards(str(data_dir / tsd.SHARD_DIR))) == 2
    assert server["requests"] == []


def test_fetch_tokenizer_checks_sha256(server, tiny_tok, tmp_path):
    model = Path(tiny_tok[1]).read_bytes()
    server["files"]["tokenizer.model"] = model
    url, dest = server["url"] + "tokenizer.model", tmp_path / "tokenizer.model"
    with pytest.raises(tsd.DataError, match="sha256") as e:
        tsd.fetch_tokenizer(str(dest), url, sha256="0" * 64, timeout=5, retries=0, backoff=0)
    assert_one_line(e.value)
    assert os.listdir(tmp_path) == []
    tsd.fetch_tokenizer(str(dest), url, sha256=hashlib.sha256(model).hexdigest(), timeout=5, retries=0, backoff=0)
    assert dest.read_bytes() == model
    assert tsd.Tokenizer(str(dest)).n_words == VOCAB


def test_download_http_error_is_one_line(server, tiny_tok, tmp_path):
    with pytest.raises(tsd.DataError, match="HTTP 404") as e:
        tsd.download(str(tmp_path / "data"), source=server["url"] + "missing.tar.gz",
                     tokenizer_model=tiny_tok[1], timeout=5, retries=0, backoff=0)
    assert_one_line(e.value)
    assert leftovers(tmp_path) == []


def test_txt_source_splits_into_shards(tiny_tok, tmp_path):
    stories = make_stories(11, seed=2)
    text = "\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n  \n<|endoftext|>"  # an empty story is dropped
    (tmp_path / "stories.txt").write_text(text, encoding="utf-8")
    data_dir = tmp_path / "data"
    tsd.download(str(data_dir), source=str(tmp_path / "stories.txt"), tokenizer_model=tiny_tok[1],
                 stories_per_shard=4)
    shards = tsd.json_shards(str(data_dir / tsd.SHARD_DIR))
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
        assert (data_dir / tsd.SHARD_DIR / name).read_bytes() == (src / name).read_bytes()


# -----------------------------------------------------------------------------
# tokenizer, train_vocab, pretokenize

def test_train_vocab_model(tiny_tok):
    data_dir, model = tiny_tok
    enc = tsd.Tokenizer(model)
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
    write_shards(tmp_path / tsd.SHARD_DIR, [make_stories(150, seed=4)])
    tsd.train_vocab(320, str(tmp_path), num_shards=1, keep_text=True)
    assert (tmp_path / "tok320.model").exists()
    assert (tmp_path / "tiny.txt").read_text(encoding="utf-8").startswith(make_stories(1, seed=4)[0].strip())


def test_train_vocab_error_is_one_line(tmp_path):
    write_shards(tmp_path / tsd.SHARD_DIR, [["Hi there."] * 5])
    with pytest.raises(tsd.DataError, match="SentencePiece") as e:
        tsd.train_vocab(5000, str(tmp_path), num_shards=1)
    assert_one_line(e.value)
    assert not (tmp_path / "tok5000.model").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "tiny.txt").exists()


def expected_tokens(stories, sp):
    return [t for s in stories for t in [sp.bos_id()] + sp.encode(s.strip())]


def test_pretokenize_equals_sentencepiece_with_bos(tiny_tok, tmp_path):
    shards = [make_stories(30, seed=5), make_stories(17, seed=6), make_stories(1, seed=7)]
    write_shards(tmp_path / tsd.SHARD_DIR, shards)
    shutil.copy(tiny_tok[1], tmp_path)
    n = tsd.pretokenize(VOCAB, str(tmp_path), workers=2)
    sp = spm.SentencePieceProcessor(model_file=tiny_tok[1])
    total = 0
    for i, stories in enumerate(shards):
        got = np.fromfile(tmp_path / f"tok{VOCAB}" / f"data{i:02d}.bin", dtype=np.uint16)
        assert got.tolist() == expected_tokens(stories, sp)
        total += got.size
    assert n == total
    assert not list((tmp_path / tsd.SHARD_DIR).glob("*.bin"))
    assert leftovers(tmp_path) == []


def test_pretokenize_vocab0_writes_next_to_shards(tiny_tok, tmp_path):
    stories = make_stories(3, seed=8)
    write_shards(tmp_path / tsd.SHARD_DIR, [stories])
    tsd.pretokenize(0, str(tmp_path), workers=1, tokenizer_model=tiny_tok[1])
    got = np.fromfile(tmp_path / tsd.SHARD_DIR / "data00.bin", dtype=np.uint16)
    assert got.tolist() == expected_tokens(stories, spm.SentencePieceProcessor(model_file=tiny_tok[1]))


def test_pretokenize_real_stories_with_llama2_tokenizer(tmp_path):
    need_shared("tokenizer.model", "TinyStories-train.head-2MiB.txt")
    text = (SHARED_DATA / "TinyStories-train.head-2MiB.txt").read_text(encoding="utf-8")
    stories = text.split("<|endoftext|>")[:-1]  # the text after the last marker is an unfinished story
    assert len(stories) == 2316
    write_shards(tmp_path / tsd.SHARD_DIR, [stories[i:i + 600] for i in range(0, len(stories), 600)])
    model = str(SHARED_DATA / "tokenizer.model")
    assert tsd.pretokenize(0, str(tmp_path), workers=2, tokenizer_model=model) == 544_652  # see shared/data/README
    sp = spm.SentencePieceProcessor(model_file=model)
    for i in (0, 3):
        got = np.fromfile(tmp_path / tsd.SHARD_DIR / f"data{i:02d}.bin", dtype=np.uint16)
        assert got.tolist() == expected_tokens(stories[i * 600:(i + 1) * 600], sp)
    enc = tsd.Tokenizer(model)
    assert (enc.n_words, enc.bos_id, enc.eos_id) == (32000, 1, 2)
    assert enc.encode("Once upon a time, there was a little girl named Lily.", bos=False) == [
        9038, 2501, 263, 931, 29892, 727, 471, 263, 2217, 7826, 4257, 365, 2354, 29889]


def test_pretokenize_rejects_shard_without_story(tiny_tok, tmp_path):
    write_shards(tmp_path / tsd.SHARD_DIR, [["Fine."], ["Fine too."]])
    (tmp_path / tsd.SHARD_DIR / "data01.json").write_text(json.dumps([{"story": "ok"}, {"text": "no story"}]))
    shutil.copy(tiny_tok[1], tmp_path)
    with pytest.raises(tsd.DataError, match=r"data01.json: record 1 has no 'story' field") as e:
        tsd.pretokenize(VOCAB, str(tmp_path), workers=2)
    assert_one_line(e.value)
    assert not (tmp_path / f"tok{VOCAB}" / "data01.bin").exists()
    assert leftovers(tmp_path) == []


def test_pretokenize_rejects_invalid_json(tiny_tok, tmp_path):
    (tmp_path / tsd.SHARD_DIR).mkdir()
    (tmp_path / tsd.SHARD_DIR / "data00.json").write_text('[{"story": "cut')
    shutil.copy(tiny_tok[1], tmp_path)
    with pytest.raises(tsd.DataError, match="not valid JSON") as e:
        tsd.pretokenize(VOCAB, str(tmp_path), workers=1)
    assert_one_line(e.value)


def test_vocab_over_uint16_is_refused(tmp_path):
    write_shards(tmp_path / tsd.SHARD_DIR, [["A story."]])
    for stage in (tsd.pretokenize, tsd.train_vocab):
        with pytest.raises(tsd.DataError, match="65,535"):
            stage(70_000, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [tsd.SHARD_DIR]


def test_missing_tokenizer_says_which_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"train_vocab --vocab_size 512 --data_dir {tmp_path}`")) as e:
        tsd.Tokenizer(str(tmp_path / "tok512.model"))
    assert isinstance(e.value, tsd.DataError)
    assert_one_line(e.value)
    with pytest.raises(FileNotFoundError, match="tiny_stories_data.py download"):
        tsd.Tokenizer(str(tmp_path / "tokenizer.model"))
    assert tsd.tokenizer_path(0) == tsd.TOKENIZER_MODEL == str(REPO / "tokenizer.model")
    assert tsd.tokenizer_path(512, "d") == os.path.join("d", "tok512.model")


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
        write_shards(tmp_path / "data" / tsd.SHARD_DIR, [["A story."]])
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
    write_shards(data_dir / tsd.SHARD_DIR, [make_stories(3000, seed=9)] * 8)
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
    """kill -9 of pretokenize: its workers exit too (they were left hanging forever); the next run cleans up what
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
    shards = tsd.json_shards(str(data_dir / tsd.SHARD_DIR))
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


# -----------------------------------------------------------------------------
# batch loader

def write_bins(directory, lengths):
    """uint16 shards whose tokens name their place: shard k, offset j holds k * 10000 + j."""
    os.makedirs(directory, exist_ok=True)
    shards = []
    for k, n in enumerate(lengths):
        tokens = (k * 10000 + np.arange(n)).astype(np.uint16)
        tokens.tofile(os.path.join(directory, f"data{k:02d}.bin"))
        shards.append(tokens.astype(np.int64))
    return shards


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


def test_loader_windows_are_exact_slices(tmp_path):
    T = 64
    shards = write_bins(tmp_path / tsd.SHARD_DIR, [500, 300, 700, T])  # the last is too short for a window
    train = tsd.BatchLoader("train", 16, T, data_dir=str(tmp_path))
    val = tsd.BatchLoader("val", 16, T, data_dir=str(tmp_path))
    assert train.n_tokens == 1000 and val.n_tokens == 500
    for _ in range(20):
        check_windows(*train.next_batch(), shards, {1, 2}, T)
        check_windows(*val.next_batch(), shards, {0}, T)


def test_loader_is_uniform_over_start_positions(tmp_path):
    T = 32
    shards = write_bins(tmp_path / tsd.SHARD_DIR, [100, T + 5, T + 15])  # 5 and 15 windows
    loader = tsd.BatchLoader("train", 500, T, data_dir=str(tmp_path), seed=1)
    places = [p for _ in range(8) for p in check_windows(*loader.next_batch(), shards, {1, 2}, T)]
    assert set(places) == {(1, o) for o in range(5)} | {(2, o) for o in range(15)}
    share = sum(k == 2 for k, _ in places) / len(places)
    assert abs(share - 0.75) < 0.03


def test_loader_state_reproduces_batches(tmp_path):
    write_bins(tmp_path / tsd.SHARD_DIR, [300, 400, 500])
    make = lambda **kw: tsd.BatchLoader("train", 8, 16, data_dir=str(tmp_path), **kw)  # noqa: E731
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
    write_bins(tmp_path / tsd.SHARD_DIR, [300, 400, 500])
    make = lambda prefetch: tsd.BatchLoader("train", 8, 16, data_dir=str(tmp_path), seed=5,  # noqa: E731
                                            prefetch=prefetch)
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
    write_bins(tmp_path / tsd.SHARD_DIR, [300, 400])
    loader = tsd.BatchLoader("train", 4, 16, data_dir=str(tmp_path), prefetch=2)
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
    write_bins(tmp_path / tsd.SHARD_DIR, [300, 5000])
    first = {(s, r): tsd.BatchLoader("train", 8, 16, data_dir=str(tmp_path), seed=s, rank=r).next_batch()[0]
             for s, r in [(0, 0), (0, 1), (1, 0)]}
    assert not torch.equal(first[0, 0], first[0, 1]) and not torch.equal(first[0, 0], first[1, 0])


def test_loader_custom_vocab_directory(tmp_path):
    write_bins(tmp_path / f"tok{VOCAB}", [100, 100])
    assert tsd.BatchLoader("train", 2, 8, vocab_size=VOCAB, data_dir=str(tmp_path)).n_tokens == 100
    with pytest.raises(FileNotFoundError, match="pretokenize"):
        tsd.BatchLoader("train", 2, 8, vocab_size=0, data_dir=str(tmp_path))


def test_loader_errors(tmp_path):
    download_then_pretokenize = "run `python tiny_stories_data.py download.*, then .*pretokenize"
    with pytest.raises(tsd.MissingDataError, match=download_then_pretokenize) as e:
        tsd.BatchLoader("train", 4, 8, data_dir=str(tmp_path))
    assert_one_line(e.value)
    write_shards(tmp_path / tsd.SHARD_DIR, [["A story."]])
    with pytest.raises(tsd.MissingDataError, match=r"run `python tiny_stories_data.py pretokenize --data_dir"):
        tsd.BatchLoader("val", 4, 8, data_dir=str(tmp_path))
    write_bins(tmp_path / tsd.SHARD_DIR, [100])
    write_shards(tmp_path / tsd.SHARD_DIR, [["A story."], ["Another."]])  # an unfinished pretokenize
    with pytest.raises(tsd.DataError, match=r"1 JSON shard\(s\) have no .bin .*data01.json.*pretokenize") as e:
        tsd.BatchLoader("val", 4, 8, data_dir=str(tmp_path))
    assert_one_line(e.value)
    (tmp_path / tsd.SHARD_DIR / "data01.json").unlink()
    with pytest.raises(tsd.DataError, match="single shard"):
        tsd.BatchLoader("train", 4, 8, data_dir=str(tmp_path))
    write_bins(tmp_path / tsd.SHARD_DIR, [100, 20, 30])
    with pytest.raises(tsd.DataError, match=r"every train shard .* shorter than max_seq_len \+ 1 = 33 tokens") as e:
        tsd.BatchLoader("train", 4, 32, data_dir=str(tmp_path))
    assert_one_line(e.value)
    assert tsd.BatchLoader("train", 4, 29, data_dir=str(tmp_path)).n_tokens == 30  # 30 tokens: exactly one window
    (tmp_path / tsd.SHARD_DIR / "data02.bin").write_bytes(b"")  # an empty shard is skipped, not a crash
    with pytest.raises(tsd.DataError, match="shorter than"):
        tsd.BatchLoader("train", 4, 29, data_dir=str(tmp_path))
    (tmp_path / tsd.SHARD_DIR / "data02.bin").write_bytes(b"abc")  # not uint16 tokens
    with pytest.raises(tsd.DataError, match="odd number of bytes"):
        tsd.BatchLoader("train", 4, 29, data_dir=str(tmp_path))


def test_eval_batches_are_deterministic_and_shared_across_ranks(tmp_path):
    T = 16
    shards = write_bins(tmp_path / tsd.SHARD_DIR, [1000, 400, 800])
    kw = dict(data_dir=str(tmp_path))
    single = list(tsd.eval_batches("train", 4, T, 5, **kw))
    assert len(single) == 5
    again = list(tsd.eval_batches("train", 4, T, 5, **kw))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(single, again))
    places = [p for x, y in single for p in check_windows(x, y, shards, {1, 2}, T)]
    assert len(set(places)) == 20  # distinct windows
    assert all({k for k, _ in places[i:i + 4]} == {1, 2} for i in range(0, 20, 4))  # each batch spans the split
    ranks = [list(tsd.eval_batches("train", 4, T, 5, rank=r, world_size=2, **kw)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 2]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ranks[0] + ranks[1], single[0::2] + single[1::2]))
    val = list(tsd.eval_batches("val", 2, T, 3, **kw))
    assert all(int(x[0, 0]) // 10000 == 0 for x, _ in val)
