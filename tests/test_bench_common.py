"""Tests of bench/common.py on the CPU: call counts and order of the timers, the table's layout, the training step."""

import math

import torch

from bench.common import Column, Table, alternate, best_of, median_ms_and_peak_gib, seconds_per_call, training_step


def test_seconds_per_call_times_the_calls_after_the_warm_up():
    calls = []
    seconds = seconds_per_call(lambda: calls.append(1), 5, 2, "cpu")
    assert len(calls) == 7 and 0 <= seconds < 1


def test_best_of_returns_the_last_result_and_the_shortest_time():
    results = iter(range(3))
    result, seconds = best_of(lambda: next(results), 3)
    assert result == 2 and 0 <= seconds < 1


def test_alternate_warms_up_each_then_runs_chunks_in_turn():
    order = []
    times = alternate({"old": lambda: order.append("old"), "new": lambda: order.append("new")}, 2, 3, 1, "cpu")
    assert order == ["old", "new"] + (["old"] * 2 + ["new"] * 2) * 3
    assert [len(t) for t in times.values()] == [3, 3] and all(s >= 0 for t in times.values() for s in t)


def test_median_ms_off_cuda_is_one_call_without_a_memory_figure():
    calls = []
    ms, gib = median_ms_and_peak_gib(lambda: calls.append(1), torch.device("cpu"))
    assert calls == [1] and ms >= 0 and math.isnan(gib)


def test_table_pads_titles_and_values_and_prints_none_as_a_dash():
    table = Table(Column("config", 8, align="<"), Column("tok/s", 9, ",.0f"), Column("ratio", 6, ".2f"))
    assert table.header() == "config       tok/s  ratio"
    assert table.row("tf", 12345.6, None) == "tf          12,346      -"
    assert table.row("tf") == "tf      "


def test_training_step_updates_the_weights_with_the_forward_arguments():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, x, y, scale):
            return None, scale * ((self.weight * x - y) ** 2).sum()

    model = Model()
    step = training_step(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", False, scale=0.5)
    loss = step(torch.ones(3), torch.zeros(3))
    assert loss.item() == 1.5 and torch.allclose(model.weight, torch.full((3,), 0.9))
    assert model.weight.grad is None  # zeroed (set to None) after the step
