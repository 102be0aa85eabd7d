"""The speculative CPU step: when each streamed layer's optimizer step runs.

A step needs the global gradient norm (clipping, fp16's overflow check), known only once every layer's
gradient is in; waiting for it serialises every streamed layer's CPU step behind backward, which is
what bounds an iteration where the CPU step is the floor (small batches). So where the norm cannot
change a step, a layer steps as soon as its gradient arrives: no clipping (`--clip-grad 0`), no fp16
loss scaling, and `--exit-on-nonfinite-iters 1` (Config.may_step_early). There the one guess that can
be wrong is on non-finite gradients, after which the run stops without a save, so a guessed step is
never undone. Everywhere else a layer waits for the norm and steps with it.

Why not guess and undo: the inverse of an AdamW step is exact only up to rounding (a moment stored in
bf16 loses even that), so an undone step would part from megatron-lm's bit by bit; keeping what an
exact undo needs is a second copy of the state of every layer that guessed (12 to 16 B per parameter
of host memory), where waiting costs time only while the CPU step bounds the iteration
(docs/measurements-2026-12-07-layouts.md).

This holds decisions only (no tensors), so tests can script the norms.
"""

import math
import threading


class SpeculativeStep:
    def __init__(self, may_guess: bool):
        """may_guess: the run's Config.may_step_early (False for L2L, which steps after backward)."""
        self.may_guess = may_guess
        # How each layer's step of this iteration was decided: "guess" (stepped on arrival) or "wait"
        # (left to the final step); guarded by lock, since the CPU worker decides while the main
        # thread publishes.
        self.lock = threading.Lock()
        self.decided = {}
        self.final = None  # (iteration, clip coefficient, skip) once published
        # Layer steps: taken on arrival, or deferred to the final step.
        self.counts = {"kept": 0, "deferred": 0}

    def decide(self, layer: int, arrived_sumsq: float, iteration: int):
        """For a layer whose gradient arrived: (step now?, the published (coeff, skip) or None).
        arrived_sumsq: the unscaled sum of squares of this layer and every layer that arrived before
        it (a non-finite one waits: its iteration will be skipped)."""
        guess = self.may_guess and math.isfinite(arrived_sumsq)
        with self.lock:
            final = self.final[1:] if self.final is not None and self.final[0] == iteration else None
            if final is None:
                self.decided[layer] = "guess" if guess else "wait"
            else:
                self._count(guess)
        return guess, final

    def publish(self, iteration: int, clip_coeff: float, skip: bool) -> dict:
        """The iteration's coefficient is known: returns {layer: "guess" | "wait"} of the layers that
        decided before it (the others step with it when they decide)."""
        with self.lock:
            self.final = (iteration, clip_coeff, skip)
            decided, self.decided = self.decided, {}
            for d in decided.values():
                self._count(d == "guess")
        return decided

    @staticmethod
    def needs_final_step(guessed: bool, skip: bool) -> bool:
        """A layer that waited steps unless the iteration is skipped; a guessed one has stepped (where
        it may guess, the coefficient is always 1, and a skip ends the run unsaved)."""
        return not guessed and not skip

    def _count(self, guessed: bool) -> None:
        self.counts["kept" if guessed else "deferred"] += 1
