"""Host-memory home of one streamed transformer layer, and its CPU AdamW.

Each layer's parameters are packed into one flat buffer, weight-decayed parameters first, so that
- the host->GPU copy of a layer is one transfer (pinned compute-dtype weights -> GPU slot);
- its parameters on the GPU are views into the slot;
- the optimizer is two fused AdamW calls (decay / no-decay group) over contiguous fp32 views.

Bytes per parameter: fp32 master + two fp32 Adam moments (12), pinned compute-dtype weights and
pinned gradient (2 + 2 in bf16; in fp16 the gradient stays fp32, as Megatron's main grads, since the
sum of a step's micro-batches can overflow fp16 where none of them does: 18). In fp32 the pinned
weights are the master itself, so also 16. Whatever the number of micro-batches: the gradient is summed on the device and
arrives once per step.
"""

from dataclasses import dataclass

import torch

from stronghold_ext import adamw_step

from ..checkpointing.format import shape_mismatch
from ..optim import adamw, no_weight_decay


@dataclass
class LayerLayout:
    """Where each parameter of a layer sits in the flat buffer (same for every layer)."""

    names: list
    shapes: list
    offsets: list
    decay_numel: int  # the first decay_numel elements take weight decay
    numel: int

    @classmethod
    def of(cls, layer: torch.nn.Module) -> "LayerLayout":
        named = list(layer.named_parameters())
        order = [x for x in named if not no_weight_decay(*x)] + [x for x in named if no_weight_decay(*x)]
        offsets, off = [], 0
        for _, p in order:
            offsets.append(off)
            off += p.numel()
        decay = sum(p.numel() for n, p in order if not no_weight_decay(n, p))
        return cls([n for n, _ in order], [tuple(p.shape) for _, p in order], offsets, decay, off)

    def views(self, flat: torch.Tensor):
        return [flat[o:o + _numel(s)].view(s) for o, s in zip(self.offsets, self.shapes)]


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


class PinnedBlock:
    """Host memory of an exact size, page-locked with cudaHostRegister.

    torch's pin_memory allocator rounds every block up to a power of two (100 MB -> 128 MB), which
    at a few hundred layers wastes tens of GiB; registering a plain allocation costs the same time
    and nothing more.
    """

    def __init__(self, nbytes: int, pin: bool):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.pinned = False
        if pin and nbytes:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed ({err}): "
                                   "is the locked-memory limit (ulimit -l) too low?")
            self.pinned = True

    def __del__(self):
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False


def gradient_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """What a streamed layer's gradient crosses PCIe in: the compute dtype, except fp16 (see above)."""
    return torch.float32 if compute_dtype == torch.float16 else compute_dtype


class HostLayer:
    """fp32 master, Adam state, pinned compute copy and pinned gradient of one layer."""

    def __init__(self, layer: torch.nn.Module, layout: LayerLayout, dtype: torch.dtype, pin: bool, args):
        params = dict(layer.named_parameters())
        n = layout.numel
        self.layout = layout
        # What crosses PCIe (weights in, gradients out) shares one page-locked block.
        grad_dtype = gradient_dtype(dtype)
        self.block = PinnedBlock(n * (dtype.itemsize + grad_dtype.itemsize), pin)
        self.weights = self.block.tensor[:n * dtype.itemsize].view(dtype)
        self.grad = self.block.tensor[n * dtype.itemsize:].view(grad_dtype)
        # In fp32 the pinned weights are the master; otherwise the master is pageable.
        self.master = self.weights if dtype == torch.float32 else torch.empty(n, dtype=torch.float32)
        for view, name in zip(layout.views(self.master), layout.names):
            view.copy_(params[name].detach())
        if self.weights is not self.master:
            # The masters start from the compute-dtype weights, as megatron-lm's do (Megatron-LM builds
            # the model in bf16/fp16 and its optimizer copies those to fp32): from the fp32 values, small
            # updates that megatron-lm rounds away would accumulate here, and the runs would part.
            self.weights.copy_(self.master)
            self.master.copy_(self.weights)

        # (flat view, start, end) per non-empty group: decay first, then no-decay.
        cut = layout.decay_numel
        self.parts = [(self.master[a:b], a, b) for a, b, in ((0, cut), (cut, n)) if b > a]
        wd_mults = [1.0 if a == 0 and cut > 0 else 0.0 for _, a, _ in self.parts]
        groups = [{"params": [view], "wd_mult": w} for (view, _, _), w in zip(self.parts, wd_mults)]
        self.optimizer = adamw(groups, args)

    def _set_hyperparameters(self, hyper: dict) -> None:
        """hyper: wd_mult -> (lr, weight decay), snapshotted when the work was queued."""
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = hyper[group["wd_mult"]]

    def nbytes(self) -> dict:
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        pinned = self.block.tensor.numel()
        pageable = (0 if self.weights is self.master else self.master.numel() * 4) + state
        return {"pinned": pinned, "pageable": pageable}

    def init_optimizer_state(self) -> None:
        """Allocate Adam moments up front so host memory is known before training starts."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)

    # ----- gradient handling (runs on the CPU worker) -----

    def final_grad(self, scratch: torch.Tensor, inv_scale: float) -> torch.Tensor:
        """This step's unscaled fp32 gradient (a view of scratch unless no conversion is needed)."""
        g = self.grad
        if g.dtype == torch.float32 and inv_scale == 1.0:
            return g
        g = scratch[:self.layout.numel].copy_(g)
        if inv_scale != 1.0:
            g.mul_(inv_scale)  # in fp32, as Megatron unscales its fp32 main grads
        return g

    def step(self, hyper: dict, grad_scale: float, scratch: torch.Tensor) -> None:
        """AdamW on gradient x grad_scale (loss unscale x clip coefficient), new weights out.

        One pass per element through stronghold_ext's fused kernel (torch ops when it is absent):
        grad in its received dtype, fp32 master and moments updated, compute-dtype weights written.
        """
        self._set_hyperparameters(hyper)
        grad = self.grad
        out = None if self.weights is self.master else self.weights
        for group, (view, a, b) in zip(self.optimizer.param_groups, self.parts):
            st = self.optimizer.state[view]
            st["step"] += 1
            beta1, beta2 = group["betas"]
            adamw_step(view, st["exp_avg"], st["exp_avg_sq"], grad[a:b], None if out is None else out[a:b],
                       group["lr"], beta1, beta2, group["eps"], group["weight_decay"], int(st["step"]),
                       grad_scale, scratch=scratch[a:b])

    def undo_step(self, grad: torch.Tensor, hyper: dict) -> None:
        """Invert the last AdamW step given the gradient it used (exact up to rounding).

        Used when the global gradient norm, known only after every layer has stepped, turns out to
        need clipping, or an overflow elsewhere means the step must be skipped.
        """
        self._set_hyperparameters(hyper)
        for group, (p, a, b) in zip(self.optimizer.param_groups, self.parts):
            g = grad[a:b]
            p = group["params"][0]
            st = self.optimizer.state[p]
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            step = float(st["step"])
            m, v = st["exp_avg"], st["exp_avg_sq"]
            bias1 = 1 - beta1 ** step
            bias2_sqrt = (1 - beta2 ** step) ** 0.5
            denom = (v.sqrt() / bias2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=lr / bias1)
            if wd != 0.0:
                p.div_(1 - lr * wd)
            v.addcmul_(g, g, value=-(1 - beta2)).div_(beta2).clamp_(min=0.0)
            m.add_(g, alpha=-(1 - beta1)).div_(beta1)
            st["step"] -= 1
        if self.weights is not self.master:
            self.weights.copy_(self.master)

    # ----- checkpoints -----

    def _param_parts(self):
        """(name, shape, offset, numel, (view, a, b) of the optimizer part holding it) per parameter."""
        for name, shape, off in zip(self.layout.names, self.layout.shapes, self.layout.offsets):
            part = next(p for p in self.parts if p[1] <= off < p[2])
            yield name, shape, off, _numel(shape), part

    def state_dict(self) -> dict:
        """{parameter name: {"param", "exp_avg", "exp_avg_sq", "step"}}: fp32 views of this store,
        no copies (the caller must not hold them across a step)."""
        out = {}
        for name, shape, off, n, (view, a, _) in self._param_parts():
            st = self.optimizer.state[view]
            out[name] = {"param": self.master[off:off + n].view(shape),
                         "exp_avg": st["exp_avg"][off - a:off - a + n].view(shape),
                         "exp_avg_sq": st["exp_avg_sq"][off - a:off - a + n].view(shape),
                         "step": int(st["step"])}
        return out

    def load_state_dict(self, state: dict) -> None:
        """Copy {parameter name: entry} (as state_dict returns; entries without Adam moments start
        fresh) into the master, the Adam state and the pinned compute-dtype weights."""
        steps = {}
        for name, shape, off, n, (view, a, _) in self._param_parts():
            entry = state[name]
            if tuple(entry["param"].shape) != tuple(shape):
                raise ValueError(shape_mismatch(name, entry["param"].shape, shape))
            self.master[off:off + n].view(shape).copy_(entry["param"])
            st = self.optimizer.state[view]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry:
                    st[key][off - a:off - a + n].view(shape).copy_(entry[key])
                else:
                    st[key][off - a:off - a + n].zero_()
            steps[a] = max(steps.get(a, 0), int(entry.get("step", 0)))
        for view, a, _ in self.parts:  # one step count per part (every parameter steps together)
            self.optimizer.state[view]["step"].fill_(steps.get(a, 0))
        if self.weights is not self.master:
            self.weights.copy_(self.master)
