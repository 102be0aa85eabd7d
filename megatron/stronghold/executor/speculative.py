"""The speculative CPU step: when each streamed layer's optimizer step may run.

The global gradient norm, which clipping needs, is known only once every layer's gradient is in;
waiting for it would serialise every CPU step behind backward. So a layer steps as soon as its
gradient arrives, a guess that clipping will not fire, while the running sum of squares over the
layers that arrived so far (backward order: L-1 down to i) stays under the clip threshold. When
the step's coefficient is published (publish) a wrong guess is undone and redone exactly, and a
layer that waited steps then. The rule depends on the arrival order alone, so a run makes the same
guesses whatever the thread timing; where the coefficient is already published, a layer deciding
late repeats exactly what the final step would do. After an iteration that clipped, the next one
does not guess at all (clipping tends to fire on runs of iterations, and a wrong guess costs an
undo and a redo where waiting costs nothing extra).

This holds decisions only (no tensors), so tests can script the norms.
"""

import math
import threading


class SpeculativeStep:
    def __init__(self, clip_grad: float, may_guess: bool = True):
        """may_guess=False: never guess (L2L steps every layer after backward)."""
        self.clip_grad = clip_grad
        self.may_guess = may_guess
        self.guessing = may_guess  # whether this iteration may guess (the last one did not clip)
        # How each layer's step of this iteration was decided: "guess" (stepped before the norm was
        # known) or "wait" (left to the final step); guarded by lock, since the CPU worker decides
        # while the main thread publishes.
        self.lock = threading.Lock()
        self.decided = {}
        self.final = None  # (iteration, clip coefficient, skip) once published
        # Layer steps: guessed and kept, guessed and redone, deferred to the final step.
        self.counts = {"kept": 0, "redone": 0, "deferred": 0}

    def decide(self, layer: int, arrived_sumsq: float, iteration: int, may_guess: bool):
        """For a layer whose gradient arrived: (guess now?, the published (coeff, skip) or None).
        arrived_sumsq: the unscaled sum of squares of this layer and every layer that arrived before
        it; may_guess: the `guessing` flag as it was when the layer's work was queued."""
        guess = (may_guess and self.may_guess and math.isfinite(arrived_sumsq)
                 and not (self.clip_grad > 0 and math.sqrt(arrived_sumsq) + 1.0e-6 > self.clip_grad))
        with self.lock:
            final = self.final[1:] if self.final is not None and self.final[0] == iteration else None
            if final is None:
                self.decided[layer] = "guess" if guess else "wait"
            else:
                self._count(guess, *final)
        return guess, final

    def publish(self, iteration: int, clip_coeff: float, skip: bool) -> dict:
        """The iteration's coefficient is known: returns {layer: "guess" | "wait"} of the layers that
        decided before it (the others step with it when they decide)."""
        with self.lock:
            self.final = (iteration, clip_coeff, skip)
            decided, self.decided = self.decided, {}
            self.guessing = self.may_guess and clip_coeff == 1.0
            for d in decided.values():
                self._count(d == "guess", clip_coeff, skip)
        return decided

    @staticmethod
    def needs_final_step(guessed: bool, clip_coeff: float, skip: bool) -> bool:
        """A wrong guess is undone and redone; a layer that waited steps unless the iteration is skipped."""
        return skip or clip_coeff != 1.0 if guessed else not skip

    def _count(self, guessed: bool, clip_coeff: float, skip: bool) -> None:
        self.counts[("redone" if skip or clip_coeff != 1.0 else "kept") if guessed else "deferred"] += 1
