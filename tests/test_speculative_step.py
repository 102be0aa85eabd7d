"""When each streamed layer's CPU step runs, with the norms scripted (no model, no tensors).

Layers arrive in backward order (L-1 first); `arrived` is the running sum of squares of the layers
that arrived so far."""

import pytest

from megatron.stronghold import arguments
from megatron.stronghold.executor.speculative import SpeculativeStep

pytestmark = pytest.mark.unit


def run_iteration(step, iteration, norms, coeff, skip=False, decide_late=()):
    """Layers arrive last to first with these gradient norms; the coefficient is published after all
    but `decide_late` have decided, which decide after it. Returns ({layer: stepped on arrival},
    {layer: needs a final step})."""
    guessed, final_step, arrived = {}, {}, 0.0
    order = list(reversed(range(len(norms))))
    for layer in order:
        arrived += norms[layer] ** 2
        if layer in decide_late:
            continue
        guessed[layer], published = step.decide(layer, arrived, iteration)
        assert published is None
    decided = step.publish(iteration, coeff, skip)
    assert set(decided) == set(order) - set(decide_late)
    for layer, how in decided.items():
        final_step[layer] = step.needs_final_step(how == "guess", skip)
    arrived = sum(n ** 2 for n in norms)
    for layer in decide_late:
        guessed[layer], published = step.decide(layer, arrived, iteration)
        assert published == (coeff, skip)
        final_step[layer] = step.needs_final_step(guessed[layer], published[1])
    return guessed, final_step


def test_where_the_norm_cannot_change_a_step_every_layer_steps_on_arrival():
    step = SpeculativeStep(may_guess=True)
    guessed, final = run_iteration(step, 0, [50.0, 80.0, 0.1], coeff=1.0)
    assert all(guessed.values()) and not any(final.values())
    assert step.counts == {"kept": 3, "deferred": 0}


def test_a_non_finite_norm_waits_and_a_skipped_iteration_steps_nothing_more():
    step = SpeculativeStep(may_guess=True)
    guessed, final = run_iteration(step, 0, [0.1, float("inf"), 0.1], coeff=1.0, skip=True)
    assert guessed == {2: True, 1: False, 0: False}
    assert not any(final.values())  # the run stops unsaved after it (--exit-on-nonfinite-iters 1)


def test_otherwise_every_layer_waits_for_the_norm_and_steps_with_it():
    step = SpeculativeStep(may_guess=False)  # clipping, fp16, or l2l
    guessed, final = run_iteration(step, 0, [0.1, 0.1, 2.0], coeff=0.5)
    assert not any(guessed.values()) and all(final.values())
    assert step.counts == {"kept": 0, "deferred": 3}
    guessed, final = run_iteration(step, 1, [0.1, 0.1], coeff=1.0, skip=True)
    assert not any(guessed.values()) and not any(final.values())


@pytest.mark.parametrize("may_guess", [True, False])
def test_a_layer_deciding_after_the_coefficient_is_published_uses_it(may_guess):
    step = SpeculativeStep(may_guess=may_guess)
    guessed, final = run_iteration(step, 0, [0.1, 0.1, 0.1], coeff=1.0, decide_late=(0,))
    assert guessed[0] == may_guess and final[0] == (not may_guess)


@pytest.mark.parametrize("flags, early", [
    ([], False),  # --clip-grad 1.0 by default
    (["--clip-grad", "0"], True),
    (["--clip-grad", "0", "--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype",
      "bf16"], True),
    (["--clip-grad", "0", "--fp16"], False),
    (["--clip-grad", "0", "--exit-on-nonfinite-iters", "2"], False),
])
def test_layers_step_early_only_where_no_guess_can_be_wrong_but_one_that_ends_the_run(flags, early):
    precision = [] if "--fp16" in flags else ["--bf16"]
    args = arguments.parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                 *precision, *flags])
    assert args.may_step_early is early
