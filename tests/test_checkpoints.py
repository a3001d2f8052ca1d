"""
Tests of checkpoints.py: the one loader reads every kind of source (our run directories and checkpoint files, the
authors' checkpoints, Hugging Face directories) for every script; a damaged checkpoint stops train.py, sample.py,
visualize.py and export.py with one `error: ...` line; the atomic write keeps the previous checkpoint on a full
disk; the tokenizer of a model is found as train.py finds it.
"""

import os
import re
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import export
import reference as R
import sample
import visualize
from checkpoints import CHECKPOINT_FILE, checkpoint_file, find_tokenizer, load_model
from runtime import RunError
from toy_runs import (CONSTANT_LR, TRANSFORMER, VOCAB, args_for, assert_one_line_error, load_ckpt, run_main,
                      run_script)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_checkpoints(tmp_path):
    """A parity fixture as our checkpoint in a run directory, as the authors' train.py's checkpoint file, and as a
    Hugging Face directory: (fixture, [paths])."""
    fixture = torch.load(FIXTURES / "parity" / "ra_posrel_rope.pt", weights_only=False)
    ckpt = dict(model=fixture["state_dict"], model_args=fixture["model_args"], kind=fixture["kind"], arch="current",
                config=dict(vocab_size=0))
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / CHECKPOINT_FILE)
    # the authors' train.py: no kind or arch, a compiled model's key prefix, their training config
    theirs = dict(model={f"_orig_mod.{k}": v for k, v in fixture["state_dict"].items()},
                  model_args=fixture["model_args"], iter_num=3, best_val_loss=torch.tensor(2.5), config={"sa": 2})
    torch.save(theirs, tmp_path / "theirs.pt")
    R.save_hf_directory(R.model_from_checkpoint(ckpt), tmp_path / "hf")
    return fixture, [tmp_path / "run", tmp_path / "run" / CHECKPOINT_FILE, tmp_path / "theirs.pt", tmp_path / "hf"]


def test_load_model_reads_every_source_and_refuses_what_is_not_a_model(tmp_path):
    fixture, paths = fixture_checkpoints(tmp_path)
    for path in paths:
        model, ckpt = load_model(str(path))
        assert not model.training and (ckpt == {}) == (path.name == "hf")
        logits, _ = model(fixture["idx"])
        assert (logits - fixture["logits"]).abs().max().item() <= 1e-4
    assert load_model(str(tmp_path / "run"), dropout_rate=0.3)[0].config.dropout_rate == 0.3
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    for path, message in ((tmp_path / "missing", "no checkpoint at"), (tmp_path / "missing", "does not exist"),
                          (tmp_path / "empty", f"neither a {CHECKPOINT_FILE} nor a config.json"),
                          (tmp_path / "notes.txt", "is not a readable checkpoint"),
                          (tmp_path / "other.pt", "is not a checkpoint of train.py (no model, model_args)")):
        with pytest.raises(RunError, match=re.escape(message)):
            load_model(str(path))


def test_a_run_directory_is_read_from_its_checkpoint_not_its_config_json(trained_run):
    """A run directory of ours holds config.json (train.py's settings, not a Hugging Face config) next to its
    checkpoint: the loader reads the checkpoint."""
    assert os.path.isfile(os.path.join(trained_run, "config.json"))
    model, ckpt = load_model(trained_run)
    assert ckpt["iter_num"] == 4 and model.config == R.config_from_checkpoint(load_ckpt(trained_run))
    assert checkpoint_file(trained_run) == os.path.join(trained_run, CHECKPOINT_FILE)


def test_the_tokenizer_is_the_given_one_the_directory_s_or_the_run_s(data_dir, trained_run, tmp_path):
    tokenizer_file = os.path.join(data_dir, f"tok{VOCAB}.model")
    _, ckpt = load_model(trained_run)
    assert find_tokenizer(trained_run, ckpt, VOCAB).model_path == tokenizer_file  # the run's --data_dir
    shutil.copy(tokenizer_file, tmp_path / "tokenizer.model")
    assert find_tokenizer(str(tmp_path), {}, VOCAB).model_path == str(tmp_path / "tokenizer.model")
    assert find_tokenizer(str(tmp_path), {}, VOCAB, given=tokenizer_file).model_path == tokenizer_file
    with pytest.raises(RunError, match=f"has {VOCAB} tokens, the model 500 \\(give the right --tokenizer\\)"):
        find_tokenizer(str(tmp_path), {}, 500)


def test_sample_reads_a_hugging_face_directory(trained_run, data_dir, tmp_path, capsys):
    """export.py writes the run as a Hugging Face directory; sample.py continues a prompt from it as from the run
    (the directory's own tokenizer.model, or --tokenizer)."""
    assert export.main(["--ckpt_path", trained_run, "--out_dir", str(tmp_path / "hf")]) == 0
    argv = ["--prompt", "Once upon a time,", "--max_new_tokens", 12, "--temperature", 0, "--device", "cpu"]
    outputs = []
    for path, extra in ((trained_run, []), (tmp_path / "hf", ["--tokenizer", Path(data_dir, f"tok{VOCAB}.model")]),
                        (tmp_path / "hf", [])):
        if path != trained_run and not extra:
            shutil.copy(Path(data_dir, f"tok{VOCAB}.model"), path / "tokenizer.model")
        capsys.readouterr()
        assert sample.main([str(a) for a in ["--ckpt_path", path, *argv, *extra]]) == 0, capsys.readouterr().err
        outputs.append(capsys.readouterr().out.split(sample.SEPARATOR)[0])
    assert outputs[0].startswith("Once upon a time,") and outputs[0] == outputs[1] == outputs[2]


def flip_an_exponent_bit(path):
    """Flip the second-highest bit of the first float of the checkpoint's largest tensor record: an exponent bit
    (float32, little-endian: the sign and the exponent's top 7 bits are its fourth byte), so that a weight of
    about 0.02 becomes about 1e36. Returns the bytes."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length  # past the record's local header
    data[start + 3] ^= 0x40
    return data


def largest_value(tree):
    """The largest |value| of the tensors in a nested dict/list (a checkpoint's model and optimizer states)."""
    if isinstance(tree, torch.Tensor):
        return tree.float().abs().max().item() if tree.numel() and tree.is_floating_point() else 0.0
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return max((largest_value(child) for child in children), default=0.0)


def damaged_copy(trained_run, tmp_path, damage):
    """A copy of the run whose checkpoint is damaged: (run directory, checkpoint path, the damaged bytes)."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    path = Path(run_dir, CHECKPOINT_FILE)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "flipped bit":
        data = flip_an_exponent_bit(path)
    else:
        data = b"" if damage == "empty" else b"not a checkpoint\n"
    path.write_bytes(data)
    return run_dir, path, bytes(data)


@pytest.mark.parametrize("damage", ["truncated", "flipped bit", "empty", "text"])
def test_a_corrupt_checkpoint_is_one_line(data_dir, tmp_path, capsys, trained_run, damage):
    run_dir, path, data = damaged_copy(trained_run, tmp_path, damage)
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume",
                                             "--ckpt_path", run_dir, "--max_iters", 6))
    assert code == 1
    why = "is corrupted (checksum mismatch" if damage == "flipped bit" else "is not a readable checkpoint"
    assert_one_line_error(err, f"{path} {why}", "use another copy of the checkpoint, or start the run afresh")
    assert path.read_bytes() == data


@pytest.mark.parametrize("script,argv", [
    ("sample.py", []),
    ("visualize.py", ["--prompt", "Lily", "--out_dir", "OUT"]),
    ("export.py", ["--out_dir", "OUT"]),
])
def test_a_flipped_exponent_bit_in_a_tensor_stops_every_tool_with_one_line(trained_run, tmp_path, script, argv):
    """torch.load alone reads the damaged weight (about 1e36) without a word; in a real process each tool stops
    with exit status 1, one `error: ...` line and no traceback on stderr, nothing printed or written."""
    run_dir, path, _ = damaged_copy(trained_run, tmp_path, "flipped bit")
    assert largest_value(torch.load(path, weights_only=True)) > 1e30
    out = tmp_path / "out"
    result = run_script(["--ckpt_path", run_dir, *[str(out) if a == "OUT" else a for a in argv]],
                        launcher=(script,))
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert_one_line_error(result.stderr, f"{path} is corrupted (checksum mismatch in its record ",
                          "use another copy of the checkpoint")
    assert not out.exists()


def test_a_full_disk_keeps_the_previous_checkpoint(data_dir, tmp_path, capsys, trained_run, monkeypatch):
    """The checkpoint's temporary file writes to /dev/full: its write really fails with ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    path = Path(run_dir, CHECKPOINT_FILE)
    good = path.read_bytes()
    mkstemp, temporary = tempfile.mkstemp, []

    def full_disk_mkstemp(**kwargs):  # the checkpoint's fresh file as usual, its descriptor writing to /dev/full
        fd, name = mkstemp(**kwargs)
        if kwargs["prefix"].startswith(CHECKPOINT_FILE):
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
            temporary.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", full_disk_mkstemp)
    code, _, err = run_main(capsys, args_for(data_dir, tmp_path, TRANSFORMER, *CONSTANT_LR, "--init_from", "resume",
                                             "--ckpt_path", run_dir, "--max_iters", 6, "--eval_interval", 2,
                                             "--always_save_checkpoint", 1, "--log_to_wandb", 0))
    assert code == 1
    assert_one_line_error(err, f"writing the checkpoint {path} failed (No space left on device): stopped, the "
                               f"previous checkpoint is kept")
    assert path.read_bytes() == good
    assert temporary and not any(os.path.lexists(name) for name in temporary)


class NotAWeight:
    """A custom class: a pickle that holds one is not weights-only."""


MALFORMED_HF = {  # what is wrong -> (how to make it, the message)
    "config.json is a JSON list": (lambda d: (d / "config.json").write_text("[2, 64]"), "holds a JSON list"),
    "truncated model.safetensors": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]), "is not a readable safetensors file"),
    "empty model.safetensors": (lambda d: (d / "model.safetensors").write_bytes(b""),
                                "is not a readable safetensors file"),
    "text model.safetensors": (lambda d: (d / "model.safetensors").write_text("weights, as text\n"),
                               "is not a readable safetensors file"),
    "pytorch_model.bin not weights-only": (lambda d: ((d / "model.safetensors").unlink(), torch.save(
        {"layers.final_out.weight": NotAWeight()}, d / "pytorch_model.bin")),
        "pytorch_model.bin is not a weights-only PyTorch file (it holds a Python object"),
}


@pytest.mark.parametrize("fault", MALFORMED_HF)
def test_a_malformed_hugging_face_directory_is_one_line_in_every_tool(tmp_path, capsys, fault):
    """load_model raises a RunError naming the file; export.py, visualize.py and sample.py print one `error: ...`
    line (no traceback), exit with status 1 and write nothing."""
    _, paths = fixture_checkpoints(tmp_path)
    hf = paths[-1]
    make, message = MALFORMED_HF[fault]
    make(hf)
    with pytest.raises(RunError, match=re.escape(message)):
        load_model(str(hf))
    out = tmp_path / "out"
    for main, argv in ((export.main, ["--out_dir", out]), (visualize.main, ["--prompt", "Lily", "--out_dir", out]),
                       (sample.main, ["--device", "cpu"])):
        assert main([str(a) for a in ["--ckpt_path", hf, *argv]]) == 1
        printed, err = capsys.readouterr()
        assert printed == "" and not out.exists()
        assert_one_line_error(err, str(hf), message)
