"""StrongHold native extensions.

C++ kernels live here, each with a pure-torch fallback used when the
extension is not built. A kernel is added only when it beats the library
(torch / DeepSpeed / megatron-core) implementation it replaces.

Kernels
-------
fused_adamw.cpp -- ``adamw_step``: the host AdamW update of one StrongHold layer in one pass over
    memory (compute-dtype gradient in, master and moments updated, compute-dtype weights out),
    with the numerics of ``torch.optim.AdamW(fused=True)`` on CPU. The torch path it replaces takes
    three passes (gradient -> fp32 scratch, fused AdamW, master -> weights copy). Host-store
    layouts: the master is fp32, or (``master=None``) bf16 weights + int16 remainder + ties
    (``stronghold_ext.remainders``: the same fp32 value, bit for bit); each Adam moment is fp32 or
    bf16. Bytes moved per parameter, bf16 gradient and weights: 28 with fp32 master and moments,
    20 with bf16 moments, 26 with remainders, 18 with remainders and bf16 moments.
    Benchmark: ``tools/bench_cpu_adam.py``; tests: ``tests/test_fused_adamw.py``.

Callers always call :func:`adamw_step`; it runs the compiled kernel when :func:`fused_adamw`
returns it and :func:`adamw_step_torch` otherwise. The kernel is JIT-compiled on first use
(``-O3 -march=native -fopenmp``) into ``$TORCH_EXTENSIONS_DIR/stronghold_ext/...`` or
``~/.cache/stronghold_ext/...`` (one directory per Python, torch and CPU, so a cache shared by
machines never hands one a binary built for another; a changed source is rebuilt there);
``STRONGHOLD_NO_EXT=1`` disables it.
"""

import hashlib
import logging
import os
import sys
import threading
import time
from typing import Optional

import torch

from stronghold_ext.remainders import join_master, store_master

logger = logging.getLogger(__name__)

_HERE = os.path.dirname(os.path.abspath(__file__))
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=off",
           "-fno-math-errno"]
_lock = threading.Lock()
_cache = {}
load_errors = {}  # extension name -> why it is unavailable (the logged line)


def _cpu_signature() -> str:
    """Short hash of the CPU model and flags: -march=native binaries are not portable."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key == "model name" and not model:
                    model = line
                elif key in ("flags", "Features") and not flags:
                    flags = line
                if model and flags:
                    break
    except OSError:
        pass
    return hashlib.sha1((model + flags).encode()).hexdigest()[:10]


def build_directory() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = os.path.join(root, "stronghold_ext") if root else os.path.join(
        os.path.expanduser("~"), ".cache", "stronghold_ext")
    tag = "py{}{}_torch{}_{}".format(sys.version_info[0], sys.version_info[1],
                                     torch.__version__.replace("+", "_"), _cpu_signature())
    return os.path.join(root, tag)


def _load(name: str, source: str):
    """Compile (or load from the cache) one extension; None and a one-line log when it fails."""
    with _lock:
        if name in _cache:
            return _cache[name]
        module = None
        if os.environ.get("STRONGHOLD_NO_EXT", "0") not in ("", "0"):
            load_errors[name] = "disabled by STRONGHOLD_NO_EXT"
            logger.info("stronghold_ext: %s disabled by STRONGHOLD_NO_EXT, using the torch fallback", name)
        else:
            try:
                from torch.utils import cpp_extension
                build = os.path.join(build_directory(), name)
                os.makedirs(build, exist_ok=True)
                t0 = time.perf_counter()
                module = cpp_extension.load(name=name, sources=[os.path.join(_HERE, source)],
                                            extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                                            build_directory=build, verbose=False)
                logger.info("stronghold_ext: %s ready in %.1f s (%s)", name, time.perf_counter() - t0, build)
            except Exception as exc:  # compiler missing, headers mismatch, ...
                lines = str(exc).splitlines()
                errors = [x for x in lines if "error" in x.lower() and x is not lines[0]]
                reason = " ".join((errors[0] if errors else lines[0] if lines else "").split())[:300]
                load_errors[name] = "{}: {}".format(type(exc).__name__, reason)
                logger.warning("stronghold_ext: %s unavailable (%s), using the torch fallback", name, load_errors[name])
                module = None
        _cache[name] = module
        return module


def fused_adamw():
    """The compiled one-pass AdamW module (``.adamw_step``), or None (reason logged once)."""
    return _load("stronghold_fused_adamw", "fused_adamw.cpp")


def _fp32_grad(grad: torch.Tensor, grad_scale: float, scratch: Optional[torch.Tensor]) -> torch.Tensor:
    """float(grad) * float(grad_scale) (into ``scratch`` when given); ``grad`` itself when nothing changes."""
    if grad.dtype == torch.float32 and grad_scale == 1.0:
        return grad
    g = scratch[:grad.numel()].view_as(grad) if scratch is not None else torch.empty_like(grad, dtype=torch.float32)
    g.copy_(grad)
    if grad_scale != 1.0:
        g.mul_(grad_scale)  # fp32 multiply by the fp32-rounded scale, as the kernel
    return g


def _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step) -> None:
    steps = [torch.tensor(float(step), dtype=torch.float32) for _ in params]
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=float(lr), beta1=float(beta1),
                        beta2=float(beta2), weight_decay=float(weight_decay), eps=float(eps), amsgrad=False,
                        maximize=False)


# A multiple of every fp32 vector length of torch's CPU kernels (4, 8, 16 lanes).
_VECTOR_PAD = 64


def _fused_adamw_vectorised(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """torch's fused AdamW on flat fp32 tensors with every element in its vectorised loop, the
    arithmetic of the kernel: the first n - n % 64 elements in place (torch splits them among threads
    in whole cache lines, so no thread has a scalar tail), the last n % 64 through a zero-padded
    copy of 64. torch's scalar loop, which would take a tensor's last n % (vector length) elements,
    rounds beta2 * v + (1 - beta2) * g * g differently (an ulp now and then on torch 2.13 x86)."""
    n = p.numel()
    body = n - n % _VECTOR_PAD
    if body:
        _fused_adamw([p[:body]], [g[:body]], [m[:body]], [v[:body]], lr, beta1, beta2, eps, weight_decay, step)
    if body < n:
        pad = torch.zeros(4, _VECTOR_PAD)
        for row, x in zip(pad, (p, g, m, v)):
            row[:n - body].copy_(x[body:])
        _fused_adamw([pad[0]], [pad[1]], [pad[2]], [pad[3]], lr, beta1, beta2, eps, weight_decay, step)
        for row, x in zip(pad[[0, 2, 3]], (p, m, v)):
            x[body:].copy_(row[:n - body])


def adamw_step_torch(master: Optional[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     grad: torch.Tensor, weights_out: Optional[torch.Tensor], lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, step: int, grad_scale: float = 1.0,
                     scratch: Optional[torch.Tensor] = None, remainder: Optional[torch.Tensor] = None,
                     ties: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Pure-torch equivalent of the kernel, and the reference it is tested against bit for bit.

    fp32 master and moments: fp32 gradient (into ``scratch`` when given, a fp32 buffer of at least
    grad.numel() elements; else a temporary), torch's fused AdamW kernel, then
    ``weights_out.copy_(master)``. The other layouts step fp32 temporaries with every element in
    torch's vectorised loop (see _fused_adamw_vectorised): the master joined from
    (weights_out, remainder, ties) into ``scratch[:n]`` (the gradient then into ``scratch[n:2n]``
    when scratch has room, else a temporary) and split back, returning the new ties; bf16 moments
    widened, then stored back with ``copy_`` (round to nearest even). ``grad`` is never modified.

    The fp32 layout keeps torch's plain call, whose scalar loop takes the last few elements of a
    tensor: there it may differ by an ulp from the kernel and from the other layouts. A NaN stored
    to bf16 is 0x7FC0 in the kernel and 0xFFFF through torch 2.13's vectorised ``copy_``."""
    if remainder is None and exp_avg.dtype == torch.float32 and exp_avg_sq.dtype == torch.float32:
        g = _fp32_grad(grad, grad_scale, scratch)
        _fused_adamw([master], [g], [exp_avg], [exp_avg_sq], lr, beta1, beta2, eps, weight_decay, step)
        if weights_out is not None and weights_out is not master:
            weights_out.copy_(master)
        return None

    n = grad.numel()
    if remainder is not None:
        room = scratch is not None and scratch.numel() >= n
        p = join_master(weights_out.view(-1), remainder.view(-1), ties, out=scratch[:n] if room else None)
        spare = scratch[n:2 * n] if room and scratch.numel() >= 2 * n else None
    else:
        p, spare = master.view(-1), scratch
    g = _fp32_grad(grad.view(-1), grad_scale, spare)
    m = exp_avg.view(-1) if exp_avg.dtype == torch.float32 else exp_avg.view(-1).float()
    v = exp_avg_sq.view(-1) if exp_avg_sq.dtype == torch.float32 else exp_avg_sq.view(-1).float()
    _fused_adamw_vectorised(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    if exp_avg.dtype != torch.float32:
        exp_avg.view(-1).copy_(m)
    if exp_avg_sq.dtype != torch.float32:
        exp_avg_sq.view(-1).copy_(v)
    if remainder is not None:
        return store_master(p, weights_out.view(-1), remainder.view(-1))
    if weights_out is not None:
        weights_out.view(-1).copy_(p)
    return None


def _check_tensor(t, name: str, dtypes, n: int) -> None:
    if t.device.type != "cpu" or t.dtype not in dtypes or not t.is_contiguous():
        kinds = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise RuntimeError(f"{name} must be a contiguous {kinds} CPU tensor, got {t.dtype} on {t.device}")
    if t.numel() != n:
        raise RuntimeError(f"{name} has {t.numel()} elements, master has {n}")


def _check_arguments(master, exp_avg, exp_avg_sq, grad, weights_out, step, remainder=None, ties=None) -> None:
    """Reject bad input in Python: an exception thrown inside an extension built against another
    pybind11 ABI than torch's may not reach Python as an exception (seen as a crash with torch 2.11)."""
    if remainder is None:
        if master is None:
            raise RuntimeError("master is None: pass an fp32 master, or remainder and ties with bf16 weights_out")
        if ties is not None:
            raise RuntimeError("ties are given only with a remainder (master=None)")
        n = master.numel()
        _check_tensor(master, "master", (torch.float32,), n)
    else:
        if master is not None:
            raise RuntimeError("with a remainder, master must be None: weights_out, remainder and ties hold it")
        if weights_out is None or weights_out.dtype != torch.bfloat16:
            raise RuntimeError("a remainder master needs bf16 weights_out (read and written), got "
                               + ("None" if weights_out is None else str(weights_out.dtype)))
        n = weights_out.numel()
        _check_tensor(remainder, "remainder", (torch.int16,), n)
        if ties is None:
            raise RuntimeError("a remainder master needs its ties (a sorted int64 tensor, may be empty)")
        if ties.device.type != "cpu" or ties.dtype != torch.int64 or ties.dim() != 1 or not ties.is_contiguous():
            raise RuntimeError("ties must be a contiguous 1-D int64 CPU tensor")
        if ties.numel() and (ties[0] < 0 or ties[-1] >= n or bool((ties[1:] < ties[:-1]).any())):
            raise RuntimeError(f"ties must be sorted indices in [0, {n})")
        if grad.dtype not in (torch.float32, torch.bfloat16):
            raise RuntimeError(f"a remainder master takes a bf16 or fp32 grad, got {grad.dtype}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_tensor(t, name, (torch.float32, torch.bfloat16), n)
    if grad.device.type != "cpu" or not grad.is_contiguous() or \
            grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError("grad must be a contiguous fp32/bf16/fp16 CPU tensor")
    if grad.numel() != n:
        raise RuntimeError(f"grad has {grad.numel()} elements, master has {n}")
    if weights_out is not None:
        if weights_out.device.type != "cpu" or not weights_out.is_contiguous() or \
                weights_out.dtype not in (torch.bfloat16, torch.float16):
            raise RuntimeError("weights_out must be a contiguous bf16/fp16 CPU tensor")
        if weights_out.numel() != n:
            raise RuntimeError(f"weights_out has {weights_out.numel()} elements, master has {n}")
    if step < 1:
        raise RuntimeError(f"step must be >= 1 (already incremented), got {step}")


def adamw_step(master: Optional[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               grad: torch.Tensor, weights_out: Optional[torch.Tensor], lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int, grad_scale: float = 1.0,
               scratch: Optional[torch.Tensor] = None, remainder: Optional[torch.Tensor] = None,
               ties: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """One AdamW step, in place, on contiguous CPU tensors (torch fused AdamW numerics).

    master: fp32, n elements, updated in place; or None with ``remainder`` and ``ties``.
    exp_avg, exp_avg_sq: fp32 or bf16 (each independently), n elements, updated in place; a bf16
        moment is updated in fp32 and stored rounded to nearest even.
    grad: fp32 | bf16 | fp16, n elements, read only; the step uses float(grad) * float(grad_scale)
        (grad_scale = inverse loss scale x clip coefficient).
    weights_out: bf16 | fp16 tensor of n elements receiving master rounded to nearest even, or None.
        With a remainder it is required, bf16, and holds the current weights on entry.
    step: the step count already incremented (1 on the first step).
    scratch: fp32 buffer used only by the torch fallback (avoids allocating n floats per call).
    remainder, ties: the master as ``stronghold_ext.remainders.join_master(weights_out, remainder,
        ties)``: int16 remainder (n elements, updated in place) and sorted int64 ties. The step
        updates that fp32 value exactly as an fp32 master, then splits it back.
    Returns the new ties (a new sorted int64 tensor) with a remainder, else None.
    Releases the GIL while it runs; threads: torch.get_num_threads() of the calling thread.
    """
    _check_arguments(master, exp_avg, exp_avg_sq, grad, weights_out, step, remainder, ties)
    ext = fused_adamw()
    if ext is None:
        return adamw_step_torch(master, exp_avg, exp_avg_sq, grad, weights_out, lr, beta1, beta2, eps,
                                weight_decay, step, grad_scale, scratch, remainder, ties)
    return ext.adamw_step(master, exp_avg, exp_avg_sq, grad, weights_out, float(lr), float(beta1), float(beta2),
                          float(eps), float(weight_decay), int(step), float(grad_scale), remainder, ties)
