"""visualize.py on a real checkpoint trained here (train.py, the toy corpus and tokenizer of toy_runs.py): every
panel of every layer, index.html, the crop of long prompts, and one-line errors."""

import os
import re
import shutil

import pytest
import torch

import export
import train
import visualize
from checkpoints import CHECKPOINT_FILE
from toy_runs import VOCAB, args_for, assert_one_line_error, dat, the_run_dir

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_dat(data_dir, tmp_path_factory):
    """Two training steps of a 2-layer DAT (relational attention, symbolic attention): its run directory."""
    out = tmp_path_factory.mktemp("viz_run")
    argv = args_for(data_dir, out, dat("relational_attention", "symbolic_attention"), "--n_layers", 2,
                    "--max_iters", 2, "--eval_interval", 2)
    assert train.main(argv) == 0
    return the_run_dir(out)


def test_every_panel_of_every_layer(trained_dat, tmp_path, capsys):
    out = tmp_path / "viz"
    assert visualize.main(["--ckpt_path", trained_dat, "--prompt", "Lily went to the park.", "--out_dir", str(out)]) == 0
    assert "index.html" in capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"layer{layer}_{name}.png" for layer in (0, 1)
                          for name in ("self_attention", "relational_attention", "relations", "symbols"))
    assert all((out / name).read_bytes().startswith(PNG) for name in pngs)
    index = (out / "index.html").read_text()
    assert sorted(re.findall(r"<img src='([^']+)'", index)) == pngs
    assert "Lily went to the park." in index and "&lt;s&gt;" in index  # the prompt and its tokens, BOS first


def test_layers_and_long_prompts(trained_dat, tmp_path, capsys):
    long_prompt = " ".join(["Tom and Lily played in the garden with the dog."] * 8)
    out = tmp_path / "viz"
    assert visualize.main(["--ckpt_path", f"{trained_dat}/{CHECKPOINT_FILE}", "--prompt", long_prompt,
                           "--out_dir", str(out), "--layers", "1"]) == 0
    note = capsys.readouterr().out.splitlines()[0]
    assert re.fullmatch(r"The prompt has \d+ tokens; the maps show its first 32\.", note)  # the block size, < 64
    assert sorted(p.name for p in out.glob("*.png"))[0].startswith("layer1_")
    assert note in (out / "index.html").read_text()


def test_relations_panels_by_kind():
    """RA relations (B, T, T, n_r) give one panel per relation, DisRCA's rho (B, n, T, T) one per head; the
    future (j > i) is blank."""
    T = 5
    ra = visualize.layer_panels("relations", {"relations": torch.randn(1, T, T, 3)}, 0)
    disrca = visualize.layer_panels("relations", {"relations": torch.randn(1, 2, T, T)}, 0)
    assert [name for name, _ in ra] == [f"layer 0, relation {r}" for r in range(3)]
    assert [name for name, _ in disrca] == ["layer 0, head 0: rho", "layer 0, head 1: rho"]
    assert torch.isnan(ra[0][1].triu(1)[0, 1:]).all() and not torch.isnan(ra[0][1].tril()).any()
    assert visualize.layer_panels("relations", {"relations": None}, 0) == []


@pytest.mark.parametrize("change,message", [
    (dict(ckpt_path="missing"), "does not exist"),
    (dict(layers="2"), "layers 0..1"),
    (dict(layers="one"), "layer numbers"),
    (dict(tokenizer="NOTES"), "not a SentencePiece model"),
    (dict(out_dir="NOTES"), "is a file"),
])
def test_bad_input_gives_one_line(trained_dat, tmp_path, capsys, change, message):
    (tmp_path / "notes.txt").write_text("not a model")
    flags = dict(dict(ckpt_path=trained_dat, prompt="Lily", out_dir=str(tmp_path / "viz")), **change)
    argv = [a for k, v in flags.items() for a in (f"--{k}", str(tmp_path / "notes.txt") if v == "NOTES" else v)]
    assert visualize.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "viz").exists()


def test_cuda_on_a_cpu_only_torch_is_one_line_not_a_traceback(trained_dat, tmp_path, capsys, monkeypatch):
    """The device check that every tool shares (runtime.setup_device), before the model is loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "viz"
    code = visualize.main(["--ckpt_path", trained_dat, "--prompt", "Lily", "--out_dir", str(out), "--device", "cuda"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "--device cuda: CUDA is not available")
    assert not out.exists()


def test_a_prompt_with_a_byte_that_is_not_utf8_is_drawn_with_the_byte_replaced(trained_dat, tmp_path, capsys):
    """`--prompt "$(printf 'ab\\xffcd')"` reaches Python as a lone surrogate (os.fsdecode), which SentencePiece and
    the UTF-8 index.html refused with a traceback; it becomes U+FFFD."""
    out = tmp_path / "viz"
    prompt = os.fsdecode(b"Lily \xff went")
    assert visualize.main(["--ckpt_path", trained_dat, "--prompt", prompt, "--out_dir", str(out)]) == 0
    assert "Lily \ufffd went" in (out / "index.html").read_text(encoding="utf-8")


def test_a_hugging_face_directory(trained_dat, data_dir, tmp_path, capsys):
    """visualize.py takes every model source checkpoints.load_model reads: here export.py's directory, with the
    tokenizer the run trained with."""
    assert export.main(["--ckpt_path", trained_dat, "--out_dir", str(tmp_path / "hf")]) == 0
    shutil.copy(os.path.join(data_dir, f"tok{VOCAB}.model"), tmp_path / "hf" / "tokenizer.model")
    outputs = []
    for path in (trained_dat, tmp_path / "hf"):
        out = tmp_path / f"viz_{len(outputs)}"
        assert visualize.main(["--ckpt_path", str(path), "--prompt", "Lily went", "--out_dir", str(out)]) == 0
        outputs.append({p.name: p.read_bytes() for p in out.glob("*.png")})
    assert len(outputs[0]) == 8 and outputs[0] == outputs[1]  # the same weights draw the same maps
