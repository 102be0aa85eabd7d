"""The largest-model search of tools/largest_model.py, with the trials replaced by a rule."""

import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import largest_model  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture
def fake_trials(monkeypatch):
    """Layer counts up to `edge` train; from `slow` on, a trial runs past the timeout."""
    tried = []

    def install(edge, slow=None):
        def trial(a, layers, log_dir):
            tried.append(layers)
            if slow is not None and layers >= slow:
                raise largest_model.TimedOut(layers)
            return layers <= edge, f"log of {layers}"
        monkeypatch.setattr(largest_model, "trial", trial)
        return tried
    return install


ARGS = types.SimpleNamespace(max_layers=4096, out=None, budget=0)


@pytest.mark.parametrize("start", [1, 20, 37, 38, 100])
def test_search_finds_the_edge_from_any_start(fake_trials, start):
    tried = fake_trials(edge=37)
    assert largest_model.search(ARGS, start) == (37, "log of 37", None)
    assert 37 in tried and 38 in tried


def test_a_timed_out_trial_stops_the_search_with_a_lower_bound(fake_trials):
    tried = fake_trials(edge=37, slow=30)
    assert largest_model.search(ARGS, 20) == (27, "log of 27", 35)  # 20, 21, 23, 27 trained; 35 ran too long
    assert tried == [20, 21, 23, 27, 35]


def test_a_seed_just_above_the_edge_costs_a_few_trials(fake_trials):
    """The pre-flight seed is close above the edge: gallop down by 1, 2, 4, not by halves."""
    tried = fake_trials(edge=150)
    assert largest_model.search(ARGS, 153) == (150, "log of 150", None)
    assert tried == [153, 152, 151, 149, 150]


def test_the_search_stops_before_a_trial_that_would_overrun_its_budget(fake_trials, monkeypatch):
    """Each trial takes 100 s here: with 350 s, the fourth would end past the budget."""
    now = [0.0]
    tried = fake_trials(edge=37)
    trial = largest_model.trial

    def slow_trial(a, layers, log_dir):
        now[0] += 100
        return trial(a, layers, log_dir)
    monkeypatch.setattr(largest_model, "trial", slow_trial)
    monkeypatch.setattr(largest_model.time, "time", lambda: now[0])
    args = types.SimpleNamespace(**{**ARGS.__dict__, "budget": 350})
    assert largest_model.search(args, 20) == (23, "log of 23", 27)  # 20, 21, 23 trained; 27 not started
    assert tried == [20, 21, 23]


def test_the_answer_can_be_rebuilt_from_the_trial_logs_of_a_search_cut_short(tmp_path):
    """The H200's l2l search was cut off by its call's limit after 155 trained (158 was refused):
    from its logs, 155 is a lower bound; with a refusal at 156 beside them, it is the answer."""
    logs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "results", "h200", "2026-11-27", "case1-l2l", "case1")
    for name in os.listdir(logs):
        with open(os.path.join(logs, name)) as src, open(tmp_path / name, "w") as dst:
            dst.write(src.read())
    args = types.SimpleNamespace(method="l2l", hidden=2048, batch=4, iters=3, out=str(tmp_path))
    best, log, stopped_at = largest_model.from_logs(args)
    assert (best, stopped_at) == (155, 156)
    assert log.summary["peak host RSS (GiB)"] == 119.908
    (tmp_path / "log_l2l_l-156_hs-2048_bs-4.txt").write_text("error: the model does not fit: ...\n")
    assert largest_model.from_logs(args)[::2] == (155, None)


def test_no_trial_logs_is_an_error_not_a_zero(tmp_path):
    args = types.SimpleNamespace(method="l2l", hidden=2048, batch=4, iters=3, out=str(tmp_path))
    with pytest.raises(SystemExit, match="no trial log of l2l"):
        largest_model.from_logs(args)


def test_a_trial_that_trained_but_exited_past_its_timeout_counts_as_trained():
    """zero-infinity at 85 layers on an H100 printed its summary and was still tearing down at the
    timeout; the same log cut before its summary is a timeout."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "case1",
                        "log_zero-infinity_l-85_hs-2048_bs-4.txt")
    with open(path) as f:
        out = f.read()
    args = types.SimpleNamespace(iters=3, timeout=240)
    log = largest_model.parse_log(out)
    assert largest_model.outcome(log, out, None, args) == (
        True, "ok (trained; its exit ran past the 240 s timeout)")
    assert largest_model.outcome(log, out, 0, args) == (True, "ok")
    cut = out[:out.index("summary |")] + "\ntimed out"
    assert largest_model.outcome(largest_model.parse_log(cut), cut, None, args) == (
        False, "timed out after 240 s")
