"""Host-memory home of one streamed transformer layer, and its CPU AdamW.

Each layer's parameters are packed into one flat buffer, weight-decayed parameters first, so that
- the host->GPU copy of a layer is one transfer (pinned compute-dtype weights -> GPU slot);
- its parameters on the GPU are views into the slot;
- the optimizer is two fused AdamW calls (decay / no-decay group) over contiguous views.

Bytes per parameter, whatever the number of micro-batches (the gradient is summed on the device and
arrives once per step): pinned compute-dtype weights and pinned gradient (2 + 2 in bf16; in fp16 the
gradient stays fp32, as Megatron's main grads, since the sum of a step's micro-batches can overflow
fp16 where none of them does), the fp32 master (4; in fp32 the pinned weights are the master; in bf16,
by default, the master is the pinned bf16 weights plus a 16-bit remainder, 2, exactly:
stronghold_ext/remainders.py) and the two Adam moments (4 + 4, or 2 + 2 in bf16 with the
precision-aware optimizer). bf16: 14 (16 with --no-store-param-remainders), 10 with bf16 moments;
fp32: 16, 12; fp16: 18, 14.
"""

from dataclasses import dataclass

import torch

from stronghold_ext import adamw_step
from stronghold_ext.remainders import join_master, store_master, ties_within

from ..checkpointing.format import shape_mismatch
from ..optim import no_weight_decay
from ..precision import gradient_dtype


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


class HostLayer:
    """Pinned compute copy and pinned gradient, fp32 master (or its remainder) and Adam state of one layer."""

    def __init__(self, layer: torch.nn.Module, layout: LayerLayout, dtype: torch.dtype, pin: bool, args):
        params = dict(layer.named_parameters())
        n = layout.numel
        self.layout = layout
        # What crosses PCIe (weights in, gradients out) shares one page-locked block.
        grad_dtype = gradient_dtype(dtype)
        self.block = PinnedBlock(n * (dtype.itemsize + grad_dtype.itemsize), pin)
        self.weights = self.block.tensor[:n * dtype.itemsize].view(dtype)
        self.grad = self.block.tensor[n * dtype.itemsize:].view(grad_dtype)
        # The masters start from the compute-dtype weights, as megatron-lm's do (Megatron-LM builds the
        # model in bf16/fp16 and its optimizer copies those to fp32): from the fp32 values, small updates
        # that megatron-lm rounds away would accumulate here, and the runs would part.
        for view, name in zip(layout.views(self.weights), layout.names):
            view.copy_(params[name].detach())
        self.remainders = dtype == torch.bfloat16 and args.store_param_remainders
        if dtype == torch.float32:
            self.master = self.weights  # the pinned weights are the master
        elif self.remainders:
            self.master = None  # the bf16 weights are exactly it, so its remainder is zero
            self.remainder = torch.zeros(n, dtype=torch.int16)
        else:
            self.master = self.weights.float()
        self.betas, self.eps = (args.adam_beta1, args.adam_beta2), args.adam_eps

        # One optimizer part per non-empty group, decay first: its span of the flat buffer, its
        # weight-decay multiplier (which selects the scheduler's lr and weight decay), its Adam state
        # (allocated up front so host memory is known before training starts) and, with remainders,
        # the ties of its masters (stronghold_ext/remainders.py).
        cut = layout.decay_numel
        exp_avg_dtype, exp_avg_sq_dtype = args.moment_dtypes
        self.parts = [{"span": (a, b), "wd_mult": 1.0 if a == 0 and cut > 0 else 0.0, "step": 0,
                       "exp_avg": torch.zeros(b - a, dtype=exp_avg_dtype),
                       "exp_avg_sq": torch.zeros(b - a, dtype=exp_avg_sq_dtype),
                       "ties": torch.zeros(0, dtype=torch.int64)}
                      for a, b in ((0, cut), (cut, n)) if b > a]

    def nbytes(self) -> dict:
        n = self.layout.numel
        state = sum(p[k].numel() * p[k].element_size() for p in self.parts for k in ("exp_avg", "exp_avg_sq", "ties"))
        master = 0 if self.master is self.weights else 2 * n if self.remainders else 4 * n
        return {"pinned": self.block.tensor.numel(), "pageable": master + state}

    # ----- gradient handling (runs on the CPU worker) -----

    def step(self, hyper: dict, grad_scale: float, scratch: torch.Tensor) -> None:
        """AdamW on gradient x grad_scale (loss unscale x clip coefficient), new weights out.
        hyper: wd_mult -> (lr, weight decay), snapshotted when the work was queued.

        One pass per element through stronghold_ext's fused kernel (torch ops when it is absent):
        grad in its received dtype, master (or weights and remainder) and moments updated in place,
        compute-dtype weights written.
        """
        out = None if self.weights is self.master else self.weights
        for part in self.parts:
            a, b = part["span"]
            lr, weight_decay = hyper[part["wd_mult"]]
            part["step"] += 1
            ties = adamw_step(None if self.master is None else self.master[a:b], part["exp_avg"],
                              part["exp_avg_sq"], self.grad[a:b], None if out is None else out[a:b], lr,
                              *self.betas, self.eps, weight_decay, part["step"], grad_scale, scratch=scratch[a:b],
                              remainder=self.remainder[a:b] if self.remainders else None,
                              ties=part["ties"] if self.remainders else None)
            if self.remainders:
                part["ties"] = ties

    # ----- checkpoints -----

    def _param_parts(self):
        """(name, shape, offset, numel, the optimizer part holding it) per parameter."""
        for name, shape, off in zip(self.layout.names, self.layout.shapes, self.layout.offsets):
            part = next(p for p in self.parts if p["span"][0] <= off < p["span"][1])
            yield name, shape, off, _numel(shape), part

    def state_dict(self) -> dict:
        """{parameter name: {"param", "exp_avg", "exp_avg_sq", "step"}}: views of this store, no copies
        (the caller must not hold them across a step). "param" is the fp32 master; with remainders it
        is the bf16 weight, and "master_remainder" and "master_ties" complete it
        (checkpointing.format.entry_master reads the fp32 value back)."""
        out = {}
        for name, shape, off, n, part in self._param_parts():
            rel = off - part["span"][0]
            entry = {"exp_avg": part["exp_avg"][rel:rel + n].view(shape),
                     "exp_avg_sq": part["exp_avg_sq"][rel:rel + n].view(shape), "step": part["step"]}
            if self.remainders:
                entry.update(param=self.weights[off:off + n].view(shape),
                             master_remainder=self.remainder[off:off + n].view(shape),
                             master_ties=ties_within(part["ties"], rel, rel + n))
            else:
                entry["param"] = self.master[off:off + n].view(shape)
            out[name] = entry
        return out

    def load_state_dict(self, state: dict) -> None:
        """Copy {parameter name: entry} (as state_dict returns, in any of its layouts; entries without
        Adam moments start fresh; moments of another dtype are converted) into the master, the Adam
        state and the pinned compute-dtype weights."""
        from ..checkpointing.format import entry_master

        steps, ties = {}, {id(p): [] for p in self.parts}
        for name, shape, off, n, part in self._param_parts():
            entry = state[name]
            if tuple(entry["param"].shape) != tuple(shape):
                raise ValueError(shape_mismatch(name, entry["param"].shape, shape))
            rel = off - part["span"][0]
            if self.remainders and "master_remainder" in entry:  # the same layout: no fp32 copy
                self.weights[off:off + n].view(shape).copy_(entry["param"])
                self.remainder[off:off + n].view(shape).copy_(entry["master_remainder"])
                ties[id(part)].append(entry["master_ties"] + rel)
            elif self.remainders:
                master = entry_master(entry).reshape(-1)
                ties[id(part)].append(store_master(master, self.weights[off:off + n], self.remainder[off:off + n]) + rel)
            else:
                self.master[off:off + n].view(shape).copy_(entry_master(entry))
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry:
                    part[key][rel:rel + n].view(shape).copy_(entry[key])
                else:
                    part[key][rel:rel + n].zero_()
            steps[id(part)] = max(steps.get(id(part), 0), int(entry.get("step", 0)))
        for part in self.parts:  # one step count per part (every parameter steps together)
            part["step"] = steps.get(id(part), 0)
            if self.remainders:
                part["ties"] = torch.cat(ties[id(part)]) if ties[id(part)] else torch.zeros(0, dtype=torch.int64)
        if self.master is not None and self.weights is not self.master:
            self.weights.copy_(self.master)
