"""
Tests of sample.py on checkpoints trained here (train.py on the toy corpus of toy_runs.py, a few steps), on a
checkpoint as the authors' train.py writes it, and its one-line errors (in a real process where the exit status is
the point). A Hugging Face directory and a damaged checkpoint: test_checkpoints.py.
"""

import os
import subprocess
import sys

import pytest
import torch

import flags
import reference as R
import sample
import train
from checkpoints import CHECKPOINT_FILE, load_model
from tokenizer import Tokenizer
from toy_runs import (MODELS, REPO, TRANSFORMER, VOCAB, args_for, assert_one_line_error, reference_checkpoint,
                      the_run_dir)

PROMPTS = ["Once upon a time, there was a", "Tom liked to"]


@pytest.fixture(scope="module")
def run_dirs(data_dir, tmp_path_factory):
    """{name: run directory} of a Transformer, a DAT and a paper-arch DAT, trained for 4 steps."""
    runs = {}
    for name in ("transformer", "disrca-posrel", "paper-ra-symbolic"):
        out_dir = tmp_path_factory.mktemp(name)
        assert train.main(args_for(data_dir, out_dir, MODELS[name], "--max_iters", 4, "--eval_interval", 4)) == 0
        runs[name] = the_run_dir(out_dir)
    return runs


def run_sample(capsys, *argv):
    """sample.main in this process: (exit code, stdout, stderr)."""
    code = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def samples_of(out):
    """The printed samples (the speed line dropped)."""
    return out.split(sample.SEPARATOR + "\n")[:-1]


@pytest.mark.parametrize("name", ["transformer", "disrca-posrel", "paper-ra-symbolic"])
def test_samples_continue_the_prompts_with_and_without_the_cache(name, run_dirs, capsys):
    run_dir = run_dirs[name]
    argv = ["--ckpt_path", run_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num_samples", 2,
            "--max_new_tokens", 40, "--device", "cpu"]  # past the block size of 32
    results = {}
    for kv_cache in (1, 0):
        for sampling in (["--temperature", 0], ["--seed", 7, "--top_k", 20, "--top_p", 0.9]):
            code, out, err = run_sample(capsys, *argv, "--kv_cache", kv_cache, *sampling)
            assert code == 0, err
            results[kv_cache, sampling[1]] = samples_of(out)
            speed = out.splitlines()[-1]
            assert speed.startswith("160 new tokens in ") and "tokens/s" in speed
            assert ("with the KV cache" if kv_cache else "without the KV cache") in speed
    greedy = results[1, 0]
    assert len(greedy) == 4 and all(s.startswith(PROMPTS[i // 2]) for i, s in enumerate(greedy))
    assert greedy[0] == greedy[1]  # greedy: both samples of a prompt are the same
    assert greedy == results[0, 0]  # the cache changes nothing
    assert results[1, 7] == results[0, 7]


def test_the_run_directory_and_its_checkpoint_file_give_the_same_samples(run_dirs, capsys):
    run_dir = run_dirs["transformer"]
    outputs = []
    for path in (run_dir, os.path.join(run_dir, CHECKPOINT_FILE)):
        code, out, _ = run_sample(capsys, "--ckpt_path", path, "--max_new_tokens", 10, "--device", "cpu")
        assert code == 0
        outputs.append(samples_of(out))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 1  # one empty prompt by default


def test_prompt_file(run_dirs, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPTS[1])
    argv = ["--ckpt_path", run_dirs["transformer"], "--max_new_tokens", 5, "--temperature", 0, "--device", "cpu"]
    code, from_file, _ = run_sample(capsys, *argv, "--prompt_file", prompt_file)
    assert code == 0
    code, from_flag, _ = run_sample(capsys, *argv, "--prompt", PROMPTS[1])
    assert samples_of(from_file) == samples_of(from_flag)


def test_a_checkpoint_of_the_authors_train_py(data_dir, tmp_path, capsys):
    """Their config records vocab_size but no data_dir: the tokenizer is looked for in ./data (as train.py would)
    and named in the error; --tokenizer points to it."""
    flags = dict(sa=2, ra=2, symbol_type="position_relative", pos_enc_type="RoPE", ra_type="rca", n_layers=1,
                 d_model=32, max_seq_len=32, vocab_size=VOCAB)
    model = reference_checkpoint(tmp_path / CHECKPOINT_FILE, flags)
    argv = ["--ckpt_path", tmp_path, "--prompt", PROMPTS[0], "--max_new_tokens", 8, "--temperature", 0,
            "--device", "cpu"]
    code, _, err = run_sample(capsys, *argv)
    assert code == 1 and err.count("\n") == 1 and f"tok{VOCAB}.model not found" in err
    tokenizer = os.path.join(data_dir, f"tok{VOCAB}.model")
    code, out, err = run_sample(capsys, *argv, "--tokenizer", tokenizer)
    assert code == 0, err
    ids = Tokenizer(tokenizer).encode(PROMPTS[0])
    expected = model.generate(torch.tensor([ids]), 8, temperature=0, use_cache=False)
    assert samples_of(out) == [Tokenizer(tokenizer).decode(expected[0].tolist()) + "\n"]


def test_bfloat16_autocast_on_the_cpu(run_dirs, capsys):
    code, out, err = run_sample(capsys, "--ckpt_path", run_dirs["disrca-posrel"], "--max_new_tokens", 12,
                                "--dtype", "bfloat16", "--device", "cpu", "--num_samples", 3)
    assert code == 0, err
    assert len(samples_of(out)) == 3 and "cpu, bfloat16, batch 3" in out


def run_script(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "sample.py", *map(str, argv)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_errors_end_the_process_with_one_line(tmp_path):
    for argv, code, message in [(["--ckpt_path", tmp_path / "nowhere"], 1, "error: no checkpoint at"),
                                (["--ckpt_path", tmp_path, "--top_p", 1.5], 2, "--top_p must be in (0, 1]")]:
        result = run_script(*argv)
        assert result.returncode == code and result.stdout == "", result.stderr
        assert_one_line_error(result.stderr, message)


def test_errors(run_dirs, tmp_path, capsys):
    run_dir = run_dirs["transformer"]
    not_a_checkpoint = tmp_path / CHECKPOINT_FILE
    not_a_checkpoint.write_text("hello")
    bad_device = "cuda:7" if not torch.cuda.is_available() else "nonsense"
    for argv, code, message in [
        (["--ckpt_path", not_a_checkpoint], 1, "is not a readable checkpoint"),
        (["--ckpt_path", run_dir, "--tokenizer", tmp_path / "missing.model"], 1, "missing.model not found"),
        (["--ckpt_path", run_dir, "--prompt_file", tmp_path / "missing.txt"], 1, "--prompt_file"),
        (["--ckpt_path", run_dir, "--device", bad_device], 2, "--device"),
    ]:
        result_code, out, err = run_sample(capsys, *argv)
        assert result_code == code and out == "" and err.count("\n") == 1 and err.startswith("error: ")
        assert message in err, err
    for argv, message in [
        (["--ckpt_path", run_dir, "--temperature", -1, "--num_samples", 0], "--num_samples must be at least 1"),
        (["--ckpt_path", run_dir, "--top_k", 0], "--top_k must be at least 1"),
        (["--ckpt_path", run_dir, "--prompt", "a", "--prompt_file", "b"], "not allowed with"),
        (["--ckpt_path", run_dir, "--kv_cache", 2], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit:
            sample.main([str(a) for a in argv])
        assert exit.value.code == 2 and message in capsys.readouterr().err


def test_the_loader_gives_the_checkpoint_s_model(run_dirs):
    """The model sample.py loads (checkpoints.load_model) is the checkpoint's, in eval mode."""
    model, ckpt = load_model(run_dirs["paper-ra-symbolic"])
    saved = torch.load(os.path.join(run_dirs["paper-ra-symbolic"], CHECKPOINT_FILE), weights_only=True)
    assert not model.training and ckpt["config"]["arch"] == "paper" and model.config == R.config_from_checkpoint(saved)


@pytest.mark.parametrize("flag,value,message", [
    ("--temperature", "nan", "--temperature must be 0 (greedy) or positive (got nan)"),
    ("--temperature", "inf", "--temperature must be 0 (greedy) or positive (got inf)"),
    ("--temperature", "-1", "--temperature must be 0 (greedy) or positive (got -1.0)"),
    ("--top_k", "0", "--top_k must be at least 1 (got 0)"),
    ("--top_p", "nan", "--top_p must be in (0, 1] (got nan)"),
    ("--top_p", "0", "--top_p must be in (0, 1] (got 0.0)"),
    ("--num_samples", "0", "--num_samples must be at least 1 (got 0)"),
    ("--max_new_tokens", "0", "--max_new_tokens must be at least 1 (got 0)"),
])
def test_a_sampling_flag_out_of_range_such_as_temperature_nan_is_one_line(flag, value, message, capsys):
    """sample.py refuses it before anything is loaded (--temperature nan used to emit one token forever); train.py's
    sampling flags go through the same check (sample.sampling_flag_problems)."""
    with pytest.raises(SystemExit) as exit:
        sample.main(["--ckpt_path", "nowhere", flag, value])
    assert exit.value.code == 2
    assert_one_line_error(capsys.readouterr().err, message)
    if flag in ("--temperature", "--top_k"):
        with pytest.raises(SystemExit) as exit:
            flags.parse_args([*TRANSFORMER, "--n_layers", "1", "--d_model", "32", flag, value])
        assert exit.value.code == 2
        assert_one_line_error(capsys.readouterr().err, message)


def test_a_prompt_with_a_byte_that_is_not_utf8_is_used_with_the_byte_replaced(run_dirs, capsys):
    """`--prompt "$(printf 'ab\\xffcd')"`: Python gives the byte 0xff as a lone surrogate (os.fsdecode, as for
    argv), which SentencePiece refused with a traceback; it becomes U+FFFD."""
    argv = ["--ckpt_path", run_dirs["transformer"], "--max_new_tokens", 3, "--temperature", 0, "--device", "cpu"]
    code, out, err = run_sample(capsys, *argv, "--prompt", os.fsdecode(b"ab\xffcd"))
    assert code == 0, err
    code, expected, _ = run_sample(capsys, *argv, "--prompt", "ab\ufffdcd")
    assert samples_of(out) == samples_of(expected) and samples_of(out)[0].startswith("ab\ufffdcd")
