"""
Tests of runtime.py: the one-line errors of every script's main, flags that are never abbreviated, RNG states, stop
signals and files replaced atomically. (--device errors are tested through train.py in test_train.py.)
"""

import os
import signal

import pytest
import torch

import export
import report
import runtime
import sample
import sweep
import tiny_stories_data
import train
import visualize
from runtime import RunError, one_line_errors
from toy_runs import TRANSFORMER


def test_one_line_errors_print_one_line_and_return_the_code(capsys):
    @one_line_errors(ValueError)
    def main(error):
        raise error

    assert main(RunError("bad\n  flags", code=2)) == 2
    assert capsys.readouterr().err == "error: bad flags\n"
    assert main(ValueError("not\na value")) == 1
    assert capsys.readouterr().err == "error: not a value\n"
    with pytest.raises(KeyError):  # an unexpected error keeps its traceback
        main(KeyError("bug"))
    assert one_line_errors()(lambda: 0)() == 0


def test_the_parser_stops_with_one_line(capsys):
    parser = runtime.Parser(prog="tool.py")
    parser.add_argument("--learning_rate", type=float, default=1.0, help="the rate")
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["--learning_rate", "fast"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("error: argument --learning_rate: invalid float value: 'fast' (python tool.py "
                                       "--help lists the flags)\n")
    assert "(default: 1.0)" in parser.format_help()


@pytest.mark.parametrize("main,argv", [
    (train.main, [*TRANSFORMER, "--n_layers", "1", "--d_model", "32", "--max_iter", "3"]),
    (sample.main, ["--ckpt", "out/run"]),
    (visualize.main, ["--ckpt", "out/run", "--prompt", "a", "--out_dir", "viz"]),
    (export.main, ["--ckpt", "out/run", "--out_dir", "hf"]),
    (sweep.main, ["paper", "--max_iter", "3"]),
    (report.main, ["--run", "out", "--out_dir", "report"]),
    (tiny_stories_data.main, ["pretokenize", "--vocab", "300"]),
], ids=["train", "sample", "visualize", "export", "sweep", "report", "tiny_stories_data"])
def test_no_script_takes_an_abbreviated_flag(main, argv, capsys):
    """--max_iter is not --max_iters, --ckpt not --ckpt_path: the parser stops (exit 2) before anything runs."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "unrecognized arguments" in err or "the following arguments are required" in err, err


def test_rng_states_round_trip():
    device = torch.device("cpu")
    state = runtime.rng_state(device)
    first = torch.rand(3)
    runtime.set_rng_state(state, device)
    assert torch.equal(torch.rand(3), first)


def test_stop_signals_are_recorded_then_act_as_usual():
    previous = signal.getsignal(signal.SIGTERM)
    with runtime.stop_signals() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is previous  # a second signal acts as usual
    assert signal.getsignal(signal.SIGTERM) is previous


def test_replacing_file_never_writes_through_a_link_and_keeps_the_old_file_on_an_error(tmp_path):
    victim, path = tmp_path / "victim", tmp_path / "config.json"
    victim.write_text("precious")
    os.symlink(victim, f"{path}.tmp")  # the name a careless writer would use
    os.symlink(victim, path)  # a link at the target itself is replaced, not followed
    old_umask = os.umask(0o022)
    try:
        with runtime.replacing_file(str(path), "w") as f:
            f.write("new")
    finally:
        os.umask(old_umask)
    assert victim.read_text() == "precious" and not path.is_symlink() and path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o644  # as open() would make it, not mkstemp's 0600
    with pytest.raises(ZeroDivisionError):
        with runtime.replacing_file(str(path), "w") as f:
            f.write("half")
            1 / 0
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json",
                                                                                        "config.json.tmp", "victim"]
