"""Mixed-precision AdamW with Megatron-LM's semantics, shared by every method.

Megatron-LM's recipe, which both the GPU-resident and the host-streamed parameters follow:
- gradients are accumulated over micro-batches in fp32 ("main grads");
- fp16 grads are unscaled by the loss scale; any inf/nan anywhere skips the whole step;
- the global L2 norm over all main grads is logged, and grads are multiplied by
  clip / (norm + 1e-6) when that is below one;
- AdamW on fp32 master weights; biases and 1-D (norm) parameters get no weight decay;
- the learning rate comes from megatron-core's OptimizerParamScheduler, stepped by the global batch
  size after each successful step.
"""

import math

import torch

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from stronghold_ext.remainders import join_master, split_into, ties_within

from .checkpointing.format import entry_master, shape_mismatch


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    return name.endswith(".bias") or param.dim() == 1


def adamw(groups, args) -> torch.optim.AdamW:
    """torch's fused AdamW (CPU and CUDA): one kernel per group, releases the GIL."""
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_eps, weight_decay=args.weight_decay, fused=True)


def counts_in_norm(param) -> bool:
    """Megatron counts a parameter replicated over tensor-parallel ranks once, on rank 0."""
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    return param_is_not_tensor_parallel_duplicate(param)


def clip_coefficient(grad_norm: float, clip_grad: float) -> float:
    """Megatron-LM's clip_grad_norm_fp32 coefficient (1.0 means: leave the grads alone)."""
    if clip_grad <= 0:
        return 1.0
    coeff = clip_grad / (grad_norm + 1.0e-6)
    return coeff if coeff < 1.0 else 1.0


class LossScaler:
    """Megatron's loss scaling: constant 1 for fp32/bf16, dynamic with hysteresis for fp16."""

    def __init__(self, args):
        self.dynamic = bool(args.fp16)
        self.scale = float(args.initial_loss_scale) if self.dynamic else 1.0
        self.min_scale = args.min_loss_scale
        self.growth_interval = args.loss_scale_window
        self.hysteresis = args.hysteresis
        self._hysteresis_left = args.hysteresis
        self._growth_tracker = 0

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * 0.5, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_left = self.hysteresis
                self.scale *= 2.0

    def state_dict(self):
        return {"scale": self.scale, "growth_tracker": self._growth_tracker,
                "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state):
        self.scale = state["scale"]
        self._growth_tracker = state["growth_tracker"]
        self._hysteresis_left = state["hysteresis_left"]


# Elements stepped at a time where the resident step rebuilds fp32 masters or widens moments: what that
# step holds at once beyond the model (the planner counts it, planner/costs.py's STEP_BYTES).
STEP_SLICE = 1 << 26


class ResidentOptimizer:
    """Mixed-precision AdamW for parameters that live on the compute device.

    Model parameters are in the compute dtype; fp32 masters and main grads sit beside them on the
    same device. A post-accumulate-grad hook moves each micro-batch's gradient into the fp32 main
    grad and frees it, as Megatron's DDP grad buffer does. In bf16 the masters are kept, by default,
    as the bf16 weights plus a 16-bit remainder (exact: stronghold_ext/remainders.py), and Adam moments
    may be bf16 (the precision-aware optimizer); either way the step runs a chunk of parameters at a
    time: masters rebuilt in fp32, moments widened, torch's fused AdamW, then split and rounded back
    (to nearest: the host store's CPU kernel does the same arithmetic).
    """

    CHUNK = STEP_SLICE  # per instance, so that a test can cut parameters into smaller slices

    def __init__(self, named_params, args):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.same_dtype = all(p.dtype == torch.float32 for p in self.params)
        self.remainders = bool(self.params) and args.store_param_remainders and all(
            p.dtype == torch.bfloat16 for p in self.params)
        if self.remainders:
            # each master's fp32 storage exists only while its chunk steps (stepped)
            self.masters = [torch.empty(0, dtype=torch.float32, device=p.device) for p in self.params]
            self.remainder = [torch.zeros_like(p, dtype=torch.int16) for p in self.params]
            self.ties = [torch.zeros(0, dtype=torch.int64, device=p.device) for p in self.params]
        else:
            self.masters = [p.detach() if self.same_dtype else p.detach().float() for p in self.params]
        self.main_grads = [torch.zeros_like(p, dtype=args.main_grads_torch_dtype) for p in self.params]
        self.narrow_grads = args.main_grads_torch_dtype != torch.float32
        self.counted = [counts_in_norm(p) for p in self.params]
        decay = [m for (n, p), m in zip(named_params, self.masters) if not no_weight_decay(n, p)]
        nodecay = [m for (n, p), m in zip(named_params, self.masters) if no_weight_decay(n, p)]
        groups = [g for g in ({"params": decay, "wd_mult": 1.0}, {"params": nodecay, "wd_mult": 0.0})
                  if g["params"]]
        self.optimizer = adamw(groups, args) if self.params else None
        self.moment_dtypes = args.moment_dtypes
        self.narrow_moments = any(d != torch.float32 for d in self.moment_dtypes)
        if self.narrow_moments:
            for m, p in zip(self.masters, self.params):
                self._init_state(m, p)
        for p, g in zip(self.params, self.main_grads):
            p.register_post_accumulate_grad_hook(self.accumulator(g))

    def _init_state(self, master, param) -> None:
        """Moments in their stored dtypes, allocated up front (torch would make fp32 ones lazily)."""
        self.optimizer.state[master] = {
            "step": torch.zeros((), dtype=torch.float32, device=param.device),  # fused AdamW's form
            "exp_avg": torch.zeros_like(param, dtype=self.moment_dtypes[0]),
            "exp_avg_sq": torch.zeros_like(param, dtype=self.moment_dtypes[1])}

    @staticmethod
    def accumulator(main_grad):
        """The post-accumulate-grad hook that adds a parameter's gradient into main_grad and frees it."""
        def accumulate(param):
            main_grad.add_(param.grad)
            param.grad = None
        return accumulate

    @property
    def param_groups(self):
        return self.optimizer.param_groups if self.optimizer else []

    def average_over_data_parallel(self) -> None:
        """Megatron's data-parallel gradient: the mean of the ranks' fp32 main grads, reduced in place
        tensor by tensor (a flat copy would need another 4 B per resident parameter of GPU memory,
        which the planner has given to layers)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        size = parallel_state.get_data_parallel_world_size()
        if size == 1 or not self.main_grads:
            return
        group = parallel_state.get_data_parallel_group()
        for work in [dist.all_reduce(g, group=group, async_op=True) for g in self.main_grads]:
            work.wait()
        torch._foreach_div_(self.main_grads, size)

    def unscale_and_measure(self, inv_scale: float):
        """Unscale main grads in place; return (sum of squares, any non-finite) as 0-dim tensors."""
        if not self.main_grads:
            return torch.zeros(()), torch.zeros((), dtype=torch.bool)
        if inv_scale != 1.0:
            torch._foreach_mul_(self.main_grads, inv_scale)
        counted = [g for g, c in zip(self.main_grads, self.counted) if c]
        # bf16 main grads: their norm in fp32, as the streamed layers' (executor._take_norm)
        wide = {"dtype": torch.float32} if self.narrow_grads else {}
        norms = (torch._foreach_norm(counted, 2, **wide) if counted
                 else [torch.zeros((), device=self.main_grads[0].device)])
        sumsq = torch.stack(norms).square().sum()
        return sumsq, ~torch.isfinite(sumsq)

    def state_dict(self) -> dict:
        """{name: {"param": fp32 master (with remainders: the bf16 weight, "master_remainder" and
        "master_ties" beside it), "exp_avg", "exp_avg_sq", "step"}} (Adam entries once it has stepped);
        the tensors are the optimizer's own, not copies."""
        out = {}
        for i, (name, master) in enumerate(zip(self.names, self.masters)):
            if self.remainders:
                entry = {"param": self.params[i].detach(), "master_remainder": self.remainder[i],
                         "master_ties": self.ties[i]}
            else:
                entry = {"param": master}
            st = self.optimizer.state.get(master) if self.optimizer is not None else None
            if st:
                entry.update(exp_avg=st["exp_avg"], exp_avg_sq=st["exp_avg_sq"], step=int(st["step"]))
            out[name] = entry
        return out

    def load_state_dict(self, state: dict) -> None:
        """Take this optimizer's parameters from a {name: entry} dict as state_dict() returns, in any of
        its layouts (it may hold other parameters too); ValueError on a missing name or another shape."""
        for i, (name, master, param) in enumerate(zip(self.names, self.masters, self.params)):
            if name not in state:
                raise ValueError(f"{name} is missing from the checkpoint")
            entry = state[name]
            if tuple(entry["param"].shape) != tuple(param.shape):
                raise ValueError(shape_mismatch(name, entry["param"].shape, param.shape))
            if self.remainders and "master_remainder" in entry:  # the same layout: no fp32 copy
                param.data.copy_(entry["param"])
                self.remainder[i].copy_(entry["master_remainder"])
                self.ties[i] = entry["master_ties"].to(param.device, copy=True)
            elif self.remainders:
                fp32 = entry_master(entry).to(device=param.device, dtype=torch.float32)
                self.ties[i] = torch.nonzero(split_into(fp32, param.data, self.remainder[i])).flatten()
            else:
                master.copy_(entry_master(entry))
            if self.optimizer is None:
                continue
            if "exp_avg" in entry:
                device = param.device
                self.optimizer.state[master] = {
                    # fused AdamW keeps its step as an fp32 tensor on the parameter's device
                    "step": torch.tensor(float(entry["step"]), dtype=torch.float32, device=device),
                    # another dtype than the checkpoint's is converted (rounded to nearest into bf16)
                    "exp_avg": entry["exp_avg"].to(device=device, dtype=self.moment_dtypes[0], copy=True).view_as(param),
                    "exp_avg_sq": entry["exp_avg_sq"].to(device=device, dtype=self.moment_dtypes[1],
                                                         copy=True).view_as(param),
                }
            elif self.narrow_moments:
                self._init_state(master, param)  # not stepped yet: fresh moments
            else:
                self.optimizer.state.pop(master, None)  # not stepped yet: fresh moments
        if not self.same_dtype and not self.remainders and self.params:
            torch._foreach_copy_([p.data for p in self.params], self.masters)
        for g in self.main_grads:
            g.zero_()

    def step(self, clip_coeff: float, skip: bool) -> None:
        if not skip and self.optimizer is not None:
            # bf16 main grads are widened and clipped in fp32 a slice at a time, as the CPU kernel scales them
            if clip_coeff != 1.0 and not self.narrow_grads:
                torch._foreach_mul_(self.main_grads, clip_coeff)
            if self.narrow_grads or self.narrow_moments or self.remainders:
                self._step_in_pieces(clip_coeff if self.narrow_grads else 1.0)
            else:
                for m, g in zip(self.masters, self.main_grads):
                    m.grad = g
                self.optimizer.step()
                for m in self.masters:
                    m.grad = None
                if not self.same_dtype:
                    torch._foreach_copy_([p.data for p in self.params], self.masters)
        for g in self.main_grads:
            g.zero_()

    def _pieces(self):
        """(group, parameter index, start, end): every parameter in slices of at most CHUNK elements, so
        that what is rebuilt in fp32 at a time stays small however large a parameter (an embedding)."""
        index = {id(m): i for i, m in enumerate(self.masters)}
        for group in self.optimizer.param_groups:
            for m in group["params"]:
                i = index[id(m)]
                n = self.params[i].numel()
                for a in range(0, n, self.CHUNK):
                    yield group, i, a, min(n, a + self.CHUNK)

    def _step_in_pieces(self, clip_coeff: float = 1.0) -> None:
        """torch's fused AdamW (what optimizer.step() runs) a slice at a time: the fp32 master rebuilt from
        the weights and remainder, bf16 moments widened, then split and rounded back. The ties of about
        CHUNK elements are found in one pass, so the step waits for the device once per chunk."""
        state = self.optimizer.state
        stepped, found, pending, size = set(), [], [], 0
        for group, i, a, b in self._pieces():
            param, st = self.params[i], state.get(self.masters[i])
            if not st:  # fp32 moments are made at the first step, as torch does
                st = state[self.masters[i]] = {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                                               "exp_avg": torch.zeros_like(param, dtype=torch.float32),
                                               "exp_avg_sq": torch.zeros_like(param, dtype=torch.float32)}
            if i not in stepped:
                st["step"] += 1
                stepped.add(i)
            weights = param.data.view(-1)[a:b]
            if self.remainders:
                ties = self.ties[i]
                if (a, b) != (0, param.numel()):  # a slice of a large parameter (a mask: waits for the device)
                    ties = ties_within(ties, a, b)
                master = join_master(weights, self.remainder[i].view(-1)[a:b], ties)
            else:
                master = self.masters[i].view(-1)[a:b]
            stored = [st[k].view(-1)[a:b] for k in ("exp_avg", "exp_avg_sq")]
            moments = [t.float() for t in stored]  # the fp32 ones themselves: no copy
            beta1, beta2 = group["betas"]
            grad = self.main_grads[i].view(-1)[a:b]
            if self.narrow_grads:  # bf16 main grads widened (and clipped) in fp32
                grad = grad.float()
                if clip_coeff != 1.0:
                    grad.mul_(clip_coeff)
            torch._fused_adamw_([master], [grad], moments[:1], moments[1:], [],
                                [st["step"]], lr=group["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False)
            for keep, new in zip(stored, moments):
                if keep.dtype != torch.float32:
                    keep.copy_(new)  # rounded to nearest
            if not self.remainders:
                weights.copy_(master)
                continue
            found.append(split_into(master, weights, self.remainder[i].view(-1)[a:b]))
            pending.append((i, a, b))
            size += b - a
            if size >= self.CHUNK:
                self._collect_ties(found, pending)
                found, pending, size = [], [], 0
        if pending:
            self._collect_ties(found, pending)

    def _collect_ties(self, masks: list, pieces: list) -> None:
        """The new ties of these pieces from their masks: one nonzero and one copy of the boundaries back to
        the host; the ties stay on the parameters' device (join_master indexes with them there)."""
        where = torch.nonzero(torch.cat(masks)).flatten()
        starts, offset = [], 0
        for _, a, b in pieces:
            starts += [offset, offset + b - a]
            offset += b - a
        bounds = torch.searchsorted(where, torch.tensor(starts, device=where.device)).tolist()
        offset, parts = 0, {}
        for (i, a, b), lo, hi in zip(pieces, bounds[::2], bounds[1::2]):
            parts.setdefault(i, []).append(where[lo:hi] - offset + a)
            offset += b - a
        for i, new in parts.items():
            lo = min(a for j, a, _ in pieces if j == i)
            hi = max(b for j, _, b in pieces if j == i)
            if (lo, hi) == (0, self.params[i].numel()):  # the whole parameter: nothing else to keep
                self.ties[i] = torch.cat(new)
                continue
            kept = self.ties[i]
            outside = kept[(kept < lo) | (kept >= hi)]  # ties of this parameter's slices in other chunks
            self.ties[i] = torch.sort(torch.cat([outside, *new])).values


class GroupsView:
    """What OptimizerParamScheduler needs from an optimizer: the param groups of all of ours."""

    def __init__(self, *sources):
        self.sources = sources

    @property
    def param_groups(self):
        return [g for s in self.sources for g in s.param_groups]


def lr_scheduler(args, optimizers) -> OptimizerParamScheduler:
    """Megatron-LM's sample-based schedule: steps are counted in samples. On resume it takes the
    checkpoint's schedule (--use-checkpoint-opt_param-scheduler) or the flags' (--override-...); with
    neither, checkpointing.load refuses a checkpoint whose schedule differs before this is built."""
    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        GroupsView(*optimizers), init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
        wsd_decay_steps=None, lr_wsd_decay_style=None,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler)


# The schedule a checkpoint records (OptimizerParamScheduler.state_dict) in the flags' words; steps are
# samples, shown in iterations of this run's global batch.
SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                  "lr_decay_steps": "--lr-decay-iters", "lr_decay_style": "--lr-decay-style",
                  "start_wd": "--weight-decay", "wd_incr_steps": "--train-iters"}


def schedule_differences(args, saved: dict) -> list:
    """["--lr 1e-05 -> 0.01", ...]: where this run's schedule flags differ from a checkpoint's."""
    mine = lr_scheduler(args, []).state_dict()
    gbs = args.global_batch_size
    out = []
    for key, flag in SCHEDULE_FLAGS.items():
        if key in saved and saved[key] != mine[key]:
            old, new = saved[key], mine[key]
            if key.endswith("_steps"):
                old, new = f"{old / gbs:g}", f"{new / gbs:g}"
            out.append(f"{flag} {old} -> {new}")
    return out


def global_norm(sumsq_total: float) -> float:
    return math.sqrt(sumsq_total) if math.isfinite(sumsq_total) else float("nan")
