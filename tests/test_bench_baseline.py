"""
Tests of bench/baseline.py and bench.train --baseline on the CPU: the current code timed against HEAD, against a
copy of the working tree in a directory and against an older commit (d0bbca5, whose model.py held the reference
API); the two models' modules kept apart, the checkout's custom operators in a namespace of their own.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._library.custom_ops as custom_ops

import model
from bench import baseline
from bench import train as bench

REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch_size", "2", "--max_seq_len", "32", "--steps", "1", "--warmup", "1", "--baseline_rounds", "2"]
OLD_COMMIT = "d0bbca5"  # model.py has model_args_from_flags and from_reference; there is no reference.py


def guard(ref, config, tmp_path):
    """bench.train --baseline ref on one tiny config in a process of its own: (its output, its one JSON row)."""
    out = tmp_path / "guard.json"
    result = subprocess.run([sys.executable, "-m", "bench.train", "--baseline", ref, "--configs", config, *TINY,
                             "--json", out], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    [row] = json.loads(out.read_text())["baseline"]
    return result.stdout, row


def check_row(row, config):
    assert row["config"] == config and "error" not in row, row
    assert all(math.isfinite(row[side]) and row[side] > 0 for side in ("baseline", "current"))
    assert row["current_over_baseline"] == pytest.approx(row["current"] / row["baseline"])
    assert {side: len(rates) for side, rates in row["rounds_tokens_per_s"].items()} == {"baseline": 2, "current": 2}


def working_tree_copy(directory):
    """The project's modules and packages of the working tree (not bench/ or tests/), copied into directory."""
    directory.mkdir()
    for path in REPO.glob("*.py"):
        shutil.copy(path, directory)
    for package in {p.parent for p in REPO.glob("*/*.py")} - {REPO / "bench", REPO / "tests"}:
        shutil.copytree(package, directory / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    return directory


def test_guard_against_head_prints_both_rates_and_their_ratio(tmp_path):
    stdout, row = guard("HEAD", "dat_d64_L2_posrel", tmp_path)
    check_row(row, "dat_d64_L2_posrel")
    header, line = stdout.splitlines()[-2:]
    assert header.split() == ["config", "baseline", "tok/s", "current", "tok/s", "current/baseline"]
    assert line.split()[0] == "dat_d64_L2_posrel" and float(line.split()[-1]) == pytest.approx(
        row["current_over_baseline"], abs=1e-3)


def test_guard_against_an_older_commit(tmp_path):
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"],
                           capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"{OLD_COMMIT} is not in this repository's history")
    stdout, row = guard(OLD_COMMIT, "dat_d64_L2_symattn", tmp_path)
    check_row(row, "dat_d64_L2_symattn")
    assert f"baseline {OLD_COMMIT}" in stdout


def test_guard_against_a_directory_in_process(tmp_path, monkeypatch, capsys):
    """The copy's model and the current one step side by side in this process; afterwards sys.path, sys.modules and
    the custom operators registered before are as they were."""
    copy = working_tree_copy(tmp_path / "copy")
    path, modules, operators = sys.path[:], dict(sys.modules), dict(custom_ops.OPDEFS)
    out = tmp_path / "guard.json"
    monkeypatch.setattr(sys, "argv", ["bench.train", "--baseline", str(copy), "--configs", "tf_d64_L2", *TINY,
                                      "--json", str(out)])
    bench.main()
    check_row(json.loads(out.read_text())["baseline"][0], "tf_d64_L2")
    assert f"baseline {copy}" in capsys.readouterr().out
    assert sys.path == path and sys.modules["model"] is model
    assert all(sys.modules.get(name) is module for name, module in modules.items())
    assert all(custom_ops.OPDEFS[name] is op for name, op in operators.items())


def test_code_builds_its_model_from_its_own_modules(tmp_path):
    copy = working_tree_copy(tmp_path / "copy")
    code = baseline.Code(copy)
    flags = bench.resized(bench.CPU_CONFIGS["dat_d64_L2_posrel"], 2, 32)["flags"]
    before = dict(custom_ops.OPDEFS)
    theirs = code.build(flags)
    assert theirs.training and Path(type(theirs).forward.__globals__["__file__"]) == copy / "model.py"
    assert sys.modules["model"] is model and type(code.build(flags)) is type(theirs)  # imported once
    assert {name.split("::")[0] for name in set(custom_ops.OPDEFS) - set(before)} <= {f"dat_{code.suffix}"}
    assert all(custom_ops.OPDEFS[name] is op for name, op in before.items())
    ours = bench.build(dict(flags=flags, batch=2), "cpu")
    x = torch.randint(0, 32000, (2, 32))
    for net in (theirs, ours):
        _, loss = net(x, x, return_logits=False)
        assert torch.isfinite(loss)


def test_baseline_must_name_code(tmp_path, monkeypatch, capsys):
    for ref in ("no-such-commit", str(tmp_path)):
        monkeypatch.setattr(sys, "argv", ["bench.train", "--baseline", ref, *TINY])
        with pytest.raises(SystemExit) as e:
            bench.main()
        message = capsys.readouterr().err.splitlines()[-1]
        assert e.value.code == 2 and message.startswith(f"python -m bench.train: error: --baseline {ref}"), message
