"""StrongHold native extensions.

C++ kernels live here, each with a pure-torch fallback used when the
extension is not built. A kernel is added only when it beats the library
(torch / DeepSpeed / megatron-core) implementation it replaces.

Kernels
-------
fused_adamw.cpp -- ``adamw_step``: the host AdamW update of one StrongHold layer in one pass over
    memory (compute-dtype gradient in, fp32 master and moments updated, compute-dtype weights out),
    with the numerics of ``torch.optim.AdamW(fused=True)`` on CPU. The torch path it replaces takes
    three passes (gradient -> fp32 scratch, fused AdamW, master -> weights copy).
    Benchmark: ``tools/bench_cpu_adam.py``; tests: ``tests/test_fused_adamw.py``.

Callers always call :func:`adamw_step`; it runs the compiled kernel when :func:`fused_adamw`
returns it and :func:`adamw_step_torch` otherwise. The kernel is JIT-compiled on first use
(``-O3 -march=native -fopenmp``) into ``$TORCH_EXTENSIONS_DIR/stronghold_ext/...`` or
``~/.cache/stronghold_ext/...`` (one directory per Python, torch and CPU, so a cache shared by
machines never hands one a binary built for another); ``STRONGHOLD_NO_EXT=1`` disables it.
"""

import hashlib
import logging
import os
import sys
import threading
import time
from typing import Optional

import torch

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


def adamw_step_torch(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     grad: torch.Tensor, weights_out: Optional[torch.Tensor], lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, step: int, grad_scale: float = 1.0,
                     scratch: Optional[torch.Tensor] = None) -> None:
    """Pure-torch equivalent of the kernel: fp32 gradient (into ``scratch`` when given, a fp32
    buffer of at least grad.numel() elements; else a temporary), torch's fused AdamW kernel, then
    ``weights_out.copy_(master)``. ``grad`` is never modified."""
    if grad.dtype == torch.float32 and grad_scale == 1.0:
        g = grad
    else:
        g = scratch[:grad.numel()].view_as(grad) if scratch is not None else torch.empty_like(grad, dtype=torch.float32)
        g.copy_(grad)
        if grad_scale != 1.0:
            g.mul_(grad_scale)  # fp32 multiply by the fp32-rounded scale, as the kernel
    steps = [torch.tensor(float(step), dtype=torch.float32)]
    torch._fused_adamw_([master], [g], [exp_avg], [exp_avg_sq], [], steps, lr=float(lr), beta1=float(beta1),
                        beta2=float(beta2), weight_decay=float(weight_decay), eps=float(eps), amsgrad=False,
                        maximize=False)
    if weights_out is not None and weights_out is not master:
        weights_out.copy_(master)


def _check_arguments(master, exp_avg, exp_avg_sq, grad, weights_out, step) -> None:
    """Reject bad input in Python: an exception thrown inside an extension built against another
    pybind11 ABI than torch's may not reach Python as an exception (seen as a crash with torch 2.11)."""
    n = master.numel()
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise RuntimeError(f"{name} must be a contiguous fp32 CPU tensor")
        if t.numel() != n:
            raise RuntimeError(f"{name} has {t.numel()} elements, master has {n}")
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


def adamw_step(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
               weights_out: Optional[torch.Tensor], lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int, grad_scale: float = 1.0,
               scratch: Optional[torch.Tensor] = None) -> None:
    """One AdamW step, in place, on contiguous CPU tensors (torch fused AdamW numerics).

    master, exp_avg, exp_avg_sq: fp32, n elements, updated in place.
    grad: fp32 | bf16 | fp16, n elements, read only; the step uses float(grad) * float(grad_scale)
        (grad_scale = inverse loss scale x clip coefficient).
    weights_out: bf16 | fp16 tensor of n elements receiving master rounded to nearest even, or None.
    step: the step count already incremented (1 on the first step).
    scratch: fp32 buffer used only by the torch fallback (avoids allocating n floats per call).
    Releases the GIL while it runs; threads: torch.get_num_threads() of the calling thread.
    """
    _check_arguments(master, exp_avg, exp_avg_sq, grad, weights_out, step)
    ext = fused_adamw()
    if ext is None:
        return adamw_step_torch(master, exp_avg, exp_avg_sq, grad, weights_out, lr, beta1, beta2, eps,
                                weight_decay, step, grad_scale, scratch)
    ext.adamw_step(master, exp_avg, exp_avg_sq, grad, weights_out, float(lr), float(beta1), float(beta2),
                   float(eps), float(weight_decay), int(step), float(grad_scale))
