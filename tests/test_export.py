"""export.py: our checkpoints -> the Hugging Face format that the authors' `dual-attention` package reads
(config.json + model.safetensors), with equal logits in their package and back in ours."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export
import model as M
import reference as R
from checkpoints import CHECKPOINT_FILE, load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def package(monkeypatch):
    hf = pytest.importorskip("dual_attention.hf", reason="pip install dual-attention huggingface_hub")
    import dual_attention.model_utils
    import dual_attention.relational_attention
    # their RCA/DisRCA use model_utils without importing it
    monkeypatch.setattr(dual_attention.relational_attention, "model_utils", dual_attention.model_utils, raising=False)
    return hf


def our_checkpoint(path, arch="current", **flags):
    """A checkpoint as train.py writes it (model, model_args, kind, arch, config), weights redrawn at a large scale."""
    flags = dict(dict(sa=2, ra=2, d_model=32, n_layers=2, symbol_type="symbolic_attention", pos_enc_type="RoPE",
                      ra_type="relational_attention", max_seq_len=16, vocab_size=50, arch=arch), **flags)
    torch.manual_seed(0)
    model = M.build_model(M.ModelConfig.from_flags(flags)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    kind, model_args = R.reference_args(model.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(model=model.state_dict(), model_args=model_args, kind=kind, arch=arch, config=flags), path)
    return model


@pytest.mark.parametrize("flags", [
    dict(),
    dict(ra_type="disrca", symbol_type="position_relative", pos_enc_type="pos_emb", symmetric_rels=1),
    dict(ra_type="rca", sa=0, ra=4, trainable_symbols=0, activation="gelu", norm_first=0),
    dict(ra=0, sa=4),
], ids=["ra-symbolic", "disrca-relative", "rca-sa0", "transformer"])
def test_export_loads_in_the_authors_package_with_equal_logits(flags, tmp_path, capsys, package):
    model = our_checkpoint(tmp_path / "run" / CHECKPOINT_FILE, **flags)
    assert export.main(["--ckpt_path", str(tmp_path / "run"), "--out_dir", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    kind = model.config.kind
    assert f"{kind}_HFHub.from_pretrained" in out
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == R.reference_args(model.config)[1]
    theirs = getattr(package, f"{kind}_HFHub").from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        expected = model(idx)[0]
        assert (theirs(idx)[0] - expected).abs().max().item() <= 1e-4
        assert (load_model(str(tmp_path / "hf"))[0](idx)[0] - expected).abs().max().item() <= 1e-4


def run_export(*argv, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "export.py", *map(str, argv)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_bad_input_gives_one_line(tmp_path, capsys):
    our_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
    (tmp_path / "file").write_text("")
    cases = [
        ((tmp_path / "missing", tmp_path / "out"), "does not exist"),
        ((tmp_path / "run", tmp_path / "file"), "is a file"),
    ]
    for (ckpt_path, out_dir), message in cases:
        assert export.main(["--ckpt_path", str(ckpt_path), "--out_dir", str(out_dir)]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_hub_id_goes_through_huggingface_hub(tmp_path):
    """The hub path exists (snapshot_download); offline (HF_HUB_OFFLINE=1, an empty cache) it fails in one line.
    A real download is not tested: the tests never leave 127.0.0.1."""
    pytest.importorskip("huggingface_hub")
    result = run_export("--ckpt_path", "awni00/DAT-sa8-ra8-ns1024-sh8-nkvh4-343M", "--out_dir", tmp_path / "out",
                        env=dict(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home")))
    assert result.returncode == 1, result.stderr
    assert "Hugging Face Hub" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [dict(), dict(ra=0, sa=4)], ids=["dat", "transformer"])
def test_a_paper_era_run_is_refused_with_the_reason(flags, tmp_path, capsys, package):
    """Their package (the oracle) builds every model with a final LayerNorm and an output layer tied to the token
    embedding, without a bias: no config.json of theirs describes a paper-era model, which has neither. export.py
    says so in one line and writes nothing."""
    model = our_checkpoint(tmp_path / "paper" / CHECKPOINT_FILE, arch="paper", **flags)
    kind, model_args = R.reference_args(M.ModelConfig.from_flags(dict(model.config.__dict__, arch="current")))
    theirs = getattr(package, f"{kind}_HFHub")(**model_args)
    names = dict(theirs.state_dict(keep_vars=True))
    assert "layers.norm.weight" in names and "layers.final_out.bias" not in names
    assert names["layers.final_out.weight"] is names["layers.token_embedder.weight"]
    assert "layers.norm.weight" not in model.state_dict() and "layers.final_out.bias" in model.state_dict()
    assert export.main(["--ckpt_path", str(tmp_path / "paper"), "--out_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: a paper-era model (--arch paper) cannot be exported: ")
    assert "no final LayerNorm and a separate output layer with a bias" in err
    assert not (tmp_path / "out").exists()


def tree(directory):
    """{relative path: bytes} of every file under a directory."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_export_into_a_run_directory_is_refused_and_the_run_is_unchanged(trained_run, tmp_path, capsys):
    """An export never writes into a run of train.py (whose config.json it would replace, and the run could not be
    resumed) nor into any other non-empty directory that is not a previous export."""
    before = tree(trained_run)
    assert export.main(["--ckpt_path", trained_run, "--out_dir", trained_run]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out_dir {trained_run} is a run directory of train.py (it holds " in err
    assert tree(trained_run) == before
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(Path(trained_run, "config.json"), only_config)  # train.py's config.json, not a Hugging Face one
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    for target, held in ((only_config, "config.json"), (tmp_path / "notes", "notes.txt")):
        before = tree(target)
        assert export.main(["--ckpt_path", trained_run, "--out_dir", str(target)]) == 1
        assert f"is neither empty nor a previous export (it holds {held})" in capsys.readouterr().err
        assert tree(target) == before


def test_a_previous_export_is_replaced(trained_run, data_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export.main(["--ckpt_path", trained_run, "--out_dir", str(out)]) == 0
    shutil.copy(Path(data_dir, "tok300.model"), out / "tokenizer.model")
    (out / "model.safetensors").write_bytes(b"an older export")
    assert export.main(["--ckpt_path", trained_run, "--out_dir", str(out)]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert load_model(str(out))[0].config == load_model(trained_run)[0].config


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_exported_files_have_the_permissions_of_the_user_s_other_files(umask, tmp_path, capsys):
    """Both files get the permissions an ordinary file write gives under the umask (model.safetensors was 0600)."""
    our_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
    previous = os.umask(umask)
    try:
        assert export.main(["--ckpt_path", str(tmp_path / "run"), "--out_dir", str(tmp_path / "hf")]) == 0
        (tmp_path / "ordinary").write_text("")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(os.stat(tmp_path / "ordinary").st_mode)
    assert expected == 0o666 & ~umask
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / "hf" / name).st_mode) == expected, name
