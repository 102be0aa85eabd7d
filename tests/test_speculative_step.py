"""When each streamed layer's CPU step runs, with the norms scripted (no model, no tensors).

Layers arrive in backward order (L-1 first); `arrived` is the running sum of squares of the layers
that arrived so far. Clip threshold 1.0 throughout."""

import math

import pytest

from megatron.stronghold.executor.speculative import SpeculativeStep

pytestmark = pytest.mark.unit


def run_iteration(step, iteration, norms, coeff, skip=False, decide_late=()):
    """Layers arrive last to first with these gradient norms; the coefficient is published after all
    but `decide_late` have decided, which decide after it. Returns ({layer: guessed},
    {layer: needs a final step})."""
    guessed, final_step, arrived = {}, {}, 0.0
    order = list(reversed(range(len(norms))))
    for layer in order:
        arrived += norms[layer] ** 2
        if layer in decide_late:
            continue
        guessed[layer], published = step.decide(layer, arrived, iteration, step.guessing)
        assert published is None
    decided = step.publish(iteration, coeff, skip)
    assert set(decided) == set(order) - set(decide_late)
    for layer, how in decided.items():
        final_step[layer] = step.needs_final_step(how == "guess", coeff, skip)
    arrived = sum(n ** 2 for n in norms)
    for layer in decide_late:
        guessed[layer], published = step.decide(layer, arrived, iteration, True)
        assert published == (coeff, skip)
        final_step[layer] = step.needs_final_step(guessed[layer], *published)
    return guessed, final_step


def test_every_layer_guesses_while_the_norm_stays_under_the_threshold():
    step = SpeculativeStep(clip_grad=1.0)
    guessed, final = run_iteration(step, 0, [0.1, 0.2, 0.3, 0.4], coeff=1.0)
    assert all(guessed.values()) and not any(final.values())
    assert step.counts == {"kept": 4, "redone": 0, "deferred": 0} and step.guessing


def test_layers_after_the_threshold_wait_and_wrong_guesses_are_redone():
    step = SpeculativeStep(clip_grad=1.0)
    norms = [0.1, 0.1, 0.9, 0.6]  # running norm: 0.6, 1.08 (over), ...
    guessed, final = run_iteration(step, 0, norms, coeff=1.0 / math.sqrt(sum(n * n for n in norms)))
    assert guessed == {3: True, 2: False, 1: False, 0: False}
    assert final == {3: True, 2: True, 1: True, 0: True}  # layer 3 undone and redone, the rest stepped
    assert step.counts == {"kept": 0, "redone": 1, "deferred": 3}
    assert not step.guessing  # the next iteration waits for the norm


def test_after_a_clipped_iteration_nothing_guesses_until_one_needs_no_clipping():
    step = SpeculativeStep(clip_grad=1.0)
    run_iteration(step, 0, [2.0, 0.1], coeff=0.5)
    guessed, _ = run_iteration(step, 1, [0.1, 0.1], coeff=1.0)
    assert not any(guessed.values()) and step.guessing
    guessed, _ = run_iteration(step, 2, [0.1, 0.1], coeff=1.0)
    assert all(guessed.values())


def test_a_skipped_iteration_undoes_the_guesses_and_steps_nothing_else():
    step = SpeculativeStep(clip_grad=1.0)
    guessed, final = run_iteration(step, 0, [0.1, float("inf"), 0.1], coeff=1.0, skip=True)
    assert guessed == {2: True, 1: False, 0: False}
    assert final == {2: True, 1: False, 0: False}


def test_a_layer_deciding_after_the_coefficient_is_published_uses_it():
    step = SpeculativeStep(clip_grad=1.0)
    guessed, final = run_iteration(step, 0, [0.1, 0.1, 0.1], coeff=1.0, decide_late=(0,))
    assert guessed[0] and not final[0]
    assert step.counts == {"kept": 3, "redone": 0, "deferred": 0}


def test_without_clipping_every_finite_norm_guesses_and_l2l_never_does():
    free = SpeculativeStep(clip_grad=0.0)
    assert all(run_iteration(free, 0, [50.0, 80.0], coeff=1.0)[0].values())
    l2l = SpeculativeStep(clip_grad=0.0, may_guess=False)
    guessed, final = run_iteration(l2l, 0, [0.1, 0.1], coeff=1.0)
    assert not any(guessed.values()) and all(final.values())
    assert l2l.counts == {"kept": 0, "redone": 0, "deferred": 2}
