"""The largest-model search of tools/largest_model.py, with the trials replaced by a rule."""

import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import largest_model  # noqa: E402


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


ARGS = types.SimpleNamespace(max_layers=4096, out=None)


@pytest.mark.parametrize("start", [1, 20, 37, 38, 100])
def test_search_finds_the_edge_from_any_start(fake_trials, start):
    tried = fake_trials(edge=37)
    assert largest_model.search(ARGS, start) == (37, "log of 37", None)
    assert 37 in tried and 38 in tried


def test_a_timed_out_trial_stops_the_search_with_a_lower_bound(fake_trials):
    tried = fake_trials(edge=37, slow=30)
    assert largest_model.search(ARGS, 20) == (27, "log of 27", 35)  # 20, 21, 23, 27 trained; 35 ran too long
    assert tried == [20, 21, 23, 27, 35]
