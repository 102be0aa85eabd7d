"""The CPU optimizer's worker thread: runs one layer's CPU work at a time, lowest layer first.

Backward hands layers over last-to-first, and the next forward pass needs them first-to-last.
The CPU step of a layer is slower than its backward, so work piles up during backward; taken in
arrival order, layer 0 (needed first by the next forward) would step last and the whole forward
would wait for every step. Taking the lowest pending layer first lets the forward pass start as
soon as layer 0 has stepped and run alongside the remaining steps.

Work whose input is not there yet (its gradient copy still on the way) is passed over for work
that can start now.

A failure inside a piece of work goes to its future. A failure of the thread itself (outside any
work: setting its threads, a readiness poll that raises) fails every queued future with it and
refuses new work, so no waiter is left waiting for work that will never run.
"""

import concurrent.futures
import ctypes
import os
import threading

import torch


def default_threads() -> int:
    """This rank's share of the node's cores, less one for the main thread, which launches the GPU
    work while the steps run (64 streamed layers on an H100 host: 15 threads 5% faster than 16).
    torchrun's OMP_NUM_THREADS=1 in every rank would leave the CPU optimizer a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // local_ranks - 1)


def _name_os_thread(name: bytes) -> None:
    """Name this OS thread (Linux, 15 characters): top and tools/thread_cpu.py then tell it, and the
    OpenMP threads it starts, which inherit the name, from the main thread's."""
    try:
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class CpuStepError(RuntimeError):
    """A streamed layer's CPU optimizer work failed: the run must stop (its state is not trusted)."""


class CpuWorker:
    def __init__(self, threads: int):
        self._pending = []  # (layer, arrival number, ready(), fn, args, future)
        self._arrivals = 0
        self._cond = threading.Condition()
        self._closed = False
        self.failure = None  # what ended the thread outside a piece of work
        self._thread = threading.Thread(target=self._run, args=(threads,), name="stronghold-cpu-adam",
                                        daemon=True)
        self._thread.start()

    def submit(self, layer: int, fn, *args, ready=None) -> concurrent.futures.Future:
        """Queue fn(*args) for layer; ready() (optional, non-blocking) says whether it can start now."""
        future = concurrent.futures.Future()
        with self._cond:
            if self.failure is not None:
                raise CpuStepError(f"the CPU optimizer thread died: {type(self.failure).__name__}: "
                                   f"{self.failure}") from self.failure
            if self._closed:
                raise RuntimeError("the CPU worker is shut down")
            self._pending.append((layer, self._arrivals, ready, fn, args, future))
            self._arrivals += 1
            self._cond.notify()
        return future

    def _next(self):
        ready = [w for w in self._pending if w[2] is None or w[2]()]
        if ready:
            return min(ready, key=lambda w: (w[0], w[1]))
        # Nothing can start yet: the copies finish in the order they were queued.
        return min(self._pending, key=lambda w: w[1])

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self, threads: int) -> None:
        try:
            self._serve(threads)
        except BaseException as exc:
            with self._cond:
                self.failure, self._closed = exc, True
                dropped, self._pending = self._pending, []
            for *_, future in dropped:
                if future.set_running_or_notify_cancel():
                    future.set_exception(exc)

    def _serve(self, threads: int) -> None:
        _name_os_thread(b"stronghold-adam")
        torch.set_num_threads(threads)
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                work = self._next()
                self._pending.remove(work)
            _, _, _, fn, args, future = work
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Finish the queued work, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
